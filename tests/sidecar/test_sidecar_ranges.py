"""Range and conditional requests: the rules alone, then the differential against a real nginx."""
from __future__ import annotations

import re
import urllib.request
from email.utils import formatdate

import pytest

from app.downloads.ranges import ByteRange, Unsatisfiable, evaluate, parse_ranges
from tests.helpers import grant_link, make_product

SIZE = 10_000


@pytest.mark.parametrize("header, expected", [
    ("bytes=0-499", [(0, 500)]),
    ("bytes=9500-", [(9500, 10000)]),
    ("bytes=-500", [(9500, 10000)]),
    ("bytes=-20000", [(0, 10000)]),
    ("bytes=0-0,-1", [(0, 1), (9999, 10000)]),
    ("BYTES=1-2", [(1, 3)]),
    ("bytes= 1 - 2 , 4-5", [(1, 3), (4, 6)]),
    ("bytes=9990-20000", [(9990, 10000)]),
    ("bytes=500-100,0-1", [(0, 2)]),  # a backwards range is skipped, as nginx does
    ("bytes=0-", None),  # nginx ignores nothing here: whole file as one range
    ("items=0-1", None),
    ("bytes=", None),
    ("bytes=0-9999,0-9999", None),  # more than the file: sent whole
    # Where we knowingly differ from nginx (issue 12): overlapping and adjacent parts are coalesced,
    # in the order of their first range-spec, and more than 16 parts after that are sent whole.
    ("bytes=0-4999,5000-", [(0, 10000)]),
    ("bytes=500-600,0-1,1-2,601-700", [(500, 701), (0, 3)]),
    ("bytes=" + ",".join(["0-1"] * 2000), [(0, 2)]),
    ("bytes=" + ",".join(f"{i * 10}-{i * 10 + 4}" for i in range(16)), [(i * 10, i * 10 + 5) for i in range(16)]),
    ("bytes=" + ",".join(f"{i * 10}-{i * 10 + 4}" for i in range(17)), None),
    ("bytes=" + ",".join(f"{i * 10}-{i * 10 + 9}" for i in range(17)), [(0, 170)]),
])
def test_parse_ranges_follows_nginx(header, expected):
    got = parse_ranges(header, SIZE)
    if header == "bytes=0-":
        assert got == [ByteRange(0, SIZE)]
    elif expected is None:
        assert got is None
    else:
        assert [(r.start, r.end) for r in got] == expected


@pytest.mark.parametrize("header", ["bytes=10000-", "bytes=-0", "bytes=abc", "bytes=1-2x", "bytes=--1",
                                    "bytes=5-4", "bytes=99999999999999999999-"])
def test_unsatisfiable_ranges(header):
    with pytest.raises(Unsatisfiable):
        parse_ranges(header, SIZE)


def test_conditionals_in_nginx_order():
    etag, mtime = '"abc"', 1_700_000_000
    date = formatdate(mtime, usegmt=True)
    assert evaluate({"If-None-Match": '"abc"'}, size=SIZE, etag=etag, mtime=mtime).status == 304
    assert evaluate({"If-None-Match": 'W/"abc"'}, size=SIZE, etag=etag, mtime=mtime).status == 304
    assert evaluate({"If-Modified-Since": date}, size=SIZE, etag=etag, mtime=mtime).status == 304
    assert evaluate({"If-Match": '"zzz"'}, size=SIZE, etag=etag, mtime=mtime).status == 412
    assert evaluate({"If-Unmodified-Since": formatdate(mtime - 10, usegmt=True)},
                    size=SIZE, etag=etag, mtime=mtime).status == 412
    assert evaluate({"Range": "bytes=0-1", "If-Range": '"abc"'}, size=SIZE, etag=etag, mtime=mtime).status == 206
    assert evaluate({"Range": "bytes=0-1", "If-Range": '"old"'}, size=SIZE, etag=etag, mtime=mtime).status == 200
    assert evaluate({"Range": "bytes=0-1", "If-Range": date}, size=SIZE, etag=etag, mtime=mtime).status == 206


