from __future__ import annotations

import re
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import ForeignKey, String, Text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.extensions import db
from app.timeutil import UTCDateTime, utcnow

if TYPE_CHECKING:
    from app.accounts.models import User
    from app.downloads.models import Package, UserDownload

# DESIGN.md: no SKU can be ".." or collide with the ".packages/" folder.
SKU_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

# Money, kept apart from delivery (``Order.status``: pending -> shipped). A refunded or disputed
# order that is downloaded later stays refunded or disputed; revenue counts only what was paid.
PAYMENT_STATUSES = ("awaiting_payment", "paid", "cancelled", "flagged", "partially_refunded",
                    "refunded", "disputed")
# Statuses whose money the shop holds (the dashboard's revenue); a partial refund is netted elsewhere.
REVENUE_STATUSES = ("paid", "partially_refunded")


class Product(db.Model):
    __tablename__ = "products"

    id: Mapped[int] = mapped_column(primary_key=True)
    sku: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text, default="")
    price_cents: Mapped[int] = mapped_column()
    currency: Mapped[str] = mapped_column(String(3), default="USD")
    max_downloads: Mapped[int | None] = mapped_column(default=5)  # None: unlimited
    link_days: Mapped[int] = mapped_column(default=7)
    # The class this product's content belongs to ("classics"), so class entitlements can pick it.
    content_class: Mapped[str | None] = mapped_column(String(64), index=True)
    # "N items of class X, chosen later": this product sells an entitlement instead of files.
    entitlement_class: Mapped[str | None] = mapped_column(String(64))
    entitlement_count: Mapped[int | None] = mapped_column()
    package_id: Mapped[int | None] = mapped_column(ForeignKey("packages.id", ondelete="SET NULL"))
    active: Mapped[bool] = mapped_column(default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    package: Mapped[Package | None] = relationship()

    @property
    def price_display(self) -> str:
        return format_money(self.price_cents, self.currency)


class Order(db.Model):
    __tablename__ = "orders"

    id: Mapped[int] = mapped_column(primary_key=True)
    # Set right after insert from the primary key: unique without a counter table or a lock.
    po_number: Mapped[str | None] = mapped_column(String(32), unique=True, index=True)
    email: Mapped[str] = mapped_column(String(254), index=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"), index=True)
    total_cents: Mapped[int] = mapped_column(default=0)
    currency: Mapped[str] = mapped_column(String(3), default="USD")
    item_count: Mapped[int] = mapped_column(default=0)
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending -> shipped
    evidence: Mapped[str | None] = mapped_column(String(16))  # weakest evidence once shipped
    shipped_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    payment_reference: Mapped[str | None] = mapped_column(String(64), unique=True)
    payment_status: Mapped[str] = mapped_column(String(20), default="paid", server_default="paid", index=True)
    # Stripe's PaymentIntent id, stored when paid: refunds and disputes arrive carrying it.
    payment_intent_id: Mapped[str | None] = mapped_column(String(255), unique=True)
    card_brand: Mapped[str | None] = mapped_column(String(16))
    card_last4: Mapped[str | None] = mapped_column(String(4))
    # One checkout form submission = one order, however often it is posted.
    checkout_token: Mapped[str | None] = mapped_column(String(64), unique=True)
    client_ip: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)

    user: Mapped[User | None] = relationship()
    items: Mapped[list[OrderItem]] = relationship(back_populates="order", cascade="all, delete-orphan")
    downloads: Mapped[list[UserDownload]] = relationship(back_populates="order", cascade="all, delete-orphan")

    @property
    def total_display(self) -> str:
        return format_money(self.total_cents, self.currency)


class OrderItem(db.Model):
    __tablename__ = "order_items"

    id: Mapped[int] = mapped_column(primary_key=True)
    order_id: Mapped[int] = mapped_column(ForeignKey("orders.id", ondelete="CASCADE"), index=True)
    product_id: Mapped[int | None] = mapped_column(ForeignKey("products.id", ondelete="SET NULL"))
    sku: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(200))
    quantity: Mapped[int] = mapped_column(default=1)
    unit_price_cents: Mapped[int] = mapped_column()

    order: Mapped[Order] = relationship(back_populates="items")
    product: Mapped[Product | None] = relationship()


def format_money(cents: int, currency: str = "USD") -> str:
    sign = "-" if cents < 0 else ""
    cents = abs(cents)
    symbol = {"USD": "$", "EUR": "€", "GBP": "£"}.get(currency, currency + " ")
    return f"{sign}{symbol}{cents // 100:,}.{cents % 100:02d}"
