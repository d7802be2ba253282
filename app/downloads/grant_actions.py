"""The owner's actions on a grant (extend, add downloads, revoke) and shared-link detection.

Plain rules: the order pages call them; they validate first and raise InvalidInput, the caller commits.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.downloads.errors import InvalidInput
from app.downloads.maintenance import remove_link_folder
from app.downloads.models import DownloadLog, UserDownload
from app.timeutil import utcnow

MAX_EXTEND_DAYS = 3650
MAX_ADD_DOWNLOADS = 10_000
SHARED_LINK_ADDRESSES = 3  # one grant used from this many addresses looks like a shared link


def parse_count(text: str | int | None, label: str, upper: int) -> int:
    try:
        value = int(str(text).strip())
    except (TypeError, ValueError):
        raise InvalidInput(f"{label} must be a whole number, not {text!r}") from None
    if not 1 <= value <= upper:
        raise InvalidInput(f"{label} must be between 1 and {upper}")
    return value


def extend_expiry(session: Session, grant: UserDownload, days: int) -> None:
    """Push the expiry ``days`` further (from now, if it has already passed); an expired link opens again."""
    if grant.status == "revoked":
        raise InvalidInput("this link was revoked; a revoked link cannot be extended", status=409)
    grant.expires_at = max(grant.expires_at, utcnow()) + timedelta(days=days)
    grant.status = "active"
    session.flush()


def add_downloads(session: Session, grant: UserDownload, count: int) -> None:
    if grant.status == "revoked":
        raise InvalidInput("this link was revoked; downloads cannot be added", status=409)
    if grant.max_downloads is None:
        raise InvalidInput("this link already has unlimited downloads", status=409)
    grant.max_downloads += count
    session.flush()


def revoke(session: Session, grant: UserDownload, symlink_dir: str | None = None) -> None:
    """Withdraw a link at once; in symlink mode its folder goes too, or nginx would keep serving it."""
    if grant.status == "revoked":
        raise InvalidInput("this link is already revoked", status=409)
    grant.status = "revoked"
    if symlink_dir and grant.symlink_token:
        remove_link_folder(symlink_dir, grant.symlink_token)
        grant.symlink_token = None
    session.flush()


@dataclass(frozen=True)
class SharedLink:
    grant_id: int
    order_po: str | None
    addresses: int


def shared_links(session: Session, min_addresses: int = SHARED_LINK_ADDRESSES, limit: int = 100) -> list[SharedLink]:
    """Grants whose downloads came from at least ``min_addresses`` distinct client addresses."""
    count = func.count(func.distinct(DownloadLog.client_ip))
    rows = session.execute(
        select(DownloadLog.grant_id, func.max(DownloadLog.order_po), count)
        .where(DownloadLog.grant_id.is_not(None), DownloadLog.client_ip.is_not(None))
        .group_by(DownloadLog.grant_id).having(count >= min_addresses)
        .order_by(count.desc(), DownloadLog.grant_id).limit(limit))
    return [SharedLink(gid, po, n) for gid, po, n in rows]
