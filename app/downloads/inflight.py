"""Requests in flight: who serves each reserved range, and the evidence that one of them has died.

Why: a reservation that never closes (its worker was SIGKILLed) must stop eating its delivery's
budget, but a request that is merely slow must keep its charge, or concurrent requests could carry
more than the budget (issue 12: twelve overlapping ``Range: bytes=k-`` requests got twelve copies
when a newer request was taken as proof that an older one had ended). So a range is presumed dead
only on evidence (DESIGN "Delivery semantics"):

* its worker process is gone: each range records ``host/pid/start`` (the process's start time
  from ``/proc/<pid>/stat``, so a reused pid is not mistaken for the worker); a process on the
  same host (same hostname and boot) checks that directly;
* or it has shown no progress for ``INFLIGHT_IDLE_SECONDS`` (60 s): while bytes move, ``Heartbeat``
  refreshes the range's ``seen`` time every ``Heartbeat.INTERVAL`` seconds, so this bound also
  covers workers on other hosts.

A range in ``Delivery.open_ranges`` is ``[token, start, end, charge, presumed_broken, opened,
owner, seen]`` (times in unix seconds); rows written before owners were recorded have six fields
and only the idle bound applies to them.
"""
from __future__ import annotations

import logging
import os
import socket
import struct
import threading
import time
from datetime import datetime
from typing import Callable

log = logging.getLogger("softgoods.sidecar")

IDLE_SECONDS = 60  # DESIGN: an in-flight request that has sent nothing this long is presumed dead


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()[:8]
    except OSError:
        return "-"


# A pid and its start time identify a process only within one boot of one machine.
HOST = f"{socket.gethostname()}#{_boot_id()}"


def process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (``/proc/<pid>/stat`` field 22), None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: count fields after its last ")".
    fields = stat[stat.rindex(b")") + 2:].split()
    if len(fields) < 20 or fields[0] in (b"Z", b"X"):  # a zombie sends nothing: its parent died unreaped
        return None
    return fields[19].decode()


_me: tuple[int, str] | None = None


def owner() -> str:
    """This process as a range's owner (computed once per process; a forked worker gets its own)."""
    global _me
    pid = os.getpid()
    if _me is None or _me[0] != pid:
        _me = (pid, f"{HOST}/{pid}/{process_start(pid) or time.time_ns()}")
    return _me[1]


def owner_gone(who: str) -> bool:
    """Evidence that the process that owns a range is gone (only a process on the same host can tell)."""
    host, pid, start = who.rsplit("/", 2)
    if host != HOST or not pid.isdigit():
        return False
    return process_start(int(pid)) != start


def new_range(token: str, start: int, end: int, charge: int, now: datetime) -> list:
    at = int(now.timestamp())
    return [token, start, end, charge, False, at, owner(), at]


def is_live(entry: list, now: datetime, idle_seconds: int = IDLE_SECONDS) -> bool:
    """May this request still be sending? False once presumed broken, idle past the bound, or its worker is gone."""
    if entry[4]:
        return False
    seen = entry[7] if len(entry) > 7 else entry[5]
    if now.timestamp() - seen >= idle_seconds:
        return False
    return len(entry) < 7 or not owner_gone(entry[6])


def touch(entries: list[list], token: str, now: datetime) -> bool:
    """Record progress of the range ``token``; False when it is no longer in flight."""
    for entry in entries:
        if entry[0] == token and not entry[4]:
            if len(entry) > 7:
                entry[7] = int(now.timestamp())
            else:
                entry[5] = int(now.timestamp())
            return True
    return False


def bytes_acked(sock) -> int | None:
    """The bytes the peer has acknowledged on a TCP socket (Linux ``tcp_info.tcpi_bytes_acked``): how
    a transfer inside one ``sendfile`` call shows progress. None when the socket cannot tell."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232)
    except (OSError, AttributeError, ValueError):
        return None
    return struct.unpack_from("Q", info, 120)[0] if len(info) >= 128 else None


class Heartbeat:
    """Per process: every INTERVAL seconds, the registered transfers that made progress since the last
    beat refresh their ranges' ``seen`` time, all in one call of ``refresh`` (one transaction, however
    many transfers). A transfer that ends before a beat never writes."""

    INTERVAL = 20.0  # a third of the idle bound: two missed beats still leave a range live

    def __init__(self, refresh: Callable[[list], None]):
        self._refresh = refresh
        self._transfers: dict[object, list] = {}
        self._lock = threading.Lock()
        self._pid: int | None = None

    def add(self, key, progress: Callable[[], object], payload) -> None:
        """Watch a transfer: ``progress()`` gives a value that changes while bytes move; ``payload``
        is what ``refresh`` gets for it."""
        baseline = progress()
        with self._lock:
            if self._pid != os.getpid():  # first use in this (forked) worker: its own thread
                self._pid = os.getpid()
                self._transfers = {}
                threading.Thread(target=self._loop, name="softgoods-heartbeat", daemon=True).start()
            self._transfers[key] = [progress, payload, baseline]

    def remove(self, key) -> None:
        with self._lock:
            self._transfers.pop(key, None)

    def beat(self) -> None:
        with self._lock:
            transfers = list(self._transfers.values())
        moved = []
        for state in transfers:
            now = state[0]()
            if now != state[2]:
                state[2] = now
                moved.append(state[1])
        if moved:
            try:
                self._refresh(moved)
            except Exception:  # a failed refresh only makes the ranges presumed dead sooner
                log.exception("could not record the progress of %d transfers", len(moved))

    def _loop(self) -> None:
        while True:
            time.sleep(self.INTERVAL)
            self.beat()
