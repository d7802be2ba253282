"""Reservations handed to nginx (``accel`` and ``symlink`` modes), settled from its access log.

nginx sends the bytes, so the sidecar never sees such a request end. It reserves before handing the
file over, exactly as pipe mode does (``delivery.open_request``: 403 past the limit, before any
redirect or link leaves), and records the reservation here. nginx log ingestion then settles it with
the same rule as pipe mode's close (``delivery.settle``): a complete transfer counts, a broken one
keeps only what it sent beyond the in-flight allowance. A reservation whose line never arrives is
released by the purge after ``NGINX_HANDOFF_SECONDS``.

How a log line finds its reservation: the line names the grant (the receipt in accel mode, the grant's
link folder in symlink mode) and the file; of that grant's open reservations for that file, the one
whose bytes match what nginx served settles, preferring the one named by the line's token (symlink
mode: the link lives in ``<grant folder>/<token>/``, removed once settled, so a link is not a lasting
way around the sidecar). The token is only a preference: a shopper who drops or alters it still
settles their own reservation (or, with none left, the line is counted by the rules at its own time),
and can never touch another grant's. Each reservation settles once (a conditional UPDATE).
"""
from __future__ import annotations

import secrets
from datetime import datetime, timedelta
from pathlib import Path

from flask import current_app, has_app_context
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.downloads import delivery
from app.downloads.maintenance import remove_link_folder
from app.downloads.models import FileEntry, NginxHandoff, UserDownload
from app.timeutil import utcnow

DEFAULT_WAIT_SECONDS = 3600


def hand_off(session: Session, grant: UserDownload, entry: FileEntry, *, start: int, length: int, status: int,
             method: str = "GET", now: datetime | None = None) -> NginxHandoff:
    """Reserve the bytes nginx is about to send (raises what ``open_request`` raises); the caller commits."""
    now = now or utcnow()
    reservation = delivery.open_request(session, grant, entry, start=start, length=length, method=method, now=now)
    row = NginxHandoff(token=secrets.token_urlsafe(18), grant_id=grant.id, delivery_id=reservation.delivery_id,
                       order_po=reservation.order_po, sku=entry.sku, path=entry.path,
                       product_sku=reservation.product_sku, start=start, length=length, status=status,
                       method=method, reservation_token=reservation.token, created_at=now)
    session.add(row)
    session.flush()
    return row


def reservation_of(row: NginxHandoff) -> delivery.Reservation:
    return delivery.Reservation(row.grant_id, row.order_po, row.sku, row.path, row.start, row.length,
                                delivery_id=row.delivery_id, method=row.method, token=row.reservation_token,
                                product_sku=row.product_sku)


def _claim(session: Session, row: NginxHandoff, now: datetime) -> bool:
    """Mark one reservation settled; False when another line or ingester settled it first."""
    result = session.execute(update(NginxHandoff).where(NginxHandoff.id == row.id, NginxHandoff.settled_at.is_(None))
                             .values(settled_at=now).execution_options(synchronize_session=False))
    if result.rowcount != 1:
        return False
    _remove_link(session, row)
    return True


def _remove_link(session: Session, row: NginxHandoff) -> None:
    """Symlink mode: the reservation's link folder goes once it is settled (nginx keeps serving what it opened)."""
    symlink_dir = current_app.config.get("SYMLINK_DIR") if has_app_context() else None
    grant_folder = session.scalar(select(UserDownload.symlink_token).where(UserDownload.id == row.grant_id))
    if symlink_dir and grant_folder:
        remove_link_folder(Path(symlink_dir) / grant_folder, row.token)


class _ReleaseStore(delivery.OrmStore):
    """The delivery rules' store, with the release's log row keyed by its reservation: written once,
    and never mistaken for the row of the log line being ingested."""

    def __init__(self, session: Session, token: str):
        super().__init__(session)
        self.token = token

    def add_log(self, **columns) -> None:
        super().add_log(**columns, source="nginx", source_key=f"handoff:{self.token}")


def _release(session: Session, row: NginxHandoff, now: datetime, outcome: str) -> bool:
    """Settle a reservation nginx sent nothing for (as far as we know): nothing counted, the bytes and,
    by the delivery rules, the slot go back."""
    if not _claim(session, row, now):
        return False
    with session.no_autoflush:
        delivery.settle(_ReleaseStore(session, row.token), reservation_of(row), 0, status=row.status, outcome=outcome,
                        client_ip=None, user_agent=None, range_header=None, now=now)
    return True


def is_token_of(session: Session, grant: UserDownload, token: str) -> bool:
    """Does ``token`` name one of this grant's hand-offs (a symlink URL's folder), settled or not?"""
    return session.scalar(select(NginxHandoff.id).where(NginxHandoff.grant_id == grant.id,
                                                        NginxHandoff.token == token)) is not None


def _open_rows(grant: UserDownload, entry: FileEntry):
    return (select(NginxHandoff).where(NginxHandoff.grant_id == grant.id, NginxHandoff.sku == entry.sku,
                                       NginxHandoff.path == entry.path, NginxHandoff.settled_at.is_(None))
            .order_by(NginxHandoff.id))


def release_unserved(session: Session, grant: UserDownload, entry: FileEntry, token: str, now: datetime) -> bool:
    """nginx answered the reserved link without the file (304 to its own validators, an error): the
    reservation named by ``token`` goes back now rather than at the purge."""
    row = session.scalar(_open_rows(grant, entry).where(NginxHandoff.token == token))
    return row is not None and _release(session, row, now, "not-served")


def settle_for_line(session: Session, grant: UserDownload, entry: FileEntry, *, start: int, length: int,
                    token: str | None, now: datetime) -> delivery.Reservation | None:
    """The open reservation a request nginx served (``start``, ``length`` of this grant's file) settles,
    claimed; the caller closes it with the line's bytes. None: no reservation matches, and the caller
    runs the line through the rules at its own time (so it is counted all the same)."""
    open_rows = _open_rows(grant, entry)
    named = session.scalar(open_rows.where(NginxHandoff.token == token)) if token else None
    if named is not None and (named.start, named.length) != (start, length):
        # nginx served other bytes than the sidecar reserved (an If-Range it judged otherwise, a download
        # manager splitting the link): give the reservation back; the line counts by the rules.
        _release(session, named, now, "served-otherwise")
        named = None
    candidates = [named] if named is not None else []
    candidates += session.scalars(open_rows.where(NginxHandoff.start == start, NginxHandoff.length == length)).all()
    for row in candidates:
        if _claim(session, row, now):
            return reservation_of(row)
    return None


def release_stale_handoffs(session: Session, now: datetime | None = None) -> int:
    """Release reservations whose nginx log line has not been ingested for ``NGINX_HANDOFF_SECONDS``
    (nginx never served the link, or the log was lost): they must not hold a download slot forever.
    A line ingested later still counts, by the rules at its own time. The caller commits."""
    now = now or utcnow()
    wait = current_app.config.get("NGINX_HANDOFF_SECONDS", DEFAULT_WAIT_SECONDS) if has_app_context() \
        else DEFAULT_WAIT_SECONDS
    rows = session.scalars(select(NginxHandoff).where(
        NginxHandoff.settled_at.is_(None), NginxHandoff.created_at < now - timedelta(seconds=wait))
        .order_by(NginxHandoff.id)).all()
    return sum(_release(session, row, now, "no-log-line") for row in rows)
