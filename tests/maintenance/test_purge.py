"""``softgoods purge [--dry-run]``: what it expires, removes, prunes and sends; a dry run changes nothing.
Both backends (the ``app`` fixture runs every test on SQLite and PostgreSQL)."""
from __future__ import annotations

import os
import time
from datetime import date, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from app.downloads import maintenance
from app.downloads.models import DownloadLog, OutboxMessage, Package, UserDownload
from app.downloads.packages import add_files, create_package, zip_path
from app.extensions import db
from app.mail import build_message, queue_message
from app.timeutil import utcnow
from tests.helpers import grant_link, make_product
from tests.maintenance.conftest import instance_digest

HOUR = timedelta(hours=1)


def _grants(app, count: int) -> list[int]:
    for n in range(count):
        grant_link(app, "KIT", f"buyer{n}@example.com")
    with app.app_context():
        return list(db.session.scalars(select(UserDownload.id).order_by(UserDownload.id)))


def _set(app, grant_id: int, *, expires_in: timedelta, token: str | None = None) -> None:
    """Move a grant's expiry (relative to now) and give it a symlink folder like the sidecar does."""
    with app.app_context():
        grant = db.session.get(UserDownload, grant_id)
        grant.expires_at = utcnow() + expires_in
        if token:
            grant.symlink_token = token
            folder = Path(app.config["SYMLINK_DIR"]) / token
            folder.mkdir(parents=True)
            (folder / "a.bin").symlink_to(Path(app.config["DOWNLOAD_DIR"]) / "KIT" / "a.bin")
        db.session.commit()


def _status(app) -> dict[int, str]:
    with app.app_context():
        return dict(db.session.execute(select(UserDownload.id, UserDownload.status)).all())


def _old_folder(app, name: str, age: timedelta) -> Path:
    folder = Path(app.config["SYMLINK_DIR"]) / name
    folder.mkdir(parents=True)
    then = time.time() - age.total_seconds()
    os.utime(folder, (then, then))
    return folder


@pytest.fixture
def scene(app):
    """Five grants: live, expired but within the grace, expired past it (one with a symlink folder),
    a live one with a folder; plus an old orphan folder and a brand-new one."""
    make_product(app, "KIT", {"a.bin": 1000, "sub/b.txt": 10})
    live, in_grace, dead, dead_linked, live_linked = _grants(app, 5)
    _set(app, in_grace, expires_in=-timedelta(minutes=30))
    _set(app, dead, expires_in=-2 * HOUR)
    _set(app, dead_linked, expires_in=-3 * HOUR, token="deadtoken")
    _set(app, live_linked, expires_in=HOUR, token="livetoken")
    _old_folder(app, "orphan-old", timedelta(hours=2))
    _old_folder(app, "orphan-new", timedelta(seconds=5))
    return {"live": live, "in_grace": in_grace, "dead": dead, "dead_linked": dead_linked,
            "live_linked": live_linked}


def test_purge_expires_grants_past_the_grace_and_removes_their_folders(app, runner, scene):
    links = Path(app.config["SYMLINK_DIR"])
    result = runner.invoke(args=["softgoods", "purge"])
    assert result.exit_code == 0, result.output
    assert "expired 2 grant(s)" in result.output
    assert "removed 2 symlink folder(s)" in result.output
    status = _status(app)
    assert status[scene["dead"]] == status[scene["dead_linked"]] == "expired"
    assert status[scene["live"]] == status[scene["in_grace"]] == status[scene["live_linked"]] == "active"
    assert sorted(p.name for p in links.iterdir()) == ["livetoken", "orphan-new"]
    with app.app_context():
        dead = db.session.get(UserDownload, scene["dead_linked"])
        assert dead.symlink_token is None and dead.key_hash  # the link still says "expired on ..." (410)
    again = runner.invoke(args=["softgoods", "purge"])  # idempotent
    assert again.exit_code == 0 and "expired 0 grant(s)" in again.output
    assert "removed 0 symlink folder(s)" in again.output
    assert _status(app) == status


