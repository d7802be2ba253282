"""The owner's dashboard: sales, deliveries by evidence per day (an inline SVG chart), flagged files."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta

from flask import abort, flash, redirect, render_template, url_for
from sqlalchemy import func, or_, select

from app.admin.blueprint import audit, bp
from app.downloads.models import PACKAGES_SKU, Delivery, FileEntry
from app.extensions import db
from app.store.models import Order, format_money
from app.timeutil import utcnow

CHART_DAYS = 14
EVIDENCE_KINDS = ("verified", "transferred")


@dataclass
class ChartBar:
    day: date
    counts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def deliveries_per_day(days: int = CHART_DAYS, today: date | None = None) -> list[ChartBar]:
    """Completed deliveries of the last ``days`` days, by evidence (the database groups, Python fills gaps)."""
    today = today or utcnow().date()
    first = today - timedelta(days=days - 1)
    day = func.date(Delivery.completed_at)
    rows = db.session.execute(
        select(day, Delivery.evidence, func.count()).where(
            Delivery.completed_at >= utcnow() - timedelta(days=days), Delivery.evidence.is_not(None))
        .group_by(day, Delivery.evidence))
    bars = {first + timedelta(days=i): ChartBar(first + timedelta(days=i), {k: 0 for k in EVIDENCE_KINDS})
            for i in range(days)}
    for when, evidence, count in rows:
        key = date.fromisoformat(str(when)[:10])  # SQLite answers a string, PostgreSQL a date
        if key in bars and evidence in EVIDENCE_KINDS:
            bars[key].counts[evidence] += count
    return [bars[k] for k in sorted(bars)]


def sales_summary() -> dict[str, str | int]:
    since = utcnow() - timedelta(days=30)
    total_orders, revenue = db.session.execute(select(func.count(Order.id), func.coalesce(func.sum(Order.total_cents), 0))).one()
    recent_orders, recent_revenue = db.session.execute(
        select(func.count(Order.id), func.coalesce(func.sum(Order.total_cents), 0)).where(Order.created_at >= since)).one()
    pending = db.session.scalar(select(func.count(Order.id)).where(Order.status == "pending")) or 0
    return {"orders": total_orders, "revenue": format_money(int(revenue)), "orders_30d": recent_orders,
            "revenue_30d": format_money(int(recent_revenue)), "pending": pending}


@bp.get("/")
def dashboard():
    flagged = list(db.session.scalars(select(FileEntry).where(
        FileEntry.sku != PACKAGES_SKU, FileEntry.acknowledged_at.is_(None),
        or_(FileEntry.flagged.is_not(None), FileEntry.missing.is_(True)))
        .order_by(FileEntry.sku, FileEntry.path).limit(100)))
    bars = deliveries_per_day()
    peak = max([b.total for b in bars] + [1])
    return render_template("admin/dashboard.html", title="Dashboard", sales=sales_summary(), bars=bars,
                           peak=peak, kinds=EVIDENCE_KINDS, flagged=flagged)


@bp.post("/flags/<int:entry_id>/acknowledge")
def acknowledge_flag(entry_id: int):
    """The owner has seen a flagged or missing file: off the dashboard until its state changes again."""
    entry = db.session.get(FileEntry, entry_id)
    if entry is None or (entry.flagged is None and not entry.missing):
        abort(404, "There is no such flagged file.")
    entry.acknowledged_at = utcnow()
    audit("file.acknowledge", entry.registered_path[:200], entry.flagged or "missing on disk")
    db.session.commit()
    flash(f"{entry.registered_path}: acknowledged.", "success")
    return redirect(url_for("admin.dashboard"))
