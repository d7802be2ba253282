"""Maintenance rules shared by ``softgoods purge`` (cron) and ``softgoods watch`` (the watcher).

What purge does, in this order, each step idempotent and in short transactions so the sidecar,
the store and a running watcher keep working meanwhile (SQLite queues writers on its busy timeout):

1. **Expire grants** past ``expires_at + EXPIRY_GRACE_SECONDS`` (a transfer that started before
   expiry may finish within the grace). Rows stay for the order history: ``status`` becomes
   ``expired`` and ``symlink_token`` is cleared. The key hash is kept on purpose, so the link still
   proves which order it belongs to and answers **410 with the date it expired** forever (a cleared
   key would turn it into a puzzling 404), and an owner who extends the grant revives the same link.
   Batched by primary-key ranges, so memory stays bounded and no transaction holds the write lock
   for long.
2. **Remove symlink folders** (``SYMLINK_DIR/<symlink_token>/``) of the grants just expired, plus
   orphans: folders older than ``ORPHAN_MIN_AGE`` that no active grant owns (a crash between the
   commit and the removal, a revoked grant).
3. **Delete expired download packages** (record and ZIP; the original files stay) through
   ``app.downloads.packages.purge_expired_packages``.
4. **Prune download-log rows** older than ``LOG_RETENTION_DAYS``, batched.
   Then release reservations handed to nginx whose log line did not arrive within
   ``NGINX_HANDOFF_SECONDS`` (``app.downloads.handoffs``), and idle unfinished deliveries' slots.
5. **Retry the email outbox** (``app.mail.flush_outbox``), never in a dry run.

``dry_run=True`` writes nothing at all (no row, no file) and reports what a real run would remove.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Callable

from sqlalchemy import and_, delete, func, select, update
from sqlalchemy.orm import Session

from app.downloads.models import DownloadLog, NginxHandoff, OutboxMessage, UserDownload
from app.store.models import Order

BATCH = 50_000  # rows per transaction: big enough to be fast, small enough to keep locks short
ORPHAN_MIN_AGE = timedelta(minutes=10)  # the sidecar creates a folder before it commits its token
SAMPLE = 20  # grants named one by one in the report; the rest are counted


@dataclass
class PurgeReport:
    dry_run: bool
    cutoff: datetime
    grants_expired: int = 0
    grant_samples: list[str] = field(default_factory=list)
    symlink_dirs: list[str] = field(default_factory=list)
    packages: list[str] = field(default_factory=list)
    log_rows: int = 0
    log_cutoff: datetime | None = None
    slots_released: int | None = None
    handoffs_released: int | None = None
    outbox_sent: int | None = None
    outbox_waiting: int = 0
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """What a person reads in the cron mail: one line per fact; the verb says whether it happened."""
        def verb(now: str, done: str) -> str:
            return f"would {now}" if self.dry_run else done

        out = [f"{verb('expire', 'expired')} {self.grants_expired} grant(s) past "
               f"{self.cutoff:%Y-%m-%d %H:%M} UTC (expiry plus grace)"]
        out += [f"  {line}" for line in self.grant_samples]
        if self.grants_expired > len(self.grant_samples):
            out.append(f"  ... and {self.grants_expired - len(self.grant_samples)} more")
        out.append(f"{verb('remove', 'removed')} {len(self.symlink_dirs)} symlink folder(s)")
        out += [f"  {name}" for name in self.symlink_dirs[:SAMPLE]]
        out.append(f"{verb('delete', 'deleted')} {len(self.packages)} expired package(s)"
                   + (f": {', '.join(self.packages)}" if self.packages else ""))
        if self.log_cutoff is not None:
            out.append(f"{verb('prune', 'pruned')} {self.log_rows} download-log row(s) "
                       f"before {self.log_cutoff:%Y-%m-%d}")
        if self.handoffs_released is not None:
            out.append(f"released {self.handoffs_released} reservation(s) handed to nginx with no log line in time")
        if self.slots_released is not None:
            out.append(f"{verb('release', 'released')} {self.slots_released} download slot(s) "
                       "held by idle unfinished deliveries")
        if self.dry_run:
            out.append(f"would retry {self.outbox_waiting} unsent email(s)")
        elif self.outbox_sent is None:
            out.append(f"outbox: {self.outbox_waiting} unsent email(s) waiting")
        else:
            out.append(f"sent {self.outbox_sent} of {self.outbox_waiting} waiting email(s)")
        out += self.notes
        return out


def expiry_cutoff(now: datetime, grace_seconds: int) -> datetime:
    return now - timedelta(seconds=grace_seconds)


def _expired_condition(cutoff: datetime):
    return and_(UserDownload.status == "active", UserDownload.expires_at < cutoff)


def count_expired_grants(session: Session, cutoff: datetime) -> int:
    return session.scalar(select(func.count()).select_from(UserDownload).where(_expired_condition(cutoff))) or 0


def _describe_expired(session: Session, cutoff: datetime, limit: int) -> list[str]:
    rows = session.execute(
        select(UserDownload.id, UserDownload.sku, UserDownload.expires_at, Order.po_number, Order.email)
        .join(Order, Order.id == UserDownload.order_id)
        .where(_expired_condition(cutoff)).order_by(UserDownload.id).limit(limit))
    return [f"grant {gid} {po} {sku} for {email}, expired {exp:%Y-%m-%d %H:%M} UTC"
            for gid, sku, exp, po, email in rows]


def expire_grants(session: Session, cutoff: datetime, *, symlink_dir: str | Path | None,
                  commit: bool = True, batch: int = BATCH, only_linked: bool = False) -> tuple[int, list[str]]:
    """Mark grants past ``cutoff`` expired, batch by batch; remove their symlink folders.

    ``only_linked`` (the watcher, every few seconds) looks only at grants that own a symlink folder,
    found through the symlink_token index however many expired grants history holds.

    Returns (grants expired, symlink folders removed). Each batch is one short transaction: the
    commit comes before the folders go, so a crash in between leaves orphans that
    ``remove_orphan_links`` sweeps, never a live grant without its folder.
    """
    due = _expired_condition(cutoff)
    if only_linked:
        due = and_(due, UserDownload.symlink_token.is_not(None))
    span = session.execute(select(func.min(UserDownload.id), func.max(UserDownload.id)).where(due)).one()
    if span[0] is None:
        return 0, []
    expired, removed = 0, []
    low, high = span
    while low <= high:
        in_batch = and_(UserDownload.id >= low, UserDownload.id < low + batch, due)
        tokens = list(session.scalars(select(UserDownload.symlink_token)
                                      .where(in_batch, UserDownload.symlink_token.is_not(None))))
        if tokens:  # only rows that own a folder pay for the extra column write
            session.execute(update(UserDownload).where(in_batch, UserDownload.symlink_token.is_not(None))
                            .values(symlink_token=None).execution_options(synchronize_session=False))
        result = session.execute(update(UserDownload).where(in_batch).values(status="expired")
                                 .execution_options(synchronize_session=False))
        expired += result.rowcount or 0
        if commit:
            session.commit()
        if symlink_dir:
            removed += [t for t in tokens if remove_link_folder(symlink_dir, t)]
        low += batch
    return expired, removed


def retire_link_folders(session: Session, now: datetime, symlink_dir: str | Path) -> list[str]:
    """Remove the symlink folders of grants that expired by ``now`` (no grace: nginx serves those links to
    anyone who has them, so they go the moment the grant expires; transfers already open in nginx keep
    their file descriptor and finish). The grant's status is left to ``expire_grants`` after the grace."""
    rows = session.execute(select(UserDownload.id, UserDownload.symlink_token)
                           .where(UserDownload.symlink_token.is_not(None), UserDownload.expires_at <= now)).all()
    if not rows:
        return []
    session.execute(update(UserDownload).where(UserDownload.id.in_([r.id for r in rows]))
                    .values(symlink_token=None).execution_options(synchronize_session=False))
    session.commit()  # before the folders go: a crash leaves orphans for the purge, never a live grant without links
    return [r.symlink_token for r in rows if remove_link_folder(symlink_dir, r.symlink_token)]


