"""Fixtures shared by every test: a database per backend and run, the app, its clients.

Store and domain tests run on SQLite and on PostgreSQL (127.0.0.1:5432); ``@pytest.mark.backends("sqlite")``
narrows a test. With ``CI`` set, an unreachable PostgreSQL fails the run instead of skipping.
"""
from __future__ import annotations

import os
import uuid

import pytest
from sqlalchemy import text

from app import create_app
from app.cli import MIGRATIONS_DIR
from app.extensions import db

PG_ADMIN = os.environ.get("SOFTGOODS_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def pytest_generate_tests(metafunc):
    if "backend_name" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("backends")
        names = marker.args if marker else ("sqlite", "postgresql")
        metafunc.parametrize("backend_name", names, scope="session")


def _pg_admin():
    import psycopg

    try:
        return psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL at {PG_ADMIN} is unreachable in CI: {exc}")
        pytest.skip(f"PostgreSQL unreachable: {exc}")


def base_env(url: str, root) -> dict[str, str]:
    env = {
        "SOFTGOODS_INSTANCE_DIR": str(root / "instance"),
        "DATABASE_URL": url,
        "SOFTGOODS_SECRET_KEY": "test-secret-" + uuid.uuid4().hex,
        "SOFTGOODS_DOWNLOAD_DIR": str(root / "downloads"),
        "SOFTGOODS_SYMLINK_DIR": str(root / "links"),
        "SOFTGOODS_SIDECAR_URL": "http://127.0.0.1:9",
    }
    for key in ("SOFTGOODS_INSTANCE_DIR", "SOFTGOODS_DOWNLOAD_DIR", "SOFTGOODS_SYMLINK_DIR"):
        os.makedirs(env[key], exist_ok=True)
    return env


@pytest.fixture(scope="session")
def database(backend_name, tmp_path_factory):
    """A migrated database for this run and backend; dropped at the end."""
    root = tmp_path_factory.mktemp(f"db-{backend_name}")
    name = None
    if backend_name == "sqlite":
        url = f"sqlite:///{root / 'softgoods.db'}"
    else:
        name = f"sg_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        with _pg_admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        url = f"postgresql://postgres@127.0.0.1:5432/{name}"
    import flask_migrate

    app = create_app(env=base_env(url, root))
    with app.app_context():
        flask_migrate.upgrade(directory=MIGRATIONS_DIR)
        db.engine.dispose()
    yield url
    if name:
        with _pg_admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def wipe_database() -> None:
    """Empty every table (fast, and ids start again at 1)."""
    tables = [t.name for t in reversed(db.metadata.sorted_tables)]
    if db.engine.dialect.name == "postgresql":
        db.session.execute(text(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE"))
    else:
        for name in tables:
            db.session.execute(text(f"DELETE FROM {name}"))
    db.session.commit()


@pytest.fixture
def env(database, tmp_path):
    """Environment variables of a fresh instance on this backend (for the app and for subprocesses)."""
    return base_env(database, tmp_path)


def config_for(request) -> dict:
    """Testing config, CSRF and rate limits off, plus the test's ``@pytest.mark.config`` overrides."""
    config = {"TESTING": True, "WTF_CSRF_ENABLED": False, "RATELIMIT_ENABLED": False}
    marker = request.node.get_closest_marker("config")
    if marker:
        config.update(marker.kwargs)
    return config


@pytest.fixture
def app(env, request):
    application = create_app(config_for(request), env=env)
    with application.app_context():
        wipe_database()
    yield application
    with application.app_context():
        db.session.remove()
        db.engine.dispose()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def runner(app):
    return app.test_cli_runner()


@pytest.fixture
def sidecar_app(app, env, request):
    """The sidecar app on the same database and folders as ``app`` (the store, which makes products)."""
    from sidecar import create_sidecar

    application = create_sidecar(config_for(request), env=env)
    yield application
    if "softgoods_fast_files" in application.extensions:
        application.extensions["softgoods_fast_files"].close()
    with application.app_context():
        db.session.remove()
        db.engine.dispose()


@pytest.fixture
def sc(sidecar_app):
    """A test client of the sidecar."""
    return sidecar_app.test_client()
