"""The download limit is per file (DESIGN.md "A download counts once per complete delivery of a file"),
and an indexed file that cannot be read answers 503, is logged and flagged, never a 500.
Test client of the sidecar app, on both backends."""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import pytest
from sqlalchemy import func, select

from app.downloads.models import Delivery, DownloadLog, FileEntry, UserDownload
from app.extensions import db
from tests.helpers import grant_link, make_product
from tests.servers import path_of

JSON = {"Accept": "application/json"}
FILES = {"readme.txt": b"hello reader\n", "ch1/intro.pdf": 5000, "ch1/deep/notes.md": 300}


def left(sc, link: str) -> dict[str, int | None]:
    listing = sc.get(link, headers=JSON)
    assert listing.status_code == 200, listing.get_data(as_text=True)
    return {f["path"]: f["downloads_left"] for f in listing.get_json()["files"]}


def test_a_three_file_product_delivers_each_file_max_downloads_times(app, sc):
    """max_downloads=2 on 3 files: every file twice (six complete downloads, the order ships); a third
    copy of one file is refused with 403 before any byte while the others still work; the listing
    answers 403 only once every file is used up."""
    make_product(app, "BOOK", FILES)
    link = path_of(grant_link(app, "BOOK", max_downloads=2))
    assert left(sc, link) == {"readme.txt": 2, "ch1/intro.pdf": 2, "ch1/deep/notes.md": 2}
    for name in FILES:
        assert sc.get(link + "f/" + name).status_code == 200
    assert left(sc, link) == {"readme.txt": 1, "ch1/intro.pdf": 1, "ch1/deep/notes.md": 1}
    assert sc.get(link + "f/readme.txt").data == FILES["readme.txt"]
    refused = sc.get(link + "f/readme.txt", headers=JSON)
    assert refused.status_code == 403 and refused.get_json()["error"] == "All downloads of this file have been used."
    assert "Content-Range" not in refused.headers and FILES["readme.txt"] not in refused.data
    page = sc.get(link)  # the HTML listing: the limit per file and each file's own count
    text = page.get_data(as_text=True)
    assert page.status_code == 200 and "2 downloads per file" in text
    assert [c.split("<")[0] for c in text.split('class="downloads-left">')[1:]] == ["1", "1", "0"]  # by path
    assert sc.get(link + "f/ch1/intro.pdf").status_code == 200  # the other files still work
    assert left(sc, link) == {"readme.txt": 0, "ch1/intro.pdf": 0, "ch1/deep/notes.md": 1}
    assert sc.get(link + "f/ch1/deep/notes.md").status_code == 200
    with app.app_context():
        grant = db.session.scalar(select(UserDownload))
        assert (grant.downloads_used, grant.downloads_held, grant.order.status) == (6, 0, "shipped")
        logged = db.session.scalars(select(DownloadLog).where(DownloadLog.status == 403)).all()
        assert [(r.path, r.bytes_sent, r.outcome) for r in logged] == [("readme.txt", 0, "refused")]
    for headers in ({}, JSON):  # now every file is used up
        gone = sc.get(link, headers=headers)
        assert gone.status_code == 403 and "All downloads of this link have been used." in gone.get_data(as_text=True)


def test_unlimited_links_list_null_downloads_left(app, sc):
    make_product(app, "BOOK", FILES)
    link = path_of(grant_link(app, "BOOK", max_downloads=None))
    for _ in range(3):
        assert sc.get(link + "f/readme.txt").status_code == 200
    assert set(left(sc, link).values()) == {None}
    assert "per file" not in sc.get(link).get_data(as_text=True)


def test_a_package_is_one_file_with_its_own_limit(app, sc, runner):
    make_product(app, "SRC", FILES)
    for args in (["package", "create", "BUNDLE"], ["package", "add", "BUNDLE", "SRC/readme.txt", "SRC/ch1/intro.pdf"]):
        result = runner.invoke(args=["softgoods", *args])
        assert result.exit_code == 0, result.output
    make_product(app, "PKG", None, package_name="BUNDLE")
    link = path_of(grant_link(app, "PKG", max_downloads=1))
    assert left(sc, link) == {"BUNDLE.zip": 1}
    assert sc.get(link + "f/BUNDLE.zip").status_code == 200
    assert sc.get(link + "f/BUNDLE.zip").status_code == 403
    assert sc.get(link, headers=JSON).status_code == 403


def _make_unreadable(full: Path, how: str) -> None:
    """Unreadable for root too (tests run as root, so chmod 000 would not do)."""
    if how == "directory":
        full.unlink()
        full.mkdir()
    else:  # the file moved away: the indexed path is a link that leads nowhere
        full.rename(full.with_name(".moved-away"))
        full.symlink_to(".nowhere")


