"""Maintenance fixtures: the sidecar app (test client) on the same database, the real servers, and
a digest of everything an instance holds (to prove a dry run changed nothing)."""
from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path
from typing import Callable

import pytest
from sqlalchemy import select

from app.downloads.watcher import Watcher
from app.extensions import db
from tests.servers import nginx, sidecar  # noqa: F401  (fixtures)
from tests.smtp import smtp_server  # noqa: F401  (fixture)

JSON = {"Accept": "application/json"}


def instance_digest(app) -> str:
    """Every row of every table and every file and link (name, size, target, mtime) of the instance."""
    digest = hashlib.sha256()
    with app.app_context():
        for table in db.metadata.sorted_tables:
            rows = db.session.execute(select(table).order_by(*table.primary_key.columns)).all()
            digest.update(f"{table.name}:{sorted(map(repr, rows))}".encode())
        db.session.rollback()
        for key in ("DOWNLOAD_DIR", "SYMLINK_DIR", "OUTBOX_DIR"):
            root = Path(app.config[key])
            for dirpath, dirnames, filenames in sorted(os.walk(root)):
                for name in sorted(dirnames + filenames):
                    path = Path(dirpath) / name
                    st = path.lstat()
                    target = os.readlink(path) if path.is_symlink() else ""
                    digest.update(f"{path.relative_to(root)} {st.st_size} {target} {st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def eventually(check: Callable[[], object], timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"{what} did not happen within {timeout:.0f} s")


@pytest.fixture
def watching(app):
    """Start the watcher in a thread of this process (stopped by the fixture); returns (watcher, lines)."""
    running = []

    def start() -> tuple[Watcher, list[str]]:
        lines: list[str] = []
        watcher = Watcher(app, echo=lines.append)
        stop = threading.Event()
        thread = threading.Thread(target=watcher.run, args=(stop,), daemon=True)
        thread.start()
        running.append((stop, thread))
        eventually(lambda: any(line.startswith("watching") for line in lines), what="watcher start")
        return watcher, lines

    def stop_all() -> None:
        for stop, thread in running:
            stop.set()
            thread.join(15)
            assert not thread.is_alive(), "the watcher did not stop"
        running.clear()

    start.stop_all = stop_all
    yield start
    stop_all()
