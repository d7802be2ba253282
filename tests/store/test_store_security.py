"""CSRF on every shop form, rate limits on login and checkout, owner pages closed to others."""
import re

import pytest
from sqlalchemy import func, select

from app.accounts.rules import register_customer
from app.extensions import db
from app.store.models import Order
from app.timeutil import utcnow
from tests.helpers import make_product
from tests.store.shop import add_to_cart, checkout_form, hidden, log_in


@pytest.fixture
def shop(app):
    make_product(app, "EBOOK1", {"book.pdf": 1000}, price="9.99", name="The Book")
    return app


def make_user(app, email: str, role: str = "customer", password: str = "correct horse") -> None:
    with app.app_context():
        user = register_customer(db.session, email, password)
        user.role, user.email_confirmed_at = role, utcnow()
        db.session.commit()


def orders(app) -> int:
    with app.app_context():
        return db.session.scalar(select(func.count()).select_from(Order))


@pytest.mark.config(WTF_CSRF_ENABLED=True)
@pytest.mark.parametrize("path, data", [
    ("/cart/add", {"sku": "EBOOK1", "quantity": "1"}),
    ("/cart/update", {"sku": "EBOOK1", "quantity": "2"}),
    ("/cart/remove", {"sku": "EBOOK1"}),
    ("/checkout", {"email": "a@example.com"}),
    ("/account/login", {"email": "a@example.com", "password": "x"}),
    ("/account/register", {"email": "a@example.com", "password": "x" * 9, "confirm": "x" * 9}),
    ("/account/logout", {}),
])
def test_forms_without_the_csrf_token_are_refused(shop, client, path, data):
    page = client.post(path, data=data)
    assert page.status_code == 400 and "CSRF" in page.text


@pytest.mark.config(WTF_CSRF_ENABLED=True)
def test_a_whole_purchase_with_csrf_on(shop, client):
    product_page = client.get("/p/EBOOK1").text
    token = hidden(product_page, "csrf_token")
    assert client.post("/cart/add", data={"sku": "EBOOK1", "quantity": "1", "csrf_token": token}).status_code == 303
    form = checkout_form(client)
    form["csrf_token"] = hidden(client.get("/checkout").text, "csrf_token")
    assert client.post("/checkout", data=form).status_code == 303
    assert orders(shop) == 1


@pytest.mark.config(RATELIMIT_ENABLED=True, LOGIN_RATE_LIMIT="3 per minute")
def test_login_attempts_are_rate_limited(shop, client):
    make_user(shop, "buyer@example.com")
    for _ in range(3):
        assert log_in(client, "buyer@example.com", "wrong password").status_code == 401
    page = log_in(client, "buyer@example.com", "correct horse")
    assert page.status_code == 429 and 1 <= int(page.headers["Retry-After"]) <= 60
    assert "Too many attempts" in page.text
    assert client.get("/account/login").status_code == 200  # the page itself stays readable


@pytest.mark.config(RATELIMIT_ENABLED=True, CHECKOUT_RATE_LIMIT="2 per minute")
def test_checkout_attempts_are_rate_limited(shop, client):
    add_to_cart(client, "EBOOK1")
    for _ in range(2):
        assert client.post("/checkout", data=checkout_form(client, card="4000 0000 0000 0002")).status_code == 402
    assert client.post("/checkout", data=checkout_form(client)).status_code == 429
    assert orders(shop) == 0


def test_admin_pages_refuse_anonymous_visitors_and_customers(shop, client, app):
    anonymous = client.get("/admin/")
    assert anonymous.status_code == 302 and anonymous.location.startswith("/account/login?next=")
    make_user(shop, "customer@example.com")
    make_user(shop, "owner@example.com", role="owner")
    customer = app.test_client()
    log_in(customer, "customer@example.com", "correct horse")
    assert customer.get("/admin/").status_code == 403
    assert "Admin" not in re.sub(r"<title>.*?</title>", "", customer.get("/").text)
    owner = app.test_client()
    log_in(owner, "owner@example.com", "correct horse")
    assert owner.get("/admin/").status_code == 200
    assert 'href="/admin/"' in owner.get("/").text


def test_session_cookie_is_httponly_and_samesite(shop, client):
    add_to_cart(client, "EBOOK1")
    cookie = client.get_cookie("session")
    assert cookie.http_only and cookie.same_site == "Lax"


@pytest.mark.config(WTF_CSRF_ENABLED=True)
@pytest.mark.parametrize("path", ["/cart/add", "/checkout", "/account/login", "/account/register"])
def test_oversized_forms_are_refused_before_anything_reads_them(shop, client, path):
    page = client.post(path, data={"email": "a@example.com", "pad": "x" * 200_000})
    assert page.status_code == 413 and "Traceback" not in page.text
    assert orders(shop) == 0
