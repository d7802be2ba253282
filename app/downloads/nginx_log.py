"""Delivery evidence from nginx's access log (``softgoods ingest-nginx-log PATH``).

In ``accel`` and ``symlink`` modes nginx sends the bytes, so the sidecar only sees the hand-off;
nginx's log line is the evidence. The log format is the ``softgoods`` one shipped in
``deploy/nginx-sidecar.conf`` (tab-separated; nginx escapes tabs inside values as ``\\x09``)::

    $time_iso8601 $remote_addr $request_method $request_uri $status $bytes_sent $body_bytes_sent
    $request_completion $http_range $sent_http_content_range $request_time
    $connection-$connection_requests $http_user_agent

Which lines are deliveries by nginx:
- ``/links/<token>/<name>`` (symlink mode): always; the token names the grant (``symlink_token``).
- ``/d/<receipt>/f/<name>`` (accel mode): only when this installation runs ``SOFTGOODS_DELIVERY=accel``;
  in pipe mode the sidecar itself sent and recorded those bytes.
GET with status 200 or 206 only; HEAD, refusals and Metalinks are not deliveries.

Each line goes through the same rules as a piped request (``delivery.open_request`` at the time the
request started, ``close_request`` with ``$body_bytes_sent``), so the evidence is the same. A line
counts **exactly once**: its SHA-256 is the ``DownloadLog.source_key`` (unique), so re-reading a log,
a rotated copy (``access.log.1``, ``.gz``) or two ingesters at once never records it twice. The
line's own content (time, connection serial and request number) makes it unique; the file's inode
is left out on purpose, so copy-and-truncate rotation does not make old lines new.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator
from urllib.parse import unquote

from flask import current_app
from sqlalchemy import event, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.downloads import delivery, handoffs
from app.downloads.access import find_file
from app.downloads.errors import DeliveryRefused
from app.downloads.models import DownloadLog, FileEntry, UserDownload
from app.downloads.receipts import key_matches, read_receipt

FIELDS = ("time", "remote_addr", "method", "request_uri", "status", "bytes_sent", "body_bytes_sent",
          "completion", "http_range", "content_range", "request_time", "connection", "user_agent")
CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
ACCEL_URI = re.compile(r"^/d/([^/?]+)/f/([^?]+)")
COMMIT_EVERY = 500


class LogFormatError(ValueError):
    """The file is not an access log in the softgoods format."""


@dataclass
class LogLine:
    raw: str
    at: datetime  # when nginx finished the request
    started: datetime
    remote_addr: str
    method: str
    uri: str
    status: int
    body_bytes: int
    complete: bool
    http_range: str | None
    content_range: str | None
    user_agent: str | None

    @property
    def source_key(self) -> str:
        return "nginx:" + hashlib.sha256(self.raw.encode()).hexdigest()


def _dash(value: str) -> str | None:
    return None if value in ("", "-") else value


def _unescape(value: str) -> str:
    """nginx writes bytes outside printable ASCII (and quotes, backslashes) as \\xXX."""
    return re.sub(r"\\x([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), value)


def parse_line(raw: str) -> LogLine | None:
    """One line in the softgoods format, or None when it is not one."""
    parts = raw.rstrip("\n").split("\t")
    if len(parts) != len(FIELDS):
        return None
    f = dict(zip(FIELDS, parts))
    try:
        at = datetime.fromisoformat(f["time"]).astimezone(timezone.utc)
        took = float(f["request_time"]) if _dash(f["request_time"]) else 0.0
        return LogLine(raw=raw.rstrip("\n"), at=at, started=at - timedelta(seconds=took),
                       remote_addr=f["remote_addr"], method=f["method"], uri=f["request_uri"],
                       status=int(f["status"]), body_bytes=int(f["body_bytes_sent"]),
                       complete=f["completion"] == "OK", http_range=_dash(_unescape(f["http_range"])),
                       content_range=_dash(f["content_range"]),
                       user_agent=_dash(_unescape(f["user_agent"])))
    except ValueError:
        return None


def read_lines(path: str | Path, start: int = 0) -> Iterator[tuple[str, int]]:
    """(line, offset just after it) of complete lines only: nginx may be half-way through the last
    one, which is read next time."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as fh:
        if start:
            fh.seek(start)
        offset = start
        for raw in fh:
            if not raw.endswith(b"\n"):
                break
            offset += len(raw)
            yield raw.decode("utf-8", errors="replace"), offset