# (Range, If-Range) — "{etag}" / "{date}" stand for the answering server's own validators.
DIFFERENTIAL_CASES = [
    ("bytes=0-0", None), ("bytes=0-499", None), ("bytes=500-999", None), ("bytes=9000-", None),
    ("bytes=0-", None), ("bytes=-1", None), ("bytes=-500", None), ("bytes=-99999", None),
    ("bytes=9999-9999", None), ("bytes=9990-20000", None), ("bytes=10000-", None), ("bytes=10000-10005", None),
    ("bytes=-0", None), ("bytes=abc", None), ("bytes=1-2x", None), ("bytes=5-4", None), ("bytes=", None),
    ("bytes=--5", None), ("items=0-5", None), ("bytes = 0-5", None), ("BYTES=0-5", None),
    ("bytes= 0 - 5 ", None), ("bytes=0-1,3-4", None), ("bytes=0-1,-1", None), ("bytes=500-100,0-1", None),
    ("bytes=0-9999,0-9999", None), ("bytes=0-4999,6000-", None), ("bytes=0-1,,3-4", None),
    ("bytes=99999999999999999999-", None), ("bytes=0-1", "{etag}"), ("bytes=0-1", '"not-the-etag"'),
    ("bytes=0-1", "W/{etag}"), ("bytes=0-1", "{date}"), ("bytes=0-1", "Mon, 01 Jan 2001 00:00:00 GMT"),
    ("bytes=0-1", "garbage"), ("bytes=10000-", "{etag}"), ("bytes=5000-", "{date}"),
]


def _fetch(url: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, {k.lower(): v for k, v in err.headers.items()}, err.read()


def _normalized(headers: dict[str, str], body: bytes) -> bytes:
    match = re.search(r"boundary=(\S+)", headers.get("content-type", ""))
    return body.replace(match.group(1).encode(), b"BOUNDARY") if match else body


@pytest.mark.backends("sqlite")
def test_range_answers_match_nginx_byte_for_byte(app, sidecar, nginx):
    make_product(app, "RANGES", {"data.bin": SIZE, "empty.bin": b""})
    server = sidecar()
    reference = nginx("static")
    link = grant_link(app, "RANGES", max_downloads=None)
    compared = 0
    for name in ("data.bin", "empty.bin"):
        ours_url, theirs_url = f"{link}f/{name}", f"{reference.url}/static-files/RANGES/{name}"
        validators = {}
        for key, url in (("ours", ours_url), ("theirs", theirs_url)):
            status, head, _ = _fetch(url, {})
            assert status == 200 and "etag" in head, (key, status, head)
            validators[key] = {"etag": head["etag"], "date": head["last-modified"]}
        cases = DIFFERENTIAL_CASES if name == "data.bin" else DIFFERENTIAL_CASES[:12]
        for range_header, if_range in cases:
            answers = {}
            for key, url in (("ours", ours_url), ("theirs", theirs_url)):
                headers = {"Range": range_header}
                if if_range is not None:
                    headers["If-Range"] = if_range.format(**validators[key])
                answers[key] = _fetch(url, headers)
            (s1, h1, b1), (s2, h2, b2) = answers["ours"], answers["theirs"]
            case = f"{name} Range={range_header!r} If-Range={if_range!r}"
            assert s1 == s2, f"{case}: status {s1} vs nginx {s2}"
            assert h1.get("content-range") == h2.get("content-range"), case
            if s1 != 416:  # 416 bodies are each server's own error page
                assert _normalized(h1, b1) == _normalized(h2, b2), case
                assert h1.get("content-length") == h2.get("content-length"), case
            compared += 1
    assert compared >= 25 + 12
    assert server.proc.poll() is None


@pytest.mark.backends("sqlite")
def test_where_we_knowingly_differ_from_nginx(app, sidecar, nginx):
    """Adjacent parts: nginx sends two multipart parts, we coalesce them into one 206 part; 17 parts:
    nginx sends 17, we send the whole file with 200 (ranges.MAX_PARTS)."""
    make_product(app, "RANGES", {"data.bin": SIZE})
    sidecar()
    reference = nginx("static")
    ours = f"{grant_link(app, 'RANGES', max_downloads=None)}f/data.bin"
    theirs = f"{reference.url}/static-files/RANGES/data.bin"
    status, head, body = _fetch(ours, {"Range": "bytes=0-4999,5000-"})
    assert (status, head["content-range"], len(body)) == (206, f"bytes 0-9999/{SIZE}", SIZE)
    status, head, _ = _fetch(theirs, {"Range": "bytes=0-4999,5000-"})
    assert status == 206 and head["content-type"].startswith("multipart/byteranges")
    seventeen = "bytes=" + ",".join(f"{i * 10}-{i * 10 + 4}" for i in range(17))
    assert _fetch(ours, {"Range": seventeen})[0] == 200
    assert _fetch(theirs, {"Range": seventeen})[0] == 206
