"""The card side of the cash register: validation, brands, the test gateway's answers."""
from datetime import date

import pytest

from app.downloads.errors import InvalidInput
from app.store.payments import Approved, Declined, TestGateway, card_brand, luhn_valid, read_card

TODAY = date(2026, 11, 23)


@pytest.mark.parametrize("number, valid", [
    ("4242424242424242", True), ("4000000000000002", True), ("4000000000009995", True),
    ("5555555555554444", True), ("378282246310005", True),
    ("4242424242424241", False), ("1234567812345678", False),
])
def test_luhn(number, valid):
    assert luhn_valid(number) is valid


@pytest.mark.parametrize("number, brand", [
    ("4242424242424242", "Visa"), ("5555555555554444", "Mastercard"), ("2223003122003222", "Mastercard"),
    ("378282246310005", "Amex"), ("6011111111111117", "Discover"), ("3056930009020004", "Card"),
])
def test_brand(number, brand):
    assert card_brand(number) == brand


def test_card_accepts_spaces_dashes_and_two_or_four_digit_years():
    card = read_card("4242-4242 4242 4242", "4/27", "123", today=TODAY)
    assert (card.number, card.exp_month, card.exp_year, card.last4, card.brand) == (
        "4242424242424242", 4, 2027, "4242", "Visa")
    assert read_card("4242424242424242", "11/2026", "1234", today=TODAY).exp_year == 2026  # this month: valid


@pytest.mark.parametrize("number, expiry, cvc, message", [
    ("4242424242424241", "12/30", "123", "card number is not valid"),
    ("4242", "12/30", "123", "12 to 19 digits"),
    ("4242 4242 4242 424x", "12/30", "123", "12 to 19 digits"),
    ("", "12/30", "123", "12 to 19 digits"),
    ("4242424242424242", "10/26", "123", "expired at the end of 10/2026"),
    ("4242424242424242", "12/2020", "123", "expired"),
    ("4242424242424242", "13/30", "123", "month must be between 01 and 12"),
    ("4242424242424242", "1230", "123", "MM/YY"),
    ("4242424242424242", "12/99", "123", "too far in the future"),
    ("4242424242424242", "12/30", "12", "CVC"),
    ("4242424242424242", "12/30", "abc", "CVC"),
    ("\u00b2" * 16, "12/30", "123", "12 to 19 digits"),
    ("\uff14\uff12" * 8, "12/30", "123", "12 to 19 digits"),
    ("4242424242424242", "12/30", "\u00b2\u00b2\u00b2", "CVC"),
])
def test_bad_cards_are_refused_with_the_field_to_fix(number, expiry, cvc, message):
    with pytest.raises(InvalidInput) as refused:
        read_card(number, expiry, cvc, today=TODAY)
    assert message in refused.value.message


def test_card_repr_never_shows_the_number_or_cvc():
    card = read_card("4242424242424242", "12/30", "987", today=TODAY)
    assert "4242424242424242" not in repr(card) and "987" not in repr(card)
    assert "4242" in repr(card)


def test_test_gateway_answers_like_the_usual_test_cards():
    gateway = TestGateway("secret")
    approve = read_card("4242424242424242", "12/30", "123", today=TODAY)
    decline = read_card("4000000000000002", "12/30", "123", today=TODAY)
    broke = read_card("4000000000009995", "12/30", "123", today=TODAY)
    assert gateway.authorize(999, "USD", decline, "k1") == Declined("card declined")
    assert gateway.authorize(999, "USD", broke, "k1") == Declined("insufficient funds")
    first = gateway.authorize(999, "USD", approve, "k1")
    assert isinstance(first, Approved) and first.reference.startswith("test_")
    # Idempotent: the same key is the same payment; another key is another payment.
    assert gateway.authorize(999, "USD", approve, "k1") == first
    assert gateway.authorize(999, "USD", approve, "k2") != first
    assert TestGateway("other").authorize(999, "USD", approve, "k1") != first
