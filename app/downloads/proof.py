"""Proof of possession (DESIGN.md "Proof of possession"): the published SHA-256 proves nothing, so a
confirm must carry ``proof`` = hex HMAC-SHA256 over the file's bytes, keyed with
``bytes.fromhex(proof_nonce)``, the nonce the listing gives for this grant and file.

* A nonce is random (32 bytes), one per grant and file (``ProofNonce``), created when the listing
  first shows the file and replaced after each successful confirm: a proof is good for one confirm
  (no replay), and a proof made with another grant's or another file's nonce, or over other bytes,
  matches nothing.
* Checking a proof costs one full read of the file (HMAC-SHA256 at ~1.2 GiB/s per core: ~0.9 s of
  CPU for 1 GiB). It is bounded: malformed proofs, a wrong SHA-256, a flagged file or a file with no
  nonce issued are refused without reading; the expected proof is computed at most once per nonce
  and file version and kept (as its SHA-256) in the nonce's row, so repeated wrong proofs cost a
  lookup, and a new nonce comes only after a successful confirm (which needs the bytes); at most
  ``PROOF_READERS_PER_PROCESS`` reads run at once per sidecar process, the rest wait their turn
  (503 after ``PROOF_WAIT_SECONDS``). The read happens before the grant is locked.
* So that a confirm of a large file does not keep its client waiting for that read (0.75 s per GiB
  here, on top of the download), the sidecar computes the expected proof in the background while
  the file is being sent (``ProofPrecomputer``): a GET from byte 0 of a file of at least
  ``PRECOMPUTE_MIN_BYTES`` whose listed nonce has no expected proof yet queues one computation
  (one reader per process, at most once per nonce and file version).
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import threading

from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from app.downloads.access import real_path
from app.downloads.background import KeyedWorker
from app.downloads.errors import DeliveryRefused, FileUnavailable, InvalidInput, ProofMismatch
from app.downloads.models import FileEntry, ProofNonce, UserDownload

PROOF_HEX = re.compile(r"[0-9a-fA-F]{64}")
NONCE_BYTES = 32
READ_BLOCK = 1 << 20
PROOF_READERS_PER_PROCESS = 1  # a full-file read each: one at a time keeps the disk for downloads
PROOF_WAIT_SECONDS = 60
PRECOMPUTE_MIN_BYTES = 32 << 20  # below this, the confirm's own read takes a few milliseconds
PRECOMPUTE_MAX_PENDING = 100
_readers = threading.BoundedSemaphore(PROOF_READERS_PER_PROCESS)
log = logging.getLogger(__name__)


def new_nonce() -> str:
    return secrets.token_hex(NONCE_BYTES)


def nonces_for(session: Session, grant: UserDownload,
               entries: list[FileEntry]) -> tuple[dict[tuple[str, str], str], bool]:
    """The current nonce of each listed file, {(sku, path): nonce}, and whether missing ones were
    created (then the caller commits). Concurrent listings may race to create a row: the first wins."""
    query = select(ProofNonce.sku, ProofNonce.path, ProofNonce.nonce).where(ProofNonce.grant_id == grant.id)
    nonces = {(sku, path): nonce for sku, path, nonce in session.execute(query)}
    missing = [{"grant_id": grant.id, "sku": e.sku, "path": e.path, "nonce": new_nonce()}
               for e in entries if (e.sku, e.path) not in nonces]
    if missing:
        insert = postgresql_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
        session.execute(insert(ProofNonce).values(missing).on_conflict_do_nothing())
        nonces = {(sku, path): nonce for sku, path, nonce in session.execute(query)}
    return nonces, bool(missing)


def checked_proof(proof) -> str:
    """The proof in canonical form; 422 when missing (a bare SHA-256 proves nothing), 400 when malformed."""
    if proof is None:
        raise InvalidInput('A confirmation needs "proof": the hex HMAC-SHA256 of the file keyed with the '
                           "file's proof_nonce from the file list. The SHA-256 alone proves nothing.")
    if not isinstance(proof, str) or not PROOF_HEX.fullmatch(proof.strip()):
        raise InvalidInput("proof must be 64 hexadecimal digits (an HMAC-SHA256)", status=400)
    return proof.strip().lower()


def file_proof(path: str, entry: FileEntry, nonce: str) -> str:
    """HMAC-SHA256 over the file's bytes keyed with the nonce: one read, refused (503) when the file
    is not the indexed version while it is read."""
    mac = hmac.new(bytes.fromhex(nonce), digestmod=hashlib.sha256)
    buf = bytearray(READ_BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        before = os.fstat(fh.fileno())
        while True:
            n = fh.readinto(buf)
            if not n:
                break
            mac.update(view[:n])
        after = os.fstat(fh.fileno())
    if any((st.st_size, st.st_mtime_ns) != (entry.size, entry.mtime_ns) for st in (before, after)):
        raise FileUnavailable("This file is being updated right now.", advice="Please try again in a few minutes.")
    return mac.hexdigest()


def _digest(proof: str) -> str:
    return hashlib.sha256(proof.encode()).hexdigest()


def _expected_proof_hash(session: Session, row: ProofNonce, entry: FileEntry, download_dir: str) -> str:
    """The SHA-256 of the expected proof for the row's current nonce, reading the file only once per
    nonce and version (the result is kept through the caller's commit, even on a mismatch)."""
    if row.expected_proof_hash and row.expected_for_sha256 == entry.sha256:
        return row.expected_proof_hash
    path = str(real_path(download_dir, entry))
    if not _readers.acquire(timeout=PROOF_WAIT_SECONDS):
        raise FileUnavailable("The shop is checking other downloads right now.",
                              advice="Please try again in a minute; the verifying client does so by itself.")
    try:
        kept = _kept_expected(session, row.id, row.nonce, entry.sha256)  # the background may have been first
        if kept is not None:
            return kept
        expected = _digest(file_proof(path, entry, row.nonce))
    finally:
        _readers.release()
    # Conditional: a confirm that replaced the nonce meanwhile keeps its fresh row.
    session.execute(update(ProofNonce).where(ProofNonce.id == row.id, ProofNonce.nonce == row.nonce)
                    .values(expected_proof_hash=expected, expected_for_sha256=entry.sha256))
    return expected


def _kept_expected(session: Session, row_id: int, nonce: str, sha256: str) -> str | None:
    return session.scalar(select(ProofNonce.expected_proof_hash).where(
        ProofNonce.id == row_id, ProofNonce.nonce == nonce, ProofNonce.expected_for_sha256 == sha256))


def precompute(session: Session, grant_id: int, sku: str, path: str, download_dir: str) -> bool:
    """Compute and keep the expected proof of this grant's current nonce for the file, when a listing
    issued one and it is not known yet; True when the file was read. Commits."""
    row = session.scalars(select(ProofNonce).where(
        ProofNonce.grant_id == grant_id, ProofNonce.sku == sku, ProofNonce.path == path)).first()
    entry = session.scalars(select(FileEntry).where(FileEntry.sku == sku, FileEntry.path == path,
                                                    FileEntry.missing.is_(False))).first()
    if row is None or entry is None or entry.flagged or \
            (row.expected_proof_hash and row.expected_for_sha256 == entry.sha256):
        session.rollback()
        return False
    nonce, row_id = row.nonce, row.id
    session.rollback()  # no transaction stays open while the file is read
    full_path = str(real_path(download_dir, entry))
    # One reader per process, shared with confirms; committed before the reader is released, so a
    # confirm that waited for it finds the value instead of reading the file again.
    with _readers:
        if _kept_expected(session, row_id, nonce, entry.sha256) is not None:
            session.rollback()
            return False
        expected = _digest(file_proof(full_path, entry, nonce))
        session.execute(update(ProofNonce).where(ProofNonce.id == row_id, ProofNonce.nonce == nonce)
                        .values(expected_proof_hash=expected, expected_for_sha256=entry.sha256))
        session.commit()
    return True


class ProofPrecomputer:
    """Runs ``precompute`` in the background (``KeyedWorker``) for large files being sent."""

    def __init__(self, app):
        self.app = app
        self.worker = KeyedWorker(self._precompute, "softgoods-proof", PRECOMPUTE_MAX_PENDING)

    def sending(self, reservation) -> None:
        """A response is about to send ``reservation`` (or hand it to nginx): queue its proof when it is
        a large file fetched from the start. Never blocks the sender."""
        if reservation.method != "GET" or reservation.start != 0 or reservation.length < PRECOMPUTE_MIN_BYTES \
                or reservation.parts:
            return
        self.worker.put((reservation.grant_id, reservation.sku, reservation.path))

    def _precompute(self, key: tuple[int, str, str]) -> None:
        from app.extensions import db

        with self.app.app_context():
            try:
                precompute(db.session, *key, self.app.config["DOWNLOAD_DIR"])
            except (DeliveryRefused, OSError) as exc:  # the confirm then computes it itself
                log.warning("could not compute the expected proof of %s/%s in advance: %s", key[1], key[2], exc)
            finally:
                db.session.remove()


def current_nonce(session: Session, grant: UserDownload, entry: FileEntry) -> ProofNonce | None:
    return session.scalars(select(ProofNonce).where(
        ProofNonce.grant_id == grant.id, ProofNonce.sku == entry.sku, ProofNonce.path == entry.path)
        .execution_options(populate_existing=True)).first()


def check_proof(session: Session, grant: UserDownload, entry: FileEntry, proof: str, download_dir: str) -> str:
    """The nonce the proof matches; ProofMismatch (409) otherwise. Compared in constant time."""
    row = current_nonce(session, grant, entry)
    if row is None:  # no listing ever showed this file to this grant: no proof can match
        raise ProofMismatch()
    expected = _expected_proof_hash(session, row, entry, download_dir)
    if not hmac.compare_digest(_digest(proof), expected):
        raise ProofMismatch()
    return row.nonce


def spend_nonce(session: Session, grant: UserDownload, entry: FileEntry, nonce: str) -> None:
    """Replace the nonce a proof matched (the caller holds the grant's lock). ProofMismatch when a
    concurrent confirm spent it first: the same proof is never accepted twice."""
    spent = session.execute(update(ProofNonce).where(
        ProofNonce.grant_id == grant.id, ProofNonce.sku == entry.sku, ProofNonce.path == entry.path,
        ProofNonce.nonce == nonce).values(nonce=new_nonce(), expected_proof_hash=None, expected_for_sha256=None))
    if spent.rowcount != 1:
        raise ProofMismatch()
