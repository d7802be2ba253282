"""Prometheus text for /metrics: bytes sent, transfers in progress, deliveries by evidence.

gunicorn runs several worker processes; each keeps its own two numbers in a tiny file named after
its pid (one pwrite per change, no lock), and /metrics adds up the files of live workers. Totals
that must survive restarts come from the database.
"""
from __future__ import annotations

import os
import struct
import threading
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.downloads.models import Delivery, DownloadLog

_RECORD = struct.Struct("<qq")  # transfers in progress, bytes sent by this process
_lock = threading.Lock()
_state = {"dir": None, "fd": None, "pid": None, "in_progress": 0, "bytes": 0}


def init(directory: str | os.PathLike) -> None:
    _state["dir"] = Path(directory)


def _write() -> None:
    if _state["dir"] is None:
        return
    if _state["pid"] != os.getpid():  # first change in a freshly forked worker
        _state["dir"].mkdir(parents=True, exist_ok=True)
        _state["fd"] = os.open(_state["dir"] / f"{os.getpid()}.bin", os.O_RDWR | os.O_CREAT, 0o600)
        _state["pid"] = os.getpid()
    os.pwrite(_state["fd"], _RECORD.pack(_state["in_progress"], _state["bytes"]), 0)


def transfer_started() -> None:
    with _lock:
        _state["in_progress"] += 1
        _write()


def transfer_finished(sent: int) -> None:
    with _lock:
        _state["in_progress"] -= 1
        _state["bytes"] += sent
        _write()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _live_counters() -> tuple[int, int]:
    in_progress = sent = 0
    directory = _state["dir"]
    if directory is None or not directory.is_dir():
        return 0, 0
    for path in directory.glob("*.bin"):
        pid = int(path.stem) if path.stem.isdigit() else 0
        try:
            data = path.read_bytes()
        except OSError:
            continue
        if len(data) != _RECORD.size:
            continue
        running, total = _RECORD.unpack(data)
        sent += total
        if _alive(pid):  # a worker that died mid-transfer is not sending any more
            in_progress += running
    return in_progress, sent


def render(session: Session) -> str:
    in_progress, process_bytes = _live_counters()
    logged = session.scalar(select(func.coalesce(func.sum(DownloadLog.bytes_sent), 0))) or 0
    by_evidence = dict(session.execute(select(func.coalesce(Delivery.evidence, "none"), func.count())
                                       .group_by(Delivery.evidence)).all())
    lines = [
        "# HELP softgoods_bytes_sent_total File bytes that left the download hosts (download log).",
        "# TYPE softgoods_bytes_sent_total counter",
        f"softgoods_bytes_sent_total {int(logged)}",
        "# HELP softgoods_sidecar_bytes_sent_total File bytes sent by this host's workers since they started.",
        "# TYPE softgoods_sidecar_bytes_sent_total counter",
        f"softgoods_sidecar_bytes_sent_total {process_bytes}",
        "# HELP softgoods_transfers_in_progress File responses being sent right now on this host.",
        "# TYPE softgoods_transfers_in_progress gauge",
        f"softgoods_transfers_in_progress {in_progress}",
        "# HELP softgoods_deliveries Deliveries by completion evidence.",
        "# TYPE softgoods_deliveries gauge",
    ]
    for evidence in ("none", "transferred", "verified"):
        lines.append(f'softgoods_deliveries{{evidence="{evidence}"}} {by_evidence.get(evidence, 0)}')
    return "\n".join(lines) + "\n"
