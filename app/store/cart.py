"""Cart rules. The cart lives in the signed session cookie as ``{sku: quantity}``; these functions
take that mapping and the database session and return a new mapping or order lines."""
from __future__ import annotations

import re

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.downloads.errors import InvalidInput
from app.store.catalog import for_sale, sale_blockers
from app.store.models import Product
from app.store.orders import MAX_QUANTITY, Line

MAX_CART_LINES = 50  # keeps the session cookie well under browsers' 4 KB limit


def parse_quantity(text: str | int | None) -> int:
    """A quantity from a form: a whole number from 1 to MAX_QUANTITY."""
    raw = str(text if text is not None else "").strip()
    if not re.fullmatch(r"-?[0-9]+", raw):  # ASCII digits only: int() takes "²" and "３"
        raise InvalidInput(f"quantity must be a whole number from 1 to {MAX_QUANTITY}, not {raw!r}")
    quantity = int(raw)
    if not 1 <= quantity <= MAX_QUANTITY:
        raise InvalidInput(f"quantity must be between 1 and {MAX_QUANTITY}, not {quantity}")
    return quantity


def product_for_sale(session: Session, sku: str) -> Product:
    product = session.scalar(select(Product).where(Product.sku == (sku or ""), Product.active))
    if product is None:
        raise InvalidInput(f"there is no product {sku!r} for sale", status=422)
    if not for_sale(session, product):
        raise InvalidInput(f"{product.name} ({product.sku}) is not available at the moment, so it cannot be bought",
                           status=422)
    return product


def add_item(session: Session, cart: dict[str, int], sku: str, quantity: str | int) -> dict[str, int]:
    qty = parse_quantity(quantity)
    product = product_for_sale(session, sku)
    new_total = cart.get(product.sku, 0) + qty
    if new_total > MAX_QUANTITY:
        raise InvalidInput(f"at most {MAX_QUANTITY} of one product per order "
                           f"(your cart already holds {cart.get(product.sku, 0)})")
    if product.sku not in cart and len(cart) >= MAX_CART_LINES:
        raise InvalidInput(f"a cart holds at most {MAX_CART_LINES} different products")
    return {**cart, product.sku: new_total}


def set_quantity(session: Session, cart: dict[str, int], sku: str, quantity: str | int) -> dict[str, int]:
    if sku not in cart:
        raise InvalidInput(f"{sku!r} is not in your cart")
    qty = parse_quantity(quantity)
    product_for_sale(session, sku)
    return {**cart, sku: qty}


def remove_item(cart: dict[str, int], sku: str) -> dict[str, int]:
    return {k: v for k, v in cart.items() if k != sku}


def cart_lines(session: Session, cart: dict[str, int]) -> list[Line]:
    """Lines of the products still for sale, in a stable order (a product withdrawn since it was
    added simply drops out; checkout compares totals, so nobody pays for what they did not see)."""
    if not cart:
        return []
    products = session.scalars(select(Product).where(Product.sku.in_(list(cart)), Product.active)
                               .order_by(Product.name, Product.sku)).all()
    blockers = sale_blockers(session, products)
    return [Line(p, int(cart[p.sku])) for p in products if isinstance(cart.get(p.sku), int)
            and 1 <= cart[p.sku] <= MAX_QUANTITY and blockers[p.id] is None]


def lines_total(lines: list[Line]) -> int:
    return sum(line.unit_price * line.quantity for line in lines)


def item_count(cart: dict[str, int]) -> int:
    return sum(v for v in cart.values() if isinstance(v, int))
