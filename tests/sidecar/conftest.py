"""Sidecar fixtures: the sidecar app for the test client, and the real servers of tests/servers.py."""
from __future__ import annotations

import pytest

from app.extensions import db
from sidecar import create_sidecar
from tests.servers import nginx, path_of, sidecar  # noqa: F401  (fixtures; path_of for the tests)


@pytest.fixture
def sidecar_app(app, env, request):
    """The sidecar app on the same database and folders as ``app`` (the store, which makes products)."""
    config = {"TESTING": True, "WTF_CSRF_ENABLED": False, "RATELIMIT_ENABLED": False}
    marker = request.node.get_closest_marker("config")
    if marker:
        config.update(marker.kwargs)
    application = create_sidecar(config, env=env)
    yield application
    with application.app_context():
        db.session.remove()
        db.engine.dispose()


@pytest.fixture
def sc(sidecar_app):
    """A test client of the sidecar."""
    return sidecar_app.test_client()
