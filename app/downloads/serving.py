"""Delivery modes: one small interface ("deliver this validated file for this grant"), three
implementations chosen by the ``DELIVERY`` setting (CTFd's uploaders): ``pipe`` (the sidecar sends
the bytes with sendfile), ``symlink`` (a random folder of links per grant, served by nginx) and
``accel`` (nginx's X-Accel-Redirect to an internal location).
"""
from __future__ import annotations

import base64
import itertools
import logging
import os
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol
from urllib.parse import quote

from sqlalchemy import update
from werkzeug.http import http_date
# Flask's own Response: Flask re-runs any other response type as a WSGI app, hiding the file wrapper
from flask import Flask, Response, current_app

from app.downloads import delivery, handoffs, inflight
from app.downloads.access import clear_unreadable, flag_unreadable, unreadable_reason
from app.downloads.errors import DeliveryRefused, FileUnreadable
from app.downloads.models import FileEntry, NginxHandoff, UserDownload
from app.downloads.ranges import ByteRange, Plan, evaluate
from app.extensions import db

log = logging.getLogger("softgoods.sidecar")

BLOCK = 256 * 1024  # only for servers without wsgi.file_wrapper (the test client) and multipart bodies


@dataclass
class FileRequest:
    """A validated request for one file of one grant (what every mode needs)."""

    grant: UserDownload
    entry: FileEntry
    name: str  # the file's path as the shopper sees it (listing "path")
    full_path: Path  # real path, already checked to lie inside DOWNLOAD_DIR/<SKU>/
    metalink_url: str
    method: str
    headers: object  # request headers (a mapping with .get)
    environ: dict
    client_ip: str
    user_agent: str | None


class DeliveryMode(Protocol):
    def deliver(self, req: FileRequest) -> Response: ...


class TransferCounters(Protocol):
    """Live counters of the host that sends the bytes (the sidecar hands in ``sidecar.metrics``)."""

    def transfer_started(self) -> None: ...
    def transfer_finished(self, sent: int) -> None: ...


class NoCounters:
    """The store and the test client count nothing."""

    def transfer_started(self) -> None:
        pass

    def transfer_finished(self, sent: int) -> None:
        pass


COUNTERS_EXTENSION = "softgoods_transfer_counters"
PROOF_AHEAD_EXTENSION = "softgoods_proof_precomputer"


def transfer_counters(app: Flask) -> TransferCounters:
    """The counters the app's host registered in ``app.extensions`` (the rules never import the sidecar)."""
    return app.extensions.get(COUNTERS_EXTENSION) or NoCounters()


def etag_for(entry: FileEntry) -> str:
    """Strong validator from the content itself: same bytes, same tag, on every sidecar host."""
    return f'"{entry.sha256[:40]}"'


def content_disposition(name: str) -> str:
    """RFC 6266 attachment with an ASCII fallback and the exact UTF-8 name in ``filename*``."""
    base = name.rsplit("/", 1)[-1]
    fallback = "".join(c if 32 <= ord(c) < 127 and c not in '"\\%;' else "_" for c in base) or "download"
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(base, safe='')}"


def file_headers(req: FileRequest) -> dict[str, str]:
    return entry_headers(req.entry, req.name, req.metalink_url)


