"""The watcher (``softgoods watch``): keeps the file index, checksums and symlink folders current.

- A watchdog observer on DOWNLOAD_DIR queues every created, changed, moved or removed product
  file; a file is re-indexed (``index.index_one``) once it has been quiet for ``WATCH_DEBOUNCE_MS``
  and its size and mtime did not move since the last look, so a file still being copied is
  indexed once, when complete (``FileChanging`` during hashing puts it back in the queue).
- Every ``WATCH_EXPIRY_SECONDS`` it expires grants with the purge rule (``maintenance.expire_grants``),
  which removes their symlink folders; nginx serves symlink mode without asking anyone, so the
  folder going away *is* the expiry there.
- A background thread re-hashes stored files at ``REHASH_BYTES_PER_SECOND`` and flags a file whose
  bytes no longer match its recorded SHA-256 while its size and mtime did not change (bit rot,
  tampering): the sidecar never confirms it as verified and the owner sees the flag.
- The email outbox is retried every ``WATCH_OUTBOX_SECONDS``.
- On start, a full ``index_files`` pass picks up what changed while it was down; SIGTERM/SIGINT
  stop it cleanly (the caller sets ``stop``).
"""
from __future__ import annotations

import hashlib
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from flask import Flask
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from app.downloads import maintenance
from app.downloads.index import READ_BLOCK, FileChanging, index_files, index_one
from app.downloads.models import PACKAGES_SKU, AuditEntry, FileEntry
from app.extensions import db
from app.store.models import SKU_PATTERN
from app.timeutil import utcnow

TICK = 0.2  # seconds between looks at the queue: the latency floor of a re-index


def product_file(download_dir: Path, path: str | bytes) -> tuple[str, str] | None:
    """(sku, relative path) of a product file under DOWNLOAD_DIR/<SKU>/, or None for anything else.

    Same rules as ``index.walk_product_files``: hidden and half-written names are never products.
    """
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    try:
        rel = Path(path).relative_to(download_dir)
    except ValueError:
        return None
    parts = rel.parts
    if len(parts) < 2 or not SKU_PATTERN.fullmatch(parts[0]) or any(p.startswith(".") for p in parts[1:]):
        return None
    if parts[-1].endswith((".part", ".tmp", ".crdownload")):
        return None
    return parts[0], "/".join(parts[1:])


@dataclass
class Pending:
    last_event: float
    signature: tuple[int, int] | None


class _Queue(FileSystemEventHandler):
    """Turns watchdog events (observer thread) into pending files and folder rescans."""

    def __init__(self, download_dir: Path):
        self.download_dir = download_dir
        self.lock = threading.Lock()
        self.files: dict[tuple[str, str], Pending] = {}
        self.rescan = False  # a folder moved or went away: a full index pass marks its files missing

    def add(self, path: str | bytes, *, unless_pending: bool = False) -> None:
        key = product_file(self.download_dir, path)
        if key is None:
            return
        sig = maintenance.file_signature(self.download_dir / key[0] / key[1])
        with self.lock:
            if unless_pending and key in self.files:
                return  # a re-hash noticing a change must not restart an event's quiet period
            self.files[key] = Pending(time.monotonic(), sig)

    def add_tree(self, folder: str | bytes) -> None:
        for dirpath, _dirs, names in os.walk(os.fsdecode(folder)):
            for name in names:
                self.add(os.path.join(dirpath, name))

    def on_any_event(self, event: FileSystemEvent) -> None:
        kind = event.event_type
        if kind in ("opened", "closed_no_write"):
            return
        if event.is_directory:
            if kind in ("deleted", "moved"):
                with self.lock:
                    self.rescan = True
            if kind in ("created", "moved"):  # files may land before the new folder is watched
                self.add_tree(event.dest_path or event.src_path)
            return
        self.add(event.src_path)
        if kind == "moved":
            self.add(event.dest_path)

    def due(self, quiet: float) -> list[tuple[str, str]]:
        """Files quiet for ``quiet`` seconds whose size and mtime held still since the last look."""
        now = time.monotonic()
        ready = []
        with self.lock:
            for key, item in list(self.files.items()):
                if now - item.last_event < quiet:
                    continue
                sig = maintenance.file_signature(self.download_dir / key[0] / key[1])
                if sig != item.signature:  # still growing: look again after another quiet period
                    item.signature, item.last_event = sig, now
                    continue
                ready.append(key)
        return ready

    def done(self, key: tuple[str, str], signature: tuple[int, int] | None) -> None:
        with self.lock:
            item = self.files.get(key)
            if item is not None and item.signature == signature:
                del self.files[key]

    def retry(self, key: tuple[str, str]) -> None:
        with self.lock:
            if key in self.files:
                self.files[key].last_event = time.monotonic()

    def take_rescan(self) -> bool:
        with self.lock:
            wanted, self.rescan = self.rescan, False
        return wanted


