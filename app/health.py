"""``/healthz`` for the store and the sidecar: 200 when the database and the download dir answer,
else 503 with ``Retry-After`` and the reason, for load balancers and operators."""
from __future__ import annotations

import os

from flask import current_app, jsonify
from sqlalchemy import text

from app.extensions import db


def health_problems() -> list[str]:
    problems = []
    try:
        db.session.execute(text("SELECT 1"))
    except Exception as exc:  # any driver error means "not reachable" to an operator
        db.session.rollback()
        problems.append(f"database unreachable: {exc.__class__.__name__}")
    download_dir = current_app.config["DOWNLOAD_DIR"]
    if not os.path.isdir(download_dir) or not os.access(download_dir, os.R_OK | os.X_OK):
        problems.append(f"download dir {download_dir} is not readable")
    return problems


def healthz_response():
    problems = health_problems()
    if problems:
        resp = jsonify(status="unavailable", reason="; ".join(problems))
        resp.status_code = 503
        resp.headers["Retry-After"] = "30"
        return resp
    return jsonify(status="ok", delivery=current_app.config["DELIVERY"])
