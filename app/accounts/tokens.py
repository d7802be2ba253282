"""Signed links sent by email: itsdangerous, each purpose with its own salt and age limit
(STYLE.md 12), so a receipt or a link made for one purpose can never pass as another.

- account setup: proves control of an address before any account exists for it; the one who
  opens it chooses the password (no password chosen by someone else can survive).
- password reset: bound to the account's session generation, which the reset itself advances,
  so a link works once and dies with every other session of the account.
"""
from __future__ import annotations

from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

from app.downloads.errors import InvalidInput

SETUP_SALT = "softgoods.account-setup.v1"
SETUP_MAX_AGE = 3 * 24 * 3600  # seconds
RESET_SALT = "softgoods.password-reset.v1"
RESET_MAX_AGE = 3600  # seconds: a reset link is a key to the account, keep it short-lived


def make_setup_token(secret: str, email: str) -> str:
    return URLSafeTimedSerializer(secret, salt=SETUP_SALT).dumps(email)


def read_setup_token(secret: str, token: str, max_age: int = SETUP_MAX_AGE) -> str:
    email = _load(secret, SETUP_SALT, token, max_age, "register again")
    if not isinstance(email, str):
        raise InvalidInput("this link is not valid", status=404)
    return email


def make_reset_token(secret: str, user_id: int, generation: int) -> str:
    return URLSafeTimedSerializer(secret, salt=RESET_SALT).dumps([user_id, generation])


def read_reset_token(secret: str, token: str, max_age: int = RESET_MAX_AGE) -> tuple[int, int]:
    payload = _load(secret, RESET_SALT, token, max_age, "ask for a new one")
    if not (isinstance(payload, list) and len(payload) == 2 and all(type(v) is int for v in payload)):
        raise InvalidInput("this link is not valid", status=404)
    return payload[0], payload[1]


def _load(secret: str, salt: str, token: str, max_age: int, what_next: str):
    try:
        return URLSafeTimedSerializer(secret, salt=salt).loads(token, max_age=max_age)
    except SignatureExpired:
        raise InvalidInput(f"this link has expired: {what_next}", status=410) from None
    except (BadSignature, ValueError, TypeError):
        raise InvalidInput("this link is not valid", status=404) from None
