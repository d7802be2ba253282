"""The watcher with a real watchdog observer on the test's DOWNLOAD_DIR: create, modify, move, delete,
a slow copy indexed once when complete, bit rot flagged, links removed at expiry, restarts, signals."""
from __future__ import annotations

import hashlib
import hmac
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from sqlalchemy import select

from app.downloads.models import AuditEntry, FileEntry, UserDownload
from app.downloads.watcher import product_file
from app.extensions import db
from app.timeutil import utcnow
from tests.helpers import ROOT, grant_link, make_product
from tests.maintenance.conftest import eventually

FAST = dict(WATCH_DEBOUNCE_MS=300, WATCH_EXPIRY_SECONDS=1, REHASH_BYTES_PER_SECOND=0)


def entry(app, sku: str, path: str) -> FileEntry | None:
    with app.app_context():
        found = db.session.scalar(select(FileEntry).where(FileEntry.sku == sku, FileEntry.path == path))
        db.session.expunge_all()
        db.session.rollback()
        return found


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("path, expected", [
    ("KIT/a.bin", ("KIT", "a.bin")),
    ("KIT/sub/deep/x.pdf", ("KIT", "sub/deep/x.pdf")),
    ("KIT/x.part", None), ("KIT/.hidden", None), ("KIT/.git/x", None),
    (".packages/P.zip", None), ("top.txt", None), ("bad sku/x", None),
])
def test_only_product_files_are_watched(tmp_path, path, expected):
    assert product_file(tmp_path, str(tmp_path / path)) == expected


@pytest.mark.config(**FAST)
def test_create_modify_move_delete(app, watching):
    root = Path(app.config["DOWNLOAD_DIR"]) / "KIT"
    root.mkdir()
    watching()
    first = os.urandom(5000)
    (root / "a.bin").write_bytes(first)
    eventually(lambda: (e := entry(app, "KIT", "a.bin")) and e.sha256 == sha(first), what="create")
    second = os.urandom(7000)
    (root / "a.bin").write_bytes(second)
    eventually(lambda: (e := entry(app, "KIT", "a.bin")) and e.sha256 == sha(second) and e.size == 7000,
               what="modify")
    (root / "sub").mkdir()
    (root / "a.bin").rename(root / "sub" / "b.bin")
    eventually(lambda: (e := entry(app, "KIT", "sub/b.bin")) and e.sha256 == sha(second), what="move (new name)")
    eventually(lambda: entry(app, "KIT", "a.bin").missing, what="move (old name missing)")
    (root / "sub" / "b.bin").unlink()
    eventually(lambda: entry(app, "KIT", "sub/b.bin").missing, what="delete")
    # a whole folder moved in at once (as `mv` from another disk folder does)
    outside = Path(app.config["INSTANCE_DIR"]) / "staging"
    (outside / "ch1").mkdir(parents=True)
    (outside / "ch1" / "intro.pdf").write_bytes(b"%PDF-1.4 intro")
    outside.rename(root / "docs")
    eventually(lambda: (e := entry(app, "KIT", "docs/ch1/intro.pdf")) and e.media_type == "application/pdf",
               what="folder moved in")


@pytest.mark.config(**{**FAST, "WATCH_DEBOUNCE_MS": 1000})  # the default: pauses of a busy CI stay below it
@pytest.mark.backends("sqlite")
def test_slow_copy_is_indexed_once_when_complete(app, watching):
    root = Path(app.config["DOWNLOAD_DIR"]) / "KIT"
    root.mkdir()
    watcher, lines = watching()
    pieces = [os.urandom(64 * 1024) for _ in range(10)]
    with open(root / "slow.bin", "wb") as fh:  # ~2 s, like a copy over a slow network share
        for piece in pieces:
            fh.write(piece)
            fh.flush()
            time.sleep(0.2)
    whole = b"".join(pieces)
    eventually(lambda: (e := entry(app, "KIT", "slow.bin")) and e.sha256 == sha(whole), what="slow copy indexed")
    time.sleep(1)  # any late second indexing would show up now
    assert watcher.indexed.count("KIT/slow.bin") == 1, lines
    assert entry(app, "KIT", "slow.bin").size == len(whole)


