"""Delivery evidence: byte coverage, the order's shipped state and the owner's view of it.

Pure helpers over intervals plus the two read-mostly rules that sit on top of the counting rules in
``app.downloads.delivery``: ``maybe_ship`` (pending -> shipped) and ``order_evidence`` (the owner's
per-file table). The caller commits.
"""
from __future__ import annotations

import json
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.downloads.access import files_for_grant, public_path
from app.downloads.models import Delivery, DownloadLog, FileEntry, UserDownload
from app.store.models import Order
from app.timeutil import utcnow

EVIDENCE_RANK = {None: 0, "transferred": 1, "verified": 2}  # weakest first: an order keeps the weakest


def parse_intervals(raw: str | None) -> list[list[int]]:
    return [[int(a), int(b)] for a, b in json.loads(raw or "[]")]


def add_interval(intervals: list[list[int]], start: int, end: int) -> list[list[int]]:
    """The union of half-open byte intervals [start, end), kept sorted and merged (touching ones join)."""
    if end <= start:
        return intervals
    merged: list[list[int]] = []
    for a, b in sorted(intervals + [[start, end]]):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return merged


def covered(intervals: list[list[int]]) -> int:
    return sum(b - a for a, b in intervals)


def best_evidence(levels: list[str | None]) -> str | None:
    return max(levels, key=lambda level: EVIDENCE_RANK[level], default=None)


def weakest_evidence(levels: list[str | None]) -> str | None:
    return min(levels, key=lambda level: EVIDENCE_RANK[level], default=None)


def _lock_order(session: Session, order_id: int) -> None:
    # A row write: on PostgreSQL a row lock, on SQLite the database write lock. Two requests that
    # finish the last two files of one order at once must not both conclude "not yet shipped".
    session.execute(update(Order).where(Order.id == order_id).values(status=Order.status)
                    .execution_options(synchronize_session=False))


def _file_evidence(session: Session, grant_id: int, entry: FileEntry) -> str | None:
    """The best evidence any delivery of this file under this grant earned (any version of the file:
    the shopper got the file as it was then)."""
    levels = session.scalars(select(Delivery.evidence).where(
        Delivery.grant_id == grant_id, Delivery.sku == entry.sku, Delivery.path == entry.path,
        Delivery.evidence.is_not(None))).all()
    return best_evidence(list(levels))


def grant_complete_evidence(session: Session, grant: UserDownload) -> str | None:
    """The weakest evidence across every file of the grant, or None while any file lacks evidence.

    A class entitlement is complete only when all of its N choices are made and delivered.
    """
    if grant.entitlement_class and len(grant.choices) < (grant.entitlement_count or 0):
        return None
    entries = files_for_grant(session, grant)
    if not entries:
        return None
    levels = [_file_evidence(session, grant.id, entry) for entry in entries]
    if any(level is None for level in levels):
        return None
    return weakest_evidence(levels)


def maybe_ship(session: Session, order_id: int, now: datetime | None = None) -> bool:
    """Move the order to shipped when every file of every grant has evidence, with the weakest level.

    A shipped order keeps its ``shipped_at``; its level only rises (transferred -> verified) when the
    client's proofs arrive for every file later.
    """
    _lock_order(session, order_id)
    order = session.execute(select(Order).where(Order.id == order_id)
                            .execution_options(populate_existing=True)).scalar_one()
    if order.evidence == "verified" or not order.downloads:
        return order.status == "shipped"
    levels = []
    for grant in order.downloads:
        level = grant_complete_evidence(session, grant)
        if level is None:
            return order.status == "shipped"
        levels.append(level)
    if order.status != "shipped":
        order.status = "shipped"
        order.shipped_at = now or utcnow()
    if EVIDENCE_RANK[weakest_evidence(levels)] > EVIDENCE_RANK[order.evidence]:
        order.evidence = weakest_evidence(levels)
    session.flush()
    return True


def order_evidence(session: Session, order: Order) -> list[dict]:
    """The owner's view: one row per grant and file with its evidence, bytes delivered, attempts and IPs.

    ``bytes_delivered`` is the byte coverage of the most advanced delivery of the current file version;
    ``attempts`` counts every file request (GET with a body) across all its deliveries; ``ips`` are the
    distinct client addresses in the download log for this grant and file.
    """
    rows = []
    for grant in sorted(order.downloads, key=lambda g: g.id):
        for entry in files_for_grant(session, grant):
            deliveries = session.scalars(select(Delivery).where(
                Delivery.grant_id == grant.id, Delivery.sku == entry.sku, Delivery.path == entry.path)
                .order_by(Delivery.id)).all()
            current = [d for d in deliveries if d.sha256 == entry.sha256]
            names = {entry.path, public_path(grant, entry)}
            ips = session.scalars(select(DownloadLog.client_ip).distinct().where(
                DownloadLog.grant_id == grant.id, DownloadLog.path.in_(names),
                DownloadLog.client_ip.is_not(None))).all()
            rows.append({
                "grant_id": grant.id,
                "sku": entry.sku,
                "path": public_path(grant, entry),
                "size": entry.size,
                "sha256": entry.sha256,
                "evidence": best_evidence([d.evidence for d in deliveries]),
                "bytes_delivered": max((d.covered_bytes for d in current), default=0),
                "deliveries": len(deliveries),
                "counted": sum(1 for d in deliveries if d.counted),
                "attempts": sum(d.attempts for d in deliveries),
                "ips": sorted(ips),
                "completed_at": max((d.completed_at for d in deliveries if d.completed_at), default=None),
                "verified_at": max((d.verified_at for d in deliveries if d.verified_at), default=None),
                "downloads_used": grant.downloads_used,
                "max_downloads": grant.max_downloads,
            })
    return rows
