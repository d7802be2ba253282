"""Issue 12 item 9: a listing served after a file response has ended reflects that response, whichever
worker answers it. Real gunicorn sidecar with 2 workers, both databases, many repetitions."""
from __future__ import annotations

import http.client
import json
from urllib.parse import urlsplit

from tests.helpers import grant_link, make_product

ROUNDS = 40


def get(url: str, accept: str = "*/*") -> tuple[int, bytes]:
    """One request on its own connection (a reload may reach the other worker)."""
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    try:
        conn.request("GET", u.path, headers={"Accept": accept})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_listing_right_after_a_download_shows_it(app, sidecar):
    make_product(app, "MANUAL", {"small.txt": 4096})
    # A generous bound: on this shared 2-core box a close can take longer than the 0.1 s default.
    sidecar(SOFTGOODS_LISTING_CLOSE_WAIT_SECONDS="3")
    stale = []
    for round_ in range(ROUNDS):
        link = grant_link(app, "MANUAL", max_downloads=3)
        for used in (1, 2):
            status, body = get(link + "f/small.txt")
            assert status == 200 and len(body) == 4096
            left = json.loads(get(link, "application/json")[1])["files"][0]["downloads_left"]
            if left != 3 - used:
                stale.append((round_, used, left))
        assert get(link + "f/small.txt")[0] == 200
        assert get(link, "application/json")[0] == 403  # used up: the listing says so at once
    assert stale == []
