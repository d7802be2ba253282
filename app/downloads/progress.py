"""A progress bar for long commands, drawn only on a terminal (cron and CI logs stay clean)."""
from __future__ import annotations

import sys
import time

from app.sizes import format_size


class ProgressBar:
    def __init__(self, label: str, stream=None, min_interval: float = 0.1):
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.started = time.monotonic()
        self.last_draw = 0.0
        self.min_interval = min_interval

    def __call__(self, done: int, total: int, detail: str = "") -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.last_draw < self.min_interval and done < total:
            return
        self.last_draw = now
        frac = done / total if total else 1.0
        elapsed = max(now - self.started, 1e-6)
        rate = done / elapsed
        eta = (total - done) / rate if rate > 0 else 0
        bar = "#" * int(frac * 30)
        self.stream.write(f"\r{self.label} [{bar:<30}] {frac:6.1%} {format_size(rate)}/s "
                          f"ETA {int(eta)//60:d}:{int(eta)%60:02d} {detail[-30:]:<30}")
        self.stream.flush()

    def finish(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
