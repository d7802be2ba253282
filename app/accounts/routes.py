"""Account pages: log in / out, register (by proving the address first), password setup, change and
reset, My downloads."""
from __future__ import annotations

from flask import Blueprint, current_app, flash, redirect, render_template, request, session, url_for
from flask_login import current_user, login_required, login_user, logout_user
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from app.accounts.rules import (account_for, authenticate, change_password, claim_guest_orders,
                                end_all_sessions, is_safe_next, register_customer, reset_account,
                                reset_password)
from app.accounts.tokens import make_reset_token, make_setup_token, read_reset_token, read_setup_token
from app.accounts.validation import normalize_email
from app.downloads.errors import InvalidInput
from app.extensions import db, limiter
from app.mail import order_links, send_account_email
from app.store.models import Order

bp = Blueprint("accounts", __name__, template_folder="templates", url_prefix="/account")


def _account_limit():
    return limiter.limit(lambda: current_app.config["LOGIN_RATE_LIMIT"], methods=["POST"])


def _next_url() -> str:
    target = request.values.get("next")
    return target if is_safe_next(target) else url_for("store.catalog")


def _store_url(endpoint: str, **values) -> str:
    return f"{current_app.config['STORE_URL']}{url_for(endpoint, **values)}"


@bp.route("/login", methods=["GET", "POST"])
@_account_limit()
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
    if current_user.is_authenticated:
        # Every session of the account ends, including cookies copied from this browser.
        end_all_sessions(current_user)
        db.session.commit()
    logout_user()
    session.clear()  # the cart and the remembered thank-you pages go with it
    flash("You are logged out.", "info")
    return redirect(url_for("store.catalog"), 303)


@bp.route("/register", methods=["GET", "POST"])
@_account_limit()
def register():
    """The same answer whatever the address: the mailbox's owner learns the rest by email."""
    email, page = _address_form("accounts/register.html")
    if page is not None:
        return page
    if account_for(db.session, email) is None:
        send_account_email(db.session, email, "Choose your Softgoods password",
                           "Open this link to choose the password of your Softgoods account:", "Choose my password",
                           _store_url("accounts.setup", token=make_setup_token(current_app.config["SECRET_KEY"],
                                                                               email)),
                           "Orders you placed with this address as a guest will appear under My downloads. "
                           "If you did not ask for an account, ignore this message.")
    else:
        send_account_email(db.session, email, "You already have a Softgoods account",
                           "Someone asked to register this address, which already has an account. If it was you, "
                           "log in, or choose a new password here:", "Reset my password",
                           _store_url("accounts.reset_request", email=email),
                           "If it was not you, ignore this message: nothing has changed.")
    db.session.commit()
    return _sent(email)


def _address_form(template: str):
    """(address, None) for a valid submitted address, else (None, the page to answer): the empty
    form on GET (pre-filled from ``?email=``), or the form again with the reason, keeping what was typed."""
    if request.method == "GET":
        return None, render_template(template, email=request.args.get("email", ""))
    try:
        return normalize_email(request.form.get("email", "")), None
    except InvalidInput as exc:
        return None, (render_template(template, email=request.form.get("email", ""), error=exc.message),
                      exc.status)


def _sent(email: str):
    return render_template("accounts/sent.html", email=email)


@bp.route("/setup/<token>", methods=["GET", "POST"])
@_account_limit()
def setup(token: str):
    """Whoever opens the link sent to the address chooses the password: the account is born here."""
    email = read_setup_token(current_app.config["SECRET_KEY"], token)
    used = InvalidInput(f"an account for {email} already exists: log in or reset your password", status=410)
    if account_for(db.session, email) is not None:
        raise used
    if request.method == "GET":
        return _password_page("Choose your password", email=email)
    try:
        user = register_customer(db.session, email, request.form.get("password", ""),
                                 request.form.get("confirm", ""))
        db.session.commit()
    except InvalidInput as exc:
        db.session.rollback()
        return _password_page("Choose your password", email=email, error=exc.message, status=exc.status)
    except IntegrityError:  # the same link submitted twice at once
        db.session.rollback()
        raise used from None
    session.clear()
    login_user(user)
    flash(f"Welcome! Your account for {user.email} is ready.", "success")
    return redirect(url_for("accounts.downloads"), 303)


@bp.route("/reset", methods=["GET", "POST"])
@_account_limit()
def reset_request():
    email, page = _address_form("accounts/reset.html")
    if page is not None:
        return page
    user = account_for(db.session, email)
    if user is not None:
        token = make_reset_token(current_app.config["SECRET_KEY"], user.id, user.session_generation)
        send_account_email(db.session, email, "Reset your Softgoods password",
                           "Open this link within an hour to choose a new password:", "Choose a new password",
                           _store_url("accounts.reset", token=token),
                           "The link works once. If you did not ask for it, ignore this message.")
        db.session.commit()
    return _sent(email)


@bp.route("/reset/<token>", methods=["GET", "POST"])
@_account_limit()
def reset(token: str):
    user_id, generation = read_reset_token(current_app.config["SECRET_KEY"], token)
    email = reset_account(db.session, user_id, generation).email
    if request.method == "GET":
        return _password_page("Choose a new password", email=email)
    try:
        user = reset_password(db.session, user_id, generation, request.form.get("password", ""),
                              request.form.get("confirm", ""))
        db.session.commit()
    except InvalidInput as exc:
        db.session.rollback()
        return _password_page("Choose a new password", email=email, error=exc.message, status=exc.status)
    logout_user()
    session.clear()
    flash("Your password is changed and every session of your account has ended: log in again.", "success")
    return redirect(url_for("accounts.login", next=url_for("accounts.downloads")), 303)


@bp.route("/password", methods=["GET", "POST"])
@login_required
@_account_limit()
def password():
    if request.method == "GET":
        return _password_page("Change your password", email=current_user.email, ask_current=True)
    user = current_user._get_current_object()
    try:
        if not user.check_password(request.form.get("current", "")):
            raise InvalidInput("the current password is not right", status=401)
        change_password(user, request.form.get("password", ""), request.form.get("confirm", ""))
        db.session.commit()
    except InvalidInput as exc:
        db.session.rollback()
        return _password_page("Change your password", email=user.email, ask_current=True, error=exc.message,
                              status=exc.status)
    login_user(user)  # this browser carries on with the new generation; every other session has ended
    flash("Your password is changed; every other session of your account has ended.", "success")
    return redirect(url_for("accounts.downloads"), 303)


def _password_page(heading: str, *, email: str, ask_current: bool = False, error: str | None = None,
                   status: int = 200):
    return render_template("accounts/set_password.html", heading=heading, email=email, ask_current=ask_current,
                           error=error), status


@bp.get("/downloads")
@login_required
def downloads():
    orders = db.session.scalars(select(Order).where(Order.user_id == current_user.id)
                                .order_by(Order.created_at.desc(), Order.id.desc())).all()
    return render_template("accounts/downloads.html", orders=[(o, order_links(o)) for o in orders])
