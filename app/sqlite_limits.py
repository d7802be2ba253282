"""A ``limits`` storage in a small SQLite file, so every worker process of one host shares its
counters without Redis (``memory://`` is per process: 20/min behaved as 40/min with 2 workers).

Registered under the ``sqlite`` scheme (``sqlite:////abs/path/file.sqlite``) by being defined: limits'
storage registry picks up every ``Storage`` subclass with a ``STORAGE_SCHEME``. Fixed-window counters
only (the strategy Flask-Limiter uses by default); each ``incr`` is one UPSERT statement, atomic
across processes. Measured on the 2-core box: ~0.1 ms per counted hit (README, "Rate limits").
"""
from __future__ import annotations

import os
import sqlite3
import threading
import time
from urllib.parse import urlsplit

from limits.storage import Storage

_SCHEMA = "CREATE TABLE IF NOT EXISTS counters (key TEXT PRIMARY KEY, count INTEGER NOT NULL, expires_at REAL NOT NULL)"
# An expired window starts again at ``amount`` (the CASEs read the old row: SQL evaluates SET on it).
_INCR = """INSERT INTO counters (key, count, expires_at) VALUES (:key, :amount, :expires_at)
ON CONFLICT (key) DO UPDATE SET
  count = CASE WHEN counters.expires_at <= :now THEN excluded.count ELSE counters.count + excluded.count END,
  expires_at = CASE WHEN counters.expires_at <= :now THEN excluded.expires_at ELSE counters.expires_at END
RETURNING count"""
_PRUNE_EVERY = 1000  # increments per process between deletions of expired windows


class SQLiteStorage(Storage):
    STORAGE_SCHEME = ["sqlite"]

    def __init__(self, uri: str, wrap_exceptions: bool = False, **options):
        super().__init__(uri, wrap_exceptions=wrap_exceptions, **options)
        self.path = urlsplit(uri).path
        self.timeout = float(options.get("timeout", 5.0))
        self._local = threading.local()
        self._increments = 0

    @property
    def base_exceptions(self) -> type[Exception]:
        return sqlite3.Error

    def _conn(self) -> sqlite3.Connection:
        local = self._local
        if getattr(local, "pid", None) != os.getpid():  # one connection per thread, never across a fork
            conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")  # counters may lose the last moment on power loss
            conn.execute(_SCHEMA)
            local.conn, local.pid = conn, os.getpid()
        return local.conn

    def incr(self, key: str, expiry: float, amount: int = 1) -> int:
        now = time.time()
        conn = self._conn()
        count = conn.execute(_INCR, {"key": key, "amount": amount, "expires_at": now + expiry, "now": now}).fetchone()[0]
        self._increments += 1
        if self._increments % _PRUNE_EVERY == 0:
            conn.execute("DELETE FROM counters WHERE expires_at <= ?", (now,))
        return count

    def get(self, key: str) -> int:
        row = self._conn().execute("SELECT count FROM counters WHERE key = ? AND expires_at > ?",
                                   (key, time.time())).fetchone()
        return row[0] if row else 0

    def get_expiry(self, key: str) -> float:
        row = self._conn().execute("SELECT expires_at FROM counters WHERE key = ? AND expires_at > ?",
                                   (key, time.time())).fetchone()
        return row[0] if row else time.time()

    def check(self) -> bool:
        try:
            self._conn().execute("SELECT 1").fetchone()
            return True
        except sqlite3.Error:
            return False

    def reset(self) -> int | None:
        return self._conn().execute("DELETE FROM counters").rowcount

    def clear(self, key: str) -> None:
        self._conn().execute("DELETE FROM counters WHERE key = ?", (key,))
