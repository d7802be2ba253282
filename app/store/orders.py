"""Order rules: creating paid orders and their purchase-order numbers."""
from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.orm import Session

from app.accounts.models import User
from app.store.models import Order, OrderItem, Product

MAX_QUANTITY = 10


@dataclass(frozen=True)
class Line:
    product: Product
    quantity: int = 1
    unit_price_cents: int | None = None  # None: the product's price; 0 for a comp copy

    @property
    def unit_price(self) -> int:
        return self.product.price_cents if self.unit_price_cents is None else self.unit_price_cents


def po_number_for(order: Order) -> str:
    """A number a person can read out on the phone: SG-2026-000123 (unique via the primary key)."""
    return f"SG-{order.created_at:%Y}-{order.id:06d}"


def create_order(session: Session, *, email: str, lines: list[Line], user: User | None = None,
                 client_ip: str | None = None, payment_reference: str | None = None,
                 card_brand: str | None = None, card_last4: str | None = None,
                 checkout_token: str | None = None, payment_status: str = "paid") -> Order:
    """An order with its items (paid unless a payment provider has yet to confirm it); the caller
    fulfils it (``app.store.fulfilment.fulfil_paid_order``) once paid, and commits."""
    order = Order(email=email.lower(), user=user, client_ip=client_ip, payment_reference=payment_reference,
                  card_brand=card_brand, card_last4=card_last4, checkout_token=checkout_token,
                  payment_status=payment_status)
    for line in lines:
        order.items.append(OrderItem(product=line.product, sku=line.product.sku, name=line.product.name,
                                     quantity=line.quantity, unit_price_cents=line.unit_price))
    order.total_cents = sum(i.quantity * i.unit_price_cents for i in order.items)
    order.item_count = sum(i.quantity for i in order.items)
    session.add(order)
    session.flush()
    order.po_number = po_number_for(order)
    session.flush()
    return order
