"""Delivery evidence: byte coverage, the order's shipped state and the owner's view of it.

Pure helpers over intervals plus the two read-mostly rules that sit on top of the counting rules in
``app.downloads.delivery``: ``maybe_ship`` (pending -> shipped) and ``order_evidence`` (the owner's
per-file table). The caller commits.
"""
from __future__ import annotations

import json
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session, joinedload

from app.downloads.access import files_for_grant, grant_files_condition, public_path
from app.downloads.models import Delivery, DownloadLog, FileEntry, UserDownload
from app.store.models import Order, Product
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


def _lock_order(session: Session, order_id: int) -> str | None:
    """Lock the order row and return its status. A row write: on PostgreSQL a row lock, on SQLite the
    database write lock. Two requests that finish the last two files of one order at once must not
    both conclude "not yet shipped"."""
    return session.execute(update(Order).where(Order.id == order_id).values(status=Order.status)
                           .returning(Order.status).execution_options(synchronize_session=False)).scalar()


FileKey = tuple[int, str, str]  # (grant id, sku, path)


def best_evidence_by_file(session: Session, grant_ids: list[int]) -> dict[FileKey, str]:
    """The best evidence any delivery of each file earned under these grants, in one grouped query
    (any version of the file: the shopper got the file as it was then)."""
    if not grant_ids:
        return {}
    best: dict[FileKey, str] = {}
    for grant_id, sku, path, level in session.execute(
            select(Delivery.grant_id, Delivery.sku, Delivery.path, Delivery.evidence)
            .where(Delivery.grant_id.in_(grant_ids), Delivery.evidence.is_not(None))
            .group_by(Delivery.grant_id, Delivery.sku, Delivery.path, Delivery.evidence)):
        key = (grant_id, sku, path)
        if EVIDENCE_RANK[level] > EVIDENCE_RANK[best.get(key)]:
            best[key] = level
    return best


def _lacks_evidence(session: Session, grant: UserDownload) -> bool:
    """Does any file of this grant still lack evidence? One EXISTS query, whatever the number of files."""
    if grant.entitlement_class and len(grant.choices) < (grant.entitlement_count or 0):
        return True  # a class entitlement is complete only when all of its N choices are made
    where = grant_files_condition(grant)
    if where is None:
        return True
    has_files = select(FileEntry.id).where(where).exists()
    delivered = select(Delivery.id).where(Delivery.grant_id == grant.id, Delivery.sku == FileEntry.sku,
                                          Delivery.path == FileEntry.path, Delivery.evidence.is_not(None)).exists()
    lacking = select(FileEntry.id).where(where, ~delivered).exists()
    return bool(session.scalar(select(lacking | ~has_files)))


def grant_complete_evidence(session: Session, grant: UserDownload,
                            best: dict[FileKey, str] | None = None) -> str | None:
    """The weakest evidence across every file of the grant, or None while any file lacks evidence.

    A class entitlement is complete only when all of its N choices are made and delivered.
    ``best`` (from ``best_evidence_by_file``) saves the query when the caller has it already.
    """
    if grant.entitlement_class and len(grant.choices) < (grant.entitlement_count or 0):
        return None
    entries = files_for_grant(session, grant)
    if not entries:
        return None
    if best is None:
        best = best_evidence_by_file(session, [grant.id])
    levels = [best.get((grant.id, entry.sku, entry.path)) for entry in entries]
    if any(level is None for level in levels):
        return None
    return weakest_evidence(levels)


def maybe_ship(session: Session, order_id: int, now: datetime | None = None) -> bool:
    """Move the order to shipped when every file of every grant has evidence, with the weakest level.

    A shipped order keeps its ``shipped_at``; its level only rises (transferred -> verified) when the
    client's proofs arrive for every file later. The rules call this only when a delivery has just
    been counted or verified. While the order is incomplete it costs four statements whatever the
    number of files (lock, grants, one EXISTS per grant); the per-file levels are read only to ship.
    """
    status = _lock_order(session, order_id)
    grants = session.scalars(select(UserDownload).where(UserDownload.order_id == order_id)
                             .options(joinedload(UserDownload.product).joinedload(Product.package))
                             .order_by(UserDownload.id)).all()
    if not grants or any(_lacks_evidence(session, grant) for grant in grants):
        return status == "shipped"
    order = session.execute(select(Order).where(Order.id == order_id)
                            .execution_options(populate_existing=True)).scalar_one()
    if order.evidence == "verified":
        return order.status == "shipped"
    best = best_evidence_by_file(session, [grant.id for grant in grants])
    levels = [grant_complete_evidence(session, grant, best) for grant in grants]
    if any(level is None for level in levels):  # cannot happen after the checks above; never ship on doubt
        return order.status == "shipped"
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
                # The limit is per file: what this file has left (None: unlimited).
                "downloads_left": (None if grant.max_downloads is None
                                   else max(0, grant.max_downloads - sum(1 for d in deliveries if d.counted))),
            })
    return rows
