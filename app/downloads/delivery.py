"""Delivery rules: byte budgets, coverage evidence, counting, confirmation, shipping.

CONTRACT between the sidecar's serving code and these rules (see DESIGN.md "Delivery semantics"):

    reservation = open_request(session, grant, entry, start=..., length=..., method=..., now=None, parts=None)
        Called before the first byte of a file response (GET with body, full or ranged).
        Reserves ``length`` bytes against the grant's current delivery of this file (or starts a
        new delivery). A multipart answer is ONE reservation: ``parts`` its [start, end) parts in
        sending order, ``length`` their sum (ranges.py caps them at 16). Raises DownloadsExhausted when a *new* delivery would pass this file's max_downloads,
        LinkExpired when the link expired and no delivery that started before expiry is unfinished.
        The caller commits right away (so concurrent requests see the reservation).

    close_request(session, reservation, bytes_sent, *, status, outcome, client_ip, user_agent, range_header)
        Called once when the response body is closed (complete or broken off) with the number of
        bytes that really left. Records the interval, releases the unsent part of the reservation,
        writes the download_log row, counts the delivery when coverage completes, moves the order
        to shipped when every file has evidence. The caller commits.

    log_request(session, grant, path, *, status, outcome, ...)  -- HEAD, 304, refusals: log only.

    confirm(session, grant, entry, sha256, proof, download_dir=...) -> str  -- the client's proof of
        possession (app.downloads.proof); "verified", or InvalidInput / DigestMismatch / ProofMismatch.

    grace_allows(session, grant, entry=None, now=None) -- may an expired link still finish a delivery
        that started before expiry (this file's, or any with entry=None: listing, Metalink, confirm)?
    release_stale_deliveries(session, now)           -- for the purge: idle unfinished slots go back.

HOW A DOWNLOAD IS COUNTED (the decisions, so nobody has to re-derive them)

* A *delivery* is one attempt to hand one file version (grant, sku, path, sha256) to the shopper.
  Per file version at most one delivery is *current* (not ``closed``); every file request joins the
  current delivery while its byte budget (``DELIVERY_BUDGET_FACTOR`` x size) has room.
* The limit is PER FILE: each file (sku, path) of a grant may be completely delivered
  ``max_downloads`` times; a product of 3 files with ``max_downloads=2`` delivers each file twice.
  A file's slots in use are its deliveries that are ``counted`` or ``holds_slot``.
* The slot is taken when a delivery STARTS: ``downloads_held`` goes up by a conditional UPDATE
  (``... WHERE id = :g AND (max_downloads IS NULL OR (SELECT count(*) FROM deliveries WHERE grant_id
  = :g AND sku = :sku AND path = :path AND (counted OR holds_slot)) < max_downloads)``, rowcount
  checked), so the limit holds before any byte leaves and under any concurrency. This is correct on
  PostgreSQL READ COMMITTED only because the grant row is locked by an EARLIER statement of the same
  transaction (``_lock_grant``): each statement takes a fresh snapshot, so the UPDATE's sub-select
  sees every delivery committed by the previous holder of the lock. Were the lock taken by the UPDATE
  itself, a waiter would re-check only the grant row after the wait (EvalPlanQual) and count the
  deliveries from its old snapshot: concurrent requests would pass the limit (checked: without the
  earlier lock the 20-vs-3 test of test_counting_rules serves more than 3 on PostgreSQL). It also
  relies on every writer of a delivery holding its grant's lock (see "Locks" below). On SQLite the
  first write takes the database write lock, so the sub-select reads the latest state. When the
  delivery is counted (coverage complete, or a matching confirm) its held slot becomes a used one
  (``downloads_used`` + 1, ``downloads_held`` - 1). ``downloads_used``/``downloads_held`` are the
  grant's totals over all files (what the owner sees); ``access.file_downloads_left`` gives a file's
  ``max_downloads`` - its counted deliveries (the listing's ``downloads_left``).
* Unfinished deliveries give their slot back, so partial transfers never use up a download:
  - a restart that does not fit the budget of an unfinished delivery with nothing in flight
    *continues* it: the new delivery inherits its coverage and its slot (no second count);
  - a newer version of the file (the shop replaced it) releases unfinished deliveries of older ones,
    and a delivery that completes after its version was replaced is recorded but not counted;
  - an unfinished delivery that carried only scanner-sized bytes gives its slot back as soon as its
    last request ends (a resume takes one again);
  - when a file has no slot left and a new delivery of it is asked for, an unfinished delivery of the
    same grant and file that is idle for ``DELIVERY_STALE_SECONDS`` or carried only scanner-sized bytes
    (< ``SCANNER_BYTES``, nothing in flight) gives its slot to the new one; ``release_stale_deliveries``
    (run by the purge) does the same for idle ones so ``downloads_left`` reads right.
  A delivery that lost its slot and is resumed later must take a slot again (403 if none is left).
* Two full copies, at once or one after the other, are two deliveries: a request that does not fit
  the budget of a *finished* delivery, or of one with requests still in flight, starts a new one.
* Reservation: ``charged_bytes`` grows by the request's length before the first byte; on close a
  complete request keeps its length, a broken-off one keeps only what it sent beyond
  ``INFLIGHT_ALLOWANCE`` (socket buffers and read-ahead proxies lose that much). So the bytes one
  delivery carries never pass its budget, whatever the concurrency and arrival order: a request that
  does not fit starts a new delivery (a slot, or 403 before any byte).
* A request in flight is presumed dead only on evidence (``app.downloads.inflight``): its worker
  process is gone (each range records host, pid and the process's start time), or it showed no
  progress for ``INFLIGHT_IDLE_SECONDS`` (60; the serving side's heartbeat refreshes a moving
  transfer's range every 20 s). Never because a newer request overlaps it: issue 12's twelve
  ``Range: bytes=k-`` requests, unread, were twelve copies under that old rule. The evidence is
  looked at only when a request does not fit the budget (the common GET reads no /proc). A dead
  request that the new one starts strictly inside broke off there at the latest (the client resumes
  from what it got) and keeps only what it sent beyond the allowance, so a SIGKILLed sidecar's
  orphaned reservation does not eat the budget and its resume costs no second download.
* A multipart request (at most 16 parts after coalescing) makes one reservation of the sum of its
  parts and one log row; settling records the coverage of each part as far as its bytes left (the
  parts leave in order, so ``bytes_sent`` says which).
* ``confirm`` upgrades the file version's best delivery to ``verified`` (counting it once if it was
  not yet); with no delivery at all (bytes that came another way) it records one, counted only if the
  limit allows. Known limit: deliberately incomplete range requests, repeated, can fetch more bytes
  than one copy without completing a delivery; each is in the download log with its address.
* Locks, always in this order: grant row -> delivery row -> order row (no deadlock on PostgreSQL;
  on SQLite the first write takes the database write lock, so the rules run one at a time). Every
  writer of a delivery holds its grant's lock first, so the file-request path reads deliveries
  under the grant lock without locking them again.
* Where the rows live: ``reserve`` and ``settle`` hold the rules and reach their rows through a store:
  ``OrmStore`` (the session; ``open_request``/``close_request`` wrap it) or, for the sidecar's fast
  path, ``fast_store.RawStore`` (the same statements on a bare DBAPI connection: ~0.5 ms of CPU per
  4 KiB GET instead of ~3.7 ms). A GET runs a fixed number of statements whatever the number of files:
  before the first byte the file's deliveries, the slot and the INSERT (+ closing a finished delivery);
  after the last the delivery (+ index, order), the count, the UPDATE, the log row, plus one EXISTS
  while the order is pending (the order-wide ``maybe_ship`` runs only once that grant has evidence for
  every file, and only through the ORM). tests/sidecar/test_fast_path.py holds the budget and compares
  the rows both stores write.
"""
from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import SimpleNamespace

