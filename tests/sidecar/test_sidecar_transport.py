"""How the sidecar talks HTTP and where its counters come from: keep-alive under gunicorn, headers of
HEAD answers, the live transfer counters handed in to the delivery rules (which never import it)."""
from __future__ import annotations

import ast
import http.client
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from app.downloads.serving import COUNTERS_EXTENSION, NoCounters, transfer_counters
from tests.helpers import ROOT, grant_link, make_product
from tests.servers import path_of

FILES = {"readme.txt": b"hello reader\n", "big.bin": 3_000_000}


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_the_rules_import_nothing_from_the_sidecar():
    """Also imports inside functions: the sidecar hands its counters in instead."""
    offenders = {str(path.relative_to(ROOT)): sorted(name for name in _imported_modules(path)
                                                     if name == "sidecar" or name.startswith("sidecar."))
                 for path in (ROOT / "app").rglob("*.py")}
    assert {path: names for path, names in offenders.items() if names} == {}


class Recorder:
    def __init__(self):
        self.events: list[tuple[str, int | None]] = []

    def transfer_started(self) -> None:
        self.events.append(("started", None))

    def transfer_finished(self, sent: int) -> None:
        self.events.append(("finished", sent))


@pytest.mark.config(SIDECAR_FAST_PATH=False)  # the fast path counts with sidecar.metrics itself
def test_the_flask_path_counts_through_the_counters_handed_in(app, sc, sidecar_app):
    from sidecar import metrics

    assert transfer_counters(sidecar_app) is metrics  # the sidecar's factory hands them in
    assert isinstance(transfer_counters(app), NoCounters)  # the store counts nothing
    recorder = Recorder()
    sidecar_app.extensions[COUNTERS_EXTENSION] = recorder
    make_product(app, "BOOK", FILES)
    link = grant_link(app, "BOOK", max_downloads=None)
    whole = sc.get(path_of(link) + "f/big.bin")
    assert whole.status_code == 200 and len(whole.data) == 3_000_000
    part = sc.get(path_of(link) + "f/readme.txt", headers={"Range": "bytes=0-4"})
    assert part.status_code == 206 and part.data == b"hello"
    assert recorder.events == [("started", None), ("finished", 3_000_000), ("started", None), ("finished", 5)]


@pytest.fixture
def served(app, sidecar):
    make_product(app, "BOOK", FILES)
    server = sidecar()
    return server, grant_link(app, "BOOK", max_downloads=None)


def _connection(server) -> http.client.HTTPConnection:
    u = urlsplit(server.url)
    return http.client.HTTPConnection(u.hostname, u.port, timeout=10)


@pytest.mark.backends("sqlite")
def test_two_requests_share_one_connection(served):
    """Download managers and the verifying client reuse their connection (gunicorn keepalive)."""
    server, link = served
    path = urlsplit(link).path
    conn = _connection(server)
    try:
        answers = []
        for target, headers in ((path, {"Accept": "application/json"}), (path + "f/readme.txt", {}),
                                (path + "f/big.bin", {"Range": "bytes=0-99"})):
            conn.request("GET", target, headers=headers)
            resp = conn.getresponse()
            answers.append((resp.status, resp.getheader("Connection", "").lower(), len(resp.read())))
            assert conn.sock is not None, f"the sidecar closed the connection after {target}"
            local = conn.sock.getsockname()
        assert [(status, connection) for status, connection, _ in answers] == [
            (200, "keep-alive"), (200, "keep-alive"), (206, "keep-alive")]
        assert answers[1][2] == len(FILES["readme.txt"]) and answers[2][2] == 100
        assert conn.sock.getsockname() == local
    finally:
        conn.close()
    assert "No keepalived connections" not in server.log_path.read_text()


@pytest.mark.backends("sqlite")
def test_corked_bodies_end_without_the_cork_delay(served):
    """Bodies go out corked (nginx's tcp_nopush); the last partial segment must leave at the end of the
    body, not when Linux's 200 ms cork timer fires, or every kept-alive request would stall."""
    server, link = served
    path = urlsplit(link).path
    conn = _connection(server)
    try:
        conn.request("GET", path + "f/readme.txt")  # warm up: the first request opens the database
        conn.getresponse().read()
        times = []
        for target, headers in ((path + "f/readme.txt", {}), (path + "f/big.bin", {"Range": "bytes=7-50006"}),
                                (path + "f/readme.txt", {}), (path + "f/big.bin", {"Range": "bytes=3-1000"})):
            started = time.perf_counter()
            conn.request("GET", target, headers=headers)
            resp = conn.getresponse()
            body = resp.read()
            times.append(time.perf_counter() - started)
            assert resp.status in (200, 206) and len(body) == int(resp.getheader("Content-Length"))
        assert min(times) < 0.15, times  # a forgotten uncork costs >= 200 ms on every one of them
    finally:
        conn.close()


@pytest.mark.backends("sqlite")
def test_retry_after_only_on_refusals_that_ask_to_wait(app, sidecar):
    """A HEAD (or any answer) the client may act on now carries no Retry-After; a 429 does."""
    make_product(app, "BOOK", FILES)
    server = sidecar(SOFTGOODS_LINK_GUESS_LIMIT="2 per minute")
    path = urlsplit(grant_link(app, "BOOK", max_downloads=None)).path
    conn = _connection(server)
    try:
        for method, target in (("HEAD", path + "f/readme.txt"), ("HEAD", path), ("GET", path),
                               ("GET", path + "f/readme.txt"), ("HEAD", path + "f/nothing.txt")):
            conn.request(method, target)
            resp = conn.getresponse()
            resp.read()
            assert resp.getheader("Retry-After") is None, (method, target, resp.status)
        forged = path[:-9] + ("x" if path[-9] != "x" else "y") + path[-8:]
        statuses = []
        while len(statuses) < 5 and 429 not in statuses:  # the limit allows 2 failed lookups a minute
            conn.request("GET", forged)
            resp = conn.getresponse()
            resp.read()
            statuses.append(resp.status)
        assert statuses[0] == 404 and statuses[-1] == 429 and 1 <= int(resp.getheader("Retry-After")) <= 60
    finally:
        conn.close()