@pytest.mark.config(WATCH_DEBOUNCE_MS=300, REHASH_BYTES_PER_SECOND=50 * 1024 * 1024, REHASH_EVERY_SECONDS=0)
def test_bit_rot_is_flagged_and_an_honest_change_is_not(app, watching, sc):
    make_product(app, "KIT", {"good.bin": 200_000, "rot.bin": 200_000})
    listing = sc.get(grant_link(app, "KIT").split("127.0.0.1:9", 1)[1], headers={"Accept": "application/json"})
    recorded = {f["path"]: f["sha256"] for f in listing.get_json()["files"]}
    rot = Path(app.config["DOWNLOAD_DIR"]) / "KIT" / "rot.bin"
    watching()
    eventually(lambda: entry(app, "KIT", "good.bin").verified_at, what="first re-hash")
    st = rot.stat()
    with open(rot, "r+b") as fh:  # one flipped byte, mtime put back: only the bytes tell
        fh.seek(1234)
        byte = fh.read(1)
        fh.seek(1234)
        fh.write(bytes([byte[0] ^ 0xFF]))
    os.utime(rot, ns=(st.st_atime_ns, st.st_mtime_ns))
    flagged = eventually(lambda: entry(app, "KIT", "rot.bin").flagged, what="bit rot flagged")
    assert "no longer match" in flagged
    with app.app_context():
        assert db.session.scalar(select(AuditEntry.target).where(AuditEntry.action == "file.flagged")) == "KIT/rot.bin"
    # the owner is told (audit entry, dashboard); the shopper's client can no longer confirm it as verified
    nonce = next(f["proof_nonce"] for f in listing.get_json()["files"] if f["path"] == "rot.bin")
    proof = hmac.new(bytes.fromhex(nonce), rot.read_bytes(), hashlib.sha256).hexdigest()  # holds the bytes, yet refused
    confirm = sc.post(urlsplit(listing.get_json()["confirm_url"]).path,
                      json={"path": "rot.bin", "sha256": recorded["rot.bin"], "proof": proof},
                      headers={"Accept": "application/json"})
    assert confirm.status_code == 503 and "integrity check" in confirm.get_json()["error"]
    good = Path(app.config["DOWNLOAD_DIR"]) / "KIT" / "good.bin"
    good.write_bytes(b"a new release")  # an honest change: new mtime and size, re-indexed, never flagged
    eventually(lambda: entry(app, "KIT", "good.bin").size == 13, what="honest change re-indexed")
    time.sleep(1)
    assert entry(app, "KIT", "good.bin").flagged is None


@pytest.mark.config(**FAST, EXPIRY_GRACE_SECONDS=3600)
def test_symlink_folder_goes_when_its_grant_expires(app, watching):
    """At expiry itself, not after the grace: nginx would serve the folder to anyone holding its URL."""
    make_product(app, "KIT", {"a.bin": 100})
    grant_link(app, "KIT")
    folder = Path(app.config["SYMLINK_DIR"]) / "tok-expiring"
    folder.mkdir()
    (folder / "a.bin").symlink_to(Path(app.config["DOWNLOAD_DIR"]) / "KIT" / "a.bin")
    with app.app_context():
        grant = db.session.scalar(select(UserDownload))
        grant.symlink_token = "tok-expiring"
        grant.expires_at = utcnow() + timedelta(seconds=2)
        db.session.commit()
    watching()
    assert folder.exists()
    started = time.monotonic()
    eventually(lambda: not folder.exists(), what="symlink folder removal")
    assert time.monotonic() - started < 5
    assert (Path(app.config["DOWNLOAD_DIR"]) / "KIT" / "a.bin").exists()  # the link went, not the file
    with app.app_context():  # the grant itself is expired by the purge after the grace
        grant = db.session.scalar(select(UserDownload))
        assert grant.symlink_token is None and grant.status == "active"


@pytest.mark.config(**FAST)
@pytest.mark.backends("sqlite")
def test_restart_picks_up_what_changed_while_it_was_down(app, watching):
    make_product(app, "KIT", {"stays.bin": 100, "changes.bin": 100, "goes.bin": 100})
    root = Path(app.config["DOWNLOAD_DIR"]) / "KIT"
    watching()
    watching.stop_all()
    (root / "changes.bin").write_bytes(b"changed while down")
    (root / "goes.bin").unlink()
    (root / "new.bin").write_bytes(b"new")
    watcher, lines = watching()
    assert entry(app, "KIT", "changes.bin").sha256 == sha(b"changed while down")
    assert entry(app, "KIT", "goes.bin").missing
    assert entry(app, "KIT", "new.bin").sha256 == sha(b"new")
    assert "index pass (start): 1 added, 1 changed, 1 missing, 1 unchanged" in lines


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.backends("sqlite")
def test_watch_command_stops_cleanly(env, sig, tmp_path):
    log = tmp_path / "watch.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "flask", "--app", "wsgi", "softgoods", "watch"],
                                cwd=ROOT, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT)
    try:
        eventually(lambda: "watching" in log.read_text(), timeout=20, what="watch command start")
        proc.send_signal(sig)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert f"{sig.name}: stopping" in text and text.rstrip().endswith("watcher stopped")
    assert "Traceback" not in text


@pytest.mark.backends("sqlite")
def test_watcher_waits_for_the_database_and_still_stops(env, tmp_path):
    from tests.helpers import free_port

    log = tmp_path / "watch.log"
    down = {**os.environ, **env, "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/gone"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "flask", "--app", "wsgi", "softgoods", "watch"],
                                cwd=ROOT, env=down, stdout=out, stderr=subprocess.STDOUT)
    try:
        eventually(lambda: "index pass interrupted (OperationalError), retrying" in log.read_text(), timeout=20,
                   what="the watcher noticing the database is down")
        proc.terminate()
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in log.read_text() and "watcher stopped" in log.read_text()