from flask import current_app, has_app_context
from sqlalchemy import bindparam, func, or_, select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.util import identity_key

from app.downloads import inflight, proof
from app.downloads.errors import DigestMismatch, DownloadsExhausted, FileUnavailable, InvalidInput, LinkExpired
from app.downloads.evidence import add_interval, covered, maybe_ship, order_evidence, parse_intervals
from app.downloads.models import Delivery, DownloadLog, FileEntry, UserDownload
from app.store.models import Order
from app.timeutil import utcnow

__all__ = ["Reservation", "open_request", "close_request", "log_request", "confirm", "grace_allows",
           "release_stale_deliveries", "order_evidence", "maybe_ship", "record_progress"]

SCANNER_BYTES = 64 * 1024  # what a link scanner or preview fetches; never worth a download
SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
# A file request past its file's limit (the listing's 403 says "of this link": every file is used up).
FILE_USED_UP = "All downloads of this file have been used."

DEFAULTS = {"DELIVERY_BUDGET_FACTOR": 1.5, "INFLIGHT_ALLOWANCE": 16 * 1024 * 1024,
            "EXPIRY_GRACE_SECONDS": 3600, "DELIVERY_STALE_SECONDS": 3600,
            "INFLIGHT_IDLE_SECONDS": inflight.IDLE_SECONDS}


def setting(name: str):
    if has_app_context():
        return current_app.config.get(name, DEFAULTS[name])
    return DEFAULTS[name]


