"""Accounts: an account is born when the address is proven (its owner chooses the password), guest
orders go to the confirmed owner, registration reveals nothing, password reset and change, every
session of an account ends together (logout, change, reset), safe logins, My downloads."""
import re

import pytest
from itsdangerous import URLSafeSerializer
from sqlalchemy import func, select

from app.accounts.models import User
from app.accounts.rules import is_safe_next
from app.accounts.tokens import make_reset_token, make_setup_token, read_reset_token, read_setup_token
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


def register(client, email="buyer@example.com", **extra):
    return client.post("/account/register", data={"email": email, **extra})


def mailed_link(mail, kind: str) -> str:
    [url] = re.findall(rf"http://shop\.test(/account/{kind}\S*)", mail.text)
    assert url in mail.html.replace("&amp;", "&")
    return url


def set_password(client, link: str, password: str = PASSWORD, confirm: str | None = None):
    return client.post(link, data={"password": password, "confirm": password if confirm is None else confirm})


def sign_up(client, smtp_server, email="buyer@example.com", password=PASSWORD):
    """Register, open the emailed link in the same browser, choose the password: logged in."""
    seen = len(smtp_server.messages)
    assert register(client, email).status_code == 200
    mail = smtp_server.wait_for(seen + 1)[seen]
    assert mail.rcpt_tos == [email]
    assert set_password(client, mailed_link(mail, "setup/"), password).status_code == 303


def users(app) -> int:
    with app.app_context():
        return db.session.scalar(select(func.count()).select_from(User))


def test_guest_claims_past_orders_after_proving_the_same_email(shop, client, smtp_server, app):
    guest_links = download_links(buy(client, "EBOOK1", email="Buyer@Example.com").text)
    smtp_server.wait_for(1)  # the order email
    shopper = app.test_client()  # later, another browser
    sign_up(shopper, smtp_server)
    assert download_links(shopper.get("/account/downloads").text) == guest_links


def test_pre_hijacking_the_address_owner_chooses_the_password_and_the_attacker_gets_nothing(
        shop, client, smtp_server, app):
    buy(client, "EBOOK1", email="victim@example.com")
    smtp_server.wait_for(1)
    attacker = app.test_client()
    # The attacker "registers" the victim's address with a password of their choosing: no account is made.
    page = register(attacker, "victim@example.com", password="attacker-pass", confirm="attacker-pass")
    assert page.status_code == 200 and users(app) == 0
    assert log_in(attacker, "victim@example.com", "attacker-pass").status_code == 401
    assert attacker.get("/account/downloads").status_code == 302
    setup_link = mailed_link(smtp_server.wait_for(2)[1], "setup/")
    victim = app.test_client()
    assert victim.get(setup_link).status_code == 200
    assert set_password(victim, setup_link, "victims own pass").status_code == 303
    assert len(download_links(victim.get("/account/downloads").text)) == 1
    # The attacker's session, their password and the link (spent) are all worthless now.
    assert attacker.get("/account/downloads").status_code == 302
    assert log_in(attacker, "victim@example.com", "attacker-pass").status_code == 401
    again = set_password(attacker, setup_link, "attacker-pass")
    assert again.status_code == 410 and "already exists" in error_text(again.text)
    buy(client, "EBOOK1", email="victim@example.com")  # a later guest order: the owner's, at next login
    assert log_in(victim, "victim@example.com", "victims own pass").status_code == 303
    assert len(download_links(victim.get("/account/downloads").text)) == 2


def test_registration_answers_the_same_whatever_the_address_and_mails_its_owner(shop, smtp_server, app):
    sign_up(app.test_client(), smtp_server, "taken@example.com")
    before = users(app)
    answers = []
    for email in ("Taken@Example.com", "fresh@example.com"):
        page = register(app.test_client(), email)
        answers.append((page.status_code, page.text.replace(email.lower(), "EMAIL")))
    assert answers[0] == answers[1] and answers[0][0] == 200 and "already" not in answers[0][1]
    assert users(app) == before
    taken, fresh = smtp_server.wait_for(3)[1:]
    assert taken.rcpt_tos == ["taken@example.com"] and "already have" in taken.message["Subject"]
    assert mailed_link(taken, "reset") == "/account/reset?email=taken@example.com"
    assert fresh.rcpt_tos == ["fresh@example.com"] and mailed_link(fresh, "setup/")


@pytest.mark.parametrize("email, message", [
    ("not-an-email", "'not-an-email' is not a valid email address"),
    ("a@b", "'a@b' is not a valid email address"),
])
def test_bad_registrations_are_refused_and_write_nothing(shop, client, app, smtp_server, email, message):
    page = register(client, email)
    assert page.status_code == 422
    assert error_text(page.text).startswith(message), error_text(page.text)
    assert users(shop) == 0 and smtp_server.messages == []


