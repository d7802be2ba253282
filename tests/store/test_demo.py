"""The README's first command: ``scripts/demo`` prepares an instance and runs store and sidecar."""
import hashlib
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import ROOT, free_port


def demo_env(tmp_path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOFTGOODS_") and k != "DATABASE_URL"}
    env["SOFTGOODS_INSTANCE_DIR"] = str(tmp_path / "instance")
    return env


@pytest.mark.backends("sqlite")
def test_demo_prepares_products_files_and_an_owner_idempotently(backend_name, tmp_path):
    runs = [subprocess.run([sys.executable, "-m", "app.demo", "--no-serve"], cwd=ROOT, env=demo_env(tmp_path),
                           capture_output=True, text=True, timeout=120) for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr
    passwords = [re.search(r"owner:\s+owner@example.com\s+password: (\S+)", r.stdout)[1] for r in runs]
    assert passwords[0] == passwords[1]  # a re-run keeps the account and prints the same credentials
    downloads = tmp_path / "instance" / "downloads"
    assert (downloads / "MANUAL" / "ch1" / "intro.pdf").read_bytes().startswith(b"%PDF-1.4")
    assert (downloads / "MANUAL" / "ch1" / "video.mp4").stat().st_size == 4 * 1024 * 1024
    assert (downloads / "TOOLKIT" / "toolkit-1.0.zip").read_bytes().startswith(b"PK")

    from app import create_app
    from app.accounts.models import User
    from app.downloads.models import FileEntry
    from app.extensions import db
    from app.store.models import Product
    from sqlalchemy import select

    app = create_app(env=demo_env(tmp_path))
    with app.app_context():
        skus = set(db.session.scalars(select(Product.sku)))
        assert {"MANUAL", "TOOLKIT", "CLASSICS-2", "FILM-METROPOLIS"} <= skus and len(skus) == 6
        assert db.session.scalar(select(Product).where(Product.sku == "CLASSICS-2")).entitlement_count == 2
        assert "ch2/appendix/tables.csv" in set(db.session.scalars(select(FileEntry.path)))
        owner = db.session.scalar(select(User).where(User.email == "owner@example.com"))
        assert owner.is_owner and owner.check_password(passwords[0])
        db.engine.dispose()


def watchers_of(tmp_path) -> list[int]:
    """Live `softgoods watch` processes of this demo instance (found by their environment)."""
    instance = f"SOFTGOODS_INSTANCE_DIR={tmp_path / 'instance'}".encode()
    found = []
    for proc_dir in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc_dir / "cmdline").read_bytes().split(b"\0")
            environ = (proc_dir / "environ").read_bytes().split(b"\0")
            state = (proc_dir / "stat").read_text().split(") ", 1)[1][0]
        except OSError:
            continue
        if b"watch" in cmdline and b"softgoods" in cmdline and instance in environ and state != "Z":
            found.append(int(proc_dir.name))
    return found


def indexed_sha256(tmp_path, path: str, wait_for: str, timeout: float = 20) -> bool:
    """Whether the index records ``wait_for`` as the file's SHA-256 within ``timeout`` (the watcher's work)."""
    import sqlite3

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with sqlite3.connect(tmp_path / "instance" / "softgoods.db") as conn:
            row = conn.execute("SELECT sha256 FROM file_entries WHERE sku = 'MANUAL' AND path = ?", (path,)).fetchone()
        conn.close()
        if row and row[0] == wait_for:
            return True
        time.sleep(0.3)
    return False


@pytest.mark.backends("sqlite")
def test_demo_serves_store_and_sidecar_until_interrupted(backend_name, tmp_path):
    store_port, sidecar_port = free_port(), free_port()
    proc, text = start_demo(tmp_path, store_port, sidecar_port)
    try:
        assert f"store:     http://127.0.0.1:{store_port}/" in text, text[-2000:]
        catalog = urllib.request.urlopen(f"http://127.0.0.1:{store_port}/", timeout=10).read().decode()
        assert "The Complete Field Manual" in catalog
        assert urllib.request.urlopen(f"http://127.0.0.1:{sidecar_port}/healthz", timeout=10).status == 200
        assert watchers_of(tmp_path), "the demo runs the watcher"
        edited = tmp_path / "instance" / "downloads" / "MANUAL" / "ch1" / "intro.pdf"
        edited.write_bytes(b"%PDF-1.4 second edition\n")
        assert indexed_sha256(tmp_path, "ch1/intro.pdf", wait_for=hashlib.sha256(edited.read_bytes()).hexdigest())
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        assert proc.wait(30) == 0
        assert not watchers_of(tmp_path)  # stopped with the rest
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        proc.stdout.close()
    for port in (store_port, sidecar_port):
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)


def serving_processes(port: int) -> list[int]:
    """Pids of processes whose command line names this loopback port (the demo's gunicorns)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    cmdline = fh.read().decode(errors="replace")
            except OSError:
                continue
            if f"127.0.0.1:{port}\0" in cmdline:
                pids.append(int(entry))
    return pids


def start_demo(tmp_path, store_port: int, sidecar_port: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "app.demo", "--store-port", str(store_port),
                             "--sidecar-port", str(sidecar_port)], cwd=ROOT, env=demo_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    output = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        output.append(line)
        if line.startswith("Ctrl-C stops"):
            break
    return proc, "".join(output)


@pytest.mark.backends("sqlite")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_demo_stops_its_servers_on_sigterm_and_sighup(backend_name, tmp_path, sig):
    store_port, sidecar_port = free_port(), free_port()
    proc, text = start_demo(tmp_path, store_port, sidecar_port)
    try:
        assert "Ctrl-C stops all three" in text, text[-2000:]
        assert serving_processes(store_port) and serving_processes(sidecar_port)
        proc.send_signal(sig)  # to the demo alone, as kill or a closing terminal does
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        proc.stdout.close()
    for port in (store_port, sidecar_port):
        assert serving_processes(port) == []
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)


@pytest.mark.backends("sqlite")
def test_demo_refuses_ports_in_use_before_any_banner(backend_name, tmp_path):
    import socket

    store_port, sidecar_port = free_port(), free_port()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", sidecar_port))
        squatter.listen()
        run = subprocess.run([sys.executable, "-m", "app.demo", "--store-port", str(store_port),
                              "--sidecar-port", str(sidecar_port)], cwd=ROOT, env=demo_env(tmp_path),
                             capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert f"error: port {sidecar_port} is already in use" in run.stderr
    assert "Ctrl-C stops both" not in run.stdout and "Traceback" not in run.stderr
    assert serving_processes(store_port) == []
