"""The watcher and several purges at the same time (real processes, both backends): every grant is
expired exactly once, every folder goes, every new file is indexed, nobody crashes."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

from sqlalchemy import func, select

from app.downloads.models import FileEntry, UserDownload
from app.extensions import db
from app.timeutil import utcnow
from tests.helpers import ROOT, grant_link, make_product
from tests.maintenance.conftest import eventually

GRANTS = 240
FILES = 20


def flask(*args: str) -> list[str]:
    return [sys.executable, "-m", "flask", "--app", "wsgi", "softgoods", *args]


def test_watcher_and_purges_at_the_same_time(app, env, tmp_path):
    make_product(app, "KIT", {"a.bin": 1000})
    grant_link(app, "KIT")
    links = Path(app.config["SYMLINK_DIR"])
    with app.app_context():
        template = db.session.scalar(select(UserDownload))
        now = utcnow()
        for n in range(GRANTS):
            # a third expired long ago, a third as the test runs, a third stays live; half own a folder
            when = [now - timedelta(hours=2), now + timedelta(seconds=2), now + timedelta(days=1)][n % 3]
            token = f"tok{n}" if n % 2 == 0 else None
            db.session.add(UserDownload(order_id=template.order_id, sku="KIT", key_nonce=f"n{n}", key_hash="h",
                                        expires_at=when, symlink_token=token))
            if token:
                (links / token).mkdir()
                (links / token / "a.bin").symlink_to(Path(app.config["DOWNLOAD_DIR"]) / "KIT" / "a.bin")
        db.session.commit()
        expiring = db.session.scalar(select(func.count()).select_from(UserDownload)
                                     .where(UserDownload.expires_at < now + timedelta(hours=1)))
    run_env = {**os.environ, **env, "SOFTGOODS_EXPIRY_GRACE_SECONDS": "0", "SOFTGOODS_WATCH_EXPIRY_SECONDS": "1",
               "SOFTGOODS_WATCH_DEBOUNCE_MS": "200", "SOFTGOODS_REHASH_EVERY_SECONDS": "1"}
    log = tmp_path / "watch.log"
    with open(log, "wb") as out:
        watcher = subprocess.Popen(flask("watch"), cwd=ROOT, env=run_env, stdout=out, stderr=subprocess.STDOUT)
    purges = []
    try:
        eventually(lambda: "watching" in log.read_text(), timeout=20, what="watcher start")
        for n in range(FILES):
            (Path(app.config["DOWNLOAD_DIR"]) / "KIT" / f"new{n}.bin").write_bytes(os.urandom(20_000 + n))
            if n % 5 == 0:
                purges.append(subprocess.Popen(flask("purge"), cwd=ROOT, env=run_env, stdout=subprocess.PIPE,
                                               stderr=subprocess.STDOUT))
            time.sleep(0.1)
        time.sleep(2.5)  # past the second batch's expiry
        purges.append(subprocess.Popen(flask("purge"), cwd=ROOT, env=run_env, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT))
        outputs = []
        for proc in purges:
            out, _ = proc.communicate(timeout=60)
            outputs.append(out.decode())
            assert proc.returncode == 0, out.decode()

        def all_indexed() -> bool:
            with app.app_context():
                count = db.session.scalar(select(func.count()).select_from(FileEntry)
                                          .where(FileEntry.path.like("new%"), FileEntry.missing.is_(False)))
                db.session.rollback()
                return count == FILES
        eventually(all_indexed, timeout=20, what="every new file indexed")
    finally:
        watcher.terminate()
        assert watcher.wait(15) == 0
        for proc in purges:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    watch_text = log.read_text()
    assert "Traceback" not in watch_text and all("Traceback" not in o for o in outputs)
    by_purge = sum(int(re.search(r"^expired (\d+) grant", o, re.M).group(1)) for o in outputs)
    by_watcher = sum(int(n) for n in re.findall(r"^expired (\d+) grant", watch_text, re.M))
    assert by_purge + by_watcher == expiring  # each grant expired exactly once, by one of them
    with app.app_context():
        states = dict(db.session.execute(select(UserDownload.status, func.count()).group_by(UserDownload.status)).all())
    assert states == {"expired": expiring, "active": GRANTS + 1 - expiring}
    left = sorted(p.name for p in links.iterdir())
    with app.app_context():
        live_tokens = sorted(db.session.scalars(select(UserDownload.symlink_token)
                                                .where(UserDownload.symlink_token.is_not(None))))
    assert left == live_tokens and len(left) == len([n for n in range(GRANTS) if n % 2 == 0 and n % 3 == 2])
