"""Account rules: accounts born from a proven address, sign-in checks, session generations, password
changes and claiming guest orders. Plain functions over a session; the caller commits."""
from __future__ import annotations

import secrets
from functools import cache
from urllib.parse import urlsplit

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session
from werkzeug.security import check_password_hash, generate_password_hash

from app.accounts.models import User
from app.accounts.validation import normalize_email
from app.downloads.errors import InvalidInput
from app.store.models import Order
from app.timeutil import utcnow

MIN_PASSWORD = 8
MAX_PASSWORD = 1024  # hashing a megabyte "password" is a cheap denial of service


@cache
def _dummy_hash() -> str:
    """Checked when the email is unknown, so a wrong email costs the same time as a wrong password."""
    return generate_password_hash(secrets.token_hex(16))


def check_password_rules(password: str, confirm: str | None = None) -> str:
    if len(password) < MIN_PASSWORD:
        raise InvalidInput(f"the password must have at least {MIN_PASSWORD} characters")
    if len(password) > MAX_PASSWORD:
        raise InvalidInput(f"the password must have at most {MAX_PASSWORD} characters")
    if confirm is not None and confirm != password:
        raise InvalidInput("the two passwords do not match")
    return password


def register_customer(session: Session, email: str, password: str, confirm: str | None = None) -> User:
    """A customer account for an address its owner has just proven (the setup link): confirmed at
    birth, so it claims the guest orders placed with that address."""
    email = normalize_email(email)
    check_password_rules(password, confirm)
    if account_for(session, email) is not None:
        raise InvalidInput(f"an account for {email} already exists: log in or reset your password", status=409)
    user = User(email=email, role="customer", email_confirmed_at=utcnow())
    user.set_password(password)
    session.add(user)
    session.flush()
    claim_guest_orders(session, user)
    return user


def account_for(session: Session, email: str) -> User | None:
    return session.scalar(select(User).where(User.email == email))


def load_session_user(session: Session, session_id: str) -> User | None:
    """The account of a session or remember cookie ("<id>.<generation>"), if that session still counts."""
    user_id, _, generation = session_id.partition(".")
    if not (user_id.isdigit() and generation.isdigit()):
        return None  # cookies from before session generations, or forged shapes
    user = session.get(User, int(user_id))
    return user if user is not None and user.session_generation == int(generation) else None


def end_all_sessions(user: User) -> None:
    user.session_generation += 1


def change_password(user: User, password: str, confirm: str | None = None) -> None:
    """A new password ends every session of the account (and any reset link already sent)."""
    check_password_rules(password, confirm)
    user.set_password(password)
    end_all_sessions(user)


def authenticate(session: Session, email: str, password: str) -> User | None:
    try:
        email = normalize_email(email)
    except InvalidInput:
        email = ""
    user = session.scalar(select(User).where(User.email == email)) if email else None
    if user is None or len(password) > MAX_PASSWORD:
        check_password_hash(_dummy_hash(), password[:MAX_PASSWORD])
        return None
    return user if user.check_password(password) else None


def reset_account(session: Session, user_id: int, generation: int) -> User:
    """The account a reset link opens, while the link is unused (no session ended since it was sent)."""
    user = session.get(User, user_id)
    if user is None or user.session_generation != generation:
        raise InvalidInput("this link was already used: ask for a new one if you still need it", status=410)
    return user


def reset_password(session: Session, user_id: int, generation: int, password: str,
                   confirm: str | None = None) -> User:
    """The reset link proved the mailbox: a new password, every session ended, the link spent."""
    user = reset_account(session, user_id, generation)
    change_password(user, password, confirm)
    if user.email_confirmed_at is None:
        user.email_confirmed_at = utcnow()
    claim_guest_orders(session, user)
    return user


def claim_guest_orders(session: Session, user: User) -> int:
    """Guest orders with the account's (confirmed) address become the account's; returns how many."""
    if user.email_confirmed_at is None:
        return 0
    result = session.execute(update(Order)
                             .where(func.lower(Order.email) == user.email.lower(), Order.user_id.is_(None))
                             .values(user_id=user.id).execution_options(synchronize_session=False))
    return result.rowcount


def is_safe_next(target: str | None) -> bool:
    """Only a path on this site: no scheme, no host, no '//' or backslash tricks (open redirects)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return False
    if any(ord(c) < 32 for c in target):
        return False
    parts = urlsplit(target)
    return not parts.scheme and not parts.netloc