@pytest.mark.parametrize("mode", ["pipe", "accel"])
@pytest.mark.parametrize("how", ["directory", "dangling-symlink"])
def test_an_unreadable_product_file_answers_503_is_logged_and_flagged(app, sc, sidecar_app, caplog, how, mode):
    sidecar_app.config["DELIVERY"] = mode
    make_product(app, "BOOK", FILES)
    link = path_of(grant_link(app, "BOOK", max_downloads=1))
    full = Path(app.config["DOWNLOAD_DIR"]) / "BOOK" / "ch1" / "intro.pdf"
    _make_unreadable(full, how)
    if how == "directory":  # the index still matches what stat() says, so only opening the file can tell
        st = os.stat(full)
        with app.app_context():
            entry = db.session.scalar(select(FileEntry).where(FileEntry.path == "ch1/intro.pdf"))
            entry.size, entry.mtime_ns = st.st_size, st.st_mtime_ns
            db.session.commit()
    with caplog.at_level(logging.ERROR, logger="softgoods.sidecar"):
        page = sc.get(link + "f/ch1/intro.pdf")
        as_json = sc.get(link + "f/ch1/intro.pdf", headers=JSON)
    text = page.get_data(as_text=True)
    assert page.status_code == 503 and "temporarily unavailable" in text and "Traceback" not in text
    assert as_json.status_code == 503 and as_json.get_json()["error"] == "This file is temporarily unavailable."
    assert any("ch1/intro.pdf" in r.getMessage() and "flagged" in r.getMessage() for r in caplog.records)
    with app.app_context():
        entry = db.session.scalar(select(FileEntry).where(FileEntry.path == "ch1/intro.pdf"))
        assert entry.flagged is not None and entry.flagged.startswith("unreadable on disk: ")
        grant = db.session.scalar(select(UserDownload))
        assert (grant.downloads_used, grant.downloads_held) == (0, 0)  # nothing reserved, nothing counted
        refused = db.session.scalars(select(DownloadLog).where(DownloadLog.path == "ch1/intro.pdf")).all()
        assert [(r.status, r.outcome, r.bytes_sent) for r in refused] == [(503, "refused", 0)] * 2
    assert sc.get(link + "f/readme.txt").status_code == 200  # the other files are served
    if how == "dangling-symlink":  # the owner puts the file back: served again, the flag goes away
        full.unlink()
        full.symlink_to(".moved-away")
        assert sc.get(link + "f/ch1/intro.pdf").status_code == 200
        with app.app_context():
            assert db.session.scalar(select(FileEntry.flagged).where(FileEntry.path == "ch1/intro.pdf")) is None


MiB = 1 << 20


def _raw_get(port: int, path: str, range_header: str | None = None) -> "socket.socket":
    import socket

    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n"
    if range_header:
        head += f"Range: {range_header}\r\n"
    sock.sendall((head + "\r\n").encode())
    return sock


def _read_all(sock) -> tuple[int, dict[str, str], bytes]:
    chunks = []
    while data := sock.recv(1 << 20):
        chunks.append(data)
    sock.close()
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def test_twelve_overlapping_unread_ranges_carry_no_more_than_one_delivery_budget(app, sidecar, tmp_path):
    """Issue 12 item 1, the attack as it was made: max_downloads=1, an 8 MiB file, twelve sockets send
    ``Range: bytes=k-`` (k = 0..11) a moment apart and read nothing until all are sent. Intact bytes
    received stay within one delivery's budget; the rest are refused with 403 before any byte."""
    import time

    size = 8 * MiB
    make_product(app, "BIG", {"big.iso": size})
    server = sidecar()
    link = path_of(grant_link(app, "BIG", max_downloads=1))
    content = (Path(app.config["DOWNLOAD_DIR"]) / "BIG" / "big.iso").read_bytes()
    sockets = []
    for k in range(12):
        sockets.append(_raw_get(server.port, link + "f/big.iso", f"bytes={k}-"))
        time.sleep(0.05)
    answers = [_read_all(sock) for sock in sockets]
    served = [(k, body) for k, (status, _h, body) in enumerate(answers) if status == 206]
    assert all(content[k:k + len(body)] == body for k, body in served)
    intact = sum(len(body) for k, body in served)
    assert intact <= size * 1.5, [(k, len(b)) for k, b in served]
    assert [status for status, _h, _b in answers].count(403) == 12 - len(served)
    with app.app_context():
        grant = db.session.scalars(select(UserDownload).where(UserDownload.sku == "BIG")).one()
        assert (grant.downloads_used, grant.downloads_held) == (1, 0)
        deliveries = db.session.scalars(select(Delivery).where(Delivery.grant_id == grant.id)).all()
        assert len(deliveries) == 1 and deliveries[0].charged_bytes <= deliveries[0].budget_bytes
        assert db.session.scalar(select(func.count(DownloadLog.id)).where(DownloadLog.status == 403)) \
            == 12 - len(served)


