"""Products: list, add and edit (the same catalog rules as ``softgoods product add``)."""
from __future__ import annotations

from flask import abort, flash, redirect, render_template, request, url_for
from flask_login import current_user
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.admin.blueprint import audit, bp, refuse
from app.accounts.models import User
from app.downloads.errors import InvalidInput
from app.downloads.packages import check_may_sell
from app.downloads.models import Package
from app.extensions import db
from app.store.catalog import add_product, parse_price, sale_blockers
from app.store.models import Product


def _limit(text: str | None) -> int | None:
    text = (text or "").strip().lower()
    if text in ("", "unlimited"):
        return None
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 100_000:
        raise InvalidInput("max downloads must be between 1 and 100000, or empty for unlimited")
    return int(text)


def _days(text: str | None) -> int:
    text = (text or "").strip()
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 3650:
        raise InvalidInput("link lifetime must be between 1 and 3650 days")
    return int(text)


def _package(session: Session, name: str | None) -> Package | None:
    name = (name or "").strip()
    if not name:
        return None
    package = session.scalar(select(Package).where(Package.name == name))
    if package is None:
        raise InvalidInput(f"no package named {name!r}")
    return package


def update_product(session: Session, product: Product, form, user: User) -> None:
    """The editable attributes of a product; the SKU (its folder) never changes."""
    name = (form.get("name") or "").strip()
    if not name or len(name) > 200:
        raise InvalidInput("name must be 1-200 characters")
    product.price_cents = parse_price(form.get("price", ""))
    product.max_downloads = _limit(form.get("max_downloads"))
    product.link_days = _days(form.get("link_days"))
    package = _package(session, form.get("package"))
    for sold in {product.package, package} - {None}:
        check_may_sell(user, sold)
    product.package = package
    product.name = name
    product.description = (form.get("description") or "").strip()
    product.active = form.get("active") == "yes"
    session.flush()


@bp.get("/products")
def products():
    items = list(db.session.scalars(select(Product).order_by(Product.sku)))
    packages = list(db.session.scalars(select(Package.name).order_by(Package.name)))
    return render_template("admin/products.html", title="Products", products=items, packages=packages,
                           blockers=sale_blockers(db.session, items))


@bp.post("/products/new")
def product_new():
    form = request.form
    try:
        product = add_product(db.session, sku=(form.get("sku") or "").strip(), name=form.get("name", ""),
                              price=form.get("price", ""), description=form.get("description", ""),
                              max_downloads=_limit(form.get("max_downloads")), link_days=_days(form.get("link_days")),
                              package_name=(form.get("package") or "").strip() or None,
                              attached_by=current_user)
    except InvalidInput as exc:
        return refuse(exc, url_for("admin.products"))
    audit("product.add", f"product {product.sku}", f"{product.name} at {product.price_display}")
    db.session.commit()
    flash(f"Product {product.sku} added.", "success")
    return redirect(url_for("admin.products"))


@bp.get("/products/<sku>")
def product_edit(sku: str):
    product = db.session.scalar(select(Product).where(Product.sku == sku))
    if product is None:
        abort(404, f"There is no product {sku}.")
    packages = list(db.session.scalars(select(Package.name).order_by(Package.name)))
    return render_template("admin/product_edit.html", title=f"Product {sku}", product=product, packages=packages)


@bp.post("/products/<sku>")
def product_save(sku: str):
    product = db.session.scalar(select(Product).where(Product.sku == sku))
    if product is None:
        abort(404, f"There is no product {sku}.")
    try:
        update_product(db.session, product, request.form, current_user)
    except InvalidInput as exc:
        return refuse(exc, url_for("admin.product_edit", sku=sku))
    audit("product.update", f"product {sku}", f"{product.name} at {product.price_display}")
    db.session.commit()
    flash(f"Product {sku} saved.", "success")
    return redirect(url_for("admin.products"))
