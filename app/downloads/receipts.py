"""Signed receipts: what a download link carries (itsdangerous, one salt for this purpose).

A receipt is readable by whoever holds the link, so it carries nothing personal in clear:
a bound client address travels as a keyed hash (``address_tag``).
"""
from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from functools import lru_cache

from itsdangerous import BadSignature, URLSafeSerializer

from app.downloads.errors import LinkNotFound

RECEIPT_SALT = "softgoods.receipt.v1"
ADDRESS_SALT = b"softgoods.bound-address.v1"
GRANT_KEY_SALT = b"softgoods.grant-key.v1"


@dataclass(frozen=True)
class Receipt:
    po_number: str
    grant_id: int
    key: str
    content_class: str | None
    expires: int  # unix seconds, informative: the database holds the authoritative expiry
    address_tag: str | None = None

    def dump(self) -> list:
        return [self.po_number, self.grant_id, self.key, self.content_class, self.expires, self.address_tag]


def _serializer(secret: str) -> URLSafeSerializer:
    return URLSafeSerializer(secret, salt=RECEIPT_SALT)


def sign_receipt(secret: str, receipt: Receipt) -> str:
    return _serializer(secret).dumps(receipt.dump())


def read_receipt(secret: str, token: str) -> Receipt:
    """Verify the signature and shape; a forged or altered token is LinkNotFound (no database work)."""
    if not token or len(token) > 600:
        raise LinkNotFound()
    return _verified(secret, token)


@lru_cache(maxsize=4096)  # a link is opened many times (every file, every resume); only good ones are kept
def _verified(secret: str, token: str) -> Receipt:
    try:
        data = _serializer(secret).loads(token)
        po, grant_id, key, content_class, expires, tag = data
        if not (isinstance(po, str) and isinstance(grant_id, int) and isinstance(key, str)
                and isinstance(expires, int)):
            raise ValueError
    except (BadSignature, ValueError, TypeError):
        raise LinkNotFound() from None
    return Receipt(po, grant_id, key, content_class, expires, tag)


def address_tag(secret: str, address: str) -> str:
    return hmac.new(secret.encode() + ADDRESS_SALT, address.encode(), hashlib.sha256).hexdigest()[:32]


def grant_key(secret: str, grant_id: int, nonce: str) -> str:
    """The grant's 128-bit secret key, derived from the signing secret and a random per-grant nonce.

    Deriving (not storing) the key lets "My downloads" show the same link again while the database
    keeps only ``hash_key(key)``: a copy of the database alone opens no download.
    """
    mac = hmac.new(secret.encode() + GRANT_KEY_SALT, f"{grant_id}:{nonce}".encode(), hashlib.sha256)
    return mac.hexdigest()[:32]


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_matches(key: str, key_hash: str) -> bool:
    return hmac.compare_digest(hash_key(key), key_hash)
