"""Serving under gunicorn on loopback with real clients: curl, wget, aria2c, hostile paths, slow
clients, broken-off transfers, zero-copy, two download hosts."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from sqlalchemy import select

from app.downloads.models import DownloadLog, FileEntry
from app.extensions import db
from tests.helpers import grant_link, make_product

pytestmark = pytest.mark.backends("sqlite")

BIG = 24 * 1024 * 1024


def listing(link: str) -> dict:
    req = urllib.request.Request(link, headers={"Accept": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(*argv: str, cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, capture_output=True, timeout=timeout, check=False)


@pytest.fixture
def shop(app, sidecar):
    made = make_product(app, "MANUAL", {"big.bin": BIG, "ch1/intro.pdf": 70_000, "notes.txt": b"secret-free\n"})
    make_product(app, "OTHER", {"other.bin": b"OTHER-PRODUCT-BYTES"})
    server = sidecar()
    link = grant_link(app, "MANUAL", max_downloads=None)
    return {"server": server, "link": link, "dir": Path(app.config["DOWNLOAD_DIR"]), "id": made}


def test_curl_resume_and_wget_continue(shop, tmp_path):
    src = shop["dir"] / "MANUAL" / "big.bin"
    url = shop["link"] + "f/big.bin"
    part = tmp_path / "big.bin"
    assert run("curl", "-sf", "-r", "0-9999999", "-o", str(part), url).returncode == 0
    assert part.stat().st_size == 10_000_000
    assert run("curl", "-sf", "-C", "-", "-o", str(part), url).returncode == 0
    assert sha(part) == sha(src)
    wget_dir = tmp_path / "wget"
    wget_dir.mkdir()
    (wget_dir / "big.bin").write_bytes(src.read_bytes()[:3_000_000])
    assert run("wget", "-q", "-c", url, cwd=wget_dir).returncode == 0
    assert sha(wget_dir / "big.bin") == sha(src)


def test_aria2c_downloads_and_verifies_the_metalink(shop, tmp_path):
    files = {f["path"]: f for f in listing(shop["link"])["files"]}
    meta = tmp_path / "big.meta4"
    urllib.request.urlretrieve(files["big.bin"]["metalink_url"], meta)
    assert b"<pieces" in meta.read_bytes()
    out = run("aria2c", "-q", "-d", str(tmp_path / "a2"), "--check-integrity=true", "-M", str(meta), timeout=120)
    assert out.returncode == 0, out.stderr
    assert sha(tmp_path / "a2" / "big.bin") == files["big.bin"]["sha256"]


HOSTILE = [
    "../OTHER/other.bin", "../../secret.txt", "%2e%2e/OTHER/other.bin", "%2e%2e%2fOTHER%2fother.bin",
    "..%2F..%2Fsecret.txt", "%2E%2E/%2E%2E/etc/passwd", "....//secret.txt", "ch1/../../OTHER/other.bin",
    "/etc/passwd", "%2fetc%2fpasswd", "..%5c..%5csecret.txt", "ch1\\..\\notes.txt", "notes.txt%00.pdf",
    "..%c0%af..%c0%afsecret.txt", "ch1/%2e%2e/%2e%2e/OTHER/other.bin", "%252e%252e/OTHER/other.bin",
    "./notes.txt", "ch1//intro.pdf", "OTHER/other.bin", "MANUAL/notes.txt", "escape.txt", "ch1/./intro.pdf",
    ".packages/x.zip", "notes.txt/", "%2e%2e", "..", ".", "~root/.ssh/id_rsa",
]


def raw_get(base_url: str, path: str) -> tuple[int, bytes]:
    """A request with the path exactly as given (no client-side normalisation)."""
    u = urlsplit(base_url)
    with socket.create_connection((u.hostname, u.port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {u.netloc}\r\nConnection: close\r\n\r\n".encode("latin-1"))
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_traversal_battery_all_404_and_logged(app, shop, tmp_path):
    (tmp_path / "secret.txt").write_text("top secret")
    # A link that leaves the product's tree, indexed as if it were a product file (swapped after indexing).
    escape = shop["dir"] / "MANUAL" / "escape.txt"
    os.symlink(tmp_path / "secret.txt", escape)
    with app.app_context():
        st = os.stat(escape)
        db.session.add(FileEntry(sku="MANUAL", path="escape.txt", size=st.st_size, mtime_ns=st.st_mtime_ns,
                                 media_type="text/plain", sha256="0" * 64, piece_size=1 << 20, piece_hashes=""))
        db.session.commit()
    base = urlsplit(shop["link"]).path + "f/"
    assert len(HOSTILE) >= 20
    for hostile in HOSTILE:
        status, body = raw_get(shop["server"].url, base + hostile)
        assert status == 404, f"{hostile!r} answered {status}"
        assert b"top secret" not in body and b"OTHER-PRODUCT" not in body and b"root:" not in body
    with app.app_context():
        refused = db.session.scalars(select(DownloadLog).where(DownloadLog.outcome == "refused")).all()
    assert len(refused) >= len(HOSTILE) - 1  # the bare "..": gunicorn/werkzeug may refuse it before routing
    assert all(r.status == 404 for r in refused)


def test_two_sidecars_serve_the_same_link(app, shop, sidecar):
    second = sidecar()
    first_url = shop["link"] + "f/ch1/intro.pdf"
    other_url = first_url.replace(shop["server"].url, second.url)
    a = urllib.request.urlopen(first_url, timeout=10)
    b = urllib.request.urlopen(other_url, timeout=10)
    assert a.read() == b.read() and a.headers["ETag"] == b.headers["ETag"]
    a.close(), b.close()
    assert listing(shop["link"].replace(shop["server"].url, second.url))["files"] == [
        {**f, "url": f["url"].replace(shop["server"].url, second.url),
         "metalink_url": f["metalink_url"].replace(shop["server"].url, second.url)}
        for f in listing(shop["link"])["files"]]


def _worker_read_syscalls(server) -> int:
    total = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.getpgid(int(pid)) != server.proc.pid:
                    continue
                io = Path(f"/proc/{pid}/io").read_text()
            except (OSError, ProcessLookupError):
                continue
            total += int(next(line.split()[1] for line in io.splitlines() if line.startswith("syscr")))
    return total


@pytest.mark.parametrize("range_header", [None, "bytes=1000-"])
def test_bodies_leave_by_sendfile_not_a_read_loop(shop, range_header):
    url = shop["link"] + "f/big.bin"
    before = _worker_read_syscalls(shop["server"])
    req = urllib.request.Request(url, headers={"Range": range_header} if range_header else {})
    with urllib.request.urlopen(req, timeout=30) as resp:
        n = len(resp.read())
    after = _worker_read_syscalls(shop["server"])
    assert n == BIG - (1000 if range_header else 0)
    # A Python loop would need BIG / 8 KiB = 3,072 reads; sendfile needs none for the body.
    assert after - before < 300, f"{after - before} read syscalls for one {n}-byte response"


def test_a_broken_off_download_records_what_really_left(app, shop):
    u = urlsplit(shop["link"] + "f/big.bin")
    with socket.create_connection((u.hostname, u.port), timeout=10) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        s.sendall(f"GET {u.path} HTTP/1.1\r\nHost: {u.netloc}\r\n\r\n".encode())
        got = 0
        while got < 1_000_000:
            got += len(s.recv(65536))
    deadline = time.monotonic() + 15
    row = None
    while time.monotonic() < deadline and row is None:
        with app.app_context():
            row = db.session.scalar(select(DownloadLog).where(DownloadLog.path == "big.bin"))
        time.sleep(0.2)
    assert row is not None and row.outcome == "aborted" and row.status == 200
    assert got <= row.bytes_sent < BIG - 1_000_000


def test_slow_downloads_do_not_block_listings(shop, tmp_path):
    url = shop["link"] + "f/big.bin"
    slow = [subprocess.Popen(["curl", "-s", "--limit-rate", "50K", "-m", "8", "-o", str(tmp_path / f"s{i}"), url])
            for i in range(40)]
    try:
        time.sleep(1.5)
        timings = []
        for _ in range(20):
            t0 = time.monotonic()
            assert listing(shop["link"])["files"]
            timings.append(time.monotonic() - t0)
        assert sorted(timings)[-2] < 0.5, timings
        assert all((tmp_path / f"s{i}").exists() for i in range(40))
    finally:
        for p in slow:
            p.terminate()
            p.wait(10)


def test_head_and_not_modified(shop):
    url = shop["link"] + "f/ch1/intro.pdf"
    head = urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=10)
    assert head.headers["Content-Length"] == "70000" and head.read() == b""
    etag = head.headers["ETag"]
    with pytest.raises(urllib.error.HTTPError) as not_modified:
        urllib.request.urlopen(urllib.request.Request(url, headers={"If-None-Match": etag}), timeout=10)
    assert not_modified.value.code == 304
    not_modified.value.close()
    head.close()


def test_two_sidecars_share_the_guess_limit_through_redis(app, shop, sidecar):
    import uuid

    shared = {"REDIS_URL": "redis://127.0.0.1:6379/0", "SOFTGOODS_LINK_GUESS_LIMIT": "3 per minute",
              "SOFTGOODS_RATELIMIT_PREFIX": "sgtest-" + uuid.uuid4().hex}
    first, second = sidecar(**shared), sidecar(**shared)
    path = urlsplit(shop["link"]).path
    forged = path[:-9] + ("x" if path[-9] != "x" else "y") + path[-8:]
    codes = [raw_get(first.url, forged)[0] for _ in range(3)]
    assert codes == [404, 404, 404]
    assert raw_get(second.url, forged)[0] == 429  # the other host knows this address already


def test_metrics_count_transfers_across_workers(shop):
    url = shop["link"] + "f/big.bin"
    metrics_url = shop["server"].url + "/metrics"
    slow = subprocess.Popen(["curl", "-s", "--limit-rate", "200K", "-m", "12", "-o", "/dev/null", url])

    def scrape() -> dict[str, int]:
        text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
        return {line.split()[0]: int(line.split()[1]) for line in text.splitlines()
                if line.startswith("softgoods_") and "{" not in line}

    try:
        deadline = time.monotonic() + 10
        seen = scrape()
        while time.monotonic() < deadline and seen["softgoods_transfers_in_progress"] != 1:
            time.sleep(0.2)
            seen = scrape()
        assert seen["softgoods_transfers_in_progress"] == 1
    finally:
        slow.terminate()
        slow.wait(10)
    # The broken-off transfer ends: the gauge drops, and the bytes counted by the workers agree with
    # the download log (its row is committed just after the counter moves, hence the wait).
    deadline = time.monotonic() + 15
    seen = scrape()
    while time.monotonic() < deadline and (seen["softgoods_transfers_in_progress"] != 0 or
                                           seen["softgoods_sidecar_bytes_sent_total"] != seen["softgoods_bytes_sent_total"]):
        time.sleep(0.2)
        seen = scrape()
    assert seen["softgoods_transfers_in_progress"] == 0
    assert 0 < seen["softgoods_sidecar_bytes_sent_total"] == seen["softgoods_bytes_sent_total"] < BIG
