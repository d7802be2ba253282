"""Sizes as people read them: one binary unit system (KiB, MiB, GiB, TiB: powers of 1024) for the shop,
the owner pages, the sidecar's listing and the command-line progress, so a file never reads as
"2.1 MB" in one place and "2.0 MiB" in another."""
from __future__ import annotations

BINARY_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def format_size(n: int | float | None) -> str:
    """``2_097_152`` -> ``"2.0 MiB"``; ``None`` (size unknown) -> ``"-"``."""
    if n is None:
        return "-"
    value = float(n)
    for unit in BINARY_UNITS:
        if abs(value) < 1024 or unit == BINARY_UNITS[-1]:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable: the last unit always returns")
