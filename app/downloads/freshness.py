"""Answers that reflect what is true now (README, "Freshness"): listings wait a moment for the close
of a response whose last byte already left (``wait_for_closes``), and changed files are re-indexed
by the sidecar itself, without the watcher (``Reindexer``).

A product file whose size or mtime no longer match the index answers 503 "being updated" (its bytes
would not match the listed SHA-256). The sidecar then re-indexes that one file in the background with
the index's own rule (``index.index_one``), so the new version is served as soon as it is hashed:

- requests never wait: ``request`` queues the file (once) and returns;
- one file at a time per host: a thread per worker process takes an ``flock`` on a file in the
  instance folder before hashing, and after taking it checks the index again (another worker, or the
  watcher, may have just done this file), so two workers never hash the same change;
- a bounded rate: hashing is paced at ``REINDEX_BYTES_PER_SECOND``; a file still being written waits
  until it has been quiet for ``WATCH_DEBOUNCE_MS``.
"""
from __future__ import annotations

import fcntl
import logging
import time
from pathlib import Path

from flask import Flask
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from app.downloads import delivery
from app.downloads.background import KeyedWorker
from app.downloads.index import FileChanging, file_path, index_one
from app.downloads.maintenance import RateLimiter, file_signature
from app.downloads.models import PACKAGES_SKU, FileEntry
from app.extensions import db

log = logging.getLogger("softgoods.sidecar")
MAX_PENDING = 1000  # files queued per worker; more are dropped (the next request for one queues it again)
CLOSE_POLL_SECONDS = 0.005
QUIET_TRIES = 30    # looks at a file that keeps changing before it is left to a later request


def wait_for_closes(session: Session, grant_id: int, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds while a file request of this grant is in flight; True when one
    was (the caller reads the grant again). The sender records a response's end only after its last
    byte left, so a shopper who reloads the listing at once could otherwise see the count before it."""
    deadline = time.monotonic() + timeout
    waited = False
    while delivery.requests_in_flight(session, grant_id):
        session.rollback()  # the next look sees what other workers committed meanwhile
        waited = True
        if time.monotonic() >= deadline:
            break
        time.sleep(CLOSE_POLL_SECONDS)
    return waited


class Reindexer:
    def __init__(self, app: Flask):
        self.app = app
        self.download_dir = Path(app.config["DOWNLOAD_DIR"])
        self.lock_path = Path(app.config["INSTANCE_DIR"]) / "reindex.lock"
        self.rate = app.config["REINDEX_BYTES_PER_SECOND"]
        self.quiet = app.config["WATCH_DEBOUNCE_MS"] / 1000
        self.worker = KeyedWorker(lambda key: self._reindex(*key), "softgoods-reindex", MAX_PENDING)
        self.stop = self.worker.stop

    def request(self, sku: str, path: str) -> None:
        """Queue a re-index of this file (at most once at a time); never blocks the caller."""
        if sku == PACKAGES_SKU:  # package ZIPs are indexed by the package builder that writes them
            return
        self.worker.put((sku, path))

    def _reindex(self, sku: str, path: str) -> None:
        full = file_path(self.download_dir, sku, path)
        for _ in range(QUIET_TRIES):
            if not self._quiet(full):
                continue
            with open(self.lock_path, "a") as lock, self.app.app_context():
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # one hash at a time on this host
                try:
                    if self._indexed_as_on_disk(sku, path, full):
                        return
                    db.session.rollback()  # no transaction stays open while the file is read
                    entry = index_one(db.session, self.download_dir, sku, path,
                                      pace=RateLimiter(self.rate, sleep=self.stop.wait).spend)
                    db.session.commit()
                    if entry is not None:
                        log.warning("re-indexed %s/%s after it changed on disk: %s bytes sha256 %s",
                                 sku, path, entry.size, entry.sha256)
                    return
                except FileChanging:
                    db.session.rollback()  # still being written: look again when it is quiet
                except (OperationalError, OSError) as exc:
                    db.session.rollback()
                    log.warning("could not re-index %s/%s yet: %s", sku, path, exc)
                    return
                finally:
                    db.session.remove()
                    fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _quiet(self, full: Path) -> bool:
        """Wait until the file has not changed for the debounce time (False: it changed meanwhile)."""
        before = file_signature(full)
        if before is not None:
            age = time.time() - before[1] / 1e9
            if age < self.quiet:
                self.stop.wait(self.quiet - age)
        return file_signature(full) == before

    def _indexed_as_on_disk(self, sku: str, path: str, full: Path) -> bool:
        recorded = db.session.execute(select(FileEntry.size, FileEntry.mtime_ns, FileEntry.missing)
                                      .where(FileEntry.sku == sku, FileEntry.path == path)).first()
        on_disk = file_signature(full)
        if on_disk is None:
            return recorded is None or recorded.missing
        return recorded is not None and not recorded.missing and (recorded.size, recorded.mtime_ns) == on_disk