def test_dry_run_changes_nothing_and_says_what_it_would_remove(app, runner, scene):
    with app.app_context():
        old = utcnow() - timedelta(days=400)
        db.session.add(DownloadLog(at=old, path="a.bin", status=200, outcome="complete", grant_id=scene["dead"]))
        db.session.add(DownloadLog(path="a.bin", status=200, outcome="complete", grant_id=scene["live"]))
        package = create_package(db.session, "OLDPACK", expires_on=date.today() + timedelta(days=1))
        add_files(db.session, app.config["DOWNLOAD_DIR"], package, ["KIT/a.bin"])
        package.expires_on = date.today() - timedelta(days=1)
        queue_message(db.session, build_message("x@example.com", "hello", "text", "<p>html</p>"))
        db.session.commit()
    before = instance_digest(app)
    result = runner.invoke(args=["softgoods", "purge", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert instance_digest(app) == before
    out = result.output
    assert "nothing was changed" in out
    assert "would expire 2 grant(s)" in out and "buyer2@example.com" in out and "buyer3@example.com" in out
    assert "would remove 2 symlink folder(s)" in out and "deadtoken" in out and "orphan-old" in out
    assert "would delete 1 expired package(s): OLDPACK" in out
    assert "would prune 1 download-log row(s)" in out
    assert "would retry 1 unsent email(s)" in out

    result = runner.invoke(args=["softgoods", "purge"])
    assert result.exit_code == 0, result.output
    assert instance_digest(app) != before
    with app.app_context():
        assert db.session.scalar(select(func.count()).select_from(DownloadLog)) == 1
        assert db.session.scalar(select(Package).where(Package.name == "OLDPACK")) is None
        assert db.session.scalar(select(OutboxMessage.sent_at)) is not None  # written to the .eml outbox
    assert not zip_path(app.config["DOWNLOAD_DIR"], "OLDPACK").exists()
    assert (Path(app.config["DOWNLOAD_DIR"]) / "KIT" / "a.bin").exists()  # the original stays


@pytest.mark.config(LOG_RETENTION_DAYS=30)
def test_log_retention_is_configurable(app, runner):
    with app.app_context():
        now = utcnow()
        for days in (10, 29, 31, 90):
            db.session.add(DownloadLog(at=now - timedelta(days=days), path=f"{days}", status=200, outcome="complete"))
        db.session.commit()
    result = runner.invoke(args=["softgoods", "purge"])
    assert "pruned 2 download-log row(s)" in result.output
    with app.app_context():
        assert sorted(db.session.scalars(select(DownloadLog.path))) == ["10", "29"]


def test_batches_cover_every_grant_in_range(app):
    make_product(app, "KIT", {"a.bin": 10})
    ids = _grants(app, 12)
    for gid in ids[::2]:
        _set(app, gid, expires_in=-5 * HOUR)
    with app.app_context():
        count, removed = maintenance.expire_grants(db.session, utcnow() - HOUR, symlink_dir=None, batch=3)
        assert (count, removed) == (6, [])
    assert [s for _, s in sorted(_status(app).items())] == ["expired", "active"] * 6


@pytest.mark.backends("sqlite")
def test_waiting_mail_is_sent_by_purge(app, runner, smtp_server):
    app.config["SMTP_URL"] = smtp_server.url
    with app.app_context():
        queue_message(db.session, build_message("late@example.com", "Your downloads", "the link", "<p>link</p>"))
        db.session.commit()
    result = runner.invoke(args=["softgoods", "purge"])
    assert "sent 1 of 1 waiting email(s)" in result.output, result.output
    assert [m.rcpt_tos for m in smtp_server.wait_for(1)] == [["late@example.com"]]


@pytest.mark.backends("postgresql")
def test_grants_table_leaves_room_for_hot_updates(app):
    """The migration applies the model's fillfactor: purge and counting rewrite grant rows in place."""
    from sqlalchemy import text

    with app.app_context():
        options = db.session.scalar(text("SELECT reloptions FROM pg_class WHERE relname = 'user_downloads'"))
    assert options == ["fillfactor=50"]


@pytest.mark.backends("sqlite")
@pytest.mark.parametrize("args, message", [
    (["purge", "--dry"], "No such option '--dry'"),
    (["purge", "now"], "Got unexpected extra argument (now)"),
    (["watch", "--fast"], "No such option '--fast'"),
    (["ingest-nginx-log"], "Missing argument 'PATH'"),
])
def test_bad_arguments_get_one_line_and_change_nothing(app, runner, args, message):
    before = instance_digest(app)
    result = runner.invoke(args=["softgoods", *args])
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert instance_digest(app) == before


@pytest.mark.backends("sqlite")
@pytest.mark.parametrize("args", [["purge"], ["purge", "--dry-run"]])
def test_database_down_is_one_line_not_a_traceback(env, tmp_path, args):
    import subprocess
    import sys

    from tests.helpers import ROOT, free_port

    down = {**os.environ, **env, "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/gone"}
    done = subprocess.run([sys.executable, "-m", "flask", "--app", "wsgi", "softgoods", *args], cwd=ROOT,
                          env=down, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("error: database unavailable, purge stopped:") and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_a_folder_with_real_files_in_the_link_dir_is_never_removed(app, runner):
    """A wrong SOFTGOODS_SYMLINK_DIR (say, the download dir) must not cost the shop its files."""
    precious = Path(app.config["SYMLINK_DIR"]) / "KIT"
    precious.mkdir()
    (precious / "manual.pdf").write_bytes(b"%PDF real file")
    os.utime(precious, (time.time() - 5 * 3600,) * 2)
    for args in (["purge", "--dry-run"], ["purge"]):
        result = runner.invoke(args=["softgoods", *args])
        assert result.exit_code == 0, result.output
        assert "kept 1 folder(s) in SYMLINK_DIR that hold real files (check the setting): KIT" in result.output
        assert "remove 0 symlink folder(s)" in result.output or "removed 0 symlink folder(s)" in result.output
    assert (precious / "manual.pdf").read_bytes() == b"%PDF real file"


def test_dry_run_says_which_download_slots_it_would_release(app, runner):
    from sqlalchemy import update

    from app.downloads.models import Delivery
    from tests.delivery.rules_helpers import open_shop

    shop = open_shop(app, {"a.bin": 300 * 1024}, max_downloads=1)
    with app.app_context():
        shop.get("a.bin", sent=200 * 1024)  # a transfer that died and was never resumed
        db.session.execute(update(Delivery).values(last_activity_at=utcnow() - 3 * HOUR))
        db.session.commit()
        assert shop.held() == 1
    dry = runner.invoke(args=["softgoods", "purge", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "would release 1 download slot(s) held by idle unfinished deliveries" in dry.output
    with app.app_context():
        assert shop.held() == 1, "a dry run released a slot"
    real = runner.invoke(args=["softgoods", "purge"])
    assert "released 1 download slot(s) held by idle unfinished deliveries" in real.output
    with app.app_context():
        assert shop.held() == 0
