"""The verifying client against the real sidecar under gunicorn, through a proxy that breaks things.

Files are a few MiB (1 MiB pieces), so every test is bounded to seconds.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from app.downloads.index import index_files
from app.downloads.models import Delivery, UserDownload
from app.extensions import db
from app.store.models import Order
from tests.helpers import ROOT, grant_link, make_product

CLIENT = ROOT / "sidecar" / "client" / "softgoods_fetch.py"
MiB = 1 << 20
PIECE = MiB
SLACK = 64 * 1024  # listing, Metalink, headers


def fetch(link: str, directory: Path, *extra: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CLIENT), link, "-d", str(directory), "-v", *extra],
                          capture_output=True, text=True, timeout=timeout)


def start_fetch(link: str, directory: Path) -> subprocess.Popen:
    """The client in the background; its messages go to ``<directory>/../client.log``."""
    with open(directory.parent / "client.log", "ab") as log:
        return subprocess.Popen([sys.executable, str(CLIENT), link, "-d", str(directory), "-v"],
                                stdout=subprocess.DEVNULL, stderr=log)


def client_log(directory: Path) -> str:
    return (directory.parent / "client.log").read_text()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def state(app, sku: str = "KIT") -> tuple[UserDownload, list[Delivery], Order]:
    grant = db.session.scalars(select(UserDownload).where(UserDownload.sku == sku)
                               .execution_options(populate_existing=True)).one()
    deliveries = list(db.session.scalars(select(Delivery).where(Delivery.grant_id == grant.id)
                                         .order_by(Delivery.id).execution_options(populate_existing=True)))
    order = db.session.get(Order, grant.order_id, populate_existing=True)
    return grant, deliveries, order


def through_proxy(app, proxy) -> None:
    app.config["SIDECAR_URL"] = proxy.url  # links minted from now on lead through the proxy


def wait_for(condition, timeout: float = 30, message: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {message}")
        time.sleep(0.02)


def test_client_fetches_verifies_confirms_and_a_second_run_changes_nothing(app, sidecar, tmp_path):
    sidecar()
    make_product(app, "KIT", {"manual.pdf": 3 * MiB + 123, "extras/tool.bin": 700_000, "notes/read me ü.txt": 5000},
                 max_downloads=5)
    link = grant_link(app, "KIT")
    installed = Path(sys.executable).parent / "softgoods-fetch"  # the command scripts/setup installs
    result = subprocess.run([str(installed), f"Your download: {link} (valid 7 days)", "-d", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr
    assert "all 3 file(s) verified" in result.stdout
    assert "ETA" not in result.stderr  # no progress bar when not on a terminal
    disk = Path(app.config["DOWNLOAD_DIR"]) / "KIT"
    for rel in ("manual.pdf", "extras/tool.bin", "notes/read me ü.txt"):
        assert sha(tmp_path / "out" / rel) == sha(disk / rel)
    assert not list((tmp_path / "out").rglob("*.part*"))
    with app.app_context():
        grant, deliveries, order = state(app)
        assert [d.evidence for d in deliveries] == ["verified"] * 3
        assert (grant.downloads_used, grant.downloads_held) == (3, 0)
        assert (order.status, order.evidence) == ("shipped", "verified")
    again = fetch(link, tmp_path / "out")  # files present and intact: nothing fetched, nothing counted
    assert again.returncode == 0, again.stderr
    with app.app_context():
        assert state(app)[0].downloads_used == 3


def test_a_spent_nonce_makes_the_client_prove_again_with_a_fresh_one(app, sidecar, tmp_path):
    """A confirm whose answer was lost spent the nonce the client holds: its retry gets 409, and the
    client reads the list again and proves the file it already has (one read, nothing re-downloaded)."""
    import importlib.util
    import json
    import urllib.request

    sidecar()
    make_product(app, "KIT", {"a.bin": 2 * MiB}, max_downloads=3)
    link = grant_link(app, "KIT")
    assert fetch(link, tmp_path / "out").returncode == 0
    (tmp_path / "out" / ".softgoods-fetch.json").unlink()  # the client forgot that the shop has its proof
    request = urllib.request.Request(link, headers={"Accept": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        stale = json.load(response)["files"][0]
    spec = importlib.util.spec_from_file_location("softgoods_fetch", CLIENT)
    client = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(client)
    data = (tmp_path / "out" / "a.bin").read_bytes()
    body = json.dumps({"path": "a.bin", "sha256": stale["sha256"], "proof": hmac.new(
        bytes.fromhex(stale["proof_nonce"]), data, hashlib.sha256).hexdigest()}).encode()
    spend = urllib.request.Request(link + "confirm", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(spend, timeout=30) as response:  # the confirm whose answer the client lost
        assert response.status == 200
    http = client.Http(10)
    try:
        client.fetch_one(http, link, stale, str(tmp_path / "out"), False)  # holds the spent nonce
    finally:
        http.close()
    with app.app_context():
        grant, deliveries, _order = state(app)
        assert [d.evidence for d in deliveries] == ["verified"] and grant.downloads_used == 1
        assert sum(d.attempts for d in deliveries) == 1  # proven from the file here: not fetched again


@pytest.mark.backends("sqlite")
@pytest.mark.parametrize("fault", ["cuts", "flips"])
def test_faults_cost_at_most_one_piece_each(app, sidecar, fault_proxy, tmp_path, fault):
    server = sidecar()
    size = 6 * MiB + 4321
    make_product(app, "KIT", {"big.iso": size})
    rng = random.Random(6)
    points = sorted(rng.randrange(200_000, size - 200_000) for _ in range(3))
    proxy = fault_proxy(server.port, **{fault: points})
    through_proxy(app, proxy)
    result = fetch(grant_link(app, "KIT"), tmp_path)
    assert result.returncode == 0, result.stderr
    assert sha(tmp_path / "big.iso") == sha(Path(app.config["DOWNLOAD_DIR"]) / "KIT" / "big.iso")
    assert proxy.faults_done == 3
    assert proxy.forwarded <= size + 3 * PIECE + SLACK, (proxy.forwarded, result.stderr)
    with app.app_context():
        grant, deliveries, _ = state(app)
        assert grant.downloads_used == 1 and any(d.evidence == "verified" for d in deliveries)


@pytest.mark.backends("sqlite")
def test_flipped_bytes_every_time_stop_with_a_clear_message(app, sidecar, fault_proxy, tmp_path):
    server = sidecar()
    make_product(app, "KIT", {"big.iso": 2 * MiB})
    # the same piece damaged on every pass
    proxy = fault_proxy(server.port, flips=[300_000, 2 * MiB + 300_000, 2 * MiB + 2 * PIECE])
    proxy.cuts_keep = lambda position, data: len(data)
    through_proxy(app, proxy)
    result = fetch(grant_link(app, "KIT"), tmp_path)
    assert result.returncode == 1
    assert "arrived damaged 3 times" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "big.iso").exists()


@pytest.mark.backends("sqlite")
def test_sidecar_killed_mid_transfer_then_restarted_client_resumes_one_download(app, sidecar, fault_proxy,
                                                                               tmp_path):
    first = sidecar()
    size = 8 * MiB
    make_product(app, "KIT", {"big.iso": size})
    proxy = fault_proxy(first.port, rate=4 * MiB)
    through_proxy(app, proxy)
    client = start_fetch(grant_link(app, "KIT"), tmp_path / "out")
    try:
        wait_for(lambda: proxy.forwarded > 3 * MiB, message="a third of the file")
        first.stop(signal.SIGKILL)
        second = sidecar()
        proxy.retarget(second.port)
        assert client.wait(90) == 0, client_log(tmp_path / "out")
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    assert sha(tmp_path / "out" / "big.iso") == sha(Path(app.config["DOWNLOAD_DIR"]) / "KIT" / "big.iso")
    assert proxy.forwarded <= size + PIECE + SLACK
    with app.app_context():
        grant, deliveries, _ = state(app)
        assert (grant.downloads_used, grant.downloads_held) == (1, 0)
        assert [d.evidence for d in deliveries if d.counted] == ["verified"]


@pytest.mark.backends("sqlite")
def test_client_killed_and_started_again_resumes_from_its_state(app, sidecar, fault_proxy, tmp_path):
    server = sidecar()
    # Several seconds at the proxy's rate: the kill lands mid-file, with most of it still to come.
    size = 24 * MiB
    make_product(app, "KIT", {"big.iso": size})
    proxy = fault_proxy(server.port, rate=4 * MiB)
    through_proxy(app, proxy)
    link = grant_link(app, "KIT")
    client = start_fetch(link, tmp_path / "out")
    wait_for(lambda: proxy.forwarded > 4 * MiB, message="half the file")
    client.send_signal(signal.SIGKILL)
    client.wait()
    assert (tmp_path / "out" / "big.iso.part.json").exists()
    proxy.rate = None
    result = fetch(link, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert sha(tmp_path / "out" / "big.iso") == sha(Path(app.config["DOWNLOAD_DIR"]) / "KIT" / "big.iso")
    # the piece in progress, plus what sat in socket buffers when the client died
    assert proxy.forwarded <= size + 2 * PIECE + SLACK, (proxy.forwarded - size, result.stderr)
    with app.app_context():
        assert state(app)[0].downloads_used == 1


@pytest.mark.backends("sqlite")
def test_file_replaced_during_download_never_ends_as_a_mix(app, sidecar, fault_proxy, tmp_path):
    server = sidecar()
    # The shop replaces the file while the old version is known to be mid-way: the proxy holds the
    # transfer after 2 MiB until the new version is indexed. While it holds, the sidecar can get ahead
    # by its send buffer (tcp_wmem max, 4 MiB) and the proxy's fixed 256 KiB receive buffer only, far
    # less than the file, so the old delivery cannot complete (and count) before the swap.
    size = 24 * MiB
    make_product(app, "KIT", {"big.iso": size})
    proxy = fault_proxy(server.port, hold_at=2 * MiB, upstream_buffer=256 * 1024)
    through_proxy(app, proxy)
    client = start_fetch(grant_link(app, "KIT"), tmp_path / "out")
    try:
        assert proxy.holding.wait(30), client_log(tmp_path / "out")
        new = os.urandom(size + 1000)
        staged = Path(app.config["DOWNLOAD_DIR"]) / "KIT" / ".big.iso.tmp"
        staged.write_bytes(new)
        os.replace(staged, staged.with_name("big.iso"))
        with app.app_context():
            index_files(db.session, app.config["DOWNLOAD_DIR"])
            db.session.commit()
            _, deliveries, _ = state(app)
            assert [d.evidence for d in deliveries] == [None], "the old version finished before the swap"
        proxy.release()
        assert client.wait(90) == 0, client_log(tmp_path / "out")
    finally:
        proxy.release()
        if client.poll() is None:
            client.kill()
            client.wait()
    assert (tmp_path / "out" / "big.iso").read_bytes() == new
    assert "starting this file over" in client_log(tmp_path / "out")  # it did see the old version first
    with app.app_context():
        grant, deliveries, _ = state(app)
        assert grant.downloads_used == 1
        assert [d.evidence for d in deliveries if d.counted] == ["verified"]


def test_bad_links_stop_with_one_line_and_no_traceback(app, sidecar, tmp_path):
    server = sidecar()
    for argument, message in [("hello", "no download link found"),
                              (f"{server.url}/d/forged-receipt/", "not valid"),
                              ("x" * 40, "--server")]:
        result = fetch(argument, tmp_path)
        assert result.returncode == 1 and message in result.stderr, (argument, result.stderr)
        assert "Traceback" not in result.stderr


@pytest.mark.backends("sqlite")
def test_progress_bar_with_speed_and_time_left_on_a_terminal(app, sidecar, fault_proxy, tmp_path):
    import pty

    server = sidecar()
    make_product(app, "KIT", {"big.iso": 4 * MiB})
    through_proxy(app, fault_proxy(server.port, rate=4 * MiB))  # a second or so: the bar redraws
    leader, follower = pty.openpty()
    try:
        client = subprocess.Popen([sys.executable, str(CLIENT), grant_link(app, "KIT"), "-d", str(tmp_path)],
                                  stdout=subprocess.DEVNULL, stderr=follower)
        assert client.wait(60) == 0
        os.close(follower)
        follower = None
        shown = b""
        while True:
            try:
                data = os.read(leader, 65536)
            except OSError:  # EIO: the terminal's other side is closed and drained
                break
            if not data:
                break
            shown += data
    finally:
        if follower is not None:
            os.close(follower)
        os.close(leader)
    text = shown.decode(errors="replace")
    assert "big.iso" in text and "ETA" in text and "MiB/s" in text and "100.0%" in text


@pytest.mark.backends("sqlite")
def test_an_unwritable_folder_is_one_clear_line(app, sidecar, tmp_path):
    sidecar()
    make_product(app, "KIT", {"a.bin": 1000})
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the folder should be")
    result = fetch(grant_link(app, "KIT"), blocker)
    assert result.returncode == 1 and "cannot write" in result.stderr and "Traceback" not in result.stderr


def test_rerun_after_the_last_download_needs_no_server_and_a_new_folder_gets_one_clear_line(app, sidecar, tmp_path):
    """max_downloads=1: the first run uses it up. Running again in the same folder finds every file
    verified locally and says so (exit 0, nothing counted); in an empty folder it stops with one line."""
    sidecar()
    make_product(app, "SOLO", {"only.bin": 2 * MiB + 5}, max_downloads=1)
    link = grant_link(app, "SOLO")
    first = fetch(link, tmp_path / "out")
    assert first.returncode == 0, first.stderr
    with app.app_context():
        assert state(app, "SOLO")[0].downloads_left == 0
    again = fetch(link, tmp_path / "out")
    assert again.returncode == 0, again.stderr
    assert "already verified" in again.stdout and "Traceback" not in again.stderr
    assert "All downloads of this link have been used" in again.stdout + again.stderr
    elsewhere = fetch(link, tmp_path / "elsewhere")
    assert elsewhere.returncode == 1
    lines = [line for line in elsewhere.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in elsewhere.stderr, elsewhere.stderr
    assert lines[0].startswith("softgoods-fetch: error: All downloads of this link have been used."), lines
    assert "contact the shop" in lines[0]
    with app.app_context():
        assert state(app, "SOLO")[0].downloads_used == 1


def test_client_finishes_and_confirms_a_delivery_that_started_before_expiry(app, sidecar, tmp_path):
    """Within the expiry grace the client lists, fetches the Metalink, completes and confirms the file
    whose delivery began before the link expired."""
    from datetime import timedelta

    from app.timeutil import utcnow

    sidecar()
    make_product(app, "LATE", {"late.bin": 3 * MiB}, max_downloads=None)
    link = grant_link(app, "LATE")
    assert subprocess.run(["curl", "-sf", "-r", "0-999999", "-o", str(tmp_path / "first-part"), link + "f/late.bin"],
                          timeout=30).returncode == 0
    with app.app_context():
        grant, deliveries, _order = state(app, "LATE")
        grant.expires_at = utcnow() - timedelta(minutes=5)
        for started in deliveries:
            started.started_at = utcnow() - timedelta(minutes=10)
        db.session.commit()
    result = fetch(link, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert sha(tmp_path / "out" / "late.bin") == sha(Path(app.config["DOWNLOAD_DIR"]) / "LATE" / "late.bin")
    with app.app_context():
        assert [d.evidence for d in state(app, "LATE")[1]] == ["verified"]


@pytest.mark.backends("sqlite")
def test_a_used_up_file_does_not_stop_the_others(app, sidecar, tmp_path):
    sidecar()
    make_product(app, "KIT", {"a.bin": 200_000, "b.bin": 300_000}, max_downloads=1)
    link = grant_link(app, "KIT")
    url_a = link + "f/a.bin"
    subprocess.run(["curl", "-sf", "-o", str(tmp_path / "curl-a.bin"), url_a], check=True, timeout=30)
    def counted() -> bool:
        with app.app_context():
            return state(app)[0].downloads_used == 1

    wait_for(counted, message="a.bin counted")
    result = fetch(link, tmp_path / "out")
    assert result.returncode == 1
    assert "1 of 2 file(s) not fetched" in result.stderr and "a.bin" in result.stderr
    assert "All downloads of this file have been used" in result.stderr  # the shop's own sentence
    assert "Traceback" not in result.stderr
    disk = Path(app.config["DOWNLOAD_DIR"]) / "KIT"
    assert sha(tmp_path / "out" / "b.bin") == sha(disk / "b.bin")  # the other file still came, verified
    assert not (tmp_path / "out" / "a.bin").exists()
