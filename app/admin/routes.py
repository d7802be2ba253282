from __future__ import annotations

from flask import Blueprint, abort
from flask_login import current_user, login_required

bp = Blueprint("admin", __name__, template_folder="templates")


@bp.before_request
@login_required
def owners_only():
    if not current_user.is_owner:
        abort(403)


@bp.get("/")
def dashboard():
    return "dashboard"
