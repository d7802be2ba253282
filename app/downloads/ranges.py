"""Conditional and Range requests, evaluated exactly as nginx's static module does (RFC 9110 §13, §14).

Why our own Range parser: werkzeug's ``parse_range_header`` answers ``None`` (ignore the header) for
inputs where nginx answers 416, and it rejects inputs nginx accepts (spaces around numbers, an end
before the start inside a list). Shoppers' resume tools see the same server behaviour whether the
sidecar serves the bytes (pipe) or nginx does (symlink, accel), so we follow nginx 1.22's
``ngx_http_range_parse`` step by step. Dates and entity tags use werkzeug's helpers.

Known, documented divergences from nginx: none in status, Content-Range or body for single ranges
and errors; multipart bodies use our own boundary (nginx's is a per-process counter). Where nginx
answers any number of parts as asked, we keep hostile headers cheap (issue 12, RFC 9110 §14.3 and
§15.3.7.2 allow both): overlapping and adjacent parts are coalesced first (so ``bytes=0-4999,5000-``
is one 206 part, not two), the parts keep the order of their first range-spec, and more than
``MAX_PARTS`` parts after that answer the whole file with 200, as Apache does for excessive ranges.
"""
from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from datetime import datetime

from werkzeug.http import parse_date

MAX_OFF_T = (1 << 63) - 1
MAX_PARTS = 16  # parts honoured per request after coalescing; more: the whole file with 200


class Unsatisfiable(Exception):
    """416: nothing of the requested ranges lies within the file."""


@dataclass(frozen=True)
class ByteRange:
    start: int
    end: int  # exclusive

    @property
    def length(self) -> int:
        return self.end - self.start

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.end - 1}/{size}"


@dataclass
class Plan:
    """What to answer: the status and, for 206, the ranges (one part, or several for multipart)."""

    status: int
    ranges: list[ByteRange] = field(default_factory=list)


def parse_ranges(header: str, size: int) -> list[ByteRange] | None:
    """nginx's ngx_http_range_parse: ranges to send, None to ignore the header (200), or Unsatisfiable.

    RFC 9110 §14.1.2 byte-range-spec grammar, with nginx's tolerance of spaces and its rules: a
    range whose start is past its end is skipped; a list whose total exceeds the file is ignored.
    """
    if len(header) < 7 or header[:6].lower() != "bytes=":
        return None
    text = header[6:] + "\0"  # nginx reads a NUL-terminated string; the sentinel keeps indexes simple
    pos = 0
    ranges: list[ByteRange] = []
    total = 0

    def skip_spaces(i: int) -> int:
        while text[i] == " ":
            i += 1
        return i

    def number(i: int) -> tuple[int, int]:
        value = 0
        while text[i].isdigit() and text[i].isascii():
            value = value * 10 + ord(text[i]) - 48
            if value > MAX_OFF_T:
                raise Unsatisfiable()
            i += 1
        return value, i

    while True:
        start = end = 0
        suffix = False
        pos = skip_spaces(pos)
        if text[pos] != "-":
            if not ("0" <= text[pos] <= "9"):
                raise Unsatisfiable()
            start, pos = number(pos)
            pos = skip_spaces(pos)
            if text[pos] != "-":
                raise Unsatisfiable()
            pos = skip_spaces(pos + 1)
            if text[pos] in ",\0":
                end = size
                open_ended = True
            else:
                open_ended = False
        else:
            suffix, open_ended = True, False
            pos += 1
        if not open_ended:
            if not ("0" <= text[pos] <= "9"):
                raise Unsatisfiable()
            end, pos = number(pos)
            pos = skip_spaces(pos)
            if text[pos] not in ",\0":
                raise Unsatisfiable()
            if suffix:
                start = size - end if end < size else 0
                end = size - 1
            end = size if end >= size else end + 1
        if start < end:
            ranges.append(ByteRange(start, end))
            total += end - start
        elif start == 0:
            return None  # nginx declines: e.g. "bytes=0-" of an empty file
        if text[pos] != ",":
            break
        pos += 1
    if not ranges:
        raise Unsatisfiable()
    if total > size:
        return None  # overlapping parts that add up to more than the file: send it whole
    ranges = coalesce(ranges)
    return ranges if len(ranges) <= MAX_PARTS else None


def coalesce(ranges: list[ByteRange]) -> list[ByteRange]:
    """Merge overlapping and adjacent parts (RFC 9110 §15.3.7.2); the merged parts keep the order in
    which their first range-spec was asked for. O(n log n) for n parts."""
    if len(ranges) < 2:
        return ranges
    by_start = sorted(range(len(ranges)), key=lambda i: ranges[i].start)
    groups: list[list[int]] = []  # [start, end, first index asked]
    for i in by_start:
        part = ranges[i]
        if groups and part.start <= groups[-1][1]:
            group = groups[-1]
            group[1], group[2] = max(group[1], part.end), min(group[2], i)
        else:
            groups.append([part.start, part.end, i])
    if len(groups) == len(ranges):
        return ranges
    return [ByteRange(start, end) for start, end, _first in sorted(groups, key=lambda g: g[2])]


def _etag_listed(header: str, etag: str, weak: bool) -> bool:
    """nginx's ngx_http_test_if_match: ``*`` or a listed tag equal to ours (W/ ignored when weak)."""
    if header.strip() == "*":
        return True
    ours = etag[2:] if etag.startswith("W/") else etag
    for candidate in header.split(","):
        candidate = candidate.strip()
        if weak and candidate.startswith("W/"):
            candidate = candidate[2:]
        if hmac.compare_digest(candidate.encode(), (ours if weak else etag).encode()):
            return True
    return False


def _date(header: str) -> int | None:
    parsed: datetime | None = parse_date(header)
    return int(parsed.timestamp()) if parsed else None


def evaluate(headers, *, size: int, etag: str, mtime: int) -> Plan:
    """The status of a GET/HEAD for a file of ``size`` bytes, in nginx's order of evaluation:
    If-Unmodified-Since / If-Match (412), If-Modified-Since / If-None-Match (304), then If-Range and
    Range (206 / 416 / 200). ``headers`` is any mapping with ``.get``; ``mtime`` is in unix seconds.

    Like nginx's default ``if_modified_since exact``, a date condition holds only on exact equality
    (RFC 9110 §13.1.3 allows this: the server decides what "modified" means for its resources).
    """
    ius = headers.get("If-Unmodified-Since")
    if ius is not None:
        when = _date(ius)
        if when is None or when < mtime:  # nginx: an unreadable date fails the precondition
            return Plan(412)
    if_match = headers.get("If-Match")
    if if_match is not None and not _etag_listed(if_match, etag, weak=False):
        return Plan(412)
    ims, inm = headers.get("If-Modified-Since"), headers.get("If-None-Match")
    if ims is not None or inm is not None:
        modified = ims is not None and _date(ims) != mtime
        if not modified and not (inm is not None and not _etag_listed(inm, etag, weak=True)):
            return Plan(304)
    range_header = headers.get("Range")
    if range_header is None or len(range_header) < 7 or range_header[:6].lower() != "bytes=":
        return Plan(200)
    if_range = headers.get("If-Range")
    if if_range is not None:
        if len(if_range) >= 2 and if_range.endswith('"'):
            if not hmac.compare_digest(if_range.encode(), etag.encode()):
                return Plan(200)
        elif _date(if_range) != mtime:
            return Plan(200)
    try:
        ranges = parse_ranges(range_header, size)
    except Unsatisfiable:
        return Plan(416)
    if ranges is None:
        return Plan(200)
    return Plan(206, ranges)
