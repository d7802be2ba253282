"""Owner-page fixtures: accounts of each role and a client logged in as one of them."""
from __future__ import annotations

from typing import Callable

import pytest

from app.accounts.models import User
from app.extensions import db


def make_user(app, email: str, role: str) -> int:
    with app.app_context():
        user = User(email=email, role=role)
        user.set_password("correct horse battery")
        db.session.add(user)
        db.session.commit()
        return user.id


def log_in(client, user_id: int) -> None:
    """Flask-Login's session keys, set directly: these tests are about the owner pages, not the login form."""
    with client.session_transaction() as session:
        session["_user_id"] = f"{user_id}.0"  # "<id>.<session generation>" of a fresh account
        session["_fresh"] = True


@pytest.fixture
def login(app, client) -> Callable[[str, str], int]:
    def as_(role: str = "owner", email: str | None = None) -> int:
        user_id = make_user(app, email or f"{role}@example.com", role)
        log_in(client, user_id)
        return user_id
    return as_


@pytest.fixture
def owner(login) -> int:
    return login("owner")