def test_many_part_ranges_are_one_cheap_answer_with_one_reservation_and_one_log_row(app, sidecar):
    """Issue 12 item 2: 2,000 parts in 8 KB of header are coalesced (one 206 part), fast; 17 parts
    after coalescing answer the whole file with 200; 32 range-specs that coalesce to 16 parts are one
    multipart answer. Each request is one reservation and one download_log row."""
    import time

    size = 64 * 1024
    make_product(app, "PARTS", {"p.bin": size})
    server = sidecar()
    link = path_of(grant_link(app, "PARTS", max_downloads=None)) + "f/p.bin"
    content = (Path(app.config["DOWNLOAD_DIR"]) / "PARTS" / "p.bin").read_bytes()
    began = time.monotonic()
    status, headers, body = _read_all(_raw_get(server.port, link, "bytes=" + ",".join(["0-1"] * 2000)))
    assert time.monotonic() - began < 2
    assert (status, headers["content-range"], body) == (206, f"bytes 0-1/{size}", content[:2])
    seventeen = "bytes=" + ",".join(f"{i * 100}-{i * 100 + 9}" for i in range(17))
    assert _read_all(_raw_get(server.port, link, seventeen))[::2] == (200, content)
    sixteen = "bytes=" + ",".join(f"{i * 100}-{i * 100 + 9},{i * 100 + 10}-{i * 100 + 19}" for i in range(16))
    status, headers, body = _read_all(_raw_get(server.port, link, sixteen))
    assert status == 206 and headers["content-type"].startswith("multipart/byteranges")
    assert [int(m) for m in re.findall(rb"Content-Range: bytes (\d+)-", body)] == [i * 100 for i in range(16)]
    with app.app_context():
        rows = db.session.scalars(select(DownloadLog).order_by(DownloadLog.id)).all()
        assert [(r.status, r.bytes_sent) for r in rows if r.method == "GET" and r.bytes_sent] \
            == [(206, 2), (200, size), (206, 16 * 20)]
        (d,) = db.session.scalars(select(Delivery)).all()
        assert d.open_ranges == "[]" and d.attempts == 3
        assert json.loads(d.coverage) == [[0, size]]


def test_a_whole_file_request_of_a_sigkilled_sidecar_does_not_block_the_resume(app, sidecar):
    """The in-flight request's worker is gone (SIGKILL): the restarted sidecar's resume from the middle
    continues the same delivery at once (no 60 s wait, no second download), and completes it."""
    import signal
    import time

    size = 8 * MiB
    make_product(app, "BIG", {"big.iso": size})
    first = sidecar()
    link = path_of(grant_link(app, "BIG", max_downloads=1)) + "f/big.iso"
    content = (Path(app.config["DOWNLOAD_DIR"]) / "BIG" / "big.iso").read_bytes()
    stalled = _raw_get(first.port, link)  # reserved, never read: in flight when the sidecar dies
    stalled.recv(1)
    first.stop(signal.SIGKILL)
    stalled.close()
    second = sidecar()
    began = time.monotonic()
    status, _headers, body = _read_all(_raw_get(second.port, link, f"bytes={3 * MiB}-"))
    assert (status, body == content[3 * MiB:]) == (206, True)
    assert time.monotonic() - began < 10
    status, _headers, body = _read_all(_raw_get(second.port, link, f"bytes=0-{3 * MiB - 1}"))
    assert (status, body == content[:3 * MiB]) == (206, True)
    with app.app_context():
        grant = db.session.scalars(select(UserDownload).where(UserDownload.sku == "BIG")).one()
        assert (grant.downloads_used, grant.downloads_held) == (1, 0)
        counted = db.session.scalars(select(Delivery).where(Delivery.counted.is_(True))).all()
        assert len(counted) == 1


@pytest.mark.parametrize("fast", [True, False])
def test_the_heartbeat_keeps_a_moving_transfer_live_and_lets_a_stalled_one_age(app, sc, sidecar_app, fast):
    """A long transfer refreshes its range's ``seen`` time only while its bytes move (inflight)."""
    from app.downloads import serving

    sidecar_app.config["SIDECAR_FAST_PATH"] = fast
    make_product(app, "BIG", {"big.iso": 4 * MiB})
    link = path_of(grant_link(app, "BIG", max_downloads=1))
    response = sc.get(link + "f/big.iso", buffered=False)
    chunks = iter(response.response)
    next(chunks)

    def seen() -> int:
        with app.app_context():
            (d,) = db.session.scalars(select(Delivery).execution_options(populate_existing=True)).all()
            return json.loads(d.open_ranges)[0][7]

    def age(seconds: int) -> int:
        with app.app_context():
            (d,) = db.session.scalars(select(Delivery)).all()
            ranges = json.loads(d.open_ranges)
            ranges[0][7] -= seconds
            d.open_ranges = json.dumps(ranges)
            db.session.commit()
            return ranges[0][7]

    aged = age(50)
    next(chunks)                               # bytes moved since the transfer started
    serving.heartbeat.beat()
    assert seen() > aged + 40
    aged = age(50)
    serving.heartbeat.beat()                   # nothing moved since the last beat: no refresh
    assert seen() == aged
    response.close()
    with app.app_context():
        (d,) = db.session.scalars(select(Delivery)).all()
        assert d.open_ranges == "[]"
