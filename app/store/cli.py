"""``softgoods product ...`` and ``softgoods grant``."""
from __future__ import annotations

import click

from app.cli import audit, fail, run_rule
from app.downloads.grants import grant_downloads
from app.downloads.packages import SHELL
from app.events import announce
from app.extensions import db
from app.store.catalog import add_product
from app.store.models import Product
from app.store.orders import Line, create_order
from app.accounts.validation import normalize_email
from sqlalchemy import select


def _limit(value: str | None) -> int | None | bool:
    """--max-downloads: a number, 'unlimited', or absent (False: the product's default)."""
    if value is None:
        return False
    if value.lower() in ("unlimited", "0", "none"):
        return None
    try:
        return int(value)
    except ValueError:
        fail(f"--max-downloads must be a whole number or 'unlimited', not {value!r}")


def register(group: click.Group) -> None:
    @group.group("product")
    def product() -> None:
        """Manage products."""

    @product.command("add")
    @click.option("--sku", required=True)
    @click.option("--name", required=True)
    @click.option("--price", required=True, help="e.g. 9.99")
    @click.option("--description", default="")
    @click.option("--max-downloads", default=None, help="per file of a link; 'unlimited' for no limit (default 5)")
    @click.option("--days", type=click.IntRange(1, 3650), default=7, show_default=True, help="link lifetime")
    @click.option("--content-class", default=None, help="class this product belongs to")
    @click.option("--entitlement", default=None, metavar="CLASS:N", help="sell N items of CLASS, chosen later")
    @click.option("--package", "package_name", default=None, help="sell this download package")
    def product_add(sku, name, price, description, max_downloads, days, content_class, entitlement, package_name):
        """Add a product (files go under DOWNLOAD_DIR/<SKU>/)."""
        limit = _limit(max_downloads)
        ent_class = ent_count = None
        if entitlement:
            ent_class, _, count = entitlement.partition(":")
            if not (count.isascii() and count.isdigit()):
                fail("--entitlement must look like CLASS:N, e.g. classics:10")
            ent_count = int(count)
        product = run_rule(add_product, db.session, sku=sku, name=name, price=price, description=description,
                           max_downloads=5 if limit is False else limit, link_days=days,
                           content_class=content_class, entitlement_class=ent_class,
                           entitlement_count=ent_count, package_name=package_name,
                           attached_by=SHELL)
        audit("product.add", f"product {product.sku}", f"{product.name} at {product.price_display}")
        db.session.commit()
        click.echo(f"product {product.sku} added: {product.name} at {product.price_display}")

    @group.command("grant")
    @click.option("--sku", required=True)
    @click.option("--email", required=True)
    @click.option("--days", type=click.IntRange(1, 3650), default=None, help="link lifetime (product default)")
    @click.option("--max-downloads", default=None, help="a number or 'unlimited' (product default)")
    def grant(sku, email, days, max_downloads):
        """Give a free/comp copy: a paid order of 0.00; the last line printed is the download link."""
        email = run_rule(normalize_email, email)
        limit = _limit(max_downloads)
        if limit not in (False, None) and not 1 <= limit <= 100_000:
            fail("--max-downloads must be between 1 and 100000, or 'unlimited'")
        product = db.session.scalar(select(Product).where(Product.sku == sku))
        if product is None:
            fail(f"no product with SKU {sku!r}")
        # A comp copy is free whatever the list price: its line says $0.00 like its total.
        order = create_order(db.session, email=email, lines=[Line(product, unit_price_cents=0)],
                             payment_reference=None)
        links = grant_downloads(db.session, order, days=days, max_downloads=limit)
        announce("order.paid", session=db.session, order=order)  # a comp order is paid (0.00)
        audit("order.grant", f"order {order.po_number}", f"{product.sku} for {email}")
        db.session.commit()
        click.echo(f"order {order.po_number} for {email}: {product.sku}, expires {links[0].grant.expires_at:%Y-%m-%d}")
        click.echo(links[0].url)
