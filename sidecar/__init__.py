"""The download sidecar: a small WSGI app for the download host. It shares settings, extensions,
the delivery domain (``app.downloads``) and the error mapping with the store, and none of its views.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from flask import Flask
from werkzeug.middleware.proxy_fix import ProxyFix

from app.config import load_settings
from app.extensions import csrf, db, limiter

STATIC_DIR = Path(__file__).resolve().parent.parent / "app" / "static"


def create_sidecar(config: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None) -> Flask:
    settings = load_settings(env)
    app = Flask(__name__, instance_path=settings["INSTANCE_DIR"], static_folder=str(STATIC_DIR))
    app.config.update(settings)
    if config:
        app.config.update(config)
    if app.config["SQLALCHEMY_DATABASE_URI"].startswith("sqlite"):
        # A SQLite file cannot "go away" like a server connection: no ping before every checkout (two
        # per file request). PostgreSQL keeps it (a restarted server must give 503, then recover).
        app.config["SQLALCHEMY_ENGINE_OPTIONS"] = {**app.config.get("SQLALCHEMY_ENGINE_OPTIONS", {}),
                                                   "pool_pre_ping": False}
    register_extensions(app)
    register_blueprints(app)
    register_errorhandlers(app)
    if app.config["SIDECAR_FAST_PATH"]:
        from sidecar.fast_files import FastFiles

        app.wsgi_app = FastFiles(app, app.wsgi_app)
    if app.config.get("PROXY_COUNT"):
        # Behind nginx: the shopper's address (for binding and the guess limit) is in X-Forwarded-For.
        count = app.config["PROXY_COUNT"]
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=count, x_proto=count, x_host=0)
    return app


def register_extensions(app: Flask) -> None:
    from app import models  # noqa: F401  every table, so relationships resolve
    from app.downloads.proof import ProofPrecomputer
    from app.downloads.serving import COUNTERS_EXTENSION, PROOF_AHEAD_EXTENSION
    from sidecar import metrics

    db.init_app(app)
    csrf.init_app(app)
    limiter.init_app(app)
    if app.config.get("RATELIMIT_ENABLED", True):
        from app.downloads.guess_limit import GuessLimit

        app.extensions["softgoods_guess_limit"] = GuessLimit(
            app.config["LINK_GUESS_STORAGE_URI"], app.config["LINK_GUESS_LIMIT"], app.config["RATELIMIT_KEY_PREFIX"])
    if app.config["REINDEX_BYTES_PER_SECOND"] > 0:
        from app.downloads.freshness import Reindexer

        app.extensions["softgoods_reindexer"] = Reindexer(app)
    app.extensions[PROOF_AHEAD_EXTENSION] = ProofPrecomputer(app)
    metrics.init(Path(app.config["INSTANCE_DIR"]) / "sidecar-metrics")
    app.extensions[COUNTERS_EXTENSION] = metrics  # the delivery rules count through it, never importing us
    if app.config["SQLALCHEMY_DATABASE_URI"].startswith("sqlite"):
        from sidecar import sqlite_writers

        with app.app_context():
            sqlite_writers.install(db.engine)


def register_blueprints(app: Flask) -> None:
    from sidecar.routes import bp

    app.register_blueprint(bp)


def register_errorhandlers(app: Flask) -> None:
    from app.errors import register

    register(app)
