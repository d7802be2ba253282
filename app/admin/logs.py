"""The download log with filters (order, address, status), CSV export and shared-link warnings."""
from __future__ import annotations

import io
from typing import Iterator

from flask import Response, render_template, request, stream_with_context
from sqlalchemy import Select, select

from app.downloads.errors import InvalidInput
from app.downloads.grant_actions import SHARED_LINK_ADDRESSES, shared_links
from app.downloads.models import DownloadLog
from app.admin.blueprint import bp
from app.admin.spreadsheet import defuse, safe_writer
from app.extensions import db

PAGE = 200
CSV_COLUMNS = ("at", "order_po", "grant_id", "path", "client_ip", "method", "status", "range_header",
               "start_offset", "bytes_sent", "outcome", "source", "user_agent")


def _filtered() -> tuple[Select, dict[str, str]]:
    filters = {k: (request.args.get(k) or "").strip() for k in ("order", "ip", "status")}
    query = select(DownloadLog).order_by(DownloadLog.at.desc(), DownloadLog.id.desc())
    if filters["order"]:
        query = query.where(DownloadLog.order_po == filters["order"])
    if filters["ip"]:
        query = query.where(DownloadLog.client_ip == filters["ip"])
    status = filters["status"]
    if status:
        if not (status.isascii() and status.isdigit()) or not 100 <= int(status) <= 599:
            raise InvalidInput(f"status must be an HTTP status code like 200 or 403, not {status!r}", status=400)
        query = query.where(DownloadLog.status == int(status))
    return query, filters


@bp.get("/log")
def download_log():
    query, filters = _filtered()
    rows = list(db.session.scalars(query.limit(PAGE)))
    return render_template("admin/log.html", title="Download log", rows=rows, filters=filters, page=PAGE,
                           shared=shared_links(db.session), shared_threshold=SHARED_LINK_ADDRESSES)


@bp.get("/log.csv")
def download_log_csv():
    query, _ = _filtered()

    def generate() -> Iterator[str]:
        buf = io.StringIO()
        writer = safe_writer(buf)
        writer.writerow(CSV_COLUMNS)
        for row in db.session.scalars(query.execution_options(yield_per=1000)):
            writer.writerow([defuse(row.at.isoformat() if c == "at" else getattr(row, c)) for c in CSV_COLUMNS])
            if buf.tell() > 64_000:
                yield buf.getvalue()
                buf.seek(0)
                buf.truncate()
        yield buf.getvalue()

    return Response(stream_with_context(generate()), mimetype="text/csv",
                    headers={"Content-Disposition": 'attachment; filename="download-log.csv"'})
