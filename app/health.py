"""``/healthz`` for the store and the sidecar: 200 when the database and the download dir answer,
else 503 with ``Retry-After`` and the reason, for load balancers and operators. And who may read
``/metrics``."""
from __future__ import annotations

import hmac
import ipaddress
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


FORWARDING_HEADERS = ("X-Forwarded-For", "Forwarded", "X-Real-IP")


def may_read_metrics(request) -> bool:
    """/metrics shows traffic and sales figures: only to SOFTGOODS_METRICS_ALLOW networks or with
    ``Authorization: Bearer <SOFTGOODS_METRICS_TOKEN>`` (compared in constant time).

    Behind a proxy the peer is the proxy itself (often loopback): the address counts only when it is
    the client's, i.e. ProxyFix (SOFTGOODS_PROXY_COUNT) resolved it or nothing says it was forwarded."""
    token = current_app.config.get("METRICS_TOKEN")
    scheme, _, presented = (request.headers.get("Authorization") or "").partition(" ")
    if token and scheme.lower() == "bearer" and hmac.compare_digest(presented.strip().encode(), token.encode()):
        return True
    resolved = "werkzeug.proxy_fix.orig" in request.environ
    if not resolved and any(name in request.headers for name in FORWARDING_HEADERS):
        return False  # an unconfigured proxy in front: the real client is unknown
    try:
        address = ipaddress.ip_address(request.remote_addr or "")
    except ValueError:
        return False
    return any(address in network for network in current_app.config["METRICS_ALLOW"])
