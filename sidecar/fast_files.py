"""The fast path of the sidecar's busiest request: GET of one file in pipe mode.

A WSGI middleware in front of the Flask app. For the common case (a good link, a plain product or
package, an indexed and unchanged file, no conditional request but Range/If-Range, a delivery the
rules can open without shipping the order) it validates, reserves, answers and records on a bare
DBAPI connection (``app.downloads.fast_store``) with the very same rules (``delivery.reserve`` and
``delivery.settle``) and response headers as the Flask view. Everything else, including every
refusal, falls through to the Flask view before anything was written, so pages, JSON errors, the
download log of refusals and the guessing limit stay in one place. Measured (bench/sidecar_bench.py,
2 cores): 4 KiB files from 0.10x to 0.43x the rate of bare Flask's send_from_directory (README).

A good link is therefore never slowed by the guessing limit: only failed links reach it (as before,
only they count against it).
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from flask import Flask
from werkzeug.datastructures import EnvironHeaders

from app.downloads import delivery
from app.downloads.access import address_allowed, looks_hostile, real_path
from app.downloads.errors import DeliveryRefused, LinkNotFound
from app.downloads.fast_store import EntryRow, GrantRow, NeedsFullPath, RawStore, runner_for
from app.downloads.ranges import ByteRange, evaluate
from app.downloads.receipts import key_matches, read_receipt
from app.downloads.serving import (TrackedFile, close_with_orm, entry_headers, file_body, keep_alive, prove_ahead,
                                   single_part)
from app.extensions import db
from app.timeutil import utcnow
from sidecar import metrics

log = logging.getLogger("softgoods.sidecar")
FILE_URL = re.compile(r"/d/([^/]+)/f/(.+)", re.DOTALL)
STATUS_LINE = {200: "200 OK", 206: "206 Partial Content"}


@dataclass
class Planned:
    status: int
    part: ByteRange
    headers: dict[str, str]
    grant: GrantRow
    entry: EntryRow
    reservation: delivery.Reservation
    now: datetime
    full_path: Path


class FastRequest:
    __slots__ = ("environ", "token", "receipt", "name", "headers", "client_ip")

    def __init__(self, environ, token: str, receipt, name: str):
        self.environ, self.token, self.receipt, self.name = environ, token, receipt, name
        self.headers = EnvironHeaders(environ)
        self.client_ip = environ.get("REMOTE_ADDR") or "unknown"


class FastFiles:
    def __init__(self, app: Flask, wsgi_app):
        self.app, self.wsgi_app = app, wsgi_app
        with app.app_context():
            self.runner = runner_for(db.engine)
        app.extensions["softgoods_fast_files"] = self
        self._adapters: dict[tuple, object] = {}

    def __call__(self, environ, start_response):
        if environ.get("REQUEST_METHOD") == "GET" and self.app.config["DELIVERY"] == "pipe":
            # Decoded as werkzeug decodes PATH_INFO for routing (WSGI hands it over as latin-1).
            path = environ.get("PATH_INFO", "").encode("latin-1").decode("utf-8", "replace")
            match = FILE_URL.fullmatch(path)
            if match is not None:
                body = self._try(environ, start_response, *match.groups())
                if body is not None:
                    return body
        return self.wsgi_app(environ, start_response)

    def close(self) -> None:
        """Close the fast path's database connections (tests; a worker process just exits)."""
        self.runner.close()

    def _try(self, environ, start_response, token: str, name: str):
        """The response body, or None: the Flask view answers (nothing was written)."""
        try:
            receipt = read_receipt(self.app.config["SECRET_KEY"], token)
        except LinkNotFound:
            return None
        if looks_hostile(name) or "\ufffd" in name:
            return None
        request = FastRequest(environ, token, receipt, name)
        try:
            planned = self.runner.read_then_run(  # the reservation is committed before the first byte leaves
                lambda store: self._plan(store, request),
                lambda store, p: delivery.reserve(store, p.grant, p.entry, p.reservation, p.now))
        except (DeliveryRefused, NeedsFullPath) + self.runner.connections.errors:
            return None  # rolled back: the Flask view answers, with its page and its log row
        except Exception:  # a bug here must not cost the shopper the file: the Flask view serves it
            log.exception("fast path failed for %r; the Flask view answers", name)
            return None
        if planned is None:
            return None
        part = planned.part
        metrics.transfer_started()
        finish = self._finisher(planned.reservation, planned.status, part.length, request.client_ip,
                                environ.get("HTTP_USER_AGENT"), request.headers.get("Range"))
        try:
            tracked = TrackedFile(open(planned.full_path, "rb"), part.start, part.length, finish)
        except OSError:  # gone since the check a moment ago: record nothing sent; the Flask view answers
            finish(0)
            return None
        keep_alive(self.app, planned.reservation, tracked, tracked.tell, environ.get("gunicorn.socket"))
        prove_ahead(self.app, planned.reservation)
        start_response(STATUS_LINE[planned.status], list(planned.headers.items()))
        return file_body(environ, tracked)

    def _plan(self, store: RawStore, request: FastRequest) -> Planned | None:
        """Validate the link and the file and plan the response (reads only; ``delivery.reserve``
        follows in a write unit). None when the Flask view must answer."""
        config = self.app.config
        now = utcnow()
        receipt, name = request.receipt, request.name
        grant = store.grant_and_file(receipt.grant_id, name)
        if grant is None or not key_matches(receipt.key, grant.key_hash) or grant.po_number != receipt.po_number:
            return None
        if grant.status != "active" or grant.expires_at <= now or grant.entitlement_class:
            return None
        if not address_allowed(config["SECRET_KEY"], grant, request.client_ip):
            return None
        entry = grant.entry
        if entry is None or entry.flagged or (grant.package_name is not None and name != f"{grant.package_name}.zip"):
            return None
        try:
            full_path = real_path(config["DOWNLOAD_DIR"], entry)
        except DeliveryRefused:
            return None  # the Flask view answers, logs and flags
        # The file is opened after the reservation: refuse here what open() would (a folder, no permission).
        if not (os.path.isfile(full_path) and os.access(full_path, os.R_OK)):
            return None
        headers = entry_headers(entry, name, self._metalink_url(request.environ, request.token, name))
        plan = evaluate(request.headers, size=entry.size, etag=headers["ETag"], mtime=entry.mtime_ns // 1_000_000_000)
        if plan.status not in (200, 206) or len(plan.ranges) > 1:
            return None
        part = single_part(plan, entry.size, headers)
        headers["X-Accel-Buffering"] = "no"  # a buffering proxy would read ahead of the shopper
        reservation = delivery.Reservation(
            grant.id, grant.po_number, entry.sku, entry.path, part.start, part.length, method="GET",
            product_sku=grant.sku if grant.package_name is None else None)
        return Planned(plan.status, part, headers, grant, entry, reservation, now, full_path)

    def _metalink_url(self, environ, token: str, name: str) -> str:
        """What ``url_for("sidecar.metalink", ..., _external=True)`` gives, with the URL adapter kept per
        host (binding one costs more than the rest of the request's Python)."""
        key = (environ.get("HTTP_HOST"), environ.get("SERVER_NAME"), environ.get("SERVER_PORT"),
               environ.get("wsgi.url_scheme"), environ.get("SCRIPT_NAME"))
        adapter = self._adapters.get(key)
        if adapter is None:
            if len(self._adapters) > 64:  # Host headers are client input: keep the cache small
                self._adapters.clear()
            adapter = self._adapters[key] = self.app.url_map.bind_to_environ(
                environ, server_name=self.app.config["SERVER_NAME"],
                subdomain=self.app.url_map.default_subdomain or None)
        return adapter.build("sidecar.metalink", {"receipt": token, "name": name}, force_external=True)

    def _finisher(self, reservation: delivery.Reservation, status: int, length: int, client_ip: str,
                  user_agent: str | None, range_header: str | None):
        def finish(sent: int) -> None:
            metrics.transfer_finished(sent)
            record = dict(status=status, outcome="complete" if sent == length else "aborted", client_ip=client_ip,
                          user_agent=user_agent, range_header=range_header)
            try:
                self.runner.run(lambda store: delivery.settle(store, reservation, sent, now=utcnow(), **record))
                return
            except NeedsFullPath:
                pass
            except Exception:
                log.exception("fast path could not record the end of %s/%s; the ORM path tries",
                              reservation.sku, reservation.path)
            close_with_orm(self.app, reservation, sent, **record)  # shipping the order, or a failure above
        return finish
