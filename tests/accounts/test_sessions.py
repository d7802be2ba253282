"""Every session of an account ends together: logout, password change and reset advance the account's
session generation, which the session cookie and the remember cookie both carry."""
import re
from datetime import datetime, timedelta, timezone
from email.utils import parsedate_to_datetime

import pytest

from app import create_app
from app.accounts.rules import register_customer
from app.extensions import db
from tests.helpers import make_product
from tests.store.shop import buy, download_links, log_in

PASSWORD = "correct horse"


@pytest.fixture
def shop(app):
    make_product(app, "EBOOK1", {"book.pdf": 1000}, price="9.99", name="The Book")
    with app.app_context():
        register_customer(db.session, "owner@example.com", PASSWORD).role = "owner"
        db.session.commit()
    return app


def remembered_login(client, email="owner@example.com"):
    return client.post("/account/login", data={"email": email, "password": PASSWORD, "remember": "1"})


def browser_with(app, **cookies):
    """Another browser holding copies of captured cookies."""
    browser = app.test_client()
    for name, value in cookies.items():
        browser.set_cookie(name, value)
    return browser


def test_cookies_captured_before_logout_open_nothing_afterwards(shop, client):
    assert remembered_login(client).status_code == 303
    captured = {"session": client.get_cookie("session").value,
                "remember_token": client.get_cookie("remember_token").value}
    for name, value in captured.items():  # each cookie alone is a login before the logout
        copy = browser_with(shop, **{name: value})
        assert copy.get("/admin/").status_code == 200 and copy.get("/account/downloads").status_code == 200
    assert client.post("/account/logout").status_code == 303
    for cookies in ({"session": captured["session"]}, {"remember_token": captured["remember_token"]}, captured):
        copy = browser_with(shop, **cookies)
        assert copy.get("/admin/").status_code == 302, cookies
        assert copy.get("/account/downloads").status_code == 302, cookies
    assert client.get("/admin/").status_code == 302


def test_logout_in_one_browser_ends_the_sessions_of_the_others(shop, client):
    other = shop.test_client()
    log_in(client, "owner@example.com", PASSWORD)
    log_in(other, "owner@example.com", PASSWORD)
    client.post("/account/logout")
    assert other.get("/admin/").status_code == 302


def remember_cookie(response) -> str:
    [header] = [h for h in response.headers.getlist("Set-Cookie") if h.startswith("remember_token=")]
    return header


@pytest.mark.parametrize("secure", ["1", "0"])
def test_the_remember_cookie_is_secure_httponly_lax_and_short_lived(shop, env, secure):
    app = create_app({"TESTING": True, "WTF_CSRF_ENABLED": False, "RATELIMIT_ENABLED": False},
                     env={**env, "SOFTGOODS_SECURE_COOKIES": secure})
    client = app.test_client()
    first = remember_cookie(remembered_login(client))
    assert "; HttpOnly" in first and "; SameSite=Lax" in first
    assert ("; Secure" in first) is (secure == "1")
    expires = parsedate_to_datetime(re.search(r"Expires=([^;]+)", first)[1])
    assert timedelta(days=13) < expires - datetime.now(timezone.utc) <= timedelta(days=14)
    client.post("/account/logout")
    assert remember_cookie(remembered_login(client)).split(";")[0] != first.split(";")[0]  # a new one each login
    with app.app_context():
        db.engine.dispose()


def test_the_thank_you_page_stops_showing_links_after_logout(shop, client):
    log_in(client, "owner@example.com", PASSWORD)
    page = buy(client, "EBOOK1", email="owner@example.com")
    assert len(download_links(page.text)) == 1
    thanks_path = re.search(r"/orders/SG-\d{4}-\d{6}", page.request.url)[0]
    captured = client.get_cookie("session").value
    client.post("/account/logout")
    assert client.get(thanks_path).status_code == 404
    copy = browser_with(shop, session=captured)
    assert copy.get(thanks_path).status_code == 404
