"""The link-guess limit (README, "Rate limits"): only failed link lookups are counted and refused.

A good link is never answered 429, whatever its address did before: the lookup runs first, and only
when it fails is the address's counter raised; past the limit the failure is answered 429 instead of
404. Counters live in ``limits`` storage shared by every worker of a host (a SQLite file in the
instance folder) or, with ``REDIS_URL``, by every host.
"""
from __future__ import annotations

import math
import time

from limits import parse
from limits.storage import storage_from_string
from limits.strategies import FixedWindowRateLimiter

import app.sqlite_limits  # noqa: F401  registers the sqlite:// storage scheme
from app.downloads.errors import TooManyGuesses


class GuessLimit:
    def __init__(self, storage_uri: str, limit: str, prefix: str):
        self.storage = storage_from_string(storage_uri)
        self.item = parse(limit)
        self.strategy = FixedWindowRateLimiter(self.storage)
        self.prefix = prefix

    def failed_lookup(self, address: str) -> None:
        """Count one failed lookup from ``address``; TooManyGuesses when it is over the limit."""
        if self.strategy.hit(self.item, self.prefix, "link-guess", address):
            return
        reset_at = self.strategy.get_window_stats(self.item, self.prefix, "link-guess", address).reset_time
        raise TooManyGuesses(retry_after=max(1, math.ceil(reset_at - time.time())))

