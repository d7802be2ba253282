"""The delivery domain's tables, shared by the store and the sidecar."""
from __future__ import annotations

from datetime import date, datetime
from typing import TYPE_CHECKING

from sqlalchemy import BigInteger, Date, ForeignKey, Index, String, Table, Text, UniqueConstraint, event
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.extensions import db
from app.timeutil import UTCDateTime, utcnow

if TYPE_CHECKING:
    from app.store.models import Order, OrderItem, Product

PACKAGES_SKU = ".packages"  # index entries of built ZIPs live under this pseudo-SKU


class UserDownload(db.Model):
    """One grant per purchased item: its own secret key, expiry and download limit."""

    __tablename__ = "user_downloads"
    # Half-empty pages on PostgreSQL: counting a download and purging (status -> expired) rewrite
    # rows, and with room on the same page those are HOT updates that touch no index (purging a
    # million grants: ~10x faster). See ``_storage_parameters`` below.
    __table_args__ = {"info": {"postgresql_fillfactor": 50}}

    id: Mapped[int] = mapped_column(primary_key=True)
    order_id: Mapped[int] = mapped_column(ForeignKey("orders.id", ondelete="CASCADE"), index=True)
    order_item_id: Mapped[int | None] = mapped_column(ForeignKey("order_items.id", ondelete="SET NULL"))
    product_id: Mapped[int | None] = mapped_column(ForeignKey("products.id", ondelete="SET NULL"), index=True)
    sku: Mapped[str] = mapped_column(String(64))
    key_nonce: Mapped[str] = mapped_column(String(32))  # random; the key is derived from it (receipts.grant_key)
    key_hash: Mapped[str] = mapped_column(String(64))  # sha256 hex of the 128-bit secret key
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    max_downloads: Mapped[int | None] = mapped_column()  # per file of the grant; None: unlimited
    downloads_used: Mapped[int] = mapped_column(default=0)  # counted deliveries, all files together
    # Slots held by deliveries in progress, all files together (app.downloads.delivery): a file's
    # limit counts its counted + slot-holding deliveries, so it holds before any byte leaves.
    downloads_held: Mapped[int] = mapped_column(default=0, server_default="0")
    status: Mapped[str] = mapped_column(String(16), default="active")  # active | revoked | expired
    bound_ip: Mapped[str | None] = mapped_column(String(64))
    entitlement_class: Mapped[str | None] = mapped_column(String(64))
    entitlement_count: Mapped[int | None] = mapped_column()
    symlink_token: Mapped[str | None] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    order: Mapped[Order] = relationship(back_populates="downloads")
    order_item: Mapped[OrderItem | None] = relationship()
    product: Mapped[Product | None] = relationship()
    choices: Mapped[list[EntitlementChoice]] = relationship(cascade="all, delete-orphan", back_populates="grant")

    @property
    def downloads_left(self) -> int | None:
        """``max_downloads`` - ``downloads_used``: exact for a one-file grant (a package, a one-file
        product); with several files only a lower bound of what each file has left, since the limit
        is per file (``access.file_downloads_left`` gives a file's own figure)."""
        if self.max_downloads is None:
            return None
        return max(0, self.max_downloads - self.downloads_used)


@event.listens_for(Table, "after_create")
def _storage_parameters(table: Table, connection, **_kw) -> None:
    """Apply ``info["postgresql_fillfactor"]`` when a table is created, by create_all or by the
    migration (Alembic renders a table's ``info`` into ``op.create_table`` and fires this event)."""
    fillfactor = table.info.get("postgresql_fillfactor")
    if fillfactor and connection.dialect.name == "postgresql":
        connection.exec_driver_sql(f'ALTER TABLE "{table.name}" SET (fillfactor = {int(fillfactor)})')


