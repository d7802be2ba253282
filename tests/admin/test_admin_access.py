"""Who may open the owner pages: owners and admins; users only for admins; CSRF on every form."""
from __future__ import annotations

import pytest
from sqlalchemy import select

from app.accounts.models import User
from app.extensions import db
from tests.admin.conftest import log_in, make_user
from tests.store.shop import hidden

OWNER_PAGES = ["/admin/", "/admin/products", "/admin/packages", "/admin/files", "/admin/orders", "/admin/log",
               "/admin/log.csv"]


def test_anonymous_visitors_are_sent_to_the_login_page(client):
    response = client.get("/admin/packages")
    assert response.status_code == 302 and "/login" in response.headers["Location"]


@pytest.mark.parametrize("path", OWNER_PAGES + ["/admin/users"])
def test_customers_are_refused(app, client, path):
    log_in(client, make_user(app, "buyer@example.com", "customer"))
    assert client.get(path).status_code == 403


@pytest.mark.backends("sqlite")
@pytest.mark.parametrize("path", OWNER_PAGES)
def test_owners_open_every_owner_page(client, owner, path):
    assert client.get(path).status_code == 200


def test_only_admins_manage_users(app, client, login):
    owner_id = make_user(app, "owner@example.com", "owner")
    log_in(client, owner_id)
    assert client.get("/admin/users").status_code == 403
    assert client.post(f"/admin/users/{owner_id}/role", data={"role": "admin"}).status_code == 403
    login("admin")
    page = client.get("/admin/users").text
    assert "owner@example.com" in page
    response = client.post(f"/admin/users/{owner_id}/role", data={"role": "customer"})
    assert response.status_code == 302
    with app.app_context():
        assert db.session.get(User, owner_id).role == "customer"


@pytest.mark.backends("sqlite")
@pytest.mark.parametrize("role, message", [("king", "role must be one of"), ("owner", "your own admin role")])
def test_bad_role_changes_are_refused(app, client, login, role, message):
    admin_id = login("admin")
    response = client.post(f"/admin/users/{admin_id}/role", data={"role": role}, follow_redirects=True)
    assert message in response.text
    with app.app_context():
        assert db.session.scalar(select(User.role).where(User.id == admin_id)) == "admin"


@pytest.mark.backends("sqlite")
@pytest.mark.config(WTF_CSRF_ENABLED=True)
def test_forms_need_a_csrf_token(app, client, owner):
    page = client.get("/admin/packages").text
    assert 'name="csrf_token"' in page
    assert client.post("/admin/packages/new", data={"name": "P1"}).status_code == 400
    token = page.split('name="csrf_token" value="')[1].split('"')[0]
    response = client.post("/admin/packages/new", data={"name": "P1", "csrf_token": token})
    assert response.status_code == 302 and response.headers["Location"].endswith("/admin/packages/P1")


def _log_in_through_the_form(client, email: str, password: str, next_url: str):
    page = client.get(f"/account/login?next={next_url}").text
    token = hidden(page, "csrf_token")
    refused = client.post("/account/login", data={"email": email, "password": password, "next": next_url})
    assert refused.status_code == 400 and "CSRF" in refused.text  # the form is protected
    return client.post("/account/login", data={"email": email, "password": password, "next": next_url,
                                               "csrf_token": token})


@pytest.mark.config(WTF_CSRF_ENABLED=True)
def test_an_owner_logs_in_through_the_real_form_and_reaches_the_owner_pages(app, client):
    make_user(app, "owner@example.com", "owner")
    assert client.get("/admin/").status_code == 302  # not logged in yet
    response = _log_in_through_the_form(client, "owner@example.com", "correct horse battery", "/admin/")
    assert response.status_code == 303 and response.headers["Location"].endswith("/admin/")
    page = client.get("/admin/")
    assert page.status_code == 200 and 'name="csrf_token"' in client.get("/admin/packages").text


@pytest.mark.config(WTF_CSRF_ENABLED=True)
def test_a_customer_who_logs_in_through_the_real_form_is_refused_the_owner_pages(app, client):
    make_user(app, "buyer@example.com", "customer")
    response = _log_in_through_the_form(client, "buyer@example.com", "correct horse battery", "/admin/")
    assert response.status_code == 303  # the login itself works ...
    assert client.get("/account/downloads").status_code == 200
    for path in OWNER_PAGES:  # ... but no owner page opens
        assert client.get(path).status_code == 403, path
