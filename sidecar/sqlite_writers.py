"""One SQLite writer at a time, queued in order instead of polling.

SQLite allows one writer; the others wait in its busy handler, which sleeps 1, 2, 5 ... 100 ms
between tries. With hundreds of sidecar threads opening downloads at once, those sleeps turn a
1 ms transaction into tens of milliseconds (measured: 28 requests/s for 4 KiB files). Taking a
thread lock and an ``flock`` (other worker processes) before the first write of a transaction, and
releasing both at commit or rollback, hands the write lock over the moment it is free.
Readers are untouched (WAL). PostgreSQL needs none of this.
"""
from __future__ import annotations

import fcntl
import os
import threading
import weakref

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

WRITES = ("INSERT", "UPDATE", "DELETE", "REPLACE")


class WriterQueue:
    """Ownership is per thread: a request's unit of work runs in one thread from first write to commit."""

    def __init__(self, lock_path: str):
        self._thread_lock = threading.Lock()
        self._owner = threading.local()
        self._lock_path = lock_path
        self._fd: int | None = None
        self._pid: int | None = None

    def _file(self) -> int:
        if self._pid != os.getpid():  # a forked worker opens its own descriptor (flock is per description)
            self._fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            self._pid = os.getpid()
        return self._fd

    def acquire(self) -> None:
        if getattr(self._owner, "held", False):
            return
        self._thread_lock.acquire()
        try:
            fcntl.flock(self._file(), fcntl.LOCK_EX)
        except BaseException:
            self._thread_lock.release()
            raise
        self._owner.held = True

    def release(self) -> None:
        if not getattr(self._owner, "held", False):
            return
        self._owner.held = False
        try:
            fcntl.flock(self._file(), fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()


_queues: weakref.WeakSet[WriterQueue] = weakref.WeakSet()
_session_hooks: list[bool] = []


def _release_all() -> None:
    for queue in list(_queues):
        queue.release()


def install(engine: Engine) -> None:
    """Queue the writers of this engine (SQLite files only); released after the session's commit or
    rollback. The lock file sits next to the database, so every process using it takes part."""
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:" \
            or getattr(engine, "_sg_writer_queue", None):
        return
    queue = WriterQueue(database + "-writers.lock")
    engine._sg_writer_queue = queue

    @event.listens_for(engine, "before_cursor_execute")
    def _before(conn, cursor, statement, parameters, context, executemany) -> None:
        if statement.lstrip()[:7].upper().startswith(WRITES):
            queue.acquire()

    _queues.add(queue)
    if not _session_hooks:
        # After the database has committed or rolled back (engine "commit" events fire before it).
        # Registered once for all engines; release() is a no-op for queues this thread does not hold.
        event.listen(Session, "after_commit", lambda session: _release_all())
        event.listen(Session, "after_rollback", lambda session: _release_all())
        event.listen(Session, "after_soft_rollback", lambda session, previous: _release_all())
        _session_hooks.append(True)

    @event.listens_for(engine.pool, "reset")
    def _reset(dbapi_connection, record, reset_state=None) -> None:  # returned to the pool mid-transaction
        queue.release()
