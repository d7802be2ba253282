"""Work a sidecar request asks for but must not wait for (re-hashing a changed file, computing an
expected proof): a set of distinct keys drained one at a time by a thread of this process."""
from __future__ import annotations

import logging
import os
import threading
from typing import Callable, Hashable

log = logging.getLogger("softgoods.sidecar")


class KeyedWorker:
    """``put`` never blocks: a key already waiting is not queued twice, and beyond ``max_pending``
    waiting keys new ones are dropped (the next request for one asks again). The thread starts on
    first use in each process (gunicorn forks workers after the app is built) and outlives a failing
    key; ``stop`` ends it and wakes whatever ``handle`` paces with ``stop.wait``."""

    def __init__(self, handle: Callable[[Hashable], None], name: str, max_pending: int):
        self.handle, self.name, self.max_pending = handle, name, max_pending
        self.stop = threading.Event()
        self._pending: dict[Hashable, None] = {}  # an ordered set
        self._wake = threading.Condition()
        self._pid: int | None = None

    def put(self, key: Hashable) -> None:
        with self._wake:
            if self._pid != os.getpid():  # first use in this (forked) worker process
                self._pid = os.getpid()
                self._pending.clear()
                threading.Thread(target=self._loop, name=self.name, daemon=True).start()
            if key not in self._pending and len(self._pending) < self.max_pending:
                self._pending[key] = None
                self._wake.notify()

    def _loop(self) -> None:
        while not self.stop.is_set():
            with self._wake:
                while not self._pending and not self.stop.is_set():
                    self._wake.wait()
                if self.stop.is_set():
                    return
                key = next(iter(self._pending))
            try:
                self.handle(key)
            except Exception:  # this thread must outlive one bad key
                log.exception("%s failed for %r", self.name, key)
            finally:
                with self._wake:
                    self._pending.pop(key, None)