@dataclass
class Reservation:
    grant_id: int
    order_po: str | None
    sku: str
    path: str
    start: int
    length: int
    delivery_id: int | None = None
    method: str = "GET"
    token: str = field(default_factory=lambda: secrets.token_hex(8))
    # The grant's files are "every file of this SKU" (a plain product, not a package or a class
    # entitlement): the closing side can then tell cheaply whether the grant still lacks evidence.
    product_sku: str | None = None
    # A multipart answer: its parts [start, end) in the order they are sent (``start``/``length`` are
    # then the first part's start and the sum of the parts: one reservation, one log row per request).
    parts: tuple[tuple[int, int], ...] | None = None

    @property
    def end(self) -> int:
        return self.parts[-1][1] if self.parts else self.start + self.length

    def sent_intervals(self, bytes_sent: int) -> list[tuple[int, int]]:
        """What ``bytes_sent`` bytes covered: parts leave one after the other, each from its start."""
        out = []
        for start, end in self.parts or ((self.start, self.start + self.length),):
            take = min(bytes_sent, end - start)
            if take > 0:
                out.append((start, start + take))
            bytes_sent -= take
        return out


# -- locks and slots -------------------------------------------------------------------------------

# The statements of the file-request path are built once, with bound parameters: building an
# expression and its cache key costs more CPU than SQLite takes to run it (measured, 4 KiB files).
_GRANT_ID = bindparam("grant_id")
_NO_SYNC = {"synchronize_session": False}


# A file's slots in use: its deliveries under this grant that are counted or hold a slot.
_FILE_SLOTS_IN_USE = (select(func.count(Delivery.id)).where(
    Delivery.grant_id == _GRANT_ID, Delivery.sku == bindparam("file_sku"), Delivery.path == bindparam("file_path"),
    or_(Delivery.counted.is_(True), Delivery.holds_slot.is_(True))).scalar_subquery())


def _file_within_limit():
    """The per-file limit as a WHERE clause on the grant row (run only after ``_lock_grant``: see above)."""
    return or_(UserDownload.max_downloads.is_(None), _FILE_SLOTS_IN_USE < UserDownload.max_downloads)


_LOCK_GRANT = (update(UserDownload).where(UserDownload.id == _GRANT_ID)
               .values(downloads_used=UserDownload.downloads_used).execution_options(**_NO_SYNC))
_TAKE_SLOT = (update(UserDownload).where(UserDownload.id == _GRANT_ID, _file_within_limit())
              .values(downloads_held=UserDownload.downloads_held + 1).execution_options(**_NO_SYNC))
_GIVE_SLOT = (update(UserDownload).where(UserDownload.id == _GRANT_ID, UserDownload.downloads_held > 0)
              .values(downloads_held=UserDownload.downloads_held - 1).execution_options(**_NO_SYNC))
_COUNT_HELD = (update(UserDownload).where(UserDownload.id == _GRANT_ID)
               .values(downloads_used=UserDownload.downloads_used + 1,
                       downloads_held=UserDownload.downloads_held - 1).execution_options(**_NO_SYNC))
_COUNT_IF_ROOM = (update(UserDownload).where(UserDownload.id == _GRANT_ID, _file_within_limit())
                  .values(downloads_used=UserDownload.downloads_used + 1).execution_options(**_NO_SYNC))


def _lock_grant(session: Session, grant_id: int) -> None:
    """Serialize the rules per grant: a row lock on PostgreSQL, the write lock on SQLite."""
    session.execute(_LOCK_GRANT, {"grant_id": grant_id})


def _lock_delivery(session: Session, delivery_id: int) -> Delivery:
    session.execute(update(Delivery).where(Delivery.id == delivery_id).values(closed=Delivery.closed)
                    .execution_options(synchronize_session=False))
    return session.execute(select(Delivery).where(Delivery.id == delivery_id)
                           .execution_options(populate_existing=True)).scalar_one()


def _take_slot(session: Session, grant_id: int, entry) -> bool:
    """Hold one download of this file for a delivery that starts, if its limit allows: one conditional
    UPDATE (never read-then-write), so concurrent requests can never pass max_downloads for a file."""
    result = session.execute(_TAKE_SLOT, {"grant_id": grant_id, "file_sku": entry.sku, "file_path": entry.path})
    _stale_counters(session, grant_id)
    return result.rowcount == 1


def _give_slot(session: Session, grant_id: int) -> None:
    session.execute(_GIVE_SLOT, {"grant_id": grant_id})
    _stale_counters(session, grant_id)