def entry_headers(entry, name: str, metalink_url: str) -> dict[str, str]:
    """The headers of a file response (``entry``: an index entry, ORM object or fast-path row)."""
    digest = base64.b64encode(bytes.fromhex(entry.sha256)).decode()
    return {
        "Content-Type": entry.media_type,
        "Content-Disposition": content_disposition(name),
        "ETag": etag_for(entry),
        "Last-Modified": http_date(entry.mtime_ns // 1_000_000_000),
        "Accept-Ranges": "bytes",
        "Repr-Digest": f"sha-256=:{digest}:",
        "Link": f'<{metalink_url}>; rel=describedby; type="application/metalink4+xml"',
        "Cache-Control": "private, no-transform",
    }


def _log_only(req: FileRequest, status: int, outcome: str) -> None:
    delivery.log_request(db.session, req.grant, req.entry.path, status=status, outcome=outcome,
                         client_ip=req.client_ip, user_agent=req.user_agent,
                         range_header=req.headers.get("Range"), method=req.method)
    db.session.commit()


def refuse_unreadable(req: FileRequest, refusal: FileUnreadable) -> FileUnreadable:
    """An indexed file that cannot be read: a log line, a flag for the owner, a refused row in the
    download log, committed; the caller raises the refusal (503 page or JSON, never a 500)."""
    db.session.rollback()
    log.error("product file %s cannot be read (%s): answered 503 and flagged for the owner",
              req.entry.registered_path, refusal.reason)
    flag_unreadable(db.session, req.entry, refusal.reason)
    _log_only(req, refusal.status, "refused")
    return refusal


def open_product_file(req: FileRequest):
    """Open the validated file for reading; FileUnreadable (never an OSError, a 500) when the disk
    says no: a folder or a dangling link where the file was indexed, no permission, an I/O error."""
    try:
        fh = open(req.full_path, "rb")
    except OSError as exc:
        raise refuse_unreadable(req, FileUnreadable(unreadable_reason(exc))) from None
    clear_unreadable(db.session, req.entry)  # committed with the request's first commit
    return fh


class TrackedFile:
    """What gunicorn's sendfile gets: a real fd positioned at the range start, and a ``seek`` that
    remembers where ``socket.sendfile`` stopped (it seeks to the final offset in its ``finally``,
    also when the client broke off), so ``close()`` knows how many bytes really left."""

    mode = "rb"

    def __init__(self, fh, start: int, length: int, on_close: Callable[[int], None]):
        self._fh, self.start, self.length, self._on_close = fh, start, length, on_close
        self.position = start
        self._closed = False
        self._corked = None
        fh.seek(start)

    def fileno(self) -> int:
        return self._fh.fileno()

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self.position = self._fh.seek(offset, whence)
        return self.position

    def tell(self) -> int:
        return self.position

    def read(self, size: int = -1) -> bytes:
        """Bounded to the range: a fallback read loop can never send past Content-Length."""
        remaining = self.start + self.length - self.position
        if size is None or size < 0 or size > remaining:
            size = remaining
        data = self._fh.read(size) if size > 0 else b""
        self.position += len(data)
        return data

    def chunks(self) -> Iterator[bytes]:
        try:
            while data := self.read(BLOCK):
                yield data
        finally:
            self.close()

    @property
    def bytes_sent(self) -> int:
        return min(max(0, self.position - self.start), self.length)

    def cork(self, sock) -> None:
        """Hold partial TCP segments back until ``close`` (nginx's ``tcp_nopush``): the headers leave
        in the first full segment with the body, and sendfile's bytes only in full segments."""
        if _set_cork(sock, True):
            self._corked = sock

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        heartbeat.remove(self)
        if self._corked is not None:  # the last partial segment leaves now, not 200 ms later
            _set_cork(self._corked, False)
        self._fh.close()
        self._on_close(self.bytes_sent)


def _record_progress(moved: list[tuple[Flask, delivery.Reservation]]) -> None:
    """The heartbeat's write: every transfer that moved since the last beat, in one transaction per app."""
    apps = {id(app): app for app, _reservation in moved}
    for app in apps.values():
        with app.app_context():
            try:
                for owner, reservation in moved:
                    if owner is app:
                        delivery.record_progress(db.session, reservation)
                db.session.commit()
            finally:
                db.session.rollback()


heartbeat = inflight.Heartbeat(_record_progress)


def keep_alive(app: Flask, reservation: delivery.Reservation, key, position: Callable[[], int], sock=None) -> None:
    """Keep the reservation's range from looking idle while its bytes move (inflight.Heartbeat).
    Progress: the read position, and on a TCP socket the bytes the peer acknowledged (one
    ``sendfile`` call moves no position); on another socket (unix) an open transfer counts as moving."""
    ticks = itertools.count()

    def progress():
        if sock is None:
            return position()
        acked = inflight.bytes_acked(sock)
        return position(), next(ticks) if acked is None else acked
    heartbeat.add(key, progress, (app, reservation))


def prove_ahead(app: Flask, reservation: delivery.Reservation) -> None:
    """Bytes of a file are about to leave: have the expected proof of possession ready for the
    confirm that follows (app.downloads.proof.ProofPrecomputer; the sidecar installs it)."""
    precomputer = app.extensions.get(PROOF_AHEAD_EXTENSION)
    if precomputer is not None:
        precomputer.sending(reservation)


def _set_cork(sock, on: bool) -> bool:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, int(on))
    except (AttributeError, OSError):  # not TCP (a UNIX socket, a test double) or not Linux: send as is
        return False
    return True