def link_folder(symlink_dir: str | Path, token: str) -> Path | None:
    """The folder of one grant's links; None for a token that could name anything else."""
    if not token or "/" in token or token.startswith("."):
        return None
    return Path(symlink_dir) / token


def holds_only_links(folder: Path) -> bool:
    """A grant's folder holds symlinks and sub-folders, nothing else. Anything more means
    SYMLINK_DIR points somewhere it should not (the download dir, a home folder): keep it."""
    if folder.is_symlink() or not folder.is_dir():
        return folder.is_symlink()
    for dirpath, _dirs, names in os.walk(folder):
        for name in names:
            if not os.path.islink(os.path.join(dirpath, name)):
                return False
    return True


def remove_link_folder(symlink_dir: str | Path, token: str) -> bool:
    """Remove one grant's folder of links; never a folder that holds real files."""
    folder = link_folder(symlink_dir, token)
    if folder is None or not folder.exists() and not folder.is_symlink():
        return False
    if not holds_only_links(folder):
        return False
    if folder.is_symlink():
        folder.unlink(missing_ok=True)
    else:
        shutil.rmtree(folder, ignore_errors=True)  # links only: rmtree removes links, never follows them
    return True


def orphan_link_folders(session: Session, symlink_dir: str | Path, now: datetime) -> list[str]:
    """Folders in SYMLINK_DIR that no active grant owns and that are old enough not to be in the making."""
    root = Path(symlink_dir)
    if not root.is_dir():
        return []
    too_new = (now - ORPHAN_MIN_AGE).timestamp()
    candidates = []
    for child in root.iterdir():
        if child.name.startswith("."):
            continue
        try:
            if child.lstat().st_mtime > too_new:
                continue
        except FileNotFoundError:
            continue
        candidates.append(child.name)
    orphans = []
    for start in range(0, len(candidates), 1000):
        chunk = candidates[start:start + 1000]
        owned = set(session.scalars(select(UserDownload.symlink_token).where(
            UserDownload.symlink_token.in_(chunk), UserDownload.status == "active")))
        orphans += sorted(set(chunk) - owned)
    return orphans