@pytest.mark.parametrize("password, confirm, message", [
    ("short", None, "the password must have at least 8 characters"),
    (PASSWORD, "different!", "the two passwords do not match"),
])
def test_bad_passwords_on_the_setup_page_are_refused(shop, client, smtp_server, password, confirm, message):
    register(client)
    link = mailed_link(smtp_server.wait_for(1)[0], "setup/")
    page = set_password(client, link, password, confirm)
    assert page.status_code == 422 and error_text(page.text) == message
    assert users(shop) == 0


def test_login_refuses_wrong_passwords_and_unknown_emails_alike(shop, client, smtp_server):
    sign_up(client, smtp_server)
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
def test_login_follows_next_only_on_this_site(shop, client, smtp_server, target, safe):
    sign_up(client, smtp_server)
    client.post("/account/logout")
    page = log_in(client, "buyer@example.com", PASSWORD, next_url=target)
    assert page.status_code == 303
    assert page.location == (target if safe else "/")
    assert is_safe_next(target) is safe


def test_my_downloads_needs_a_login(shop, client):
    page = client.get("/account/downloads")
    assert page.status_code == 302 and page.location.startswith("/account/login?next=")


def test_logout_is_a_post(shop, client, smtp_server):
    sign_up(client, smtp_server)
    assert client.get("/account/logout").status_code == 405
    assert client.post("/account/logout").status_code == 303
    assert client.get("/account/downloads").status_code == 302


def test_password_reset_by_email_ends_every_session_and_works_once(shop, client, smtp_server, app):
    sign_up(client, smtp_server)
    other = app.test_client()
    log_in(other, "buyer@example.com", PASSWORD)
    other.post("/account/login", data={"email": "buyer@example.com", "password": PASSWORD, "remember": "1"})
    unknown = app.test_client().post("/account/reset", data={"email": "nobody@example.com"})
    known = app.test_client().post("/account/reset", data={"email": "buyer@example.com"})
    assert unknown.status_code == known.status_code == 200
    assert unknown.text.replace("nobody@", "X@") == known.text.replace("buyer@", "X@")
    link = mailed_link(smtp_server.wait_for(2)[1], "reset/")  # only the real account got a message
    assert len(smtp_server.messages) == 2
    stranger = app.test_client()
    assert stranger.get(link).status_code == 200
    assert set_password(stranger, link, "a new password").status_code == 303
    for browser in (client, other):  # sessions and remember cookies from before the reset
        assert browser.get("/account/downloads").status_code == 302
    assert log_in(app.test_client(), "buyer@example.com", PASSWORD).status_code == 401
    assert log_in(app.test_client(), "buyer@example.com", "a new password").status_code == 303
    spent = set_password(stranger, link, "third password")
    assert spent.status_code == 410 and "already used" in error_text(spent.text)
    assert log_in(app.test_client(), "buyer@example.com", "a new password").status_code == 303


def test_reset_tokens_are_short_lived_and_have_their_own_salt(shop, client):
    secret = shop.config["SECRET_KEY"]
    token = make_reset_token(secret, 1, 0)
    assert read_reset_token(secret, token) == (1, 0)
    with pytest.raises(InvalidInput) as refused:
        read_reset_token(secret, token, max_age=-1)
    assert refused.value.status == 410 and "expired" in refused.value.message
    for forged in (token + "x", make_reset_token("other", 1, 0), make_setup_token(secret, "a@example.com"),
                   URLSafeSerializer(secret, salt="softgoods.receipt.v1").dumps([1, 0])):
        with pytest.raises(InvalidInput):
            read_reset_token(secret, forged)
    with pytest.raises(InvalidInput):
        read_setup_token(secret, token)
    for path in ("/account/reset/forged-token", "/account/setup/forged-token"):
        page = client.get(path)
        assert page.status_code == 404 and "not valid" in page.text


def test_changing_the_password_ends_every_other_session(shop, client, smtp_server, app):
    sign_up(client, smtp_server)
    other = app.test_client()
    log_in(other, "buyer@example.com", PASSWORD)
    wrong = client.post("/account/password", data={"current": "nope", "password": "x" * 9, "confirm": "x" * 9})
    assert wrong.status_code == 401 and other.get("/account/downloads").status_code == 200
    page = client.post("/account/password", data={"current": PASSWORD, "password": "new password",
                                                  "confirm": "new password"})
    assert page.status_code == 303
    assert client.get("/account/downloads").status_code == 200  # this browser carries on
    assert other.get("/account/downloads").status_code == 302
    assert log_in(app.test_client(), "buyer@example.com", "new password").status_code == 303
