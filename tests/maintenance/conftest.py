"""Maintenance fixtures: the sidecar app (test client) on the same database, the real servers, and
a digest of everything an instance holds (to prove a dry run changed nothing)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from sqlalchemy import select

from app.extensions import db
from sidecar import create_sidecar
from tests.servers import nginx, sidecar  # noqa: F401  (fixtures)
from tests.smtp import smtp_server  # noqa: F401  (fixture)

JSON = {"Accept": "application/json"}


@pytest.fixture
def sidecar_app(app, env):
    application = create_sidecar({"TESTING": True, "WTF_CSRF_ENABLED": False, "RATELIMIT_ENABLED": False}, env=env)
    yield application
    with application.app_context():
        db.session.remove()
        db.engine.dispose()


@pytest.fixture
def sc(sidecar_app):
    return sidecar_app.test_client()


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