def prune_download_log(session: Session, before: datetime, *, commit: bool = True, batch: int = BATCH) -> int:
    """Delete log rows older than ``before`` in batches (deleted rows leave the index: no rescans)."""
    total = 0
    while True:
        ids = select(DownloadLog.id).where(DownloadLog.at < before).order_by(DownloadLog.at).limit(batch)
        result = session.execute(delete(DownloadLog).where(DownloadLog.id.in_(ids.scalar_subquery()))
                                 .execution_options(synchronize_session=False))
        if commit:
            session.commit()
        total += result.rowcount or 0
        if (result.rowcount or 0) < batch:
            return total


def _packages_purger() -> Callable | None:
    try:
        from app.downloads.packages import purge_expired_packages
    except ImportError:
        return None
    return purge_expired_packages


def _stale_slot_releaser() -> Callable | None:
    from app.downloads import delivery

    return getattr(delivery, "release_stale_deliveries", None)


def outbox_flusher() -> Callable | None:
    try:
        from app.mail import flush_outbox
    except ImportError:
        return None
    return flush_outbox


def unsent_emails(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(OutboxMessage).where(OutboxMessage.sent_at.is_(None))) or 0


def purge(session: Session, now: datetime, *, dry_run: bool, download_dir: str | Path,
          symlink_dir: str | Path, grace_seconds: int, log_retention_days: int | None,
          send_mail: bool = True) -> PurgeReport:
    """The cron job's rule. Commits its own short batches (unless ``dry_run``: then it writes nothing)."""
    cutoff = expiry_cutoff(now, grace_seconds)
    report = PurgeReport(dry_run=dry_run, cutoff=cutoff)
    report.grant_samples = _describe_expired(session, cutoff, SAMPLE)
    if dry_run:
        report.grants_expired = count_expired_grants(session, cutoff)
        tokens = session.scalars(select(UserDownload.symlink_token).where(
            _expired_condition(cutoff), UserDownload.symlink_token.is_not(None)).limit(10_000))
        report.symlink_dirs = [t for t in tokens
                               if (f := link_folder(symlink_dir, t)) and f.exists() and holds_only_links(f)]
    else:
        report.grants_expired, report.symlink_dirs = expire_grants(session, cutoff, symlink_dir=symlink_dir)
    orphans = orphan_link_folders(session, symlink_dir, now)
    kept = [name for name in orphans if not holds_only_links(Path(symlink_dir) / name)]
    if kept:
        report.notes.append(f"kept {len(kept)} folder(s) in SYMLINK_DIR that hold real files (check the setting): "
                            + ", ".join(kept[:5]))
    orphans = [name for name in orphans if name not in kept]
    if not dry_run:
        orphans = [name for name in orphans if remove_link_folder(symlink_dir, name)]
    report.symlink_dirs += orphans

    purge_packages = _packages_purger()
    if purge_packages is None:
        report.notes.append("packages: not available in this installation")
    else:
        report.packages = purge_packages(session, download_dir, now.date(), dry_run=dry_run)
        if not dry_run:
            session.commit()

    if log_retention_days:
        report.log_cutoff = now - timedelta(days=log_retention_days)
        if dry_run:
            report.log_rows = session.scalar(select(func.count()).select_from(DownloadLog)
                                             .where(DownloadLog.at < report.log_cutoff)) or 0
        else:
            report.log_rows = prune_download_log(session, report.log_cutoff)
            # settled nginx reservations are only needed while their log lines may still be read
            session.execute(delete(NginxHandoff).where(NginxHandoff.settled_at < report.log_cutoff)
                            .execution_options(synchronize_session=False))
            session.commit()

    if not dry_run:
        from app.downloads.handoffs import release_stale_handoffs  # here: handoffs imports this module

        report.handoffs_released = release_stale_handoffs(session, now)
        session.commit()

    release = _stale_slot_releaser()
    if release is not None:
        # Unfinished deliveries idle too long give their download slot back (the delivery rules decide).
        report.slots_released = release(session, now, dry_run=dry_run)
        if not dry_run:
            session.commit()

    report.outbox_waiting = unsent_emails(session)
    flush = outbox_flusher()
    if not dry_run and send_mail and flush is not None and report.outbox_waiting:
        report.outbox_sent = flush(session)
        session.commit()
    if dry_run:
        session.rollback()  # reads only; end the read transaction so no snapshot lingers
    return report


class RateLimiter:
    """Keeps a long job to ``bytes_per_second`` on average (the background re-hash)."""

    def __init__(self, bytes_per_second: int, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], object] = time.sleep):
        self.rate = bytes_per_second
        self.clock, self.sleep = clock, sleep
        self.started = clock()
        self.done = 0

    def spend(self, n: int) -> None:
        if self.rate <= 0:
            return
        self.done += n
        ahead = self.done / self.rate - (self.clock() - self.started)
        if ahead > 0:
            self.sleep(ahead)


def file_signature(path: str | os.PathLike) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns
