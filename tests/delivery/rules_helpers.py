"""A shopper's requests played straight against the counting rules (no HTTP): open, commit, close, commit."""
from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from flask import Flask
from sqlalchemy import select

from app.downloads import delivery as rules
from app.downloads import proof as proofs
from app.downloads.models import Delivery, FileEntry, UserDownload
from app.extensions import db
from app.store.models import Order
from tests.helpers import grant_link, make_product


RIGHT_PROOF = "<the right proof>"  # Shop.confirm's default: computed from the file and its current nonce


@dataclass
class Shop:
    app: Flask
    grant_id: int
    order_id: int

    def grant(self) -> UserDownload:
        return db.session.get(UserDownload, self.grant_id, populate_existing=True)

    def entry(self, path: str) -> FileEntry:
        grant = self.grant()
        return db.session.scalar(select(FileEntry).where(FileEntry.sku == grant.sku, FileEntry.path == path))

    def open(self, path: str, start: int = 0, length: int | None = None, now: datetime | None = None):
        entry = self.entry(path)
        length = entry.size - start if length is None else length
        try:
            reservation = rules.open_request(db.session, self.grant(), entry, start=start, length=length, now=now)
        except Exception:
            db.session.rollback()
            raise
        db.session.commit()
        return reservation

    def close(self, reservation, sent: int | None = None, now: datetime | None = None, ip: str = "192.0.2.1"):
        sent = reservation.length if sent is None else sent
        rules.close_request(db.session, reservation, sent, status=206 if reservation.start else 200,
                            outcome="complete" if sent == reservation.length else "aborted", client_ip=ip,
                            user_agent="test", range_header=None, now=now)
        db.session.commit()

    def get(self, path: str, start: int = 0, length: int | None = None, sent: int | None = None,
            now: datetime | None = None, ip: str = "192.0.2.1"):
        reservation = self.open(path, start, length, now)
        self.close(reservation, sent, now, ip)
        return reservation

    def nonce(self, path: str) -> str:
        """The file's current proof nonce, issued as the listing issues it."""
        entry = self.entry(path)
        nonces, _created = proofs.nonces_for(db.session, self.grant(), [entry])
        db.session.commit()
        return nonces[(entry.sku, entry.path)]

    def proof(self, path: str, nonce: str | None = None, data: bytes | None = None) -> str:
        """What the verifying client sends: HMAC-SHA256 over the file's bytes keyed with the nonce
        (the file's current one unless given)."""
        entry = self.entry(path)
        if data is None:
            data = Path(self.app.config["DOWNLOAD_DIR"], entry.sku, entry.path).read_bytes()
        return hmac.new(bytes.fromhex(nonce or self.nonce(path)), data, hashlib.sha256).hexdigest()

    def confirm(self, path: str, sha256: str | None = None, proof: str | None = RIGHT_PROOF) -> str:
        """A confirm with the file's digest and, unless given, the right proof for its current nonce."""
        if proof is RIGHT_PROOF:
            proof = self.proof(path)
        entry = self.entry(path)
        try:
            result = rules.confirm(db.session, self.grant(), entry, sha256 or entry.sha256, proof,
                                   download_dir=self.app.config["DOWNLOAD_DIR"])
        except Exception:
            db.session.rollback()
            raise
        db.session.commit()
        return result

    def used(self) -> int:
        return self.grant().downloads_used

    def held(self) -> int:
        return self.grant().downloads_held

    def deliveries(self, path: str | None = None) -> list[Delivery]:
        query = select(Delivery).where(Delivery.grant_id == self.grant_id).order_by(Delivery.id)
        if path:
            query = query.where(Delivery.path == path)
        return list(db.session.scalars(query.execution_options(populate_existing=True)))

    def order(self) -> Order:
        return db.session.get(Order, self.order_id, populate_existing=True)


def open_shop(app: Flask, files: dict[str, int | bytes], *, max_downloads: int | None = 3, sku: str = "BOOK",
              days: int | None = None) -> Shop:
    make_product(app, sku, files, max_downloads=max_downloads)
    grant_link(app, sku, max_downloads=max_downloads, days=days)
    with app.app_context():
        grant = db.session.scalars(select(UserDownload).order_by(UserDownload.id.desc())).first()
        return Shop(app, grant.id, grant.order_id)
