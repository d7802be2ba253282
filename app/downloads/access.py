"""Opening a download link: receipt validation in the issue's order, the files a grant offers, and
safe resolution of a requested file. Plain functions; the sidecar (and the store's "My downloads")
call them, the caller commits.
"""
from __future__ import annotations

import hmac
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.orm import Session, joinedload

from app.downloads.errors import (
    AddressMismatch, DownloadsExhausted, FileChangedOnDisk, FileNotFound, FileUnreadable, InvalidInput,
    LinkExpired, LinkNotFound, LinkRevoked,
)
from app.downloads.models import PACKAGES_SKU, Delivery, EntitlementChoice, FileEntry, UserDownload
from app.downloads.receipts import Receipt, address_tag, key_matches, read_receipt
from app.store.models import Product
from app.timeutil import utcnow


# Built once: building a statement and its cache key costs more CPU than running it (4 KiB benchmark).
_GRANT_WITH_ORDER = (select(UserDownload).where(UserDownload.id == bindparam("grant_id"))
                     .options(joinedload(UserDownload.order),
                              joinedload(UserDownload.product).joinedload(Product.package)))
_FILE_ENTRY = select(FileEntry).where(FileEntry.sku == bindparam("sku"), FileEntry.path == bindparam("path"),
                                      FileEntry.missing.is_(False))


@dataclass(frozen=True)
class OpenedGrant:
    grant: UserDownload
    receipt: Receipt


def open_grant(session: Session, secret: str, token: str, client_ip: str, *, listing: bool = True,
               finishing: Callable[[UserDownload], bool] | None = None,
               now: datetime | None = None) -> OpenedGrant:
    """Validate a link, in this order: signature (no database query when forged), grant + key + order,
    revoked 403, expired 410 (unless ``finishing(grant)`` says a delivery that started before expiry
    may still finish), every file used up 403 (listings only: for files the counting rules decide,
    so a delivery in progress may finish), bound address 403.
    """
    receipt = read_receipt(secret, token)
    # One query for the grant, its order and product (+ package): every request needs them.
    grant = session.scalars(_GRANT_WITH_ORDER, {"grant_id": receipt.grant_id}).unique().one_or_none()
    # Compare the key even when the grant is gone, so timing does not tell which ids exist.
    key_ok = key_matches(receipt.key, grant.key_hash if grant else "0" * 64)
    if grant is None or not key_ok or (grant.order.po_number or "") != receipt.po_number:
        raise LinkNotFound()
    if grant.status == "revoked":
        raise LinkRevoked()
    now = now or utcnow()
    if grant.status == "expired" or grant.expires_at <= now:
        if finishing is None or not finishing(grant):
            raise LinkExpired(grant.expires_at)
    if listing and used_up(session, grant):
        raise DownloadsExhausted()
    if not address_allowed(secret, grant, client_ip):
        raise AddressMismatch()
    return OpenedGrant(grant, receipt)


def address_allowed(secret: str, grant, client_ip: str) -> bool:
    """A grant bound to an address opens only from it (compared through keyed hashes)."""
    return not grant.bound_ip or hmac.compare_digest(address_tag(secret, client_ip),
                                                     address_tag(secret, grant.bound_ip))


def is_class_entitlement(grant: UserDownload) -> bool:
    return bool(grant.entitlement_class)


def public_path(grant: UserDownload, entry: FileEntry) -> str:
    """The file's name in URLs and listings: its path in the product; under a class entitlement,
    prefixed by the chosen product's SKU (several products may share a file name)."""
    return f"{entry.sku}/{entry.path}" if is_class_entitlement(grant) else entry.path


