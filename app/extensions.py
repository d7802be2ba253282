"""Extension objects, created once and bound to an app by ``init_app`` (store and sidecar alike)."""
from __future__ import annotations

from flask import request
from flask_limiter import Limiter
from flask_login import LoginManager
from flask_migrate import Migrate
from flask_sqlalchemy import SQLAlchemy
from flask_wtf.csrf import CSRFProtect
from sqlalchemy import MetaData
from sqlalchemy.orm import DeclarativeBase


class Base(DeclarativeBase):
    # Named constraints so Alembic migrations work the same on SQLite (batch mode) and PostgreSQL.
    metadata = MetaData(naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    })


def client_address() -> str:
    """The peer address; behind a proxy, deploy ProxyFix so this is the shopper's address."""
    return request.remote_addr or "unknown"


db = SQLAlchemy(model_class=Base)
migrate = Migrate()
login_manager = LoginManager()
csrf = CSRFProtect()
# No rate-limit headers on answers: flask-limiter would put "Retry-After: 0" on every 200 and HEAD of a
# limited route (download managers read it as "come back later"); a 429 gets its Retry-After from app.errors.
limiter = Limiter(key_func=client_address, default_limits=[], headers_enabled=False)
