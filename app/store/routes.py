"""Shop pages: catalog, product, cart, checkout, thank-you. Views parse the request, call the rules
in cart.py / checkout.py / payments.py, commit once, and render."""
from __future__ import annotations

import logging

from flask import (Blueprint, abort, current_app, flash, has_request_context, redirect, render_template, request,
                   session, url_for)
from flask_login import current_user
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from app.accounts.validation import normalize_email
from app.downloads.errors import InvalidInput
from app.downloads.models import FileEntry
from app.health import healthz_response
from app.extensions import client_address, db, limiter
from app.mail import deliver, order_links
from app.sizes import format_size
from app.store import cart as cart_rules
from app.store.catalog import sale_blockers
from app.store.checkout import after_race, check_token, checkout, new_checkout_token, shown_total_field
from app.store.models import Order, Product, format_money
from app.store.payments import gateway_for, read_card

bp = Blueprint("store", __name__, template_folder="templates")
log = logging.getLogger("softgoods.store")

REMEMBERED_ORDERS = 20  # thank-you pages this browser may open again
bp.add_app_template_global(format_money)
bp.add_app_template_filter(format_size, "filesize")  # the owner pages use it too


FORM_BLUEPRINTS = ("store", "accounts")


def limit_form_size() -> None:
    """Shop and account forms get a small body limit (the 2 GB default is for owner uploads)."""
    if request.blueprint in FORM_BLUEPRINTS:
        request.max_content_length = current_app.config["FORM_MAX_BYTES"]


def session_cart() -> dict[str, int]:
    cart = session.get("cart")
    return dict(cart) if isinstance(cart, dict) else {}


def save_cart(cart: dict[str, int]) -> None:
    session["cart"] = cart


@bp.app_context_processor
def cart_badge() -> dict:
    if not has_request_context():  # emails are rendered by CLI commands and the watcher too
        return {"cart_count": 0}
    return {"cart_count": cart_rules.item_count(session_cart())}


@bp.get("/healthz")
def healthz():
    return healthz_response()


@bp.get("/")
def catalog():
    products = db.session.scalars(select(Product).where(Product.active).order_by(Product.name)).all()
    blockers = sale_blockers(db.session, products)
    return render_template("store/catalog.html", products=[p for p in products if blockers[p.id] is None])


@bp.get("/p/<sku>")
def product(sku: str):
    item = db.session.scalar(select(Product).where(Product.sku == sku, Product.active))
    if item is None:
        abort(404, description=f"There is no product {sku!r} in this shop.")
    if sale_blockers(db.session, [item])[item.id] is not None:  # known, but nothing to deliver now
        return render_template("store/product.html", product=item, files=[], unavailable=True), 404
    files = db.session.scalars(select(FileEntry).where(FileEntry.sku == item.sku, FileEntry.missing.is_(False))
                               .order_by(FileEntry.path)).all()
    return render_template("store/product.html", product=item, files=files)


@bp.get("/cart")
def cart():
    lines = cart_rules.cart_lines(db.session, session_cart())
    return render_template("store/cart.html", lines=lines, total=format_money(cart_rules.lines_total(lines)))


@bp.post("/cart/add")
def cart_add():
    new_cart = cart_rules.add_item(db.session, session_cart(), request.form.get("sku", ""),
                                   request.form.get("quantity", "1"))
    save_cart(new_cart)
    flash("Added to your cart.", "success")
    return redirect(url_for("store.cart"), 303)


@bp.post("/cart/update")
def cart_update():
    save_cart(cart_rules.set_quantity(db.session, session_cart(), request.form.get("sku", ""),
                                      request.form.get("quantity", "")))
    return redirect(url_for("store.cart"), 303)


@bp.post("/cart/remove")
def cart_remove():
    save_cart(cart_rules.remove_item(session_cart(), request.form.get("sku", "")))
    return redirect(url_for("store.cart"), 303)


def _checkout_page(lines, *, token: str, email: str, error: str | None = None, status: int = 200):
    total_cents = cart_rules.lines_total(lines)
    currency = lines[0].product.currency if lines else "USD"
    return render_template("store/checkout.html", lines=lines, total=format_money(total_cents, currency),
                           total_cents=total_cents, shown_total=shown_total_field(total_cents, currency),
                           token=token, email=email, error=error), status


@bp.get("/checkout")
def checkout_form():
    lines = cart_rules.cart_lines(db.session, session_cart())
    if not lines:
        flash("Your cart is empty.", "info")
        return redirect(url_for("store.catalog"))
    email = current_user.email if current_user.is_authenticated else ""
    return _checkout_page(lines, token=new_checkout_token(), email=email)


@bp.post("/checkout")
@limiter.limit(lambda: current_app.config["CHECKOUT_RATE_LIMIT"], methods=["POST"])
def checkout_submit():
    form = request.form
    lines = cart_rules.cart_lines(db.session, session_cart())
    token, email = form.get("checkout_token", ""), form.get("email", "")
    try:
        token = check_token(token)
        email = normalize_email(email)
        card = None
        if cart_rules.lines_total(lines) > 0 or not lines:
            card = read_card(form.get("card_number", ""), form.get("expiry", ""), form.get("cvc", ""))
        user = current_user._get_current_object() if current_user.is_authenticated else None
        result = checkout(db.session, gateway_for(current_app.config), lines=lines, email=email, card=card,
                          checkout_token=token, shown_total=form.get("shown_total", ""), user=user,
                          client_ip=client_address())
        db.session.commit()
    except IntegrityError as exc:
        result = after_race(db.session, exc, token)
    except InvalidInput as exc:
        db.session.rollback()
        if not lines:  # e.g. the first submit emptied the cart and this one is not the same form
            raise
        # A declined card gets a fresh token: a real gateway replays the decline for a reused key.
        fresh = exc.status in (400, 402)
        return _checkout_page(lines, token=new_checkout_token() if fresh else token,
                              email=email, error=exc.message, status=exc.status)
    if result.email is not None:
        _send_now(result.email)
    save_cart({})
    remember_order(result.order.po_number)
    return redirect(url_for("store.thanks", po=result.order.po_number), 303)


def _send_now(message) -> None:
    """The order is committed; a mail failure must not turn the thank-you page into an error."""
    try:
        deliver(db.session, message)
        db.session.commit()
    except Exception:  # noqa: BLE001  the message stays in the outbox for flush_outbox
        log.exception("order email %s left in the outbox", message.id)
        db.session.rollback()


def remember_order(po_number: str) -> None:
    orders = [po for po in session.get("orders", []) if po != po_number]
    session["orders"] = (orders + [po_number])[-REMEMBERED_ORDERS:]


@bp.get("/orders/<po>")
def thanks(po: str):
    order = db.session.scalar(select(Order).where(Order.po_number == po))
    if order is not None and order.user_id is not None:
        # An account's order shows only to that account's live session: a session that logged out
        # (or a copy of its cookie) remembers the number but no longer sees the links.
        mine = current_user.is_authenticated and order.user_id == current_user.id
    else:
        mine = order is not None and po in session.get("orders", [])
    if not mine:
        abort(404, description="There is no such order in this browser's history.")
    return render_template("store/thanks.html", order=order, links=order_links(order),
                           smtp=bool(current_app.config.get("SMTP_URL")))