def grant_files_condition(grant: UserDownload):
    """The WHERE clause on FileEntry for every servable index entry of this grant: a product's files,
    its package ZIP, or the files of the products picked under a class entitlement (None: no files)."""
    if is_class_entitlement(grant):
        skus = [choice.product.sku for choice in grant.choices if choice.product is not None]
        if not skus:
            return None
        where = FileEntry.sku.in_(skus)
    elif grant.product is not None and grant.product.package is not None:
        where = (FileEntry.sku == PACKAGES_SKU) & (FileEntry.path == f"{grant.product.package.name}.zip")
    else:
        where = FileEntry.sku == grant.sku
    return where & FileEntry.missing.is_(False)


def files_for_grant(session: Session, grant: UserDownload) -> list[FileEntry]:
    """Every servable index entry of this grant (``grant_files_condition``), by SKU and path."""
    where = grant_files_condition(grant)
    if where is None:
        return []
    return list(session.scalars(select(FileEntry).where(where).order_by(FileEntry.sku, FileEntry.path)))


_COUNTED_BY_FILE = (select(Delivery.sku, Delivery.path, func.count(Delivery.id))
                    .where(Delivery.grant_id == bindparam("grant_id"), Delivery.counted.is_(True))
                    .group_by(Delivery.sku, Delivery.path))


def counted_by_file(session: Session, grant: UserDownload) -> dict[tuple[str, str], int]:
    """Complete deliveries counted per file (sku, path) of this grant: the limit is per file."""
    return {(sku, path): n for sku, path, n in session.execute(_COUNTED_BY_FILE, {"grant_id": grant.id})}


def file_downloads_left(grant: UserDownload, counted: dict[tuple[str, str], int], entry: FileEntry) -> int | None:
    """What the listing shows for one file: max_downloads minus its counted deliveries (None: unlimited)."""
    if grant.max_downloads is None:
        return None
    return max(0, grant.max_downloads - counted.get((entry.sku, entry.path), 0))


def used_up(session: Session, grant: UserDownload) -> bool:
    """Is every file of the grant completely delivered ``max_downloads`` times (the listing's 403)?

    A grant with no file yet, or a class entitlement with picks left, is not used up: there is still
    something to fetch. Cheap for most links: if the grant's total of counted deliveries is below
    ``max_downloads``, no file can have reached it, and no query runs."""
    if grant.max_downloads is None or grant.downloads_used < grant.max_downloads:
        return False
    if is_class_entitlement(grant) and choices_left(grant) > 0:
        return False
    entries = files_for_grant(session, grant)
    counted = counted_by_file(session, grant)
    return bool(entries) and all(file_downloads_left(grant, counted, e) == 0 for e in entries)


def looks_hostile(requested: str) -> bool:
    """Shapes no index entry can have; refused before any lookup (and logged by the caller)."""
    parts = requested.split("/")
    return (not requested or len(requested) > 1100 or "\0" in requested or "\\" in requested
            or requested.startswith("/") or any(part in ("", ".", "..") for part in parts))


def find_file(session: Session, grant: UserDownload, requested: str) -> FileEntry:
    """The index entry named by ``requested``, looked up (never joined onto a directory) among the
    grant's own entries. FileNotFound when there is none."""
    if looks_hostile(requested):
        raise FileNotFound()
    if is_class_entitlement(grant):
        sku, _, path = requested.partition("/")
        chosen = {c.product.sku for c in grant.choices if c.product is not None}
        if sku not in chosen:
            raise FileNotFound()
    elif grant.product is not None and grant.product.package is not None:
        sku, path = PACKAGES_SKU, requested
        if path != f"{grant.product.package.name}.zip":
            raise FileNotFound()
    else:
        sku, path = grant.sku, requested
    entry = session.scalar(_FILE_ENTRY, {"sku": sku, "path": path})
    if entry is None:
        raise FileNotFound()
    return entry