def file_body(environ: dict, tracked: TrackedFile):
    """The response body: gunicorn's file wrapper (one sendfile, its socket corked meanwhile), or
    blocks read in Python on servers without one (the test client)."""
    wrapper = environ.get("wsgi.file_wrapper")
    if wrapper is None:
        return tracked.chunks()
    sock = environ.get("gunicorn.socket")
    if sock is not None:
        tracked.cork(sock)
    return wrapper(tracked)


def close_with_orm(app: Flask, reservation: delivery.Reservation, sent: int, **record) -> None:
    """close_request in its own app context (a response body closes after its request's context).
    Never raises: the bytes are gone either way; a failure is logged, not lost in a worker."""
    with app.app_context():
        try:
            delivery.close_request(db.session, reservation, sent, **record)
            db.session.commit()
        except Exception:
            log.exception("could not record the end of %s/%s (%d bytes)", reservation.sku, reservation.path, sent)
            db.session.rollback()


def _finisher(app: Flask, reservation: delivery.Reservation, req: FileRequest, status: int,
              length: int) -> Callable[[int], None]:
    transfer_finished = transfer_counters(app).transfer_finished
    range_header = req.headers.get("Range")

    def finish(sent: int) -> None:
        transfer_finished(sent)
        close_with_orm(app, reservation, sent, status=status, outcome="complete" if sent == length else "aborted",
                       client_ip=req.client_ip, user_agent=req.user_agent, range_header=range_header)
    return finish


def answer_without_body(req: FileRequest, plan: Plan, headers: dict[str, str]) -> Response | None:
    """The 304, 412 and 416 answers of a plan (logged, nothing reserved); None when the plan sends bytes."""
    if plan.status in (304, 412):
        _log_only(req, plan.status, "not-modified" if plan.status == 304 else "refused")
        keep = ("ETag", "Last-Modified", "Cache-Control") if plan.status == 304 else ()
        return Response(status=plan.status, headers={k: headers[k] for k in keep})
    if plan.status == 416:
        _log_only(req, 416, "refused")
        return Response("Requested range not satisfiable\n", status=416, mimetype="text/plain",
                        headers={"Content-Range": f"bytes */{req.entry.size}"})
    return None


def single_part(plan: Plan, size: int, headers: dict[str, str]) -> ByteRange:
    """The one part a 200/206 plan sends; sets its Content-Range (206) and Content-Length in ``headers``."""
    part = plan.ranges[0] if plan.ranges else ByteRange(0, size)
    if plan.status == 206:
        headers["Content-Range"] = part.content_range(size)
    headers["Content-Length"] = str(part.length)
    return part


def _reserve(req: FileRequest, fh, **request) -> delivery.Reservation:
    """Reserve the request's bytes, committed before the first byte (concurrent requests must see it).
    A refusal (e.g. the limit is used up) is logged and raised with nothing sent."""
    try:
        reservation = delivery.open_request(db.session, req.grant, req.entry, method=req.method, **request)
        db.session.commit()
        return reservation
    except DeliveryRefused as refusal:
        fh.close()
        db.session.rollback()
        _log_only(req, refusal.status, "refused")
        raise
    except BaseException:
        fh.close()
        db.session.rollback()
        raise


class _Sent:
    """The bytes a multipart body has sent so far (its heartbeat's progress)."""

    __slots__ = ("bytes", "__weakref__")

    def __init__(self):
        self.bytes = 0