class ReadPositions:
    """Where the last run stopped in each log file, so a re-read skips what was read already.

    Keyed by the file's device and inode (a renamed ``access.log.1`` continues where ``access.log``
    stopped) and guarded by a digest of its first line (a truncated or recreated file starts over).
    Only a shortcut: the unique ``source_key`` is what makes each line count once.
    """

    KEEP = 20

    def __init__(self, state_file: str | Path | None):
        self.state_file = Path(state_file) if state_file else None
        self.data: dict[str, dict] = {}
        if self.state_file and self.state_file.exists():
            try:
                self.data = json.loads(self.state_file.read_text())
            except (OSError, ValueError):
                self.data = {}

    @staticmethod
    def _identity(path: Path) -> tuple[str, str, int] | None:
        if str(path).endswith(".gz"):
            return None
        try:
            st = path.stat()
            with open(path, "rb") as fh:
                head = fh.readline()
        except OSError:
            return None
        return f"{st.st_dev}:{st.st_ino}", hashlib.sha256(head).hexdigest(), st.st_size

    def start(self, path: Path) -> int:
        ident = self._identity(path)
        if ident is None:
            return 0
        key, head, size = ident
        seen = self.data.get(key)
        if not seen or seen.get("head") != head or seen.get("offset", 0) > size:
            return 0
        return int(seen["offset"])

    def save(self, path: Path, offset: int) -> None:
        ident = self._identity(path)
        if ident is None or self.state_file is None:
            return
        key, head, _size = ident
        self.data.pop(key, None)
        self.data[key] = {"head": head, "offset": offset, "path": str(path)}
        self.data = dict(list(self.data.items())[-self.KEEP:])
        temp = self.state_file.with_name(self.state_file.name + ".tmp")
        temp.write_text(json.dumps(self.data))
        os.replace(temp, self.state_file)


@dataclass
class IngestReport:
    lines: int = 0
    recorded: int = 0
    already: int = 0
    not_deliveries: int = 0
    unmatched: int = 0
    malformed: int = 0
    skipped_bytes: int = 0  # read by an earlier run
    refused: list[str] = field(default_factory=list)

    def summary(self) -> str:
        resumed = f" (from byte {self.skipped_bytes}: read before)" if self.skipped_bytes else ""
        return (f"nginx log{resumed}: {self.lines} line(s), {self.recorded} delivery request(s) recorded, "
                f"{self.already} already recorded, {self.not_deliveries} not deliveries by nginx, "
                f"{self.unmatched} matching no grant or file, {self.malformed} not in the softgoods format")


def resolve(session: Session, line: LogLine, *, secret: str,
            accel: bool) -> tuple[UserDownload, FileEntry, str | None] | None:
    """The grant and index entry a served URI belongs to, and the reservation token it names (symlink
    mode), or None."""
    path = line.uri.split("?", 1)[0]
    grant, handoff = None, None
    if path.startswith("/links/"):  # symlink mode: /links/<grant folder>/<reservation>/<name>
        folder, _, name = path[len("/links/"):].partition("/")
        if folder and name:
            grant = session.scalar(select(UserDownload).where(UserDownload.symlink_token == folder))
        first, _, rest = name.partition("/")
        if grant is not None and rest and handoffs.is_token_of(session, grant, first):
            handoff, name = first, rest  # (before reservation folders, links sat in the grant's folder)
    elif accel and (m := ACCEL_URI.match(path)):
        try:
            receipt = read_receipt(secret, unquote(m.group(1)))
        except DeliveryRefused:
            return None
        candidate = session.get(UserDownload, receipt.grant_id)
        if candidate is not None and key_matches(receipt.key, candidate.key_hash):
            grant, name = candidate, m.group(2)
    if grant is None:
        return None
    try:
        return grant, find_file(session, grant, unquote(name)), handoff
    except DeliveryRefused:
        return None


def _served_span(line: LogLine, entry: FileEntry) -> tuple[int, int] | None:
    """(start, length) of the bytes the response carried; None for multipart answers."""
    if line.status == 200:
        return 0, entry.size
    m = CONTENT_RANGE.fullmatch(line.content_range or "")
    if not m:
        return None
    start, end = int(m.group(1)), int(m.group(2))
    return start, end - start + 1


SOURCE_INFO = "softgoods.log_source"


@event.listens_for(Session, "before_flush")
def _tag_log_rows(session: Session, _context, _instances) -> None:
    """While ``record_line`` runs, the log rows the delivery rules write are nginx's, keyed by the line.

    The rules write their own row (``close_request``/``log_request``); tagging it here keeps their
    signatures as the sidecar uses them. The key is unique: a line recorded twice fails to flush."""
    source = session.info.get(SOURCE_INFO)
    if source is None:
        return
    for obj in session.new:
        if isinstance(obj, DownloadLog) and obj.source_key is None:
            obj.source, obj.source_key = source


