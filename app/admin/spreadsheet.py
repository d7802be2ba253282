"""CSV cells that no spreadsheet runs as a formula (OWASP "CSV Injection").

A spreadsheet starts a formula at the start of a field, and a field may start inside our cell: a
program that opens the file with ``;`` (most European locales), tab or ``|`` as its separator splits
``a;=cmd|' /C calc'!A0`` after the ``;``. So a formula trigger at the start of the cell *or* right after
any separator (spaces and quotes in between included, full-width forms too) gets a ``'`` in front,
which every spreadsheet shows as text.
"""
from __future__ import annotations

import csv
import re
from typing import Any

TRIGGERS = "=+\\-@\t\r\uff1d\uff0b\uff0d\uff20\ufe66\ufe62\ufe63\u2212"  # ＝＋－＠ ﹦﹢﹣ and − too
SEPARATORS = ",;|\t\r\n\uff0c\uff1b\uff5c"  # full-width ，；｜ as well
_FORMULA_START = re.compile(rf"(^|[{SEPARATORS}])([\s\"'\u3000]*?)(?=[{TRIGGERS}])")


def defuse(value: Any) -> str:
    """The cell's text with every place a formula could start made literal."""
    text = "" if value is None else str(value)
    return _FORMULA_START.sub(lambda m: f"{m[1]}{m[2]}'", text)


def safe_writer(buffer) -> Any:
    """A CSV writer that quotes every cell, so a separator inside one never splits it for us either."""
    return csv.writer(buffer, quoting=csv.QUOTE_ALL)