def _stale_counters(session: Session, grant_id: int) -> None:
    grant = session.identity_map.get(identity_key(UserDownload, grant_id))
    if grant is not None:  # only a copy this session already holds can be stale; none is loaded for this
        session.expire(grant, ["downloads_used", "downloads_held"])


def _count(store, grant_id: int, delivery) -> None:
    """A delivery finished: its held slot becomes a used download. One that had given its slot back
    counts only if its file's limit still allows (conditional UPDATE again)."""
    if delivery.counted:
        return
    if delivery.holds_slot:
        store.count_held(grant_id)
        delivery.counted, delivery.holds_slot = True, False
    else:
        delivery.counted = store.count_if_room(grant_id, delivery)


# -- requests in flight (Delivery.open_ranges: see app.downloads.inflight) ------------------------

def _ranges(delivery: Delivery) -> list[list]:
    return json.loads(delivery.open_ranges or "[]")


def _live_in_flight(delivery: Delivery, now: datetime) -> bool:
    """Requests that may still be sending: none presumed dead on evidence (inflight.is_live)."""
    idle = setting("INFLIGHT_IDLE_SECONDS")
    return any(inflight.is_live(r, now, idle) for r in _ranges(delivery))


def _drop_dead(delivery: Delivery, start: int, allowance: int, now: datetime) -> None:
    """Requests in flight whose worker is gone or that sent nothing for INFLIGHT_IDLE_SECONDS are
    presumed broken off. One that the new request starts strictly inside broke off there at the
    latest (the client resumes from what it got), so it keeps only what it sent beyond the
    allowance; any other keeps its charge. A live request is never touched, however it overlaps."""
    idle = setting("INFLIGHT_IDLE_SECONDS")
    ranges = _ranges(delivery)
    for r in ranges:
        if r[4] or inflight.is_live(r, now, idle):
            continue
        r_start, r_end, charge = r[1], r[2], r[3]
        if r_start < start < r_end:
            kept = min(charge, max(0, (start - r_start) - allowance))
            delivery.charged_bytes -= charge - kept
            r[2], r[3] = start, kept
        r[4] = True
    delivery.open_ranges = json.dumps(ranges)


def _reserve(delivery: Delivery, reservation: Reservation, now: datetime) -> None:
    ranges = _ranges(delivery)
    ranges.append(inflight.new_range(reservation.token, reservation.start, reservation.end,
                                     reservation.length, now))
    delivery.open_ranges = json.dumps(ranges)
    delivery.charged_bytes += reservation.length
    delivery.attempts += 1
    delivery.last_activity_at = now
    reservation.delivery_id = delivery.id


def _unfinished(delivery: Delivery) -> bool:
    return delivery.evidence is None and not delivery.counted


def _reclaimable(delivery: Delivery, now: datetime, stale_seconds: int) -> bool:
    """An unfinished delivery whose slot another delivery of the same grant may take."""
    if not (delivery.holds_slot and _unfinished(delivery)) or _live_in_flight(delivery, now):
        return False
    idle = delivery.last_activity_at is None or now - delivery.last_activity_at >= timedelta(seconds=stale_seconds)
    return idle or delivery.covered_bytes < SCANNER_BYTES


_SLOT_HOLDERS = (select(Delivery).where(
    Delivery.grant_id == _GRANT_ID, Delivery.sku == bindparam("sku"), Delivery.path == bindparam("path"),
    Delivery.holds_slot.is_(True), Delivery.counted.is_(False))
    .order_by(Delivery.last_activity_at).execution_options(populate_existing=True))

_FILE_DELIVERIES = (select(Delivery).where(
    Delivery.grant_id == _GRANT_ID, Delivery.path == bindparam("path"), Delivery.sku == bindparam("sku"),
    or_(Delivery.closed.is_(False), (Delivery.holds_slot.is_(True) & Delivery.counted.is_(False))))
    .order_by(Delivery.id.desc()).execution_options(populate_existing=True))

_CLOSING_DELIVERY = (select(Delivery, FileEntry.sha256, UserDownload.order_id, Order.status)
                     .join(UserDownload, UserDownload.id == Delivery.grant_id)
                     .join(Order, Order.id == UserDownload.order_id)
                     .outerjoin(FileEntry, (FileEntry.sku == Delivery.sku) & (FileEntry.path == Delivery.path))
                     .where(Delivery.id == bindparam("delivery_id")).execution_options(populate_existing=True))

_PRODUCT_FILE_LACKS_EVIDENCE = select(
    select(FileEntry.id).where(
        FileEntry.sku == bindparam("sku"), FileEntry.missing.is_(False),
        ~select(Delivery.id).where(Delivery.grant_id == _GRANT_ID, Delivery.sku == FileEntry.sku,
                                   Delivery.path == FileEntry.path, Delivery.evidence.is_not(None)).exists())
    .exists())


