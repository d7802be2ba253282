"""The cash register: approved and declined payments, double submits, retries, bad input."""
import logging

import pytest
from sqlalchemy import func, select

from app.downloads.models import OutboxMessage, UserDownload
from app.extensions import db
from app.store.checkout import checkout
from app.store.models import Order
from app.store.orders import Line
from app.store.payments import Approved, TestGateway, read_card
from tests.helpers import make_product
from tests.store.shop import (APPROVING, DECLINING, INSUFFICIENT, add_to_cart, buy, checkout_form,
                              download_links, error_text)


@pytest.fixture
def shop(app):
    make_product(app, "EBOOK1", {"book.pdf": 3000}, price="9.99", name="The Book")
    make_product(app, "SONG", {"song.mp3": 1000}, price="0.10", name="A Song")
    make_product(app, "FREEBIE", {"free.txt": b"free"}, price="0", name="Freebie")
    return app


def counts(app) -> tuple[int, int, int]:
    with app.app_context():
        return tuple(db.session.scalar(select(func.count()).select_from(t))
                     for t in (Order, UserDownload, OutboxMessage))


def test_approved_card_makes_one_order_with_a_grant_and_link_per_item(shop, client):
    add_to_cart(client, "EBOOK1", 2)
    add_to_cart(client, "SONG", 3)
    page = client.post("/checkout", data=checkout_form(client, email="Buyer@Example.com"), follow_redirects=True)
    assert page.status_code == 200 and "Thank you!" in page.text
    links = download_links(page.text)
    assert len(links) == 5 and len(set(links)) == 5
    assert all(link.startswith(shop.config["SIDECAR_URL"] + "/d/") for link in links)
    with shop.app_context():
        order = db.session.scalar(select(Order))
        assert order.po_number in page.text and order.po_number.startswith("SG-20")
        assert (order.total_cents, order.item_count, order.email) == (2 * 999 + 3 * 10, 5, "buyer@example.com")
        assert (order.card_brand, order.card_last4, order.status) == ("Visa", "4242", "pending")
        assert order.payment_reference.startswith("test_")
        assert sorted(g.sku for g in order.downloads) == ["EBOOK1", "EBOOK1", "SONG", "SONG", "SONG"]
    assert client.get("/cart").text.count("Your cart is empty") == 1


def test_money_sums_are_exact_in_cents(shop, client):
    add_to_cart(client, "SONG", 10)  # ten times 0.10 is exactly 1.00, unlike ten float additions
    client.post("/checkout", data=checkout_form(client))
    add_to_cart(client, "EBOOK1", 3)
    add_to_cart(client, "SONG", 7)
    thanks = client.post("/checkout", data=checkout_form(client), follow_redirects=True)
    assert "$30.67" in thanks.text
    with shop.app_context():
        totals = db.session.scalars(select(Order.total_cents).order_by(Order.id)).all()
        assert totals == [100, 3 * 999 + 70]
        assert db.session.scalar(select(func.sum(Order.total_cents))) == 100 + 2997 + 70
        assert db.session.scalar(select(Order.total_cents).order_by(Order.id.desc()).limit(1)) == 3067


def test_double_submit_makes_one_order(shop, client):
    add_to_cart(client, "EBOOK1")
    form = checkout_form(client)
    first = client.post("/checkout", data=form)
    second = client.post("/checkout", data=form)  # the cart is empty now: the token still finds the order
    assert first.status_code == second.status_code == 303
    assert first.location == second.location
    assert counts(shop) == (1, 1, 1)


def test_retry_after_a_crash_between_approval_and_storing_charges_once(shop, client):
    charges = []

    class RecordingGateway(TestGateway):
        def authorize(self, amount_cents, currency, card, idempotency_key):
            answer = super().authorize(amount_cents, currency, card, idempotency_key)
            charges.append((idempotency_key, answer))
            return answer

    shop.config["PAYMENT_GATEWAY"] = RecordingGateway()
    add_to_cart(client, "EBOOK1")
    form = checkout_form(client)
    with shop.test_request_context():  # the first attempt: approved, then the request dies before commit
        from app.store.models import Product

        book = db.session.scalar(select(Product).where(Product.sku == "EBOOK1"))
        checkout(db.session, shop.config["PAYMENT_GATEWAY"], lines=[Line(book)], email="buyer@example.com",
                 card=read_card(APPROVING, "12/39", "123"), checkout_token=form["checkout_token"],
                 shown_total=form["shown_total"])
        db.session.rollback()
    assert counts(shop) == (0, 0, 0)
    assert client.post("/checkout", data=form).status_code == 303  # the shopper presses Pay again
    assert len(charges) == 2 and charges[0] == charges[1]  # same key, same payment reference
    with shop.app_context():
        order = db.session.scalar(select(Order))
        assert order.payment_reference == charges[0][1].reference and isinstance(charges[0][1], Approved)
    assert counts(shop) == (1, 1, 1)


