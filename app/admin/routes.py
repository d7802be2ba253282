"""The owner pages (/admin): a table of contents. Each module adds its views to the one blueprint."""
from __future__ import annotations

from app.admin import dashboard, file_views, logs, orders, package_views, products, users  # noqa: F401
from app.admin.blueprint import bp

__all__ = ["bp"]