class OrmStore:
    """Where ``reserve`` and ``settle`` keep their rows: the ORM session, for every case. The sidecar's
    fast path (``app.downloads.fast_store.RawStore``) offers the same methods on a bare DBAPI
    connection for the common cases, so one set of rules decides for both."""

    def __init__(self, session: Session):
        self.session = session

    def lock_grant(self, grant_id: int) -> None:
        _lock_grant(self.session, grant_id)

    def file_deliveries(self, grant_id: int, entry) -> list[Delivery]:
        """Under the grant lock: this file's deliveries that are not closed or still hold a slot, newest first."""
        return self.session.scalars(_FILE_DELIVERIES, {"grant_id": grant_id, "sku": entry.sku,
                                                       "path": entry.path}).all()

    def slot_holders(self, grant_id: int, entry) -> list[Delivery]:
        """This file's uncounted deliveries that hold a slot, least recently active first."""
        return self.session.scalars(_SLOT_HOLDERS, {"grant_id": grant_id, "sku": entry.sku,
                                                    "path": entry.path}).all()

    def take_slot(self, grant_id: int, entry) -> bool:
        return _take_slot(self.session, grant_id, entry)

    def give_slot(self, grant_id: int) -> None:
        _give_slot(self.session, grant_id)

    def count_held(self, grant_id: int) -> None:
        self.session.execute(_COUNT_HELD, {"grant_id": grant_id})
        _stale_counters(self.session, grant_id)

    def count_if_room(self, grant_id: int, delivery: Delivery) -> bool:
        """Count a delivery that holds no slot, if its file's limit allows."""
        result = self.session.execute(_COUNT_IF_ROOM, {"grant_id": grant_id, "file_sku": delivery.sku,
                                                       "file_path": delivery.path})
        _stale_counters(self.session, grant_id)
        return result.rowcount == 1

    def insert_delivery(self, **columns) -> Delivery:
        delivery = Delivery(**columns)
        self.session.add(delivery)
        self.session.flush()
        return delivery

    def flush(self) -> None:
        self.session.flush()

    def closing_delivery(self, delivery_id: int) -> tuple[Delivery, str | None, int, str]:
        """Under the grant lock: the delivery, the file version the index has now, its order's id and state."""
        return tuple(self.session.execute(_CLOSING_DELIVERY, {"delivery_id": delivery_id}).one())

    def add_log(self, **columns) -> None:
        self.session.add(DownloadLog(**columns))

    def grant_lacks_evidence(self, grant_id: int, sku: str) -> bool:
        return bool(self.session.scalar(_PRODUCT_FILE_LACKS_EVIDENCE, {"grant_id": grant_id, "sku": sku}))

    def ship_if_complete(self, order_id: int, now: datetime) -> None:
        maybe_ship(self.session, order_id, now)


def _reclaim_slot(store, grant_id: int, entry, now: datetime) -> bool:
    """Move a slot from an unfinished delivery of the same file (older file version, idle, or
    scanner-sized) to a new one: the limit is per file, so only that file's slots can change hands."""
    stale = setting("DELIVERY_STALE_SECONDS")
    for old in store.slot_holders(grant_id, entry):
        older_version = old.sha256 != entry.sha256
        if (older_version and _unfinished(old)) or _reclaimable(old, now, stale):
            old.holds_slot = False
            old.closed = True
            return True
    return False


def _release_older_versions(store, grant_id: int, older: list) -> None:
    """The shop replaced the file: unfinished deliveries of the old version give their slot back."""
    for old in older:
        if old.holds_slot and not old.counted:
            old.holds_slot = False
            old.closed = True
            store.give_slot(grant_id)


# -- the contract ----------------------------------------------------------------------------------

def _grace_covers(grant: UserDownload, delivery: Delivery | None, now: datetime) -> bool:
    if grant.status == "revoked" or now > grant.expires_at + timedelta(seconds=setting("EXPIRY_GRACE_SECONDS")):
        return False
    return delivery is not None and delivery.started_at < grant.expires_at and _unfinished(delivery)


