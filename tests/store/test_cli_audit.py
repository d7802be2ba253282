"""Owner actions from the command line leave the same audit trail as the owner pages (actor "cli")."""
from __future__ import annotations

from sqlalchemy import select

from app.downloads.models import AuditEntry
from app.extensions import db


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
