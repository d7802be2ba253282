"""The cash register: cart lines + card -> authorized payment -> order, grants, queued email.

One checkout form submission is one order however often it arrives: the form's hidden
``checkout_token`` is unique on the order and is also the gateway's idempotency key, so
- a double submit finds the order the first submit made (or loses the insert race and then finds it);
- a retry after the request died between "approved" and "stored" gets the same payment reference
  from the gateway and makes the one order, never a second charge.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.accounts.models import User
from app.downloads.errors import InvalidInput
from app.downloads.models import OutboxMessage
from app.store.cart import lines_total
from app.store.models import Order, format_money
from app.store.fulfilment import fulfil_paid_order
from app.store.orders import Line, create_order
from app.store.payments import Approved, Card, PaymentGateway

TOKEN_BYTES = 24


class PaymentDeclined(InvalidInput):
    """The gateway said no: the shopper sees the reason; nothing was written."""

    def __init__(self, reason: str):
        super().__init__(f"Your payment was declined: {reason}.", status=402)
        self.reason = reason


class TotalChanged(InvalidInput):
    """The total now differs from the one the shopper saw (a price changed, a product left the shop):
    nothing is charged; the page shows the new total for a fresh decision."""

    def __init__(self, shown: str, now: str):
        super().__init__(f"The total changed from {shown} to {now} since this page was opened, so nothing was "
                         f"charged. Please check your order and pay {now} if you still want it.", status=409)


def shown_total_field(total_cents: int, currency: str) -> str:
    """The checkout form's hidden record of the total the shopper was shown: "4999 USD"."""
    return f"{total_cents} {currency}"


def check_shown_total(shown: str | None, total_cents: int, currency: str) -> None:
    """Charge only the total the shopper saw: any other current total (or no record of it) is refused."""
    amount, _, shown_currency = (shown or "").strip().partition(" ")
    if not (amount.isascii() and amount.isdigit()) or len(amount) > 12 or not shown_currency:
        raise InvalidInput("this checkout form is not valid any more: please open the checkout page again",
                           status=400)
    if (int(amount), shown_currency) != (total_cents, currency):
        raise TotalChanged(format_money(int(amount), shown_currency), format_money(total_cents, currency))


@dataclass
class CheckoutResult:
    order: Order
    created: bool  # False: this submission had already made its order
    email: OutboxMessage | None = None


def new_checkout_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def check_token(token: str | None) -> str:
    token = (token or "").strip()
    if not 20 <= len(token) <= 64 or not token.replace("-", "").replace("_", "").isalnum():
        raise InvalidInput("this checkout form is not valid any more: please open the checkout page again",
                           status=400)
    return token


def order_for_token(session: Session, token: str) -> Order | None:
    return session.scalar(select(Order).where(Order.checkout_token == token))


def checkout(session: Session, gateway: PaymentGateway, *, lines: list[Line], email: str, card: Card | None,
             checkout_token: str, shown_total: str | None, user: User | None = None,
             client_ip: str | None = None) -> CheckoutResult:
    """Authorize and record a sale. The caller commits, then sends ``result.email`` (app.mail.deliver);
    on IntegrityError at commit it calls ``after_race`` to find the winner's order. ``shown_total`` is
    the form's record of the total on the page (``shown_total_field``); None only for callers that
    show no page (a comp order made by the owner)."""
    token = check_token(checkout_token)
    existing = order_for_token(session, token)
    if existing is not None:
        return CheckoutResult(existing, created=False)
    if not lines:
        raise InvalidInput("your cart is empty: add a product first")
    currencies = {line.product.currency for line in lines}
    if len(currencies) > 1:
        raise InvalidInput("products priced in different currencies must be bought in separate orders")
    currency = next(iter(currencies))
    total = lines_total(lines)
    if shown_total is not None:
        check_shown_total(shown_total, total, currency)
    reference = brand = last4 = None
    if total > 0:
        if card is None:
            raise InvalidInput("please enter a card to pay with")
        answer = gateway.authorize(total, currency, card, idempotency_key=token)
        if not isinstance(answer, Approved):
            raise PaymentDeclined(answer.reason)
        reference, brand, last4 = answer.reference, card.brand, card.last4
        # Approved before, but the request died before the order was stored: this is that order.
        earlier = session.scalar(select(Order).where(Order.payment_reference == reference))
        if earlier is not None:
            return CheckoutResult(earlier, created=False)
    order = create_order(session, email=email, lines=lines, user=user, client_ip=client_ip,
                         payment_reference=reference, card_brand=brand, card_last4=last4,
                         checkout_token=token)
    return CheckoutResult(order, created=True, email=fulfil_paid_order(session, order, client_ip=client_ip))


def after_race(session: Session, exc: IntegrityError, checkout_token: str) -> CheckoutResult:
    """A concurrent submission of the same form committed first: show its order."""
    session.rollback()
    existing = order_for_token(session, checkout_token)
    if existing is None:
        raise exc
    return CheckoutResult(existing, created=False)
