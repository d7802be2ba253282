"""The owner pages' blueprint, its guard and the helpers every admin view shares."""
from __future__ import annotations

from functools import wraps
from typing import Callable

from flask import Blueprint, abort, current_app, flash, redirect, render_template, request
from flask_login import current_user, login_required

from app.downloads.errors import InvalidInput
from app.downloads.models import AuditEntry
from app.extensions import db

bp = Blueprint("admin", __name__, template_folder="templates", static_folder="static",
               static_url_path="/admin-static")


@bp.before_request
@login_required
def owners_only():
    if not current_user.is_owner:
        abort(403)


def admins_only(view: Callable) -> Callable:
    @wraps(view)
    def wrapped(*args, **kwargs):
        if not current_user.is_admin:
            abort(403, "Only administrators may manage accounts.")
        return view(*args, **kwargs)
    return wrapped


def audit(action: str, target: str, detail: str = "") -> None:
    """Record who did what; committed with the action itself."""
    db.session.add(AuditEntry(actor=current_user.email, action=action, target=target[:200], detail=detail))


def download_dir() -> str:
    return current_app.config["DOWNLOAD_DIR"]


def confirmed() -> bool:
    """A destructive or money-related action runs only from the confirmation page's button."""
    return request.form.get("confirm") == "yes"


def confirm_page(title: str, question: str, action_url: str, cancel_url: str, fields: dict[str, str] | None = None):
    return render_template("admin/confirm.html", title=title, question=question, action_url=action_url,
                           cancel_url=cancel_url, fields=fields or {})


def refuse(exc: InvalidInput, back: str):
    """A refused form: roll back, say why, go back to the form (nothing was written)."""
    db.session.rollback()
    flash(exc.message, "error")
    return redirect(back)