class PipeDelivery:
    """The sidecar sends the bytes itself: full and single-range bodies by sendfile (zero-copy)."""

    def deliver(self, req: FileRequest) -> Response:
        entry = req.entry
        headers = file_headers(req)
        plan = evaluate(req.headers, size=entry.size, etag=headers["ETag"], mtime=entry.mtime_ns // 1_000_000_000)
        headers["X-Accel-Buffering"] = "no"  # a buffering proxy would read ahead of the shopper
        if (bodiless := answer_without_body(req, plan, headers)) is not None:
            return bodiless
        if len(plan.ranges) > 1:
            return self._multipart(req, plan, headers)
        part = single_part(plan, entry.size, headers)
        if req.method == "HEAD":
            _log_only(req, plan.status, "head")
            return Response(status=plan.status, headers=headers)
        return self._send(req, plan.status, part, headers)

    def _send(self, req: FileRequest, status: int, part: ByteRange, headers: dict) -> Response:
        fh = open_product_file(req)
        reservation = _reserve(req, fh, start=part.start, length=part.length)
        app = current_app._get_current_object()
        transfer_counters(app).transfer_started()
        tracked = TrackedFile(fh, part.start, part.length, _finisher(app, reservation, req, status, part.length))
        keep_alive(app, reservation, tracked, tracked.tell, req.environ.get("gunicorn.socket"))
        prove_ahead(app, reservation)
        response = Response(file_body(req.environ, tracked), status=status, headers=headers, direct_passthrough=True)
        response.content_length = part.length
        return response

    def _multipart(self, req: FileRequest, plan: Plan, headers: dict) -> Response:
        """nginx's multipart/byteranges layout (a Python loop, as in nginx; no downloader asks for it).
        ONE reservation for the sum of the parts and one log row (the parts are at most
        ranges.MAX_PARTS, coalesced): settling records the coverage of each part that left."""
        entry = req.entry
        boundary = f"{secrets.randbits(63):020d}"
        heads = [(f"\r\n--{boundary}\r\nContent-Type: {entry.media_type}\r\nContent-Range: bytes "
                  f"{r.start}-{r.end - 1}/{entry.size}\r\n\r\n").encode() for r in plan.ranges]
        tail = f"\r\n--{boundary}--\r\n".encode()
        length = sum(r.length for r in plan.ranges)
        total = sum(len(h) for h in heads) + length + len(tail)
        out = {k: v for k, v in headers.items() if k != "Content-Type"}
        out["Content-Type"] = f"multipart/byteranges; boundary={boundary}"
        out["Content-Length"] = str(total)
        if req.method == "HEAD":
            _log_only(req, 206, "head")
            return Response(status=206, headers=out)
        fh = open_product_file(req)  # refuse an unreadable file before reserving or sending anything
        reservation = _reserve(req, fh, start=plan.ranges[0].start, length=length,
                               parts=tuple((r.start, r.end) for r in plan.ranges))
        app = current_app._get_current_object()
        finish = _finisher(app, reservation, req, 206, length)
        transfer_counters(app).transfer_started()
        sent = _Sent()
        keep_alive(app, reservation, sent, lambda: sent.bytes)

        def body() -> Iterator[bytes]:
            try:
                for head, r in zip(heads, plan.ranges):
                    yield head
                    tracked = TrackedFile(fh, r.start, r.length, lambda _sent: None)
                    while data := tracked.read(BLOCK):
                        yield data
                        sent.bytes += len(data)
                yield tail
            finally:
                heartbeat.remove(sent)
                fh.close()
                finish(sent.bytes)

        return Response(body(), status=206, headers=out, direct_passthrough=True)


def symlink_token(grant: UserDownload) -> str:
    """The grant's random link folder name, created once (concurrent requests agree on one)."""
    if grant.symlink_token:
        return grant.symlink_token
    token = secrets.token_urlsafe(24)
    db.session.execute(update(UserDownload).where(UserDownload.id == grant.id,
                                                  UserDownload.symlink_token.is_(None))
                       .values(symlink_token=token))
    db.session.commit()
    db.session.refresh(grant)
    return grant.symlink_token


def hand_to_nginx(req: FileRequest, headers: dict[str, str]) -> Response | NginxHandoff:
    """accel and symlink: reserve the bytes nginx is about to send, as pipe mode does (403 past the
    limit, before any redirect or link is handed out). Returns the sidecar's own answer when there is
    no body to send (304, 412, 416), else the committed reservation. nginx runs with ``max_ranges 1``
    (deploy/nginx-sidecar.conf): it answers a request for several ranges with the whole file."""
    entry = req.entry
    plan = evaluate(req.headers, size=entry.size, etag=headers["ETag"], mtime=entry.mtime_ns // 1_000_000_000)
    if (bodiless := answer_without_body(req, plan, headers)) is not None:
        return bodiless
    one_part = plan.status == 206 and len(plan.ranges) == 1
    part = plan.ranges[0] if one_part else ByteRange(0, entry.size)
    try:
        reserved = handoffs.hand_off(db.session, req.grant, entry, start=part.start, length=part.length,
                                     status=206 if one_part else 200, method=req.method)
        db.session.commit()  # concurrent requests must see this reservation
    except DeliveryRefused as refusal:  # e.g. the limit is used up: logged, nothing handed out
        db.session.rollback()
        _log_only(req, refusal.status, "refused")
        raise
    if req.method == "GET":
        prove_ahead(current_app._get_current_object(), handoffs.reservation_of(reserved))
    return reserved


class SymlinkDelivery:
    """The mailing-list design: ``SYMLINK_DIR/<grant folder>/<reservation>/<file>`` -> the product file,
    served by nginx. Each GET gets its own reservation folder (removed when its log line settles it or
    the purge releases it), so a link is no lasting way around the limit; the grant's folder goes with
    the grant (maintenance). A HEAD gets its headers from the sidecar: it needs no link."""

    def deliver(self, req: FileRequest) -> Response:
        cfg = current_app.config
        open_product_file(req).close()  # nginx would answer its own 403/404; the shopper gets our 503
        headers = file_headers(req)
        if req.method == "HEAD":
            headers["Content-Length"] = str(req.entry.size)
            _log_only(req, 200, "head")
            return Response(status=200, headers=headers)
        reserved = hand_to_nginx(req, headers)
        if isinstance(reserved, Response):
            return reserved
        folder = f"{symlink_token(req.grant)}/{reserved.token}"
        link = Path(cfg["SYMLINK_DIR"]) / folder / req.name
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(req.full_path, link)  # a new folder per reservation: nobody else makes this link
        _log_only(req, 302, "handoff")
        target = f"{cfg['SYMLINK_URL']}/{folder}/{quote(req.name)}"
        return Response(status=302, headers={"Location": target, "Cache-Control": "no-store"})


class AccelDelivery:
    """nginx serves the file from its ``internal`` location after the sidecar validated the link and,
    for a GET, reserved the bytes (a HEAD sends none: nginx answers it without a reservation)."""

    def deliver(self, req: FileRequest) -> Response:
        open_product_file(req).close()  # nginx would answer its own 403/404; the shopper gets our 503
        prefix = current_app.config["ACCEL_PREFIX"]
        if not prefix.endswith("/"):
            prefix += "/"
        headers = file_headers(req)
        if req.method != "HEAD" and isinstance(reserved := hand_to_nginx(req, headers), Response):
            return reserved
        headers["X-Accel-Redirect"] = f"{prefix}{quote(req.entry.sku)}/{quote(req.entry.path)}"
        headers["X-Accel-Buffering"] = "no"
        _log_only(req, 200, "handoff")
        return Response(status=200, headers=headers)


MODES: dict[str, DeliveryMode] = {"pipe": PipeDelivery(), "symlink": SymlinkDelivery(), "accel": AccelDelivery()}


def delivery_mode(name: str | None = None) -> DeliveryMode:
    return MODES[name or current_app.config["DELIVERY"]]
