"""Delivery rules: byte budgets, coverage evidence, counting, confirmation, shipping.

CONTRACT between the sidecar's serving code and these rules (see DESIGN.md "Delivery semantics"):

    reservation = open_request(session, grant, entry, start=..., length=..., method=..., ...)
        Called before the first byte of a file response (GET with body, full or ranged).
        Reserves ``length`` bytes against the grant's current delivery of this file (or starts a
        new delivery). Raises DownloadsExhausted when a *new* delivery would pass max_downloads.
        The caller commits right away (so concurrent requests see the reservation).

    close_request(session, reservation, bytes_sent, *, status, outcome, client_ip, user_agent, range_header)
        Called once when the response body is closed (complete or broken off) with the number of
        bytes that really left. Records the interval, releases the unsent part of the reservation,
        writes the download_log row, counts the delivery when coverage completes, moves the order
        to shipped when every file has evidence. The caller commits.

    log_request(session, grant, path, *, status, outcome, ...)  -- HEAD, 304, refusals: log only.

    confirm(session, grant, entry, sha256) -> str   -- the client's proof; "verified" or DigestMismatch.

STUB: the verified-delivery issue replaces the bodies; signatures stay.
"""
from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.orm import Session

from app.downloads.errors import DigestMismatch
from app.downloads.models import DownloadLog, FileEntry, UserDownload


@dataclass
class Reservation:
    grant_id: int
    order_po: str | None
    sku: str
    path: str
    start: int
    length: int
    delivery_id: int | None = None


def open_request(session: Session, grant: UserDownload, entry: FileEntry, *, start: int, length: int,
                 method: str = "GET") -> Reservation:
    return Reservation(grant.id, grant.order.po_number, entry.sku, entry.path, start, length)


def close_request(session: Session, reservation: Reservation, bytes_sent: int, *, status: int, outcome: str,
                  client_ip: str | None, user_agent: str | None, range_header: str | None) -> None:
    session.add(DownloadLog(grant_id=reservation.grant_id, delivery_id=reservation.delivery_id,
                            order_po=reservation.order_po, path=reservation.path, client_ip=client_ip,
                            user_agent=(user_agent or "")[:300], range_header=(range_header or None),
                            status=status, start_offset=reservation.start, bytes_sent=bytes_sent,
                            outcome=outcome))


def log_request(session: Session, grant: UserDownload | None, path: str, *, status: int, outcome: str,
                client_ip: str | None, user_agent: str | None, range_header: str | None = None,
                method: str = "GET") -> None:
    session.add(DownloadLog(grant_id=grant.id if grant else None,
                            order_po=grant.order.po_number if grant else None, path=path,
                            client_ip=client_ip, user_agent=(user_agent or "")[:300], method=method,
                            range_header=range_header, status=status, bytes_sent=0, outcome=outcome))


def confirm(session: Session, grant: UserDownload, entry: FileEntry, sha256: str) -> str:
    if sha256.lower() != entry.sha256:
        raise DigestMismatch()
    return "verified"
