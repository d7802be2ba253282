"""Orders with their items, grants and per-file delivery evidence; the owner's actions on a grant.

Every action asks for confirmation first and is recorded with who did it.
"""
from __future__ import annotations

from datetime import datetime

from flask import abort, current_app, flash, redirect, render_template, request, url_for
from sqlalchemy import or_, select

from app.admin.blueprint import audit, bp, confirm_page, confirmed, refuse
from app.downloads import grant_actions as rules
from app.downloads.errors import InvalidInput
from app.downloads.models import Delivery, DownloadLog, UserDownload
from app.extensions import db
from app.store.models import Order

PAGE = 100


def delivery_evidence(order: Order) -> list[dict]:
    """Per-file evidence rows. The verified-delivery rules provide ``order_evidence``; until they do,
    the deliveries table itself is shown."""
    try:
        from app.downloads.delivery import order_evidence
    except ImportError:
        order_evidence = None
    if order_evidence is not None:
        return [_readable(row if isinstance(row, dict) else dict(vars(row))) for row in order_evidence(db.session, order)]
    grant_ids = [g.id for g in order.downloads]
    if not grant_ids:
        return []
    deliveries = db.session.scalars(select(Delivery).where(Delivery.grant_id.in_(grant_ids))
                                    .order_by(Delivery.grant_id, Delivery.path, Delivery.id))
    return [{"grant": d.grant_id, "file": f"{d.sku}/{d.path}", "evidence": d.evidence or "none yet",
             "bytes seen": f"{d.covered_bytes} of {d.size}", "counted": "yes" if d.counted else "no",
             "completed": d.completed_at.strftime("%Y-%m-%d %H:%M") if d.completed_at else ""} for d in deliveries]


def _readable(row: dict) -> dict:
    """Table cells for people: lists joined, times to the minute, digests shortened (full one on the file page)."""
    shown = {}
    for key, value in row.items():
        if key in ("downloads_used", "max_downloads"):
            continue  # the grants table shows them (each row has its own file's "downloads left")
        if isinstance(value, (list, tuple)):
            value = ", ".join(map(str, value))
        elif isinstance(value, datetime):
            value = value.strftime("%Y-%m-%d %H:%M")
        elif key == "sha256" and isinstance(value, str):
            value = value[:16] + "…"
        shown[key.replace("_", " ")] = value
    return shown


@bp.get("/orders")
def orders():
    query = select(Order).order_by(Order.created_at.desc(), Order.id.desc()).limit(PAGE)
    q = (request.args.get("q") or "").strip()
    if q:
        query = query.where(or_(Order.po_number == q, Order.email.ilike(f"%{q}%")))
    return render_template("admin/orders.html", title="Orders", orders=list(db.session.scalars(query)), q=q)


def _order(po: str) -> Order:
    order = db.session.scalar(select(Order).where(Order.po_number == po))
    if order is None:
        abort(404, f"There is no order {po}.")
    return order


@bp.get("/orders/<po>")
def order_detail(po: str):
    order = _order(po)
    log = list(db.session.scalars(select(DownloadLog).where(DownloadLog.order_po == po)
                                  .order_by(DownloadLog.at.desc()).limit(50)))
    return render_template("admin/order.html", title=f"Order {po}", order=order,
                           grants=sorted(order.downloads, key=lambda g: g.id),
                           evidence=delivery_evidence(order), log=log)


def _grant(grant_id: int) -> UserDownload:
    grant = db.session.get(UserDownload, grant_id)
    if grant is None:
        abort(404, "There is no such download link.")
    return grant


GRANT_ACTIONS = {
    "extend": "Extend the expiry",
    "add-downloads": "Add downloads",
    "revoke": "Revoke the link",
}


@bp.post("/grants/<int:grant_id>/<action>")
def grant_action(grant_id: int, action: str):
    if action not in GRANT_ACTIONS:
        abort(404)
    grant = _grant(grant_id)
    po = grant.order.po_number
    back = url_for("admin.order_detail", po=po)
    target = f"grant {grant.id} of order {po}"
    try:
        if action == "extend":
            days = rules.parse_count(request.form.get("days"), "days", rules.MAX_EXTEND_DAYS)
            question, fields = f"Extend {target} ({grant.sku}) by {days} day(s)?", {"days": str(days)}
        elif action == "add-downloads":
            count = rules.parse_count(request.form.get("count"), "downloads", rules.MAX_ADD_DOWNLOADS)
            question, fields = f"Add {count} download(s) per file to {target} ({grant.sku})?", {"count": str(count)}
        else:
            question, fields = f"Revoke {target} ({grant.sku})? The shopper's link stops working at once.", {}
        if not confirmed():
            return confirm_page(GRANT_ACTIONS[action], question, url_for("admin.grant_action", grant_id=grant_id,
                                                                         action=action), back, fields)
        if action == "extend":
            rules.extend_expiry(db.session, grant, days)
            detail = f"+{days} days, now expires {grant.expires_at:%Y-%m-%d %H:%M} UTC"
        elif action == "add-downloads":
            rules.add_downloads(db.session, grant, count)
            detail = f"+{count}, now {grant.max_downloads} per file"
        else:
            rules.revoke(db.session, grant, current_app.config["SYMLINK_DIR"])
            detail = "revoked"
    except InvalidInput as exc:
        return refuse(exc, back)
    audit(f"grant.{action}", target, detail)
    db.session.commit()
    flash(f"{GRANT_ACTIONS[action]}: done ({detail}).", "success")
    return redirect(back)


@bp.post("/orders/<po>/resend")
def order_resend(po: str):
    order = _order(po)
    back = url_for("admin.order_detail", po=po)
    if not confirmed():
        return confirm_page("Re-send the order email", f"Send the download links of order {po} again to "
                            f"{order.email}?", url_for("admin.order_resend", po=po), back)
    try:
        from app.mail import send_order_email
    except ImportError:
        flash("Email is not available in this installation.", "error")
        return redirect(back)
    send_order_email(db.session, order)
    audit("order.resend", f"order {po}", order.email)
    db.session.commit()
    flash(f"The order email was sent again to {order.email} (or waits in the outbox if mail is down).", "success")
    return redirect(back)
