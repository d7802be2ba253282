"""Catalog rules: validating and adding products (CLI and owner pages call these)."""
from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.accounts.models import User
from app.downloads.errors import InvalidInput
from app.downloads.models import PACKAGES_SKU, FileEntry, Package
from app.downloads.packages import check_may_sell, on_sale
from app.store.models import SKU_PATTERN, Product

MAX_PRICE_CENTS = 100_000_000  # one million in the shop's currency


def sale_blockers(session: Session, products: Sequence[Product]) -> dict[int, str | None]:
    """Can each product be sold? product id -> None when it can, else why not (for the owner's eyes).

    The one answer the catalog, product page, cart, checkout and owner pages all use: a product is
    sold only when there is something to deliver (an indexed file under its SKU, or its package's
    ZIP while the package is on sale), so nobody pays for "This download has no files yet"."""
    skus = [p.sku for p in products]
    with_files = set(session.scalars(select(FileEntry.sku).where(
        FileEntry.sku.in_(skus), FileEntry.missing.is_(False)).distinct())) if skus else set()
    built = set(session.scalars(select(FileEntry.path).where(
        FileEntry.sku == PACKAGES_SKU, FileEntry.missing.is_(False))))
    reasons: dict[int, str | None] = {}
    for product in products:
        package = product.package
        if not product.active:
            reason = "withdrawn from sale"
        elif product.entitlement_class:
            reason = None  # sells a later choice among other products, which are checked when picked
        elif package is not None:
            reason = (f"its package {package.name} is past its expiry or lifetime" if not on_sale(package)
                      else f"its package {package.name} has no ZIP (no files)" if f"{package.name}.zip" not in built
                      else None)
        else:
            reason = None if product.sku in with_files else f"no file is indexed under {product.sku}/"
        reasons[product.id] = reason
    return reasons


def for_sale(session: Session, product: Product) -> bool:
    return sale_blockers(session, [product])[product.id] is None


def parse_price(text: str | int | Decimal) -> int:
    """'9.99' -> 999 cents; refuses negatives, fractions of a cent and anything non-numeric."""
    try:
        value = Decimal(str(text).strip())
    except InvalidOperation:
        raise InvalidInput(f"price must be a number like 9.99, not {text!r}") from None
    if not value.is_finite() or value < 0:
        raise InvalidInput(f"price must be zero or more, not {text}")
    cents = value * 100
    if cents != cents.to_integral_value():
        raise InvalidInput(f"price {text} has fractions of a cent")
    if cents > MAX_PRICE_CENTS:
        raise InvalidInput(f"price {text} is too high")
    return int(cents)


def check_sku(sku: str) -> str:
    if not isinstance(sku, str) or not SKU_PATTERN.fullmatch(sku):
        raise InvalidInput(f"SKU {sku!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-', "
                           "starting with a letter or digit")
    return sku


def add_product(session: Session, *, sku: str, name: str, price: str | int | Decimal,
                description: str = "", max_downloads: int | None = 5, link_days: int = 7,
                content_class: str | None = None, entitlement_class: str | None = None,
                entitlement_count: int | None = None, package_name: str | None = None,
                attached_by: User | str | None = None) -> Product:
    """``attached_by``: who sells ``package_name`` (a User, or ``packages.SHELL`` for the command line)."""
    check_sku(sku)
    name = (name or "").strip()
    if not name or len(name) > 200:
        raise InvalidInput("name must be 1-200 characters")
    price_cents = parse_price(price)
    if max_downloads is not None and not 1 <= max_downloads <= 100_000:
        raise InvalidInput("max downloads must be between 1 and 100000 (or unlimited)")
    if not 1 <= link_days <= 3650:
        raise InvalidInput("link lifetime must be between 1 and 3650 days")
    if (entitlement_class is None) != (entitlement_count is None):
        raise InvalidInput("a class entitlement needs both a class and a count")
    if entitlement_count is not None and not 1 <= entitlement_count <= 10_000:
        raise InvalidInput("entitlement count must be between 1 and 10000")
    for label, value in (("content class", content_class), ("entitlement class", entitlement_class)):
        if value is not None and not SKU_PATTERN.fullmatch(value):
            raise InvalidInput(f"{label} {value!r} is not allowed: use letters, digits, '.', '_' or '-'")
    if session.scalar(select(Product.id).where(Product.sku == sku)) is not None:
        raise InvalidInput(f"a product with SKU {sku} already exists", status=409)
    package = None
    if package_name is not None:
        package = session.scalar(select(Package).where(Package.name == package_name))
        if package is None:
            raise InvalidInput(f"no package named {package_name!r}")
        check_may_sell(attached_by, package)
    product = Product(sku=sku, name=name, description=description or "", price_cents=price_cents,
                      max_downloads=max_downloads, link_days=link_days, content_class=content_class,
                      entitlement_class=entitlement_class, entitlement_count=entitlement_count,
                      package=package)
    session.add(product)
    session.flush()
    return product
