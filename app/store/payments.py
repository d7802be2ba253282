"""The cash register's side of payments: one small gateway interface and a built-in test gateway.

A gateway authorizes an amount for a card and answers ``Approved(reference)`` or ``Declined(reason)``.
The card number never leaves this module's objects: orders keep only the brand and the last four
digits, and ``Card.__repr__`` masks the number so it cannot reach a log by accident.
"""
from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass, field
from datetime import date
from typing import Protocol, Union

from app.downloads.errors import InvalidInput


@dataclass(frozen=True)
class Approved:
    reference: str


@dataclass(frozen=True)
class Declined:
    reason: str


Authorization = Union[Approved, Declined]


@dataclass(frozen=True)
class Card:
    number: str = field(repr=False)
    exp_month: int
    exp_year: int
    cvc: str = field(repr=False)

    @property
    def last4(self) -> str:
        return self.number[-4:]

    @property
    def brand(self) -> str:
        return card_brand(self.number)

    def __repr__(self) -> str:  # never the number, even in a traceback's locals
        return f"Card({self.brand} ****{self.last4}, {self.exp_month:02d}/{self.exp_year})"


class PaymentGateway(Protocol):
    def authorize(self, amount_cents: int, currency: str, card: Card, idempotency_key: str) -> Authorization:
        """Reserve the amount on the card. The same idempotency key always gives the same answer and
        reference, so a retried checkout never charges twice."""


def luhn_valid(number: str) -> bool:
    """ISO/IEC 7812-1 check digit (the Luhn algorithm)."""
    total = 0
    for position, char in enumerate(reversed(number)):
        digit = int(char)
        if position % 2:
            digit = digit * 2 - 9 if digit > 4 else digit * 2
        total += digit
    return total % 10 == 0


def card_brand(number: str) -> str:
    if number.startswith("4"):
        return "Visa"
    if re.match(r"5[1-5]|2[2-7]", number):
        return "Mastercard"
    if re.match(r"3[47]", number):
        return "Amex"
    if re.match(r"6(011|5)", number):
        return "Discover"
    return "Card"


def parse_expiry(text: str) -> tuple[int, int]:
    """'MM/YY' or 'MM/YYYY' -> (month, four-digit year)."""
    match = re.fullmatch(r"\s*(\d{1,2})\s*/\s*(\d{2}|\d{4})\s*", text or "")
    if not match:
        raise InvalidInput("expiry date must look like MM/YY, e.g. 04/30")
    month, year = int(match[1]), int(match[2])
    if not 1 <= month <= 12:
        raise InvalidInput("expiry month must be between 01 and 12")
    return month, year + 2000 if year < 100 else year


def read_card(number: str, expiry: str, cvc: str, today: date | None = None) -> Card:
    """A validated card from form text; every refusal says which field to fix."""
    digits = re.sub(r"[\s-]", "", number or "")
    if not re.fullmatch(r"[0-9]{12,19}", digits):  # str.isdigit() also takes "²"
        raise InvalidInput("card number must be 12 to 19 digits")
    if not luhn_valid(digits):
        raise InvalidInput("card number is not valid: please check it for a typo")
    month, year = parse_expiry(expiry)
    today = today or date.today()
    if (year, month) < (today.year, today.month):
        raise InvalidInput(f"this card expired at the end of {month:02d}/{year}")
    if year > today.year + 20:
        raise InvalidInput("expiry year is too far in the future")
    cvc = (cvc or "").strip()
    if not re.fullmatch(r"[0-9]{3,4}", cvc):
        raise InvalidInput("security code (CVC) must be 3 or 4 digits")
    return Card(digits, month, year, cvc)


# The usual test numbers (Stripe's convention); anything else valid is approved.
DECLINING_CARDS = {
    "4000000000000002": "card declined",
    "4000000000009995": "insufficient funds",
}


class TestGateway:
    """Deterministic: the reference is a keyed hash of the idempotency key, so a checkout retried
    after a crash gets the same reference and finds the order it already made."""

    __test__ = False  # not a pytest test class, whatever imports it

    def __init__(self, secret: str = "softgoods-test-gateway"):
        self._secret = secret.encode()

    def authorize(self, amount_cents: int, currency: str, card: Card, idempotency_key: str) -> Authorization:
        if amount_cents < 0:
            return Declined("invalid amount")
        reason = DECLINING_CARDS.get(card.number)
        if reason:
            return Declined(reason)
        digest = hmac.new(self._secret, idempotency_key.encode(), hashlib.sha256).hexdigest()
        return Approved("test_" + digest[:24])


def gateway_for(config: dict) -> PaymentGateway:
    """The configured gateway; only the test gateway is built in (a real one plugs in here)."""
    return config.get("PAYMENT_GATEWAY") or TestGateway(config["SECRET_KEY"])
