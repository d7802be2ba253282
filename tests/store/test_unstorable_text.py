"""NUL and lone surrogates never reach the database or the filesystem: store pages, owner pages
and commands refuse them with a clear 400 (or the one-line CLI refusal) and change nothing, on both
backends (PostgreSQL text cannot hold NUL; no driver can encode a lone surrogate)."""
from __future__ import annotations

import pytest
from sqlalchemy import func, select

from app.accounts.models import User
from app.downloads.models import AuditEntry
from app.extensions import db
from app.store.models import Order, Product
from tests.helpers import make_product

HOSTILE = ["EBOOK1\x00", "\x00", "EBOOK1\udc80", "\ud800"]
# Over HTTP only NUL can arrive: werkzeug decodes URLs and forms with errors="replace" (no surrogates).
NUL_ONLY = [t for t in HOSTILE if "\x00" in t]


def _counts(app) -> tuple[int, int, int]:
    with app.app_context():
        return (db.session.scalar(select(func.count(Product.id))), db.session.scalar(select(func.count(Order.id))),
                db.session.scalar(select(func.count(AuditEntry.id))))


@pytest.mark.parametrize("text", NUL_ONLY, ids=repr)
@pytest.mark.parametrize("where", ["product page", "cart form", "cart query", "admin product page"])
def test_store_and_owner_pages_refuse_unstorable_text(app, client, text, where):
    make_product(app, "EBOOK1")
    before = _counts(app)
    if where == "admin product page":
        with app.app_context():
            owner = User(email="owner@example.com", role="owner")
            owner.set_password("correct horse battery")
            db.session.add(owner)
            db.session.commit()
            owner_id = owner.id
        with client.session_transaction() as session:
            session["_user_id"], session["_fresh"] = str(owner_id), True
        before = _counts(app)
    resp = {
        "product page": lambda: client.get(f"/p/{text}", headers={"Accept": "application/json"}),
        "cart form": lambda: client.post("/cart/add", data={"sku": text, "quantity": "1"},
                                         headers={"Accept": "application/json"}),
        "cart query": lambda: client.get("/cart", query_string={"sku": text}, headers={"Accept": "application/json"}),
        "admin product page": lambda: client.post(f"/admin/products/{text}", data={"name": "x"},
                                                  headers={"Accept": "application/json"}),
    }[where]()
    assert resp.status_code == 400 and "cannot be stored" in resp.get_json()["error"]
    assert _counts(app) == before


@pytest.mark.parametrize("text", HOSTILE, ids=repr)
@pytest.mark.parametrize("option", ["--sku", "--name", "--description", "--package"])
def test_product_add_refuses_unstorable_text_with_one_line(app, runner, text, option):
    args = {"--sku": "EBOOK2", "--name": "Book", "--price": "9.99", option: text}
    result = runner.invoke(args=["softgoods", "product", "add", *[x for kv in args.items() for x in kv]])
    assert result.exit_code == 2 and "cannot be stored" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert _counts(app) == (0, 0, 0)


@pytest.mark.parametrize("text", HOSTILE, ids=repr)
def test_grant_lookup_refuses_unstorable_text(app, runner, text):
    make_product(app, "EBOOK1")
    result = runner.invoke(args=["softgoods", "grant", "--sku", text, "--email", "friend@example.com"])
    assert result.exit_code == 2 and "cannot be stored" in result.output
    assert _counts(app) == (1, 0, 0)
