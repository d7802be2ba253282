#!/usr/bin/env python3
"""softgoods-fetch: download every file of a Softgoods link, verify it, and prove it to the shop.

    python3 softgoods_fetch.py LINK [-d DIR]

LINK is the download link from your email (or a pasted piece of the email that contains it). The
client reads the link's file list, downloads each file into ``<name>.part`` with resume, checks every
piece against the shop's Metalink as it arrives, fetches again only pieces that fail, renames it into
place and proves to the shop that it holds the file: an HMAC-SHA256 of the file's bytes keyed with the
file's ``proof_nonce``, computed in the same pass (the pieces already prove the file intact, so no
separate whole-file SHA-256 is needed: two hashes per byte). It exits 0 only when every file is
verified. Interrupted? Run the same command again: it continues where it stopped.

Needs nothing but Python 3.9+ and its standard library.
"""
from __future__ import annotations

import argparse
import hashlib
import hmac
import http.client
import json
import os
import queue
import random
import re
import sys
import threading
import time
import xml.etree.ElementTree as ET
from base64 import b64decode
from urllib.parse import urlsplit

VERSION = "1.0"
USER_AGENT = "softgoods-fetch/" + VERSION
BLOCK = 1 << 20               # socket reads of 1 MiB: few system calls, hashlib runs at full speed
MAX_PIECE_FAILURES = 3        # a piece that fails this often is not bad luck: stop and say so
MAX_VERSION_RESTARTS = 3      # the shop replacing a file more often than this during one run: give up
MAX_FAILURES_WITHOUT_PROGRESS = 8
STATE_SAVE_INTERVAL = 0.5
META_NS = "{urn:ietf:params:xml:ns:metalink}"


class FetchError(Exception):
    """A reason to stop, in words for the shopper."""


class LinkRefused(FetchError):
    """The shop refused the link itself (used up, expired, revoked, unknown): retrying cannot help."""

    ADVICE = {403: "Please contact the shop and quote your order number if you need the files again.",
              404: "Check that you copied the whole link from your email.",
              410: "Please contact the shop and quote your order number if you need the files again."}

    def __init__(self, status: int, message: str):
        advice = self.ADVICE.get(status, "")
        super().__init__(f"{message.rstrip()} {advice}".strip() if advice not in message else message)
        self.status = status


class FileChanged(Exception):
    """The shop's file is not the version we were downloading: start that file over, never mix."""


class Transient(Exception):
    """Worth retrying after a pause (connection lost, server restarting, 5xx)."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


# -- HTTP --------------------------------------------------------------------------------------------

class Http:
    """One keep-alive connection per host, reopened after any error."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self.conns: dict = {}

    def request(self, method: str, url: str, headers: dict | None = None, body: bytes | None = None):
        parts = urlsplit(url)
        key = (parts.scheme, parts.netloc)
        conn = self.conns.get(key)
        if conn is None:
            cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
            conn = self.conns[key] = cls(parts.netloc, timeout=self.timeout)
        path = (parts.path or "/") + ("?" + parts.query if parts.query else "")
        all_headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
        all_headers.update(headers or {})
        try:
            conn.request(method, path, body=body, headers=all_headers)
            response = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            self.drop(url)
            raise Transient(f"connection to {parts.netloc} failed: {exc or exc.__class__.__name__}") from None
        if response.status >= 500 or response.status == 429:
            retry = response.getheader("Retry-After")
            message = _error_text(response)
            self.drop(url)
            raise Transient(f"server answered {response.status}: {message}",
                            float(retry) if retry and retry.isdigit() else None)
        return response

    def close(self) -> None:
        for conn in self.conns.values():
            conn.close()
        self.conns.clear()

    def drop(self, url: str) -> None:
        parts = urlsplit(url)
        conn = self.conns.pop((parts.scheme, parts.netloc), None)
        if conn is not None:
            conn.close()

    def get_json(self, url: str) -> dict:
        response = self.request("GET", url, {"Accept": "application/json"})
        body = _read_all(response)
        if response.status in LinkRefused.ADVICE:
            raise LinkRefused(response.status, _json_error(body) or f"the server answered {response.status} for {url}")
        if response.status != 200:
            raise FetchError(_json_error(body) or f"the server answered {response.status} for {url}")
        try:
            return json.loads(body)
        except ValueError:
            raise FetchError(f"{url} did not answer with a Softgoods file list (is this a download link?)") from None


