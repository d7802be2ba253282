"""Sidecar fixtures: the real servers of tests/servers.py (the test client, ``sc``, is in tests/conftest.py)."""
from __future__ import annotations

from tests.servers import nginx, path_of, sidecar  # noqa: F401  (fixtures; path_of for the tests)
