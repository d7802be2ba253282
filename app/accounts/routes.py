"""Account pages: log in / out, register, confirm the email address, My downloads."""
from __future__ import annotations

from flask import Blueprint, current_app, flash, redirect, render_template, request, url_for
from flask_login import current_user, login_required, login_user, logout_user
from sqlalchemy import select

from app.accounts.rules import (authenticate, claim_guest_orders, confirm_email, is_safe_next,
                                register_customer)
from app.accounts.tokens import make_confirm_token, read_confirm_token
from app.downloads.errors import InvalidInput
from app.extensions import db, limiter
from app.mail import order_links, send_confirmation_email
from app.store.models import Order

bp = Blueprint("accounts", __name__, template_folder="templates", url_prefix="/account")


def _next_url() -> str:
    target = request.values.get("next")
    return target if is_safe_next(target) else url_for("store.catalog")


@bp.route("/login", methods=["GET", "POST"])
@limiter.limit(lambda: current_app.config["LOGIN_RATE_LIMIT"], methods=["POST"])
def login():
    if request.method == "GET":
        return render_template("accounts/login.html", next=request.args.get("next", ""), email="")
    email = request.form.get("email", "")
    user = authenticate(db.session, email, request.form.get("password", ""))
    if user is None:
        return render_template("accounts/login.html", next=request.form.get("next", ""), email=email,
                               error="Wrong email or password."), 401
    login_user(user, remember=bool(request.form.get("remember")))
    claim_guest_orders(db.session, user)
    db.session.commit()
    return redirect(_next_url(), 303)


@bp.post("/logout")
def logout():
    logout_user()
    flash("You are logged out.", "info")
    return redirect(url_for("store.catalog"), 303)


@bp.route("/register", methods=["GET", "POST"])
@limiter.limit(lambda: current_app.config["LOGIN_RATE_LIMIT"], methods=["POST"])
def register():
    if request.method == "GET":
        return render_template("accounts/register.html", email=request.args.get("email", ""))
    email = request.form.get("email", "")
    try:
        user = register_customer(db.session, email, request.form.get("password", ""),
                                 request.form.get("confirm", ""))
        send_confirmation_email(db.session, user.email, _confirm_url(user))
        db.session.commit()
    except InvalidInput as exc:
        db.session.rollback()
        return render_template("accounts/register.html", email=email, error=exc.message), exc.status
    login_user(user)
    flash(f"Welcome! We sent a confirmation link to {user.email}: open it to see your earlier orders "
          "under My downloads.", "success")
    return redirect(url_for("accounts.downloads"), 303)


def _confirm_url(user) -> str:
    token = make_confirm_token(current_app.config["SECRET_KEY"], user.id, user.email)
    return f"{current_app.config['STORE_URL']}{url_for('accounts.confirm', token=token)}"


@bp.get("/confirm/<token>")
def confirm(token: str):
    user_id, email = read_confirm_token(current_app.config["SECRET_KEY"], token)
    user = confirm_email(db.session, user_id, email)
    db.session.commit()
    flash(f"Thank you: {user.email} is confirmed.", "success")
    if current_user.is_authenticated and current_user.id == user.id:
        return redirect(url_for("accounts.downloads"), 303)
    return redirect(url_for("accounts.login", next=url_for("accounts.downloads")), 303)


@bp.post("/confirm/resend")
@login_required
@limiter.limit(lambda: current_app.config["LOGIN_RATE_LIMIT"])
def resend_confirmation():
    if current_user.email_confirmed_at is None:
        send_confirmation_email(db.session, current_user.email, _confirm_url(current_user))
        db.session.commit()
        flash(f"We sent a new confirmation link to {current_user.email}.", "success")
    return redirect(url_for("accounts.downloads"), 303)


@bp.get("/downloads")
@login_required
def downloads():
    orders = db.session.scalars(select(Order).where(Order.user_id == current_user.id)
                                .order_by(Order.created_at.desc(), Order.id.desc())).all()
    return render_template("accounts/downloads.html", orders=[(o, order_links(o)) for o in orders])