def _read_all(response) -> bytes:
    try:
        return response.read()
    except (OSError, http.client.HTTPException) as exc:
        raise Transient(f"connection lost while reading: {exc}") from None


def _json_error(body: bytes) -> str | None:
    try:
        data = json.loads(body)
        return data.get("error") if isinstance(data, dict) else None
    except ValueError:
        return None


def _error_text(response) -> str:
    try:
        body = response.read(4096)
    except (OSError, http.client.HTTPException):
        return response.reason
    return _json_error(body) or response.reason


def retrying(what: str, action, *args):
    """Run ``action`` until it stops raising Transient, with bounded exponential backoff."""
    failures = 0
    while True:
        try:
            return action(*args)
        except Transient as exc:
            failures += 1
            if failures >= MAX_FAILURES_WITHOUT_PROGRESS:
                raise FetchError(f"{what}: giving up after {failures} attempts ({exc})") from None
            pause = exc.retry_after if exc.retry_after is not None else min(8.0, 0.25 * 2 ** failures)
            say(f"{what}: {exc}; retrying in {pause:.1f}s", verbose_only=True)
            time.sleep(min(pause, 30.0) * random.uniform(0.8, 1.2))


# -- the link ------------------------------------------------------------------------------------------

def link_from(text: str, server: str | None) -> str:
    """The listing URL from a link, a pasted piece of the email, or a bare receipt token (with --server)."""
    text = text.strip()
    match = re.search(r"https?://[^\s<>\"']+/d/[^\s<>\"'/]+/?", text)
    if match:
        url = match.group(0)
        return url if url.endswith("/") else url + "/"
    if re.fullmatch(r"[A-Za-z0-9_.\-]{20,600}", text):
        if not server:
            raise FetchError("that looks like a receipt without the shop's address: pass --server URL "
                             "or paste the whole link")
        return f"{server.rstrip('/')}/d/{text}/"
    raise FetchError("no download link found: paste the link from your email (it contains /d/)")


def safe_destination(root: str, path: str) -> str:
    parts = path.split("/")
    if not path or path.startswith("/") or "\\" in path or any(p in ("", ".", "..") for p in parts):
        raise FetchError(f"the server listed an unsafe file name {path!r}; refusing to write it")
    return os.path.join(root, *parts)