def grace_allows(session: Session, grant: UserDownload, entry: FileEntry | None = None,
                 now: datetime | None = None) -> bool:
    """May an expired link still be used, within EXPIRY_GRACE_SECONDS after expiry?

    Yes for a delivery that started before the link expired and had not finished when it expired
    (of this file, or with ``entry=None`` of any file of the grant): its bytes may still flow, and
    the listing, the file's Metalink and its confirmation keep answering, so a verifying client can
    resume, check and prove it. ``open_request`` still never starts a new delivery after expiry.
    """
    now = now or utcnow()
    if grant.status == "revoked" or now > grant.expires_at + timedelta(seconds=setting("EXPIRY_GRACE_SECONDS")):
        return False
    query = select(Delivery.id).where(
        Delivery.grant_id == grant.id, Delivery.started_at < grant.expires_at,
        or_(Delivery.evidence.is_(None) & Delivery.counted.is_(False) & Delivery.closed.is_(False),
            Delivery.completed_at >= grant.expires_at))
    if entry is not None:
        query = query.where(Delivery.sku == entry.sku, Delivery.path == entry.path, Delivery.sha256 == entry.sha256)
    return session.scalar(query.limit(1)) is not None


def open_request(session: Session, grant: UserDownload, entry: FileEntry, *, start: int, length: int,
                 method: str = "GET", now: datetime | None = None,
                 parts: tuple[tuple[int, int], ...] | None = None) -> Reservation:
    reservation = Reservation(grant.id, grant.order.po_number, entry.sku, entry.path, start, length, method=method,
                              product_sku=_plain_product_sku(grant), parts=parts)
    return reserve(OrmStore(session), grant, entry, reservation, now or utcnow())


def reserve(store, grant, entry, reservation: Reservation, now: datetime) -> Reservation:
    """The rules of ``open_request`` on any store: ``grant`` needs id, status and expires_at, ``entry``
    sku, path, sha256 and size (ORM objects or the fast path's plain rows)."""
    start, length = reservation.start, reservation.length
    for part_start, part_end in reservation.parts or ((start, start + length),):
        if part_start < 0 or part_end < part_start or part_end > entry.size:
            raise InvalidInput(f"bytes {part_start}-{part_end} are outside the file ({entry.size} bytes)", status=416)
    expired = grant.expires_at <= now
    store.lock_grant(grant.id)
    # Under the grant lock every writer of these rows waits (locks: grant -> delivery -> order), so a
    # plain read sees the committed state: no separate delivery lock needed.
    rows = store.file_deliveries(grant.id, entry)
    delivery = next((d for d in rows if d.sha256 == entry.sha256 and not d.closed), None)
    older = [d for d in rows if d.sha256 != entry.sha256]
    if expired and not _grace_covers(grant, delivery, now):
        raise LinkExpired(grant.expires_at)
    if delivery is not None:
        if delivery.charged_bytes + length > delivery.budget_bytes:  # only evidence of a dead request frees budget
            _drop_dead(delivery, start, setting("INFLIGHT_ALLOWANCE"), now)
        if delivery.charged_bytes + length <= delivery.budget_bytes:
            if _unfinished(delivery) and not delivery.holds_slot:  # gave its slot back while idle
                if not (store.take_slot(grant.id, entry) or _reclaim_slot(store, grant.id, entry, now)):
                    raise DownloadsExhausted(FILE_USED_UP)
                delivery.holds_slot = True
            _reserve(delivery, reservation, now)
            store.flush()
            return reservation
    if expired:  # the grace finishes deliveries, it never starts one
        raise LinkExpired(grant.expires_at)
    inherit = (delivery is not None and delivery.holds_slot and _unfinished(delivery)
               and not _live_in_flight(delivery, now))
    if not inherit and not (store.take_slot(grant.id, entry) or _reclaim_slot(store, grant.id, entry, now)):
        raise DownloadsExhausted(FILE_USED_UP)
    coverage: list[list[int]] = []
    if delivery is not None:
        delivery.closed = True
        if inherit:  # a restart of an unfinished delivery continues it: same slot, same coverage
            delivery.holds_slot = False
            coverage = parse_intervals(delivery.coverage)
    _release_older_versions(store, grant.id, older)
    budget = max(entry.size, int(entry.size * setting("DELIVERY_BUDGET_FACTOR")))
    born = SimpleNamespace(id=None, grant_id=grant.id, sku=entry.sku, path=entry.path, sha256=entry.sha256,
                           size=entry.size, budget_bytes=budget, charged_bytes=0, coverage=json.dumps(coverage),
                           covered_bytes=covered(coverage), evidence=None, counted=False, attempts=0,
                           holds_slot=True, closed=False, open_ranges="[]", last_activity_at=None, started_at=now,
                           completed_at=None, verified_at=None)
    _reserve(born, reservation, now)  # born with this request's reservation: one INSERT, no UPDATE after it
    del born.id
    new = store.insert_delivery(**vars(born))
    store.flush()
    reservation.delivery_id = new.id
    return reservation