def record_line(session: Session, line: LogLine, grant: UserDownload, entry: FileEntry,
                handoff: str | None = None) -> str:
    """Run one served request through the delivery rules; returns the outcome written."""
    session.info[SOURCE_INFO] = ("nginx", line.source_key)
    try:
        outcome = _apply_rules(session, line, grant, entry, handoff)
        session.flush()
    finally:
        session.info.pop(SOURCE_INFO, None)
    return outcome


def _apply_rules(session: Session, line: LogLine, grant: UserDownload, entry: FileEntry,
                 handoff: str | None) -> str:
    outcome = "complete" if line.complete else "aborted"
    span = _served_span(line, entry)
    if span is None:
        delivery.log_request(session, grant, entry.path, status=line.status, outcome="multipart",
                             client_ip=line.remote_addr, user_agent=line.user_agent,
                             range_header=line.http_range, now=line.at)
        outcome = "multipart"
    else:
        start, length = span
        # The sidecar reserved these bytes before handing them over; a line it did not (a reservation
        # released already, a link fetched again) runs through the rules at the time it started.
        reservation = handoffs.settle_for_line(session, grant, entry, start=start, length=length,
                                               token=handoff, now=line.at)
        try:
            reservation = reservation or delivery.open_request(session, grant, entry, start=start, length=length,
                                                               method=line.method, now=line.started)
        except DeliveryRefused as refusal:
            # nginx sent the bytes already; the record says the rules would not have counted them.
            outcome = f"refused-{refusal.status}"
            delivery.log_request(session, grant, entry.path, status=line.status, outcome=outcome,
                                 client_ip=line.remote_addr, user_agent=line.user_agent,
                                 range_header=line.http_range, now=line.at)
        else:
            delivery.close_request(session, reservation, min(line.body_bytes, length), status=line.status,
                                   outcome=outcome, client_ip=line.remote_addr, user_agent=line.user_agent,
                                   range_header=line.http_range, now=line.at)
    return outcome


def _release_unserved(session: Session, line: LogLine, secret: str) -> None:
    """A reserved symlink answered without the file (nginx's own 304, a 404 after a rename)."""
    found = resolve(session, line, secret=secret, accel=False)
    if found is not None and found[2] is not None:
        handoffs.release_unserved(session, *found, now=line.at)


def ingest_log(session: Session, path: str | Path, *, accel: bool | None = None,
               secret: str | None = None, state_file: str | Path | None = None) -> IngestReport:
    """Record every nginx delivery in the log at ``path`` that is not recorded yet.

    Commits in batches and at the end; with ``state_file``, remembers where it stopped (after the
    commit) so the next run starts there."""
    cfg = current_app.config
    accel = cfg["DELIVERY"] == "accel" if accel is None else accel
    secret = secret or cfg["SECRET_KEY"]
    path = Path(path)
    positions = ReadPositions(state_file)
    report = IngestReport(skipped_bytes=positions.start(path))
    pending = 0
    offset = report.skipped_bytes
    for raw, offset in read_lines(path, report.skipped_bytes):
        report.lines += 1
        line = parse_line(raw)
        if line is None:
            report.malformed += 1
            if report.malformed == report.lines and report.lines >= 3:
                raise LogFormatError(f"{path} is not an access log in the softgoods format "
                                     f"(log_format softgoods in deploy/nginx-sidecar.conf)")
            continue
        if line.method != "GET" or line.status not in (200, 206):
            report.not_deliveries += 1
            if line.method == "GET" and line.uri.startswith("/links/"):
                _release_unserved(session, line, secret)
            continue
        if session.scalar(select(DownloadLog.id).where(DownloadLog.source_key == line.source_key)):
            report.already += 1
            continue
        found = resolve(session, line, secret=secret, accel=accel)
        if found is None:
            if line.uri.startswith("/links/") or (accel and line.uri.startswith("/d/")):
                report.unmatched += 1
            else:
                report.not_deliveries += 1
            continue
        try:
            with session.begin_nested():
                outcome = record_line(session, line, *found)
        except IntegrityError:  # another ingester recorded this line a moment ago
            report.already += 1
            continue
        report.recorded += 1
        if outcome.startswith("refused"):
            report.refused.append(f"{line.uri[:80]}: {outcome}")
        pending += 1
        if pending >= COMMIT_EVERY:
            session.commit()
            positions.save(path, offset)
            pending = 0
    if report.lines and report.malformed == report.lines:
        raise LogFormatError(f"{path} is not an access log in the softgoods format "
                             f"(log_format softgoods in deploy/nginx-sidecar.conf)")
    session.commit()
    positions.save(path, offset)
    return report
