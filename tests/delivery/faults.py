"""A TCP proxy on loopback that damages the download path on purpose: cuts connections, flips bytes,
throttles. Started and stopped by the ``fault_proxy`` fixture; counts every byte it forwards to the
client so tests can measure what a fault cost."""
from __future__ import annotations

import socket
import threading
import time

import pytest

ELIGIBLE_AFTER = 64 * 1024  # leave listings and Metalinks alone: faults hit file bodies only


class FaultProxy:
    def __init__(self, upstream_port: int, *, cuts: list[int] | None = None, flips: list[int] | None = None,
                 rate: float | None = None):
        self.upstream_port = upstream_port
        self.cuts = sorted(cuts or [])     # global downstream byte counts at which to cut a connection
        self.flips = sorted(flips or [])   # ... at which to flip one byte
        self.rate = rate                   # bytes per second, all connections together
        self.forwarded = 0                 # bytes sent to the client
        self.faults_done = 0
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.sockets: list[socket.socket] = []
        self.stopped = False
        self.started_at = time.monotonic()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=10)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, downstream: bool) -> None:
        relayed = 0
        try:
            src.settimeout(30)
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if downstream:
                    data, cut = self._apply_faults(bytearray(data), relayed)
                    if self.rate:
                        self._throttle(len(data))
                    dst.sendall(data)
                    relayed += len(data)
                    with self.lock:
                        self.forwarded += len(data)
                    if cut:
                        break
                else:
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def _apply_faults(self, data: bytearray, relayed: int) -> tuple[bytearray, bool]:
        with self.lock:
            position = self.forwarded
            eligible = relayed + len(data) > ELIGIBLE_AFTER
            if eligible and self.cuts and position + len(data) >= self.cuts[0]:
                self.cuts.pop(0)
                self.faults_done += 1
                keep = max(1, min(len(data), self.cuts_keep(position, data)))
                return data[:keep], True
            if eligible and self.flips and position + len(data) >= self.flips[0]:
                self.flips.pop(0)
                self.faults_done += 1
                index = len(data) - 1
                data[index] ^= 0xFF
        return data, False

    @staticmethod
    def cuts_keep(position: int, data: bytearray) -> int:
        return len(data) // 2

    def _throttle(self, n: int) -> None:
        with self.lock:
            due = self.started_at + (self.forwarded + n) / self.rate
        pause = due - time.monotonic()
        if pause > 0:
            time.sleep(min(pause, 1.0))

    def retarget(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port

    def stop(self) -> None:
        self.stopped = True
        self.listener.close()
        with self.lock:
            for s in self.sockets:
                try:
                    s.close()
                except OSError:
                    pass


@pytest.fixture
def fault_proxy():
    proxies: list[FaultProxy] = []

    def start(upstream_port: int, **faults) -> FaultProxy:
        proxy = FaultProxy(upstream_port, **faults)
        proxies.append(proxy)
        return proxy

    yield start
    for proxy in proxies:
        proxy.stop()
