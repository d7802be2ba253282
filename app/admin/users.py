"""Accounts and roles: administrators only (owners run the shop, admins also manage people)."""
from __future__ import annotations

from flask import abort, flash, redirect, render_template, request, url_for
from flask_login import current_user
from sqlalchemy import select

from app.accounts.models import ROLES, User
from app.admin.blueprint import admins_only, audit, bp, refuse
from app.downloads.errors import InvalidInput
from app.extensions import db


@bp.get("/users")
@admins_only
def users():
    accounts = list(db.session.scalars(select(User).order_by(User.role.desc(), User.email)))
    return render_template("admin/users.html", title="Users", accounts=accounts, roles=ROLES)


@bp.post("/users/<int:user_id>/role")
@admins_only
def user_role(user_id: int):
    account = db.session.get(User, user_id)
    if account is None:
        abort(404, "There is no such account.")
    role = request.form.get("role", "")
    try:
        if role not in ROLES:
            raise InvalidInput(f"role must be one of {', '.join(ROLES)}")
        if account.id == current_user.id and role != "admin":
            raise InvalidInput("you cannot take away your own admin role; ask another administrator")
    except InvalidInput as exc:
        return refuse(exc, url_for("admin.users"))
    old, account.role = account.role, role
    audit("user.role", f"user {account.email}", f"{old} -> {role}")
    db.session.commit()
    flash(f"{account.email} is now {role}.", "success")
    return redirect(url_for("admin.users"))
