"""The store's commands: owner actions leave the same audit trail as the owner pages (actor "cli"),
and odd numbers get the one-line refusal."""
from __future__ import annotations

import pytest
from sqlalchemy import func, select

from app.downloads.models import AuditEntry
from app.extensions import db
from app.store.models import Product


def test_product_add_grant_and_user_add_are_recorded(app, runner):
    assert runner.invoke(args=["softgoods", "product", "add", "--sku", "EBOOK1", "--name", "Book",
                               "--price", "9.99"]).exit_code == 0
    granted = runner.invoke(args=["softgoods", "grant", "--sku", "EBOOK1", "--email", "friend@example.com"])
    assert granted.exit_code == 0, granted.output
    po = granted.output.split()[1]
    assert runner.invoke(args=["softgoods", "user", "add", "--email", "boss@example.com", "--role", "owner",
                               "--password-stdin"], input="correct horse battery\n").exit_code == 0
    refused = runner.invoke(args=["softgoods", "grant", "--sku", "NOPE", "--email", "friend@example.com"])
    assert refused.exit_code == 2
    with app.app_context():
        trail = [(a.actor, a.action, a.target, a.detail)
                 for a in db.session.scalars(select(AuditEntry).order_by(AuditEntry.id))]
    assert trail == [("cli", "product.add", "product EBOOK1", "Book at $9.99"),
                     ("cli", "order.grant", f"order {po}", "EBOOK1 for friend@example.com"),
                     ("cli", "user.add", "user boss@example.com", "role owner")]


@pytest.mark.backends("sqlite")
@pytest.mark.parametrize("args, reason", [
    (["--entitlement", "classics:\u00b2"], "--entitlement must look like CLASS:N"),
    (["--entitlement", "classics:\uff13"], "--entitlement must look like CLASS:N"),
    (["--max-downloads", "\u00b2"], "--max-downloads must be a whole number"),
])
def test_odd_numbers_are_refused_with_one_line(app, runner, args, reason):
    result = runner.invoke(args=["softgoods", "product", "add", "--sku", "OK1", "--name", "x", "--price", "1", *args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and reason in lines[0], result.output
    with app.app_context():
        assert db.session.scalar(select(func.count()).select_from(Product)) == 0
