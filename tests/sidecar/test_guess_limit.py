"""Issue 12 item 8: the link-guess limit counts and refuses only failed lookups, and one host's
workers (and, with REDIS_URL, several hosts) share it. Real gunicorn sidecars with 2 workers."""
from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest

from tests.helpers import grant_link, make_product

LIMIT = 5


def status_of(url: str, method: str = "GET", accept: str = "application/json") -> int:
    req = urllib.request.Request(url, method=method, headers={"Accept": accept, "Connection": "close"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            resp.read()
            return resp.status
    except urllib.error.HTTPError as refused:
        refused.read()
        refused.close()
        return refused.code


def dribbled_get(url: str) -> int:
    """A GET whose headers arrive in two parts: it keeps its worker's only thread busy meanwhile, so
    requests sent at once are spread over both workers."""
    u = urlsplit(url)
    with socket.create_connection((u.hostname, u.port), timeout=10) as s:
        s.sendall(f"GET {u.path} HTTP/1.1\r\n".encode())
        time.sleep(0.05)
        s.sendall(f"Host: {u.netloc}\r\nAccept: application/json\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return int(data.split()[1])


def forged(link: str) -> str:
    i = len(link) - 8
    return link[:i] + ("x" if link[i] != "x" else "y") + link[i + 1:]


@pytest.fixture
def guarded(app, sidecar):
    make_product(app, "MANUAL", {"book.pdf": 50_000})
    limit = {"SOFTGOODS_LINK_GUESS_LIMIT": f"{LIMIT} per minute",
             "SOFTGOODS_RATELIMIT_PREFIX": "sgtest-" + uuid.uuid4().hex}
    server = sidecar(threads=1, **limit)
    return {"server": server, "link": grant_link(app, "MANUAL", max_downloads=None), "limit": limit}


def test_exactly_the_limit_of_failures_across_two_workers(guarded):
    bad = forged(guarded["link"])
    with ThreadPoolExecutor(4) as pool:  # both workers take some (memory:// let each allow LIMIT)
        codes = list(pool.map(lambda _: dribbled_get(bad), range(6 * LIMIT)))
    assert sorted(codes) == [404] * LIMIT + [429] * (5 * LIMIT)


def test_a_good_link_is_never_answered_429(guarded):
    link, bad = guarded["link"], forged(guarded["link"])
    for _ in range(3 * LIMIT):
        status_of(bad)
    assert status_of(bad) == 429
    metalink = link + "m/book.pdf.meta4"
    for _ in range(10):  # every request kind the verifying client starts with, on both workers
        assert status_of(link) == 200
        assert status_of(link, accept="text/html") == 200
        assert status_of(link, method="HEAD") == 200
        assert status_of(metalink) == 200
        assert status_of(metalink, method="HEAD") == 200
        assert status_of(link + "f/book.pdf", method="HEAD") == 200
        assert status_of(link + "f/book.pdf") == 200
    assert status_of(bad) == 429


def test_the_refusal_says_when_to_come_back(guarded):
    bad = forged(guarded["link"])
    for _ in range(LIMIT):
        status_of(bad)
    req = urllib.request.Request(bad, headers={"Accept": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=10)
    assert refused.value.code == 429 and 1 <= int(refused.value.headers["Retry-After"]) <= 60
    assert json.load(refused.value)["error"] == "Too many attempts from your address."
    refused.value.close()


def test_two_sidecars_with_redis_share_one_limit(app, guarded, sidecar):
    shared = {**guarded["limit"], "REDIS_URL": "redis://127.0.0.1:6379/0"}
    first, second = sidecar(**shared), sidecar(**shared)
    path = guarded["link"].removeprefix(guarded["server"].url)
    bad = forged(path)
    codes = [status_of((first if i % 2 else second).url + bad) for i in range(2 * LIMIT)]
    assert sorted(codes) == [404] * LIMIT + [429] * LIMIT
    assert status_of(second.url + path) == 200 and status_of(first.url + path) == 200
