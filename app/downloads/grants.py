"""Grants (``user_downloads`` rows) and the links that open them. Plain functions: views, CLI and
sidecar call these; the caller commits."""
from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import timedelta

from flask import current_app
from sqlalchemy.orm import Session

from app.downloads.models import UserDownload
from app.downloads.receipts import Receipt, address_tag, grant_key, hash_key, sign_receipt
from app.store.models import Order
from app.timeutil import utcnow


@dataclass(frozen=True)
class IssuedLink:
    grant: UserDownload
    url: str


def grant_downloads(session: Session, order: Order, *, days: int | None = None,
                    max_downloads: int | None | bool = False, client_ip: str | None = None) -> list[IssuedLink]:
    """One grant per purchased unit of every item of a paid order; returns their links.

    ``max_downloads=False`` means "the product's default"; ``None`` means unlimited.
    """
    bind = current_app.config["BIND_IP"] and client_ip
    now = utcnow()
    issued = []
    for item in order.items:
        product = item.product
        for _ in range(item.quantity):
            grant = UserDownload(
                order=order, order_item=item, product=product, sku=item.sku,
                key_nonce=secrets.token_hex(16), key_hash="",
                expires_at=now + timedelta(days=days if days is not None else product.link_days),
                max_downloads=product.max_downloads if max_downloads is False else max_downloads,
                bound_ip=client_ip if bind else None,
                entitlement_class=product.entitlement_class,
                entitlement_count=product.entitlement_count,
            )
            session.add(grant)
            session.flush()  # the id is part of the key derivation
            grant.key_hash = hash_key(_key(grant))
            issued.append(IssuedLink(grant, link_for(grant)))
    return issued


def _key(grant: UserDownload) -> str:
    return grant_key(current_app.config["SECRET_KEY"], grant.id, grant.key_nonce)


def receipt_for(grant: UserDownload) -> str:
    cfg = current_app.config
    receipt = Receipt(
        po_number=grant.order.po_number or "",
        grant_id=grant.id,
        key=_key(grant),
        content_class=grant.entitlement_class or (grant.product.content_class if grant.product else None),
        expires=int(grant.expires_at.timestamp()),
        address_tag=address_tag(cfg["SECRET_KEY"], grant.bound_ip) if grant.bound_ip else None,
    )
    return sign_receipt(cfg["SECRET_KEY"], receipt)


def link_for(grant: UserDownload) -> str:
    """The shopper's link: the sidecar's listing page for this grant."""
    return f"{current_app.config['SIDECAR_URL']}/d/{receipt_for(grant)}/"