def fetch_pieces(http: Http, url: str, size: int) -> tuple[int, list[str]]:
    response = http.request("GET", url, {"Accept": "application/metalink4+xml"})
    body = _read_all(response)
    if response.status != 200:
        raise FetchError(_json_error(body) or f"the Metalink {url} answered {response.status}")
    try:
        pieces = ET.fromstring(body).find(f"{META_NS}file/{META_NS}pieces")
        length = int(pieces.get("length"))
        hashes = [h.text.strip().lower() for h in pieces.findall(f"{META_NS}hash")]
    except (ET.ParseError, AttributeError, TypeError, ValueError):
        raise FetchError(f"the Metalink {url} is not readable") from None
    if length <= 0 or len(hashes) != max(1, -(-size // length)):
        raise FetchError(f"the Metalink {url} does not describe a file of {size} bytes")
    return length, hashes


# -- one file ------------------------------------------------------------------------------------------

class Progress:
    """A progress bar with speed and time left, drawn only on a terminal."""

    def __init__(self, name: str, total: int, done: int, enabled: bool):
        self.name, self.total, self.enabled = name, total, enabled
        self.started, self.start_done, self.last = time.monotonic(), done, 0.0

    def update(self, done: int, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self.last < 0.2 and not force):
            return
        self.last = now
        rate = (done - self.start_done) / max(now - self.started, 1e-6)
        eta = (self.total - done) / rate if rate > 0 else 0
        frac = done / self.total if self.total else 1.0
        bar = "#" * int(frac * 24)
        sys.stderr.write(f"\r{self.name[-28:]:<28} [{bar:<24}] {frac:6.1%} {human(rate)}/s "
                         f"ETA {int(eta) // 60}:{int(eta) % 60:02d} ")
        sys.stderr.flush()

    def finish(self) -> None:
        if self.enabled:
            self.update(self.total, force=True)
            sys.stderr.write("\n")


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class Verifier:
    """Checks pieces and computes the proof (HMAC-SHA256 keyed with the nonce) in two threads while
    the socket is read, so verification keeps up with the network (hashlib releases the GIL):
    socket -> piece thread -> proof thread. Buffers go round in a small pool: a buffer is read into
    again only after both hashes saw it. The proof runs only while bytes arrive in order from byte 0;
    otherwise (a resumed run, a re-fetched piece) it is computed from disk at the end."""

    BUFFERS = 8

    def __init__(self, job: "FileJob", proof_from_start: bool):
        self.job = job
        self.free: queue.Queue = queue.Queue()
        for _ in range(self.BUFFERS):
            self.free.put(bytearray(BLOCK))
        self.piece_queue: queue.Queue = queue.Queue()
        self.proof_queue: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.piece_hash, self.piece_at = hashlib.sha256(), -1
        self.mac = proof_hmac(job.nonce) if proof_from_start else None
        self.mac_at = 0
        self.threads = [threading.Thread(target=self._piece_loop, daemon=True),
                        threading.Thread(target=self._proof_loop, daemon=True)]
        for thread in self.threads:
            thread.start()

    def submit(self, buf: bytearray, n: int, offset: int) -> None:
        self.piece_queue.put((buf, n, offset))
        if self.error is not None:
            raise self.error

    def drain(self) -> None:
        self.piece_queue.join()
        self.proof_queue.join()
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self.piece_queue.put(None)
        for thread in self.threads:
            thread.join(60)

    def proof(self) -> str | None:
        if self.mac is None or self.mac_at != self.job.size:
            return None
        return self.mac.hexdigest()

    def _piece_loop(self) -> None:
        while True:
            item = self.piece_queue.get()
            try:
                if item is None:
                    self.proof_queue.put(None)
                    return
                if self.error is None:
                    buf, n, offset = item
                    self._pieces(memoryview(buf)[:n], offset)
            except BaseException as exc:  # handed to the reading thread, which raises it
                self.error = exc
            finally:
                if item is not None:
                    self.proof_queue.put(item)
                self.piece_queue.task_done()

    def _pieces(self, chunk: memoryview, offset: int) -> None:
        size, piece_size = self.job.size, self.job.piece_size
        if offset != self.piece_at:  # a new range: ranges start on a piece boundary
            self.piece_hash = hashlib.sha256()
        while chunk:
            index = offset // piece_size
            piece_end = min(size, (index + 1) * piece_size)
            take = min(len(chunk), piece_end - offset)
            self.piece_hash.update(chunk[:take])
            offset += take
            chunk = chunk[take:]
            if offset == piece_end:
                self.piece_hash, digest = hashlib.sha256(), self.piece_hash.hexdigest()
                self.job.finish_piece(index, digest)
        self.piece_at = offset

    def _proof_loop(self) -> None:
        while True:
            item = self.proof_queue.get()
            try:
                if item is None:
                    return
                buf, n, offset = item
                if self.mac is not None:
                    if offset == self.mac_at:
                        self.mac.update(memoryview(buf)[:n])
                        self.mac_at += n
                    else:
                        self.mac = None
                self.free.put(buf)
            finally:
                self.proof_queue.task_done()


class FileJob:
    """Download one listed file into ``<dest>.part`` (+ ``.part.json`` state) and verify it."""

    def __init__(self, http: Http, info: dict, dest: str, show_progress: bool):
        self.http, self.info, self.dest = http, info, dest
        self.part, self.state_path = dest + ".part", dest + ".part.json"
        self.size, self.sha256 = int(info["size"]), info["sha256"].lower()
        self.nonce = info.get("proof_nonce")
        proof_hmac(self.nonce)  # a listing without a usable nonce is refused before any byte is fetched
        self.show_progress = show_progress
        self.damaged = False

    def run(self) -> str:
        """Fetch and check the file; its proof for the shop."""
        self.piece_size, self.pieces = retrying(self.info["path"], fetch_pieces, self.http,
                                                self.info["metalink_url"], self.size)
        self.load_state()
        os.makedirs(os.path.dirname(self.part) or ".", exist_ok=True)
        with open(self.part, "r+b" if os.path.exists(self.part) else "w+b", buffering=0) as self.fh:
            if os.fstat(self.fh.fileno()).st_size > self.size:
                self.fh.truncate(self.size)
            # No pre-sizing: appending is several times cheaper than filling a sparse file (ext4).
            self.recover_written_pieces()
            self.progress = Progress(self.info["path"], self.size, self.good_bytes, self.show_progress)
            self.verifier = Verifier(self, proof_from_start=not any(self.good))
            try:
                while not all(self.good):
                    first = self.good.index(False)
                    last = first
                    while last + 1 < len(self.good) and not self.good[last + 1]:
                        last += 1
                    self.fetch_range(first * self.piece_size, min(self.size, (last + 1) * self.piece_size))
                    self.verifier.drain()
            finally:
                self.verifier.close()
            self.save_state(force=True)
            self.progress.finish()
            proof = None if self.damaged else self.verifier.proof()
            if proof is None:  # resumed, or bad bytes went into the running proof: one pass from disk
                proof = hash_file(self.fh, proof_hmac(self.nonce))[0]
        os.replace(self.part, self.dest)
        os.unlink(self.state_path)
        return proof

    # state ------------------------------------------------------------------------------------------
    def load_state(self) -> None:
        self.etag, self.good, self.failures = None, [False] * len(self.pieces), {}
        try:
            with open(self.state_path) as fh:
                state = json.load(fh)
        except (OSError, ValueError):
            state = None
        if (state and state.get("sha256") == self.sha256 and state.get("size") == self.size
                and state.get("piece_size") == self.piece_size and os.path.exists(self.part)):
            self.etag = state.get("etag")
            self.good = [c == "1" for c in state.get("good", "")][:len(self.pieces)]
            self.good += [False] * (len(self.pieces) - len(self.good))
        else:
            self.reset()
        self.good_bytes = sum(self.piece_length(i) for i, g in enumerate(self.good) if g)
        self.saved_at = 0.0

    def recover_written_pieces(self) -> None:
        """After a kill, pieces written since the last saved state are on disk already: check them
        (forward from the first missing piece, up to the first one that does not match) instead of
        fetching them again."""
        if all(self.good) or not any(self.good) and os.fstat(self.fh.fileno()).st_size == 0:
            return
        index = self.good.index(False)
        while index < len(self.pieces):
            if not self.good[index]:
                self.fh.seek(index * self.piece_size)
                data = self.fh.read(self.piece_length(index))
                if hashlib.sha256(data).hexdigest() != self.pieces[index]:
                    return
                self.good[index] = True
                self.good_bytes += len(data)
            index += 1

    def save_state(self, force: bool = False) -> None:
        """Remember verified pieces (their bytes are already written), so a killed run resumes."""
        now = time.monotonic()
        if not force and now - self.saved_at < STATE_SAVE_INTERVAL:
            return
        self.saved_at = now
        state = {"url": self.info["url"], "sha256": self.sha256, "size": self.size, "etag": self.etag,
                 "piece_size": self.piece_size, "good": "".join("1" if g else "0" for g in list(self.good))}
        tmp = self.state_path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(state, fh)
        os.replace(tmp, self.state_path)

    def reset(self) -> None:
        for path in (self.part, self.state_path):
            if os.path.exists(path):
                os.unlink(path)
        self.etag, self.good, self.failures = None, [False] * len(self.pieces), {}
        self.good_bytes = 0

    def piece_length(self, index: int) -> int:
        return min(self.piece_size, self.size - index * self.piece_size)

    # transfer ---------------------------------------------------------------------------------------
    def fetch_range(self, start: int, end: int) -> None:
        """Fetch [start, end): on a dropped connection continue from the exact byte reached (the
        partial piece's hash is kept), with bounded backoff."""
        self.cursor, failures = start, 0
        while self.cursor < end:
            headers = {"Accept": "application/json;q=0.9, */*;q=0.8"}  # bytes, or a refusal as JSON to quote
            if self.cursor > 0 or end < self.size:
                headers["Range"] = f"bytes={self.cursor}-{end - 1 if end < self.size else ''}"
                if self.etag:
                    headers["If-Range"] = self.etag
            elif self.etag:
                headers["If-Match"] = self.etag
            before = self.cursor
            try:
                self.stream(headers, end)
            except Transient as exc:
                failures = 0 if self.cursor > before else failures + 1
                if failures >= MAX_FAILURES_WITHOUT_PROGRESS:
                    raise FetchError(f"{self.info['path']}: giving up after {failures} failed attempts ({exc})")
                pause = exc.retry_after if exc.retry_after is not None else min(8.0, 0.25 * 2 ** failures)
                say(f"{self.info['path']}: {exc}; continuing from byte {self.cursor} in {pause:.1f}s",
                    verbose_only=True)
                time.sleep(min(pause, 30.0) * random.uniform(0.8, 1.2))

    def stream(self, headers: dict, end: int) -> None:
        response = self.http.request("GET", self.info["url"], headers)
        try:
            self.check_response(response, headers)
            self.fh.seek(self.cursor)
            while self.cursor < end:
                buf = self.verifier.free.get()
                view = memoryview(buf)[:min(BLOCK, end - self.cursor)]
                try:
                    n = response.readinto(view)
                except (OSError, http.client.HTTPException) as exc:
                    self.verifier.free.put(buf)
                    raise Transient(f"connection lost at byte {self.cursor}: "
                                    f"{exc or exc.__class__.__name__}") from None
                if not n:
                    self.verifier.free.put(buf)
                    raise Transient(f"connection closed at byte {self.cursor}")
                written = 0
                while written < n:  # a raw file may write less than asked
                    written += self.fh.write(view[written:n])
                self.verifier.submit(buf, n, self.cursor)
                self.cursor += n
                self.save_state()
                if self.progress.enabled:
                    self.progress.update(max(self.good_bytes, self.verifier.mac_at))
            if response.length:
                self.http.drop(self.info["url"])  # we stopped reading early: this connection is spent
        except BaseException:
            self.http.drop(self.info["url"])
            raise
        finally:
            response.close()

    def check_response(self, response, headers: dict) -> None:
        etag = response.getheader("ETag")
        if response.status in (412, 416):
            self.reset()
            raise FileChanged(f"the server answered {response.status}")
        if response.status == 200 and "Range" in headers:
            self.reset()  # If-Range did not match: a new version is on its way, never mix it with ours
            raise FileChanged("the server sent the whole file instead of the missing part")
        if response.status in LinkRefused.ADVICE:
            raise LinkRefused(response.status, _error_text(response))
        if response.status not in (200, 206):
            raise FetchError(_error_text(response) + f" ({self.info['path']}: {response.status})")
        if response.status == 206:
            match = re.match(r"bytes (\d+)-(\d+)/(\d+)", response.getheader("Content-Range") or "")
            if not match or int(match.group(1)) != self.cursor or int(match.group(3)) != self.size:
                self.reset()
                raise FileChanged("the server sent another part, or another size, than asked for")
        elif response.length is not None and response.length != self.size:
            self.reset()
            raise FileChanged("the server is sending a file of another size than it listed")
        digest = response.getheader("Repr-Digest") or ""
        match = re.search(r"sha-256=:([A-Za-z0-9+/=]+):", digest)
        if match and b64decode(match.group(1)).hex() != self.sha256:
            self.reset()
            raise FileChanged("the server is serving another version of the file than it listed")
        if self.etag and etag and etag != self.etag:
            self.reset()
            raise FileChanged("the file's ETag changed")
        self.etag = self.etag or etag

    def finish_piece(self, index: int, digest: str) -> None:
        """Called by the piece thread for every completed piece."""
        if digest == self.pieces[index]:
            if not self.good[index]:
                self.good[index] = True
                self.good_bytes += self.piece_length(index)
            return
        self.damaged = True  # the bad bytes went into the running proof
        self.failures[index] = self.failures.get(index, 0) + 1
        say(f"{self.info['path']}: piece {index + 1} of {len(self.pieces)} arrived damaged; fetching it again",
            verbose_only=True)
        if self.failures[index] >= MAX_PIECE_FAILURES:
            raise FetchError(f"{self.info['path']}: piece {index + 1} arrived damaged {self.failures[index]} times. "
                             "Something between you and the shop (a proxy, antivirus or a bad connection) is "
                             "changing the data; try another network, or contact the shop.")


def proof_hmac(nonce: str):
    """The proof of possession the shop checks: HMAC-SHA256 over the file keyed with its nonce."""
    try:
        return hmac.new(bytes.fromhex(nonce), digestmod=hashlib.sha256)
    except (TypeError, ValueError):
        raise FetchError("the server listed no usable proof_nonce (is the shop's download host up to date?)") from None


def hash_file(fh, *digests) -> list:
    """One read of the file feeding every digest given; their hex digests in the same order."""
    fh.seek(0)
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    while True:
        n = fh.readinto(buf)
        if not n:
            return [d.hexdigest() for d in digests]
        for digest in digests:
            digest.update(view[:n])


def file_sha256(path: str) -> str:
    with open(path, "rb") as fh:
        return hash_file(fh, hashlib.sha256())[0]


# -- the whole link ---------------------------------------------------------------------------------

QUIET = False
VERBOSE = False


def say(message: str, verbose_only: bool = False, err: bool = True) -> None:
    if QUIET or (verbose_only and not VERBOSE):
        return
    print(message, file=sys.stderr if err else sys.stdout, flush=True)


def confirm(http: Http, confirm_url: str, path: str, sha256: str, proof: str) -> None:
    body = json.dumps({"path": path, "sha256": sha256, "proof": proof}).encode()
    response = http.request("POST", confirm_url, {"Content-Type": "application/json",
                                                  "Accept": "application/json"}, body)
    data = _read_all(response)
    if response.status == 200:
        return
    if response.status == 409:
        # A stale nonce (spent by an earlier confirm whose answer was lost) or another version: the
        # caller reads the list again (a fresh nonce) and proves the file here once more.
        raise FileChanged(f"the shop did not accept the proof: {_json_error(data) or response.status}")
    raise FetchError(f"{path}: the shop did not accept the confirmation: {_json_error(data) or response.status}")


class Manifest:
    """``<dir>/.softgoods-fetch.json``: the files of each link this folder holds verified and confirmed.
    A later run needs the shop only for what is missing: once a link is used up or expired, the files
    already here are still recognised as complete (each is hashed again before it counts)."""

    NAME = ".softgoods-fetch.json"

    def __init__(self, directory: str, link: str):
        self.path = os.path.join(directory, self.NAME)
        self.key = hashlib.sha256(link.encode()).hexdigest()[:32]  # the link itself is a secret: not stored
        try:
            with open(self.path) as fh:
                self.data = json.load(fh)
            if not isinstance(self.data, dict) or not isinstance(self.data.get(self.key, {}), dict):
                raise ValueError
        except (OSError, ValueError):
            self.data = {}

    @property
    def files(self) -> dict:
        return self.data.get(self.key, {})

    def confirmed(self, info: dict) -> bool:
        known = self.files.get(info["path"])
        return bool(known) and known.get("sha256") == info["sha256"].lower() and known.get("size") == int(info["size"])

    def record(self, info: dict) -> None:
        self.data.setdefault(self.key, {})[info["path"]] = {"sha256": info["sha256"].lower(), "size": int(info["size"])}
        tmp = self.path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(self.data, fh)
        os.replace(tmp, self.path)

    def all_here(self, directory: str) -> list[str] | None:
        """The paths of this link's files, when every one is here with its confirmed SHA-256; else None."""
        files = self.files
        if not files:
            return None
        for path, known in files.items():
            try:
                dest = safe_destination(directory, path)
            except FetchError:
                return None
            if not (os.path.isfile(dest) and os.path.getsize(dest) == known.get("size")
                    and file_sha256(dest) == known.get("sha256")):
                return None
        return sorted(files)


def fetch_one(http: Http, link: str, info: dict, directory: str, show_progress: bool,
              manifest: Manifest | None = None) -> None:
    dest = safe_destination(directory, info["path"])
    for restart in range(MAX_VERSION_RESTARTS + 1):
        try:
            proof = None
            if os.path.isfile(dest) and os.path.getsize(dest) == int(info["size"]):
                with open(dest, "rb") as fh:  # one read: is it intact, and its proof
                    sha256, proof = hash_file(fh, hashlib.sha256(), proof_hmac(info.get("proof_nonce")))
                proof = proof if sha256 == info["sha256"].lower() else None
                if proof is not None and manifest is not None and manifest.confirmed(info):
                    return  # here, intact, and the shop has our proof already
            if proof is None:
                proof = FileJob(http, info, dest, show_progress).run()
            retrying(info["path"], confirm, http, listing_confirm_url(http, link), info["path"], info["sha256"], proof)
            if manifest is not None:
                manifest.record(info)
            return
        except FileChanged as changed:
            if restart == MAX_VERSION_RESTARTS:
                raise FetchError(f"{info['path']}: {changed}, {restart + 1} times. The shop may be replacing "
                                 "the file right now; try again later.") from None
            say(f"{info['path']}: {changed}; starting this file over", verbose_only=True)
            time.sleep(0.5 * (restart + 1))
            fresh = {f["path"]: f for f in retrying("file list", http.get_json, link)["files"]}
            if info["path"] not in fresh:
                raise FetchError(f"{info['path']} is no longer offered by this link") from None
            info = fresh[info["path"]]
            if os.path.isfile(dest) and file_sha256(dest) != info["sha256"].lower():
                os.unlink(dest)


_confirm_urls: dict = {}


def listing_confirm_url(http: Http, link: str) -> str:
    if link not in _confirm_urls:
        _confirm_urls[link] = retrying("file list", http.get_json, link)["confirm_url"]
    return _confirm_urls[link]


def main(argv: list | None = None) -> int:
    global QUIET, VERBOSE
    parser = argparse.ArgumentParser(prog="softgoods-fetch", description=__doc__.split("\n\n")[0])
    parser.add_argument("link", help="the download link (or the text of the email that contains it)")
    parser.add_argument("-d", "--dir", default=".", help="where to save the files (default: here)")
    parser.add_argument("--server", help="the shop's download address, when LINK is a bare receipt")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds without data before retrying")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="explain every retry")
    args = parser.parse_args(argv)
    QUIET, VERBOSE = args.quiet, args.verbose
    http = Http(args.timeout)
    try:
        link = link_from(args.link, args.server)
        manifest = Manifest(args.dir, link)
        local = manifest.all_here(args.dir)
        try:
            # Everything verified here already: one try (no retries), the shop is only asked for news.
            listing = http.get_json(link) if local else retrying("file list", http.get_json, link)
        except (LinkRefused, Transient) as exc:
            if not local:
                raise
            say(f"all {len(local)} file(s) of this link are already verified in {args.dir}; nothing to fetch "
                f"(the shop did not answer the link: {exc})", err=False)
            return 0
        if not (isinstance(listing, dict) and isinstance(listing.get("files"), list) and listing.get("confirm_url")):
            raise FetchError(f"{link} did not answer with a Softgoods file list (is this a download link?)")
        _confirm_urls[link] = listing["confirm_url"]
        files = listing["files"]
        if not files:
            raise FetchError("this link lists no files yet (a choice of products? pick them on the link's page)")
        os.makedirs(args.dir, exist_ok=True)
        show_progress = sys.stderr.isatty() and not QUIET
        refused = []
        for info in files:
            try:
                fetch_one(http, link, info, args.dir, show_progress, manifest)
            except LinkRefused as exc:
                if exc.status != 403:  # expired, revoked, unknown: the same for every file
                    raise
                refused.append(f"{info['path']}: {exc}")  # this file's downloads are used up; others may not be
                continue
            say(f"verified  {info['path']}  ({int(info['size'])} bytes, sha256 {info['sha256'][:16]}...)", err=False)
        if refused:
            raise FetchError(f"{len(refused)} of {len(files)} file(s) not fetched:\n  " + "\n  ".join(refused))
    except FetchError as exc:
        print(f"softgoods-fetch: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # the disk, not the network: full, read-only, no permission
        print(f"softgoods-fetch: error: cannot write {exc.filename or args.dir}: {exc.strerror or exc}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nsoftgoods-fetch: interrupted; run the same command again to continue", file=sys.stderr)
        return 130
    say(f"all {len(files)} file(s) verified and confirmed to the shop", err=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
