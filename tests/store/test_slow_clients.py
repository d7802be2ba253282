"""The store under its shipped gunicorn config (app/gunicorn.conf.py): 200 connections that send their
headers a line at a time never finish them, and a shopper still checks out; the server drops the slow
ones once the header time is up. With ``sync`` workers four such connections froze the store."""
import os
import re
import socket
import sys
import threading
import time

import pytest

from tests.helpers import ROOT, ServerProcess, free_port, make_product
from tests.store.test_live_store import Browser

SLOW_CLIENTS = 200
HEADER_TIMEOUT = 6


@pytest.fixture
def store(app, env, tmp_path):
    make_product(app, "EBOOK1", {"book.pdf": 1000}, price="9.99", name="The Book")
    port = free_port()
    server = ServerProcess([sys.executable, "-m", "gunicorn", "-c", "app/gunicorn.conf.py",
                            "--bind", f"127.0.0.1:{port}", "wsgi:app"],
                           env={**env, "SOFTGOODS_STORE_HEADER_TIMEOUT": str(HEADER_TIMEOUT)}, port=port,
                           log_path=tmp_path / "store.log")
    try:
        yield server.wait_ready()
    finally:
        server.stop()


class Slowloris:
    """Connections that start a request and then send one more header line every second, forever."""

    def __init__(self, port: int, count: int):
        self.socks = []
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            self.socks.append(sock)
        self.closed_by_server = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drip, daemon=True)
        self._thread.start()

    def _drip(self) -> None:
        while not self._stop.wait(1.0):
            for sock in list(self.socks):
                try:
                    sock.sendall(b"X-Slow: 1\r\n")
                except OSError:
                    sock.close()
                    self.socks.remove(sock)
                    self.closed_by_server += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for sock in self.socks:
            sock.close()


def checkout(url: str) -> float:
    """One shopper's whole purchase; returns how long it took."""
    started = time.monotonic()
    browser = Browser(url)
    browser.add("EBOOK1", 1)
    assert browser.pay(browser.checkout_form("buyer@example.com")).startswith("SG-")
    return time.monotonic() - started


def test_slow_header_connections_do_not_stop_a_checkout(store):
    attack = Slowloris(store.port, SLOW_CLIENTS)
    try:
        time.sleep(1.5)  # every slow connection has reached a worker and is dripping headers
        assert checkout(store.url) < 5
        time.sleep(HEADER_TIMEOUT)  # now the server is dropping all 200 at once
        assert checkout(store.url) < 5
        deadline = time.monotonic() + 10
        while attack.closed_by_server < SLOW_CLIENTS and time.monotonic() < deadline:
            time.sleep(0.5)
        assert attack.closed_by_server == SLOW_CLIENTS  # none outlived the header time
    finally:
        attack.stop()


def nginx_store_conf(port: int, upstream_port: int, prefix) -> str:
    """deploy/nginx-store.conf with this test's ports and folders (the tests test what we ship)."""
    conf = (ROOT / "deploy" / "nginx-store.conf").read_text()
    conf = conf.replace("listen 80;", f"listen 127.0.0.1:{port};")
    conf = conf.replace("server 127.0.0.1:8000;", f"server 127.0.0.1:{upstream_port};")
    conf = conf.replace("/var/log/nginx/", f"{prefix}/").replace("/run/", f"{prefix}/")
    return re.sub(r"^user .*;$", "user root;" if os.geteuid() == 0 else "", conf, flags=re.M)


@pytest.mark.backends("sqlite")
def test_behind_the_shipped_nginx_conf_slow_headers_do_not_stop_a_checkout(store, tmp_path, backend_name):
    port, prefix = free_port(), tmp_path / "nginx"
    (prefix / "temp").mkdir(parents=True)
    (prefix / "nginx.conf").write_text(nginx_store_conf(port, store.port, prefix))
    front = ServerProcess(["/usr/sbin/nginx", "-p", str(prefix), "-c", str(prefix / "nginx.conf"),
                           "-g", "daemon off; master_process on;"], {}, port, health_path="/nginx-health",
                          log_path=prefix / "stderr.log")
    try:
        front.wait_ready()
        attack = Slowloris(port, SLOW_CLIENTS)
        try:
            time.sleep(1.5)
            assert checkout(front.url) < 5
        finally:
            attack.stop()
    finally:
        front.stop()
