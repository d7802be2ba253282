"""One path from "the money arrived" to grants, links and the order email, whichever gateway
confirmed the payment (the test gateway at once, a payment provider from its webhook or from the
shopper's return) and however often the confirmation arrives."""
from __future__ import annotations

from sqlalchemy.orm import Session

from app.downloads.grants import grant_downloads
from app.downloads.models import OutboxMessage
from app.events import announce
from app.mail import queue_order_email
from app.store.models import Order


def fulfil_paid_order(session: Session, order: Order, *, client_ip: str | None = None,
                      payment_intent_id: str | None = None) -> OutboxMessage | None:
    """Mark ``order`` paid, grant its downloads and queue its email; returns the queued email, or
    None when the order was fulfilled already (grants exist), so a second confirmation changes
    nothing. The caller holds the order's row lock where confirmations can race, and commits."""
    if order.downloads:
        return None
    order.payment_status = "paid"
    if payment_intent_id:
        order.payment_intent_id = payment_intent_id
    grant_downloads(session, order, client_ip=client_ip)
    announce("order.paid", session=session, order=order)
    return queue_order_email(session, order)
