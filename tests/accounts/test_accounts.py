"""Accounts: register, confirm by email, claim guest orders, log in safely, My downloads."""
import re

import pytest
from sqlalchemy import func, select

from app.accounts.models import User
from app.accounts.rules import is_safe_next
from app.accounts.tokens import make_confirm_token, read_confirm_token
from app.downloads.errors import InvalidInput
from app.extensions import db
from tests.helpers import make_product
from tests.store.shop import buy, download_links, error_text, log_in

PASSWORD = "correct horse"


@pytest.fixture
def shop(app, smtp_server):
    app.config["SMTP_URL"] = smtp_server.url
    app.config["STORE_URL"] = "http://shop.test"
    make_product(app, "EBOOK1", {"book.pdf": 1000}, price="9.99", name="The Book")
    return app


def register(client, email="buyer@example.com", password=PASSWORD, confirm=None):
    return client.post("/account/register", data={"email": email, "password": password,
                                                  "confirm": password if confirm is None else confirm})


def confirm_link(mail) -> str:
    [url] = re.findall(r"http://shop\.test(/account/confirm/\S+)", mail.text)
    assert url in mail.html
    return url


def users(app) -> int:
    with app.app_context():
        return db.session.scalar(select(func.count()).select_from(User))


def test_guest_claims_past_orders_after_confirming_the_same_email(shop, client, smtp_server, app):
    guest_links = download_links(buy(client, "EBOOK1", email="Buyer@Example.com").text)
    smtp_server.wait_for(1)  # the order email
    shopper = app.test_client()  # later, another browser
    assert register(shopper).status_code == 303
    page = shopper.get("/account/downloads")
    assert download_links(page.text) == [] and "Confirm buyer@example.com" in page.text
    confirmation = smtp_server.wait_for(2)[1]
    assert confirmation.rcpt_tos == ["buyer@example.com"] and "Confirm" in confirmation.message["Subject"]
    assert shopper.get(confirm_link(confirmation)).status_code == 303
    assert download_links(shopper.get("/account/downloads").text) == guest_links


def test_someone_else_cannot_claim_orders_without_the_mailbox(shop, client, app):
    buy(client, "EBOOK1", email="victim@example.com")
    attacker = app.test_client()
    register(attacker, email="victim@example.com")
    log_in(attacker, "victim@example.com", PASSWORD)
    assert download_links(attacker.get("/account/downloads").text) == []


def test_logged_in_purchases_appear_under_my_downloads(shop, client):
    register(client)
    links = download_links(buy(client, "EBOOK1", email="buyer@example.com").text)
    assert download_links(client.get("/account/downloads").text) == links


@pytest.mark.parametrize("email, password, confirm, status, message", [
    ("not-an-email", PASSWORD, None, 422, "'not-an-email' is not a valid email address"),
    ("a@b", PASSWORD, None, 422, "'a@b' is not a valid email address"),
    ("new@example.com", "short", None, 422, "the password must have at least 8 characters"),
    ("new@example.com", PASSWORD, "different!", 422, "the two passwords do not match"),
    ("Taken@Example.com", PASSWORD, None, 409, "an account for taken@example.com already exists"),
])
def test_bad_registrations_are_refused_and_write_nothing(shop, client, app, email, password, confirm, status,
                                                         message):
    register(app.test_client(), email="taken@example.com")
    before = users(shop)
    page = register(client, email, password, confirm)
    assert page.status_code == status
    assert error_text(page.text).startswith(message), error_text(page.text)
    assert users(shop) == before


def test_login_refuses_wrong_passwords_and_unknown_emails_alike(shop, client):
    register(client)
    client.post("/account/logout")
    for email, password in (("buyer@example.com", "wrong password"), ("nobody@example.com", PASSWORD),
                            ("not an email", PASSWORD)):
        page = log_in(client, email, password)
        assert page.status_code == 401 and "Wrong email or password." in page.text
    assert log_in(client, "BUYER@example.com", PASSWORD).status_code == 303


@pytest.mark.parametrize("target, safe", [
    ("/account/downloads", True), ("/p/EBOOK1?x=1", True),
    ("https://evil.example/", False), ("//evil.example/", False), ("/\\evil.example", False),
    ("javascript:alert(1)", False), ("http:/evil.example", False), ("", False), ("/\tevil", False),
])
def test_login_follows_next_only_on_this_site(shop, client, target, safe):
    register(client)
    client.post("/account/logout")
    page = log_in(client, "buyer@example.com", PASSWORD, next_url=target)
    assert page.status_code == 303
    assert page.location == (target if safe else "/")
    assert is_safe_next(target) is safe


def test_my_downloads_needs_a_login(shop, client):
    page = client.get("/account/downloads")
    assert page.status_code == 302 and page.location.startswith("/account/login?next=")


def test_logout_is_a_post(shop, client):
    register(client)
    assert client.get("/account/logout").status_code == 405
    assert client.post("/account/logout").status_code == 303
    assert client.get("/account/downloads").status_code == 302


def test_confirmation_tokens_are_checked(shop, client):
    secret = shop.config["SECRET_KEY"]
    token = make_confirm_token(secret, 1, "a@example.com")
    assert read_confirm_token(secret, token) == (1, "a@example.com")
    for bad, status in ((token + "x", 404), (make_confirm_token("other", 1, "a@example.com"), 404)):
        with pytest.raises(InvalidInput) as refused:
            read_confirm_token(secret, bad)
        assert refused.value.status == status
    with pytest.raises(InvalidInput) as refused:
        read_confirm_token(secret, token, max_age=-1)
    assert refused.value.status == 410 and "expired" in refused.value.message
    # a receipt is signed with the same secret but another salt: never a confirmation
    from itsdangerous import URLSafeSerializer
    receipt = URLSafeSerializer(secret, salt="softgoods.receipt.v1").dumps([1, "a@example.com"])
    with pytest.raises(InvalidInput):
        read_confirm_token(secret, receipt)
    page = client.get("/account/confirm/forged-token")
    assert page.status_code == 404 and "not valid" in page.text
