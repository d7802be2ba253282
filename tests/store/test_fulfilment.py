"""The one fulfilment path: paid status, grants, email and the order.paid event, exactly once."""
from contextlib import contextmanager

from sqlalchemy import select

from app.events import announce, shop_event
from app.extensions import db
from app.store.fulfilment import fulfil_paid_order
from app.store.models import Order
from app.store.orders import Line, create_order
from tests.helpers import make_product
from tests.store.shop import add_to_cart, checkout_form

import pytest


@contextmanager
def recorded_events():
    seen = []

    def listener(event_type, **objects):
        seen.append((event_type, objects.get("order").po_number if objects.get("order") else None))

    shop_event.connect(listener)
    try:
        yield seen
    finally:
        shop_event.disconnect(listener)


def test_test_gateway_checkout_is_paid_at_once_and_announced_once(app, client):
    make_product(app, "EBOOK1", {"book.pdf": 3000}, price="9.99", name="The Book")
    add_to_cart(client, "EBOOK1")
    form = checkout_form(client)
    with recorded_events() as seen:
        client.post("/checkout", data=form)
        client.post("/checkout", data=form)  # a double submit: the same order, no second event
    with app.app_context():
        order = db.session.scalar(select(Order))
        assert (order.payment_status, order.status) == ("paid", "pending")
    assert seen == [("order.paid", order.po_number)]


def test_a_second_confirmation_changes_nothing(app):
    make_product(app, "EBOOK1", {"book.pdf": 3000}, price="9.99", name="The Book")
    with app.app_context():
        from app.store.models import Product
        product = db.session.scalar(select(Product))
        order = create_order(db.session, email="a@example.com", lines=[Line(product)],
                             payment_status="awaiting_payment")
        assert order.payment_status == "awaiting_payment" and not order.downloads
        with recorded_events() as seen:
            first = fulfil_paid_order(db.session, order, payment_intent_id="pi_123")
            again = fulfil_paid_order(db.session, order, payment_intent_id="pi_123")
        db.session.commit()
        assert first is not None and again is None
        assert (order.payment_status, order.payment_intent_id, len(order.downloads)) == ("paid", "pi_123", 1)
        assert seen == [("order.paid", order.po_number)]


def test_unknown_event_types_are_refused():
    with pytest.raises(ValueError):
        announce("order.teleported")
