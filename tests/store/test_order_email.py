"""The order email through a real SMTP server, the .eml outbox, and nothing lost when SMTP is down."""
import email
import email.policy
from pathlib import Path

import pytest
from sqlalchemy import select

from app.downloads.models import OutboxMessage
from app.extensions import db
from app.mail import flush_outbox, send_order_email
from app.store.models import Order
from tests.helpers import free_port, make_product
from tests.store.shop import add_to_cart, buy, checkout_form, download_links


@pytest.fixture
def shop(app):
    make_product(app, "EBOOK1", {"book.pdf": 3000}, price="9.99", name="The Book")
    make_product(app, "CLASSICS-2", price="6.00", name="Any 2 Classics",
                 entitlement_class="classics", entitlement_count=2)
    return app


def outbox_rows(app) -> list[tuple]:
    with app.app_context():
        return [(m.to, m.attempts, m.sent_at is not None, m.last_error)
                for m in db.session.scalars(select(OutboxMessage).order_by(OutboxMessage.id))]


def test_order_email_arrives_by_smtp_with_both_parts_and_the_same_links(shop, client, smtp_server):
    shop.config["SMTP_URL"] = smtp_server.url
    add_to_cart(client, "EBOOK1", 2)
    add_to_cart(client, "CLASSICS-2")
    page = client.post("/checkout", data=checkout_form(client, email="Reader@Example.com"), follow_redirects=True)
    links = download_links(page.text)
    assert len(links) == 3
    [mail] = smtp_server.wait_for(1)
    with shop.app_context():
        po = db.session.scalar(select(Order.po_number))
    assert mail.rcpt_tos == ["reader@example.com"]
    assert mail.message["Subject"] == f"Your downloads: order {po}"
    assert mail.message.get_content_type() == "multipart/alternative"
    for part in (mail.text, mail.html):
        assert po in part and "$25.98" in part
        assert all(link in part for link in links)
        assert "2 items of the classics collection" in part
        assert "5 downloads per file" in part  # the limit is per file of a link
    assert f'<a href="{links[0]}">' in mail.html
    assert outbox_rows(shop) == [("reader@example.com", 1, True, None)]


def test_without_smtp_the_email_is_an_eml_file_in_the_outbox(shop, client):
    page = buy(client, "EBOOK1", email="buyer@example.com")
    [link] = download_links(page.text)
    files = sorted(Path(shop.config["OUTBOX_DIR"]).glob("*.eml"))
    assert len(files) == 1
    message = email.message_from_bytes(files[0].read_bytes(), policy=email.policy.default)
    assert message["To"] == "buyer@example.com"
    assert link in message.get_body(("plain",)).get_content()
    assert link in message.get_body(("html",)).get_content()
    assert not list(Path(shop.config["OUTBOX_DIR"]).glob(".*"))  # no half-written leftovers


def test_smtp_down_at_checkout_loses_nothing_and_flush_sends_it_later(shop, client, smtp_server):
    shop.config["SMTP_URL"] = f"smtp://127.0.0.1:{free_port()}"  # nobody listens there
    page = buy(client, "EBOOK1")
    assert page.status_code == 200
    [link] = download_links(page.text)  # the shopper still gets the link
    [(to, attempts, sent, error)] = outbox_rows(shop)
    assert (to, attempts, sent) == ("buyer@example.com", 1, False) and "refused" in error.lower()
    with shop.app_context():
        assert flush_outbox(db.session) == 0  # still down: kept, retried
        db.session.commit()
    shop.config["SMTP_URL"] = smtp_server.url  # the mail server is back
    with shop.app_context():
        assert flush_outbox(db.session) == 1
        db.session.commit()
        assert flush_outbox(db.session) == 0  # sent once, never again
        db.session.commit()
    [mail] = smtp_server.wait_for(1)
    assert link in mail.text and link in mail.html
    assert outbox_rows(shop) == [("buyer@example.com", 3, True, None)]


def test_send_order_email_again_for_the_owner(shop, client, smtp_server):
    shop.config["SMTP_URL"] = smtp_server.url
    buy(client, "EBOOK1")
    smtp_server.wait_for(1)
    with shop.app_context():
        send_order_email(db.session, db.session.scalar(select(Order)))
        db.session.commit()
    first, second = smtp_server.wait_for(2)
    assert first.text == second.text
    assert first.message["Message-ID"] != second.message["Message-ID"]