def close_request(session: Session, reservation: Reservation, bytes_sent: int, *, status: int, outcome: str,
                  client_ip: str | None, user_agent: str | None, range_header: str | None,
                  now: datetime | None = None) -> None:
    with session.no_autoflush:  # one UPDATE of the delivery at the end, not one per rule that touches it
        settle(OrmStore(session), reservation, bytes_sent, status=status, outcome=outcome, client_ip=client_ip,
               user_agent=user_agent, range_header=range_header, now=now or utcnow())


def settle(store, reservation: Reservation, bytes_sent: int, *, status: int, outcome: str, client_ip: str | None,
           user_agent: str | None, range_header: str | None, now: datetime) -> None:
    """The rules of ``close_request`` on any store (see ``reserve``)."""
    bytes_sent = max(0, min(bytes_sent, reservation.length))
    store.add_log(grant_id=reservation.grant_id, delivery_id=reservation.delivery_id, order_po=reservation.order_po,
                  path=reservation.path, client_ip=client_ip, user_agent=(user_agent or "")[:300],
                  method=reservation.method, range_header=range_header[:200] if range_header else None,
                  status=status, start_offset=reservation.start, bytes_sent=bytes_sent, outcome=outcome, at=now)
    if reservation.delivery_id is None:
        return
    store.lock_grant(reservation.grant_id)
    # One read under the grant lock: the delivery, the file version the index has now, the order's state.
    delivery, indexed_sha256, order_id, order_status = store.closing_delivery(reservation.delivery_id)
    delivery.last_activity_at = now
    complete = bytes_sent >= reservation.length
    kept = reservation.length if complete else max(0, bytes_sent - setting("INFLIGHT_ALLOWANCE"))
    ranges = _ranges(delivery)
    mine = next((r for r in ranges if r[0] == reservation.token), None)
    if mine is not None:
        ranges.remove(mine)
        delivery.charged_bytes += kept - mine[3]
    delivery.open_ranges = json.dumps(ranges)
    intervals = parse_intervals(delivery.coverage)
    for part_start, part_end in reservation.sent_intervals(bytes_sent):
        intervals = add_interval(intervals, part_start, part_end)
    delivery.coverage = json.dumps(intervals)
    delivery.covered_bytes = covered(intervals)
    whole = delivery.covered_bytes >= delivery.size and (delivery.size > 0 or complete)
    finished_now = whole and delivery.evidence is None
    if finished_now:
        delivery.evidence = "transferred"
        delivery.completed_at = now
        if indexed_sha256 is None or indexed_sha256 == delivery.sha256:
            _count(store, reservation.grant_id, delivery)
        elif delivery.holds_slot:  # replaced by the shop while on its way: the shopper fetches the new one
            delivery.holds_slot = False
            store.give_slot(reservation.grant_id)
    elif (delivery.holds_slot and _unfinished(delivery) and delivery.covered_bytes < SCANNER_BYTES
          and not _live_in_flight(delivery, now)):
        # A peek (scanner, preview, a download manager's surplus connection) holds no slot once it ends.
        delivery.holds_slot = False
        store.give_slot(reservation.grant_id)
    store.flush()
    # A shipped order already has at least "transferred" evidence: another transfer cannot change it
    # (only every file's client proof raises it, in confirm). So the whole-order check runs only when
    # a delivery just completed for an order that is still pending.
    # And a grant that still lacks evidence for one of its files keeps its order pending: that is one
    # EXISTS query (under this grant's lock its files' evidence cannot change), not the order-wide check.
    if finished_now and order_status != "shipped" and not (
            reservation.product_sku is not None
            and store.grant_lacks_evidence(reservation.grant_id, reservation.product_sku)):
        store.ship_if_complete(order_id, now)


def record_progress(session: Session, reservation: Reservation, now: datetime | None = None) -> None:
    """A long transfer is still moving bytes (inflight.Heartbeat): its range is not idle."""
    if reservation.delivery_id is None:
        return
    _lock_grant(session, reservation.grant_id)
    found = session.get(Delivery, reservation.delivery_id, populate_existing=True)
    ranges = _ranges(found) if found is not None else []
    if inflight.touch(ranges, reservation.token, now or utcnow()):
        found.open_ranges = json.dumps(ranges)


def _plain_product_sku(grant: UserDownload) -> str | None:
    if grant.entitlement_class or (grant.product is not None and grant.product.package is not None):
        return None
    return grant.sku


def log_request(session: Session, grant: UserDownload | None, path: str, *, status: int, outcome: str,
                client_ip: str | None, user_agent: str | None, range_header: str | None = None,
                method: str = "GET", now: datetime | None = None) -> None:
    session.add(DownloadLog(grant_id=grant.id if grant else None,
                            order_po=grant.order.po_number if grant else None, path=path[:1024],
                            client_ip=client_ip, user_agent=(user_agent or "")[:300], method=method[:8],
                            range_header=range_header[:200] if range_header else None, status=status,
                            bytes_sent=0, outcome=outcome, at=now or utcnow()))