def real_path(download_dir: str, entry: FileEntry) -> Path:
    """The entry's file on disk, guaranteed inside DOWNLOAD_DIR/<SKU>/ (symlinks resolved).

    FileNotFound when a link leads out of the tree; FileUnreadable when the file is gone (or a link
    dangles); FileChangedOnDisk when it differs from what was indexed (being replaced: never serve
    bytes that do not match the listed SHA-256).
    """
    # os.path.realpath on strings: what Path.resolve does, for a fraction of the CPU (every file GET).
    root = os.path.realpath(os.path.join(download_dir, entry.sku))
    full = os.path.realpath(os.path.join(root, entry.path))
    if not full.startswith(root + os.sep):
        raise FileNotFound()
    try:
        st = os.stat(full)
    except OSError as exc:
        raise FileUnreadable(unreadable_reason(exc)) from None
    if st.st_size != entry.size or st.st_mtime_ns != entry.mtime_ns:
        raise FileChangedOnDisk(entry.sku, entry.path)
    return Path(full)


UNREADABLE = "unreadable on disk"  # the prefix of the flag set below (a later good read clears it)


def unreadable_reason(exc: OSError) -> str:
    return f"{UNREADABLE}: {exc.strerror or exc.__class__.__name__}"[:200]


def flag_unreadable(session: Session, entry: FileEntry, reason: str) -> None:
    """Flag an indexed file that cannot be read, for the owner's dashboard (an integrity flag stays)."""
    session.execute(update(FileEntry).where(FileEntry.id == entry.id, FileEntry.flagged.is_(None))
                    .values(flagged=reason[:200]).execution_options(synchronize_session=False))


def clear_unreadable(session: Session, entry: FileEntry) -> None:
    """The file reads again (the owner fixed it): drop the flag ``flag_unreadable`` set. No query
    unless the entry carries that flag."""
    if entry.flagged and entry.flagged.startswith(UNREADABLE):
        session.execute(update(FileEntry).where(FileEntry.id == entry.id, FileEntry.flagged == entry.flagged)
                        .values(flagged=None).execution_options(synchronize_session=False))


def choose_entitlement(session: Session, grant: UserDownload, sku: str) -> EntitlementChoice:
    """Pick one product of the grant's class; each pick uses one of the N. Idempotent per product."""
    if not is_class_entitlement(grant):
        raise InvalidInput("This download is not a choice of products.", status=400)
    product = session.scalar(select(Product).where(Product.sku == sku))
    if product is None or product.content_class != grant.entitlement_class or not product.active:
        raise InvalidInput(f"{sku} is not one of the products you can choose from.", status=400)
    for choice in grant.choices:
        if choice.product_id == product.id:
            return choice
    _lock_for_picking(session, grant)
    session.refresh(grant, ["choices"])  # read after the lock: every pick committed before it counts
    for choice in grant.choices:
        if choice.product_id == product.id:  # the same pick, posted twice at once
            return choice
    if len(grant.choices) >= (grant.entitlement_count or 0):
        raise InvalidInput(f"You have already chosen all {grant.entitlement_count} products of this download.",
                           status=403)
    choice = EntitlementChoice(grant=grant, product=product)
    session.add(choice)
    session.flush()
    return choice


def _lock_for_picking(session: Session, grant: UserDownload) -> None:
    """Make picks on one grant take turns until the caller commits.

    A write to the grant row does it on both databases: PostgreSQL locks the row (a concurrent pick
    waits, then reads the committed picks), and SQLite starts its one write transaction, so no other
    pick can insert between our count and our insert. ``SELECT ... FOR UPDATE`` is a no-op on SQLite,
    and the count alone is read outside any transaction there: three picks on "any 2" all succeeded.
    """
    session.execute(update(UserDownload).where(UserDownload.id == grant.id)
                    .values(entitlement_count=UserDownload.entitlement_count)
                    .execution_options(synchronize_session=False))


def choices_left(grant: UserDownload) -> int:
    return max(0, (grant.entitlement_count or 0) - len(grant.choices))


def class_offer(session: Session, grant: UserDownload) -> list[Product]:
    """The products a class entitlement may still pick from (active, of the grant's class)."""
    return list(session.scalars(select(Product).where(Product.content_class == grant.entitlement_class,
                                                      Product.active.is_(True)).order_by(Product.name)))