class EntitlementChoice(db.Model):
    """A product picked under a class entitlement; each pick uses one of the N."""

    __tablename__ = "entitlement_choices"
    __table_args__ = (UniqueConstraint("grant_id", "product_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    grant_id: Mapped[int] = mapped_column(ForeignKey("user_downloads.id", ondelete="CASCADE"), index=True)
    product_id: Mapped[int] = mapped_column(ForeignKey("products.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    grant: Mapped[UserDownload] = relationship(back_populates="choices")
    product: Mapped[Product] = relationship()


class FileEntry(db.Model):
    """The file index: what `softgoods index` and the watcher found under DOWNLOAD_DIR/<SKU>/."""

    __tablename__ = "file_entries"
    __table_args__ = (UniqueConstraint("sku", "path"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    sku: Mapped[str] = mapped_column(String(64), index=True)
    path: Mapped[str] = mapped_column(String(1024))  # posix, relative to DOWNLOAD_DIR/<SKU>/
    size: Mapped[int] = mapped_column(BigInteger)
    mtime_ns: Mapped[int] = mapped_column(BigInteger)
    media_type: Mapped[str] = mapped_column(String(128))
    sha256: Mapped[str] = mapped_column(String(64))
    piece_size: Mapped[int] = mapped_column(BigInteger)
    piece_hashes: Mapped[str] = mapped_column(Text)  # concatenated sha256 hex digests, one per piece
    indexed_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    verified_at: Mapped[datetime | None] = mapped_column(UTCDateTime())  # last background re-hash
    flagged: Mapped[str | None] = mapped_column(String(200))  # why it must not be served as verified
    missing: Mapped[bool] = mapped_column(default=False)
    # The owner has seen this flag or absence (or deleted the file on purpose): off the dashboard until
    # the file's state changes again (index.py and the watcher clear it).
    acknowledged_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    @property
    def registered_path(self) -> str:
        return f"{self.sku}/{self.path}"

    @property
    def pieces(self) -> list[str]:
        h = self.piece_hashes
        return [h[i:i + 64] for i in range(0, len(h), 64)]


class Delivery(db.Model):
    """One delivery of one file under one grant: its byte budget, coverage and evidence."""

    __tablename__ = "deliveries"
    __table_args__ = (Index("ix_deliveries_grant_path", "grant_id", "path"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    grant_id: Mapped[int] = mapped_column(ForeignKey("user_downloads.id", ondelete="CASCADE"))
    sku: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(1024))
    sha256: Mapped[str] = mapped_column(String(64))  # the file version this delivery is for
    size: Mapped[int] = mapped_column(BigInteger)
    budget_bytes: Mapped[int] = mapped_column(BigInteger)
    charged_bytes: Mapped[int] = mapped_column(BigInteger, default=0)  # reserved + kept
    coverage: Mapped[str] = mapped_column(Text, default="[]")  # JSON [[start, end), ...] seen leaving
    covered_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    evidence: Mapped[str | None] = mapped_column(String(16))  # None | transferred | verified
    counted: Mapped[bool] = mapped_column(default=False)
    attempts: Mapped[int] = mapped_column(default=0)
    # Rules of app.downloads.delivery: a delivery holds one of the grant's download slots while it
    # is open or counted; "closed" takes no new requests (budget spent or superseded).
    holds_slot: Mapped[bool] = mapped_column(default=False)
    closed: Mapped[bool] = mapped_column(default=False)
    open_ranges: Mapped[str] = mapped_column(Text, default="[]")  # JSON ranges in flight (app.downloads.inflight)
    last_activity_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    verified_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class NginxHandoff(db.Model):
    """A reservation the sidecar made before handing a file to nginx (accel and symlink modes).

    nginx sends the bytes, so the sidecar never sees the request end: the access-log line settles the
    reservation (``app.downloads.handoffs``), or the purge releases it when no line arrives in time.
    The columns are those of ``delivery.Reservation``, so the settling side rebuilds it exactly."""

    __tablename__ = "nginx_handoffs"
    __table_args__ = (Index("ix_nginx_handoffs_file", "grant_id", "sku", "path"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    token: Mapped[str] = mapped_column(String(64), unique=True)  # random; symlink mode's link folder
    grant_id: Mapped[int] = mapped_column(ForeignKey("user_downloads.id", ondelete="CASCADE"))
    delivery_id: Mapped[int | None] = mapped_column(ForeignKey("deliveries.id", ondelete="SET NULL"))
    order_po: Mapped[str | None] = mapped_column(String(32))
    sku: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(1024))
    product_sku: Mapped[str | None] = mapped_column(String(64))
    start: Mapped[int] = mapped_column(BigInteger)
    length: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[int] = mapped_column()  # what nginx is expected to answer: 200 or 206
    method: Mapped[str] = mapped_column(String(8), default="GET")
    reservation_token: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    settled_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), index=True)


class ProofNonce(db.Model):
    """The key of a verifying client's proof of possession (DESIGN.md "Proof of possession"): one per
    grant and file, random, replaced after each successful confirm. Stored plain: the server needs it
    to compute the proof, and it proves nothing without the file's bytes."""

    __tablename__ = "proof_nonces"
    __table_args__ = (UniqueConstraint("grant_id", "sku", "path"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    grant_id: Mapped[int] = mapped_column(ForeignKey("user_downloads.id", ondelete="CASCADE"))
    sku: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(1024))
    nonce: Mapped[str] = mapped_column(String(64))  # 32 random bytes, hex
    # The expected proof, once a confirm read the file for this nonce: later attempts with this nonce
    # cost no file read. Kept as its SHA-256 (a database reader learns no usable proof), together
    # with the file version (its SHA-256) it was computed over.
    expected_proof_hash: Mapped[str | None] = mapped_column(String(64))
    expected_for_sha256: Mapped[str | None] = mapped_column(String(64))
    issued_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class DownloadLog(db.Model):
    """One row per file request: the owner's log and the raw material of delivery evidence."""

    __tablename__ = "download_log"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    grant_id: Mapped[int | None] = mapped_column(ForeignKey("user_downloads.id", ondelete="SET NULL"), index=True)
    delivery_id: Mapped[int | None] = mapped_column(ForeignKey("deliveries.id", ondelete="SET NULL"))
    order_po: Mapped[str | None] = mapped_column(String(32), index=True)
    path: Mapped[str] = mapped_column(String(1024))
    client_ip: Mapped[str | None] = mapped_column(String(64), index=True)
    user_agent: Mapped[str | None] = mapped_column(String(300))
    method: Mapped[str] = mapped_column(String(8), default="GET")
    range_header: Mapped[str | None] = mapped_column(String(200))
    status: Mapped[int] = mapped_column()
    start_offset: Mapped[int | None] = mapped_column(BigInteger)
    bytes_sent: Mapped[int] = mapped_column(BigInteger, default=0)
    outcome: Mapped[str] = mapped_column(String(32))  # complete | aborted | head | refused | not-modified
    source: Mapped[str] = mapped_column(String(16), default="sidecar")  # sidecar | nginx
    source_key: Mapped[str | None] = mapped_column(String(128), unique=True)  # de-duplicates nginx log lines


class Package(db.Model):
    """A named ZIP of registered files, built into DOWNLOAD_DIR/.packages/<name>.zip."""

    __tablename__ = "packages"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    expires_on: Mapped[date | None] = mapped_column(Date)  # purged (record and ZIP) after this date
    lifetime_days: Mapped[int | None] = mapped_column()  # offered for sale this long after creation
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    built_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    build_error: Mapped[str | None] = mapped_column(Text)

    files: Mapped[list[PackageFile]] = relationship(cascade="all, delete-orphan", back_populates="package",
                                                    order_by="PackageFile.file_path")
    managers: Mapped[list[PackageManager]] = relationship(cascade="all, delete-orphan")


class PackageFile(db.Model):
    __tablename__ = "package_files"
    __table_args__ = (UniqueConstraint("package_id", "file_path"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    package_id: Mapped[int] = mapped_column(ForeignKey("packages.id", ondelete="CASCADE"), index=True)
    file_path: Mapped[str] = mapped_column(String(1100))  # registered path "<SKU>/<path>"

    package: Mapped[Package] = relationship(back_populates="files")


class PackageManager(db.Model):
    """Owner accounts allowed to manage a package (admins always may)."""

    __tablename__ = "package_managers"
    __table_args__ = (UniqueConstraint("package_id", "user_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    package_id: Mapped[int] = mapped_column(ForeignKey("packages.id", ondelete="CASCADE"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))


class OutboxMessage(db.Model):
    """An email that waits to be sent: SMTP down at checkout loses nothing."""

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(primary_key=True)
    to: Mapped[str] = mapped_column(String(254))
    subject: Mapped[str] = mapped_column(String(300))
    message: Mapped[str] = mapped_column(Text)  # the whole RFC 5322 message
    attempts: Mapped[int] = mapped_column(default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), index=True)


class AuditEntry(db.Model):
    """Who did what on the owner pages and the CLI."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(254))  # an email, or "cli"
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(200))
    detail: Mapped[str] = mapped_column(Text, default="")