def confirm(session: Session, grant: UserDownload, entry: FileEntry, sha256: str, proof_hex: str | None, *,
            download_dir: str, now: datetime | None = None) -> str:
    """The client's proof of possession (app.downloads.proof). A matching proof records ``verified``
    (counting the delivery once if it was not yet) and replaces the file's nonce; a missing proof is
    InvalidInput (422), a wrong digest or proof DigestMismatch/ProofMismatch (409), and change nothing
    but the kept expected proof of the current nonce (the caller commits it, so a retry reads no file)."""
    now = now or utcnow()
    if not isinstance(sha256, str) or not SHA256_HEX.fullmatch(sha256):
        raise InvalidInput("sha256 must be 64 hexadecimal digits", status=400)
    proof_hex = proof.checked_proof(proof_hex)
    if entry.flagged:
        raise FileUnavailable("This file failed the shop's integrity check, so it cannot be confirmed.",
                              advice="The shop has been told. Please try again later.")
    if sha256.lower() != entry.sha256:
        raise DigestMismatch()
    nonce = proof.check_proof(session, grant, entry, proof_hex, download_dir)  # reads the file: before any lock
    _lock_grant(session, grant.id)
    proof.spend_nonce(session, grant, entry, nonce)
    delivery = session.scalars(select(Delivery).where(
        Delivery.grant_id == grant.id, Delivery.sku == entry.sku, Delivery.path == entry.path,
        Delivery.sha256 == entry.sha256).order_by(Delivery.evidence.is_(None), Delivery.id.desc()).limit(1)
        .execution_options(populate_existing=True)).first()
    if delivery is None:  # the bytes came another way (accel, a copy): the proof still ships
        budget = max(entry.size, int(entry.size * setting("DELIVERY_BUDGET_FACTOR")))
        delivery = Delivery(grant_id=grant.id, sku=entry.sku, path=entry.path, sha256=entry.sha256,
                            size=entry.size, budget_bytes=budget, charged_bytes=0, coverage="[]",
                            covered_bytes=0, attempts=0, holds_slot=False, closed=False, open_ranges="[]",
                            started_at=now, last_activity_at=now)
        session.add(delivery)
        session.flush()
    delivery = _lock_delivery(session, delivery.id)
    if delivery.evidence == "verified":
        return "verified"
    _count(OrmStore(session), grant.id, delivery)
    delivery.evidence = "verified"
    delivery.verified_at = now
    delivery.completed_at = delivery.completed_at or now
    session.flush()
    maybe_ship(session, grant.order_id, now)
    return "verified"


def release_stale_deliveries(session: Session, now: datetime | None = None, *, dry_run: bool = False) -> int:
    """Give back the slots of unfinished deliveries idle for DELIVERY_STALE_SECONDS (the purge calls this).
    ``dry_run`` counts the slots the same test would release, and locks and changes nothing."""
    now = now or utcnow()
    stale = timedelta(seconds=setting("DELIVERY_STALE_SECONDS"))
    released = 0
    ids = session.scalars(select(Delivery.id).where(
        Delivery.holds_slot.is_(True), Delivery.counted.is_(False), Delivery.evidence.is_(None),
        or_(Delivery.last_activity_at.is_(None), Delivery.last_activity_at < now - stale))).all()
    if dry_run:
        return sum(1 for d in session.scalars(select(Delivery).where(Delivery.id.in_(ids)))
                   if _unfinished(d) and not _live_in_flight(d, now))
    for delivery_id in ids:
        grant_id = session.scalar(select(Delivery.grant_id).where(Delivery.id == delivery_id))
        _lock_grant(session, grant_id)
        delivery = _lock_delivery(session, delivery_id)
        if delivery.holds_slot and _unfinished(delivery) and not _live_in_flight(delivery, now):
            delivery.holds_slot = False
            _give_slot(session, grant_id)
            released += 1
        session.flush()
    return released


def requests_in_flight(session: Session, grant_id: int, now: datetime | None = None) -> bool:
    """Whether a file request of this grant may still be sending, or has sent its last byte and its
    close is not yet recorded (the listing waits a moment for those: README, "Freshness")."""
    now = now or utcnow()
    open_deliveries = session.scalars(select(Delivery).where(Delivery.grant_id == grant_id,
                                                             Delivery.open_ranges != "[]"))
    return any(_live_in_flight(d, now) for d in open_deliveries)