@pytest.mark.parametrize("card, reason", [(DECLINING, "card declined"), (INSUFFICIENT, "insufficient funds")])
def test_declined_payment_shows_the_reason_and_creates_nothing(shop, client, card, reason):
    add_to_cart(client, "EBOOK1")
    page = client.post("/checkout", data=checkout_form(client, card=card))
    assert page.status_code == 402
    assert error_text(page.text) == f"Your payment was declined: {reason}."
    assert download_links(page.text) == []
    assert counts(shop) == (0, 0, 0)
    # The cart survives, and a good card then goes through on a fresh form.
    ok = client.post("/checkout", data=checkout_form(client), follow_redirects=True)
    assert len(download_links(ok.text)) == 1 and counts(shop) == (1, 1, 1)


@pytest.mark.parametrize("field, value, status, message", [
    ("card_number", "4242 4242 4242 4241", 422, "card number is not valid: please check it for a typo"),
    ("card_number", "42", 422, "card number must be 12 to 19 digits"),
    ("expiry", "01/20", 422, "this card expired at the end of 01/2020"),
    ("expiry", "2030-12", 422, "expiry date must look like MM/YY, e.g. 04/30"),
    ("cvc", "x", 422, "security code (CVC) must be 3 or 4 digits"),
    ("email", "not-an-email", 422, "'not-an-email' is not a valid email address"),
    ("email", "", 422, "'' is not a valid email address"),
    ("checkout_token", "", 400, "this checkout form is not valid any more"),
    ("checkout_token", "../../etc/passwd" * 2, 400, "this checkout form is not valid any more"),
])
def test_bad_checkout_input_is_refused_and_nothing_is_written(shop, client, field, value, status, message):
    add_to_cart(client, "EBOOK1")
    form = checkout_form(client)
    form[field] = value
    page = client.post("/checkout", data=form)
    assert page.status_code == status
    assert error_text(page.text).startswith(message), error_text(page.text)
    assert "Traceback" not in page.text
    assert counts(shop) == (0, 0, 0)


def test_checkout_with_an_empty_cart_is_refused(shop, client):
    add_to_cart(client, "EBOOK1")
    form = checkout_form(client)
    client.post("/cart/remove", data={"sku": "EBOOK1"})
    page = client.post("/checkout", data=form)
    assert page.status_code == 422 and "your cart is empty" in error_text(page.text)
    assert counts(shop) == (0, 0, 0)


def test_free_products_need_no_card(shop, client):
    add_to_cart(client, "FREEBIE")
    form = checkout_form(client)
    assert "card_number" not in client.get("/checkout").text
    del form["card_number"], form["expiry"], form["cvc"]
    page = client.post("/checkout", data=form, follow_redirects=True)
    assert len(download_links(page.text)) == 1
    with shop.app_context():
        order = db.session.scalar(select(Order))
        assert (order.total_cents, order.payment_reference, order.card_last4) == (0, None, None)


def test_the_card_number_is_never_stored_or_logged(shop, client, caplog):
    caplog.set_level(logging.DEBUG)
    buy(client, "EBOOK1")
    add_to_cart(client, "EBOOK1")
    client.post("/checkout", data=checkout_form(client, card=DECLINING))
    with shop.app_context():
        rows = [repr([getattr(o, c.key) for c in Order.__table__.columns]) for o in db.session.scalars(select(Order))]
        rows += [m.message for m in db.session.scalars(select(OutboxMessage))]
    everything = "\n".join(rows) + caplog.text
    for number in ("4242424242424242", "4242 4242 4242 4242", "4000000000000002", "4000 0000 0000 0002"):
        assert number not in everything
    assert "4242" in everything  # the last four are kept, on purpose


def test_thank_you_page_is_only_for_the_browser_that_bought(shop, client, app):
    page = buy(client, "EBOOK1")
    po_url = page.request.path
    assert client.get(po_url).status_code == 200
    other = app.test_client()
    assert other.get(po_url).status_code == 404


def test_thank_you_page_says_downloads_per_file_and_when_every_file_is_used(shop, client, app):
    """The limit is per file: the links summary says so, and "all used" once every file is used up."""
    from app.downloads.models import Delivery

    page = buy(client, "EBOOK1")
    assert "5 downloads per file" in page.text and "all used" not in page.text
    with app.app_context():
        grant = db.session.scalar(select(UserDownload))
        db.session.add_all(Delivery(grant_id=grant.id, sku="EBOOK1", path="book.pdf", sha256="0" * 64, size=3000,
                                    budget_bytes=4500, covered_bytes=3000, evidence="transferred", counted=True)
                           for _ in range(5))
        grant.downloads_used = 5
        db.session.commit()
    assert "all used" in client.get(page.request.path).text
