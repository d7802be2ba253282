"""Imports every feature's models so SQLAlchemy's metadata (and Alembic) knows all tables."""
from app.accounts.models import User  # noqa: F401
from app.downloads.models import (  # noqa: F401
    AuditEntry, Delivery, DownloadLog, EntitlementChoice, FileEntry, OutboxMessage, Package,
    PackageFile, PackageManager, UserDownload,
)
from app.store.models import Order, OrderItem, Product  # noqa: F401
