"""Refusals and failures mapped in one place to status codes, pages and JSON.

A browser gets a page that says what happened and what to do; ``Accept: application/json`` gets
``{"error": "<sentence>"}``. Nobody sees a traceback.
"""
from __future__ import annotations

import logging

from flask import Flask, current_app, jsonify, make_response, render_template, request
from flask_limiter.errors import RateLimitExceeded
from sqlalchemy.exc import OperationalError
from werkzeug.exceptions import HTTPException

from app.downloads.errors import DeliveryRefused, InvalidInput
from app.extensions import db
from app.text_input import refuse_unstorable_request

log = logging.getLogger("softgoods")


def wants_json() -> bool:
    accept = request.accept_mimetypes
    if request.is_json and (not accept or accept["application/json"] >= accept["text/html"]):
        return True  # an API call that posted JSON expects JSON back, whatever its Accept says
    best = request.accept_mimetypes.best_match(["text/html", "application/json"])
    return best == "application/json" and request.accept_mimetypes[best] > request.accept_mimetypes["text/html"]


def error_response(status: int, message: str, advice: str = "", headers: dict | None = None,
                   contact: str = ""):
    if wants_json():
        body = jsonify(error=message)
    else:
        body = render_template("error.html", status=status, message=message, advice=advice, contact=contact)
    resp = make_response(body, status)
    resp.headers.update(headers or {})
    return resp


def register(app: Flask) -> None:
    # Refused here, in both apps, so no view, lookup or log line ever receives such text.
    app.before_request(refuse_unstorable_request)

    @app.errorhandler(DeliveryRefused)
    def refused(exc: DeliveryRefused):
        return error_response(exc.status, exc.message, exc.advice, exc.headers,
                              contact=current_app.config["SHOP_CONTACT"])

    @app.errorhandler(InvalidInput)
    def invalid(exc: InvalidInput):
        db.session.rollback()
        return error_response(exc.status, exc.message)

    @app.errorhandler(RateLimitExceeded)
    def too_many(exc: RateLimitExceeded):
        return error_response(429, "Too many attempts from your address.",
                              "Please wait a minute and try again.", {"Retry-After": "60"})

    @app.errorhandler(OperationalError)
    def database_down(exc: OperationalError):
        log.error("database unavailable: %s", exc.orig)
        db.session.rollback()
        return error_response(503, "The service is briefly unavailable.",
                              "Please try again in a minute.", {"Retry-After": "30"})

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        if exc.code is None or exc.code < 400:
            return exc
        advice = {404: "Check the address, or start again from the home page.",
                  405: "", 413: "The upload is larger than this shop accepts."}.get(exc.code, "")
        return error_response(exc.code, exc.description or exc.name, advice)

    @app.errorhandler(Exception)
    def crashed(exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.path)
        db.session.rollback()
        return error_response(500, "Something went wrong on our side.",
                              "Nothing was charged twice. Please try again, or contact the shop.")