class Watcher:
    def __init__(self, app: Flask, echo: Callable[[str], None] = print):
        cfg = app.config
        self.app = app
        self.echo = echo
        self.download_dir = Path(cfg["DOWNLOAD_DIR"])
        self.symlink_dir = cfg["SYMLINK_DIR"]
        self.quiet = cfg["WATCH_DEBOUNCE_MS"] / 1000
        self.expiry_every = cfg["WATCH_EXPIRY_SECONDS"]
        self.outbox_every = cfg["WATCH_OUTBOX_SECONDS"]
        self.rehash_rate = cfg["REHASH_BYTES_PER_SECOND"]
        self.rehash_age = cfg["REHASH_EVERY_SECONDS"]
        self.grace = cfg["EXPIRY_GRACE_SECONDS"]
        self.queue = _Queue(self.download_dir)
        self.indexed: list[str] = []  # what this run (re-)indexed, in order: tests and the log read it
        self.stop = threading.Event()

    # -- the main loop -------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        self.download_dir.mkdir(parents=True, exist_ok=True)
        self.stop = stop
        with self.app.app_context():
            self._full_pass("start")
        if stop.is_set():  # asked to stop while waiting for the database
            self.echo("watcher stopped")
            return
        observer = Observer()
        observer.schedule(self.queue, str(self.download_dir), recursive=True)
        observer.start()
        rehash = threading.Thread(target=self._rehash_loop, args=(stop,), name="rehash", daemon=True)
        rehash.start()
        self.echo(f"watching {self.download_dir}")
        next_expiry = next_outbox = 0.0
        try:
            while not stop.is_set():
                with self.app.app_context():
                    self._guarded(self._index_due)
                    now = time.monotonic()
                    if now >= next_expiry:
                        self._guarded(self._expire)
                        next_expiry = now + self.expiry_every
                    if now >= next_outbox:
                        self._guarded(self._flush_outbox)
                        next_outbox = now + self.outbox_every
                    db.session.remove()
                stop.wait(TICK)
        finally:
            observer.stop()
            observer.join(10)
            rehash.join(10)
            self.echo("watcher stopped")

    def _guarded(self, step: Callable[[], None]) -> None:
        """One step's failure (a locked database, a full disk) is logged; the next tick tries again."""
        try:
            step()
        except OperationalError as exc:
            db.session.rollback()
            self.echo(f"database busy or unreachable, will retry: {exc.orig}")

    def _full_pass(self, why: str) -> None:
        while True:
            try:
                report = index_files(db.session, self.download_dir)
                db.session.commit()
                break
            except (OperationalError, IntegrityError) as exc:  # `softgoods index` at the same time, or no database
                db.session.rollback()
                self.echo(f"index pass interrupted ({exc.__class__.__name__}), retrying")
                if self.stop.wait(2):
                    return
        self.indexed += report.added + report.changed
        self.echo(f"index pass ({why}): {len(report.added)} added, {len(report.changed)} changed, "
                  f"{len(report.removed)} missing, {report.unchanged} unchanged")

    def _index_due(self) -> None:
        if self.queue.take_rescan():
            self._full_pass("a folder moved or was removed")
        for sku, rel in self.queue.due(self.quiet):
            signature = maintenance.file_signature(self.download_dir / sku / rel)
            if signature is not None and self._already_indexed(sku, rel, signature):
                # Same rule as `softgoods index`: size and mtime decide. An in-place write that put the
                # old mtime back is exactly what the re-hash must flag, not bless as the new content.
                self.queue.done((sku, rel), signature)
                continue
            try:
                entry = index_one(db.session, self.download_dir, sku, rel)
                db.session.commit()
            except FileChanging:
                db.session.rollback()
                self.queue.retry((sku, rel))
                continue
            except (OperationalError, IntegrityError) as exc:
                db.session.rollback()
                self.echo(f"could not index {sku}/{rel} yet ({exc.__class__.__name__}), retrying")
                self.queue.retry((sku, rel))
                continue
            except OSError as exc:
                db.session.rollback()
                self.echo(f"cannot read {sku}/{rel}: {exc.strerror or exc}")
                self.queue.done((sku, rel), signature)
                continue
            self.queue.done((sku, rel), signature)
            if entry is None:
                continue
            if entry.missing:
                self.echo(f"missing  {sku}/{rel}")
            else:
                self.indexed.append(f"{sku}/{rel}")
                self.echo(f"indexed  {sku}/{rel} {entry.size} bytes sha256 {entry.sha256}")

    def _already_indexed(self, sku: str, rel: str, signature: tuple[int, int]) -> bool:
        recorded = db.session.execute(select(FileEntry.size, FileEntry.mtime_ns, FileEntry.missing)
                                      .where(FileEntry.sku == sku, FileEntry.path == rel)).first()
        return recorded is not None and not recorded.missing and (recorded.size, recorded.mtime_ns) == signature

    def _expire(self) -> None:
        now = utcnow()
        if self.symlink_dir:
            retired = maintenance.retire_link_folders(db.session, now, self.symlink_dir)
            if retired:
                self.echo(f"removed {len(retired)} symlink folder(s) of links that expired")
        cutoff = maintenance.expiry_cutoff(now, self.grace)
        count, folders = maintenance.expire_grants(db.session, cutoff, symlink_dir=self.symlink_dir,
                                                       only_linked=True)
        if count:
            self.echo(f"expired {count} grant(s), removed {len(folders)} symlink folder(s)")

    def _flush_outbox(self) -> None:
        flush = maintenance.outbox_flusher()
        if flush is None or not maintenance.unsent_emails(db.session):
            return
        sent = flush(db.session)
        db.session.commit()
        if sent:
            self.echo(f"sent {sent} waiting email(s)")

    # -- background integrity check -------------------------------------------------------------
    def _rehash_loop(self, stop: threading.Event) -> None:
        if self.rehash_rate <= 0:
            return
        while not stop.is_set():
            with self.app.app_context():
                try:
                    busy = self.verify_next(stop)
                except OperationalError:
                    db.session.rollback()
                    busy = False
                finally:
                    db.session.remove()
            if not busy:
                stop.wait(min(60.0, max(1.0, self.rehash_age / 10)))

    def verify_next(self, stop: threading.Event | None = None) -> bool:
        """Re-hash the file verified longest ago, if it is due; False when nothing was due."""
        oldest = db.session.execute(
            select(FileEntry.id, FileEntry.sku, FileEntry.path, FileEntry.sha256, FileEntry.size,
                   FileEntry.mtime_ns, FileEntry.verified_at)
            .where(FileEntry.missing.is_(False))
            .order_by(FileEntry.verified_at.is_not(None), FileEntry.verified_at, FileEntry.id).limit(1)).first()
        db.session.rollback()  # no transaction stays open while the file is read
        if oldest is None:
            return False
        entry_id, sku, path, sha256, size, mtime_ns, verified_at = oldest
        if verified_at is not None and (utcnow() - verified_at).total_seconds() < self.rehash_age:
            return False
        full = self.download_dir / sku / path
        recorded = (size, mtime_ns)
        if maintenance.file_signature(full) != recorded:
            if sku != PACKAGES_SKU:
                # changed or gone the ordinary way (new size or mtime): re-index, never flag
                self.queue.add(str(full), unless_pending=True)
            self._mark_verified(entry_id, sha256, None)
            return True
        digest = self._hash(full, stop)
        if digest is None:  # stopping, or unreadable: try again later
            return False
        if maintenance.file_signature(full) != recorded:
            return True  # replaced while we read it: the event queue re-indexes it
        if digest == sha256:
            self._mark_verified(entry_id, sha256, None)
        else:
            reason = f"bytes no longer match the recorded SHA-256 (found {digest[:16]}...): bit rot or tampering"
            self._mark_verified(entry_id, sha256, reason)
            db.session.add(AuditEntry(actor="watcher", action="file.flagged", target=f"{sku}/{path}"[:200],
                                      detail=reason))
            db.session.commit()
            self.echo(f"FLAGGED  {sku}/{path}: {reason}")
        return True

    def _mark_verified(self, entry_id: int, sha256: str, flag: str | None) -> None:
        values = {"verified_at": utcnow()}
        if flag:
            values["flagged"] = flag[:200]
            values["acknowledged_at"] = None  # a new problem: back on the owner's dashboard
        # Conditional on the digest we checked: a re-index meanwhile wins.
        db.session.execute(update(FileEntry).where(FileEntry.id == entry_id, FileEntry.sha256 == sha256)
                           .values(**values).execution_options(synchronize_session=False))
        db.session.commit()

    def _hash(self, full: Path, stop: threading.Event | None) -> str | None:
        limiter = maintenance.RateLimiter(self.rehash_rate, sleep=stop.wait if stop is not None else time.sleep)
        digest = hashlib.sha256()
        try:
            with open(full, "rb") as fh:
                while chunk := fh.read(READ_BLOCK):
                    if stop is not None and stop.is_set():
                        return None
                    digest.update(chunk)
                    limiter.spend(len(chunk))
        except OSError as exc:
            self.echo(f"cannot re-hash {full}: {exc.strerror or exc}")
            return None
        return digest.hexdigest()
