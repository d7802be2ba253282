"""The store application factory: a table of contents of how the app is wired."""
from __future__ import annotations

import sqlite3
from typing import Any, Mapping

from flask import Flask
from sqlalchemy import event
from sqlalchemy.engine import Engine

from app.config import load_settings
from app.extensions import csrf, db, limiter, login_manager, migrate


def create_app(config: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None) -> Flask:
    settings = load_settings(env)
    app = Flask(__name__, instance_path=settings["INSTANCE_DIR"], instance_relative_config=True)
    app.config.update(settings)
    if config:
        app.config.update(config)
    register_extensions(app)
    register_blueprints(app)
    register_errorhandlers(app)
    register_commands(app)
    if app.config.get("PROXY_COUNT"):
        # Behind nginx (deploy/nginx-store.conf): rate limits key on the shopper's address, not nginx's.
        from werkzeug.middleware.proxy_fix import ProxyFix

        count = app.config["PROXY_COUNT"]
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=count, x_proto=count, x_host=0)
    return app


def register_extensions(app: Flask) -> None:
    from app import models  # noqa: F401  every table, so Alembic and create_all see them all

    db.init_app(app)
    migrate.init_app(app, db, render_as_batch=True)
    from app.store.routes import limit_form_size

    app.before_request(limit_form_size)  # registered before CSRF, which reads the form first
    csrf.init_app(app)
    limiter.init_app(app)
    release_limiter_timer()
    login_manager.init_app(app)
    login_manager.login_view = "accounts.login"
    login_manager.login_message_category = "info"

    @login_manager.user_loader
    def load_user(session_id: str):
        from app.accounts.rules import load_session_user

        return load_session_user(db.session, session_id)


def release_limiter_timer() -> None:
    """limits' in-memory storage starts a non-daemon 10 ms Timer when it is created and starts it again on
    first use. Cancelling the first one lets every command exit at once, also under libfaketime (how
    expiry is checked days ahead), where that 10 ms wait would last days of real time."""
    timer = getattr(getattr(limiter, "_storage", None), "timer", None)
    if timer is not None:
        timer.cancel()


def register_blueprints(app: Flask) -> None:
    from app.accounts.routes import bp as accounts_bp
    from app.admin.routes import bp as admin_bp
    from app.store.routes import bp as store_bp

    app.register_blueprint(store_bp)
    app.register_blueprint(accounts_bp)
    app.register_blueprint(admin_bp, url_prefix="/admin")


def register_errorhandlers(app: Flask) -> None:
    from app.errors import register

    register(app)


def register_commands(app: Flask) -> None:
    from app.cli import register_commands as register

    register(app)


@event.listens_for(Engine, "connect")
def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # WAL lets the sidecar read while the store writes; busy_timeout queues writers instead of failing.
    if isinstance(dbapi_connection, sqlite3.Connection):
        cur = dbapi_connection.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA busy_timeout=15000")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()
