"""``softgoods user add``."""
from __future__ import annotations

import sys

import click
from sqlalchemy import select

from app.accounts.models import ROLES, User
from app.accounts.rules import check_password_rules
from app.accounts.validation import normalize_email
from app.cli import audit, fail, run_rule
from app.extensions import db
from app.timeutil import utcnow


def register(group: click.Group) -> None:
    @group.group("user")
    def user() -> None:
        """Manage accounts."""

    @user.command("add")
    @click.option("--email", required=True)
    @click.option("--role", type=click.Choice(ROLES), default="customer", show_default=True)
    @click.option("--password-stdin", is_flag=True, help="read the password from standard input")
    def user_add(email, role, password_stdin):
        """Add an account (password from a prompt or --password-stdin)."""
        email = run_rule(normalize_email, email)
        if db.session.scalar(select(User.id).where(User.email == email)) is not None:
            fail(f"an account for {email} already exists")
        if password_stdin:
            password = sys.stdin.readline().rstrip("\r\n")
        else:
            password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
        run_rule(check_password_rules, password)  # the same rule as the register page
        account = User(email=email, role=role, email_confirmed_at=utcnow())
        account.set_password(password)
        db.session.add(account)
        audit("user.add", f"user {email}", f"role {role}")
        db.session.commit()
        click.echo(f"{role} {email} added")
