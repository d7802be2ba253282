"""Delivery evidence from nginx's access log, against a real nginx in accel and symlink modes:
complete, resumed and broken-off transfers; a re-read and a rotated log count each line once."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from sqlalchemy import func, select

from app.downloads.models import Delivery, DownloadLog, UserDownload
from app.downloads.index import index_one
from app.downloads.nginx_log import ingest_log, parse_line
from app.extensions import db
from tests.helpers import grant_link, make_product

SIZE = 3_000_000
GOOD = ("2026-11-23T13:45:00+00:00\t127.0.0.1\tGET\t/links/tok/a.bin\t200\t3000250\t3000000\tOK\t-\t-\t"
        "0.012\t5-1\tcurl/8.0")


def curl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-s", "-m", "20", *args], capture_output=True, timeout=30, check=False)


def wait_logged(front, count: int) -> list[str]:
    """nginx writes the line when the request ends; wait until ``count`` lines are there."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = front.access_log.read_text().splitlines() if front.access_log.exists() else []
        if len(lines) >= count:
            return lines
        time.sleep(0.05)
    pytest.fail(f"nginx logged fewer than {count} lines")


def broken_off_get(url: str, keep: int) -> None:
    """Read ``keep`` bytes of the body, then drop the connection (a shopper's line failing)."""
    parts = urlsplit(url)
    with socket.socket() as sock:
        sock.settimeout(10)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)  # before connect: a small window
        sock.connect((parts.hostname, parts.port))
        sock.sendall(f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: close\r\n\r\n".encode())
        got = 0
        while got < keep:
            chunk = sock.recv(16384)
            if not chunk:
                break
            got += len(chunk)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST


def behind_nginx(app, sidecar, nginx, mode: str, max_downloads: int):
    """A gunicorn sidecar in ``mode`` behind nginx, and a link to GAME through nginx: (front, link, url
    of the big file)."""
    server = sidecar(SOFTGOODS_DELIVERY=mode, SOFTGOODS_PROXY_COUNT="1")
    front = nginx(mode, upstream=server.url)
    link = grant_link(app, "GAME", max_downloads=max_downloads).replace(server.url, front.url)
    return front, link, link + "f/setup/big%20file.bin"


def fetch_in_two_parts(url: str, tmp_path: Path, product: Path) -> None:
    """A partial download and its resume, as curl makes them: together, the exact file."""
    assert curl("-L", "-r", "0-999999", "-o", str(tmp_path / "p1"), url).returncode == 0
    assert curl("-L", "-r", "1000000-", "-o", str(tmp_path / "p2"), url).returncode == 0
    assert (tmp_path / "p1").read_bytes() + (tmp_path / "p2").read_bytes() == product.read_bytes()


def deliveries(app) -> list[tuple[str | None, int, bool]]:
    with app.app_context():
        rows = db.session.execute(select(Delivery.evidence, Delivery.covered_bytes, Delivery.counted)
                                  .order_by(Delivery.id)).all()
        db.session.rollback()
        return [tuple(r) for r in rows]


def used(app) -> int:
    with app.app_context():
        value = db.session.scalar(select(UserDownload.downloads_used))
        db.session.rollback()
        return value


def ingest(app, path: Path, accel: bool):
    with app.app_context():
        report = ingest_log(db.session, path, accel=accel)
        db.session.commit()
        return report


@pytest.fixture
def product(app):
    make_product(app, "GAME", {"setup/big file.bin": SIZE, "small.txt": 2000})
    return Path(app.config["DOWNLOAD_DIR"]) / "GAME" / "setup" / "big file.bin"


@pytest.mark.backends("sqlite")
@pytest.mark.parametrize("mode", ["accel", "symlink"])
def test_nginx_deliveries_get_evidence_once(app, sidecar, nginx, product, tmp_path, mode):
    front, link, url = behind_nginx(app, sidecar, nginx, mode, max_downloads=3)
    # one file fetched in two resumed parts, another whole; HEAD and a Metalink are not deliveries
    fetch_in_two_parts(url, tmp_path, product)
    assert curl("-L", "-o", str(tmp_path / "s"), link + "f/small.txt").returncode == 0
    assert curl("-L", "-I", "-o", "/dev/null", url).returncode == 0
    wait_logged(front, 7 if mode == "symlink" else 4)  # symlink: the sidecar answers HEAD itself
    report = ingest(app, front.access_log, accel=mode == "accel")
    assert report.recorded == 3, report.summary()
    assert sorted(deliveries(app)) == sorted([("transferred", SIZE, True), ("transferred", 2000, True)])
    assert used(app) == 2
    with app.app_context():
        assert db.session.scalar(select(func.count()).select_from(DownloadLog)
                                 .where(DownloadLog.source == "nginx")) == 3

    # re-read: nothing new; rotate (rename + USR1, as logrotate does) and fetch again
    assert ingest(app, front.access_log, accel=mode == "accel").already == 3
    rotated = front.access_log.with_name("access.log.1")
    front.access_log.rename(rotated)
    os.kill(front.proc.pid, signal.SIGUSR1)
    time.sleep(0.3)
    assert curl("-L", "-o", str(tmp_path / "again"), url).returncode == 0
    wait_logged(front, 1)
    first = ingest(app, rotated, accel=mode == "accel")
    second = ingest(app, front.access_log, accel=mode == "accel")
    assert (first.recorded, second.recorded) == (0, 1)
    assert ingest(app, rotated, accel=mode == "accel").recorded == 0
    assert used(app) == 3  # a second full copy is a second delivery
    assert len(deliveries(app)) == 3


@pytest.mark.backends("sqlite")
def test_broken_off_transfer_uses_no_download(app, sidecar, nginx, product):
    huge = Path(app.config["DOWNLOAD_DIR"]) / "GAME" / "huge.iso"
    with open(huge, "wb") as fh:  # sparse: bigger than any socket buffer, cheap to make and hash
        fh.truncate(64 * 1024 * 1024)
    with app.app_context():
        index_one(db.session, app.config["DOWNLOAD_DIR"], "GAME", "huge.iso")
        db.session.commit()
    server = sidecar(SOFTGOODS_DELIVERY="accel", SOFTGOODS_PROXY_COUNT="1")
    front = nginx("accel", upstream=server.url)
    link = grant_link(app, "GAME", max_downloads=3).replace(server.url, front.url)
    broken_off_get(link + "f/huge.iso", 100_000)
    line = parse_line(wait_logged(front, 1)[-1] + "\n")
    assert line is not None and not line.complete and line.body_bytes < huge.stat().st_size
    assert ingest(app, front.access_log, accel=True).recorded == 1
    [(evidence, covered, counted)] = deliveries(app)
    assert (evidence, counted) == (None, False) and covered == line.body_bytes
    assert used(app) == 0


def test_pipe_mode_lines_are_left_to_the_sidecar(app, product, tmp_path):
    link = grant_link(app, "GAME")
    path = urlsplit(link).path + "f/small.txt"
    log = tmp_path / "access.log"
    log.write_text(GOOD.replace("/links/tok/a.bin", path).replace("3000000", "2000") + "\n")
    report = ingest(app, log, accel=False)
    assert (report.recorded, report.not_deliveries) == (0, 1)
    assert ingest(app, log, accel=True).recorded == 1  # the same line, in accel mode, is nginx's


@pytest.mark.parametrize("line", [
    GOOD.replace("\tOK\t", "\tOK\textra\t"),           # a field too many
    GOOD.replace("2026-11-23T13:45:00+00:00", "yesterday"),
    GOOD.replace("\t200\t", "\tOK\t"),
    GOOD.replace("\t3000000\t", "\tmany\t"),
    "127.0.0.1 - - [23/Nov/2026:13:45:00 +0000] \"GET / HTTP/1.1\" 200 612",  # nginx's "combined" format
])
def test_lines_in_another_format_are_not_read(line):
    assert parse_line(line + "\n") is None


def test_a_good_line_is_read():
    line = parse_line(GOOD + "\n")
    assert (line.status, line.body_bytes, line.complete, line.uri) == (200, 3_000_000, True, "/links/tok/a.bin")
    assert line.started < line.at and line.source_key == parse_line(GOOD + "\n").source_key


@pytest.mark.backends("sqlite")
@pytest.mark.parametrize("content, message", [
    (None, "no log file at"),
    ("127.0.0.1 - - [23/Nov/2026] \"GET / HTTP/1.1\" 200 612\n" * 3, "not an access log in the softgoods format"),
])
def test_ingest_command_refuses_bad_input_with_one_line(runner, tmp_path, content, message):
    path = tmp_path / "access.log"
    if content is not None:
        path.write_text(content)
    result = runner.invoke(args=["softgoods", "ingest-nginx-log", str(path)])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.backends("sqlite")
def test_ingest_command_summarises(runner, tmp_path):
    path = tmp_path / "access.log"
    path.write_text(GOOD + "\n" + GOOD[:40])  # the second line is still being written: left for next time
    result = runner.invoke(args=["softgoods", "ingest-nginx-log", str(path)])
    assert result.exit_code == 0, result.output
    assert "1 line(s), 0 delivery request(s) recorded" in result.output and "1 matching no grant" in result.output


def test_next_run_starts_where_the_last_one_stopped(app, runner, product, tmp_path):
    grant_link(app, "GAME", max_downloads=None)
    with app.app_context():
        db.session.scalar(select(UserDownload)).symlink_token = "tok"
        db.session.commit()
    line = GOOD.replace("/links/tok/a.bin", "/links/tok/small.txt").replace("3000000", "2000")
    log = tmp_path / "access.log"
    log.write_text(line + "\n")
    ingest_cmd = ["softgoods", "ingest-nginx-log", str(log)]
    assert "1 delivery request(s) recorded" in runner.invoke(args=ingest_cmd).output
    again = runner.invoke(args=ingest_cmd).output
    assert f"from byte {len(line) + 1}" in again and "0 line(s)" in again
    with open(log, "a") as fh:  # nginx appends; the next run reads only the new line
        fh.write(line.replace("\t5-1\t", "\t5-2\t") + "\n")
    assert "1 line(s), 1 delivery request(s) recorded" in runner.invoke(args=ingest_cmd).output
    rotated = log.with_name("access.log.1")
    log.rename(rotated)  # a renamed file keeps its inode: still nothing new in it
    assert "0 line(s)" in runner.invoke(args=["softgoods", "ingest-nginx-log", str(rotated)]).output
    log.write_text(line + "\n")  # a new file at the old name starts from the top; its line is known
    out = runner.invoke(args=ingest_cmd).output
    assert "1 line(s), 0 delivery request(s) recorded, 1 already recorded" in out
    with app.app_context():
        assert db.session.scalar(select(func.count()).select_from(DownloadLog)
                                 .where(DownloadLog.source == "nginx")) == 2
