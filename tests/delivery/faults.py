"""A TCP proxy on loopback that damages the download path on purpose: cuts connections, flips bytes,
throttles. Started and stopped by the ``fault_proxy`` fixture; counts every byte it forwards to the
client so tests can measure what a fault cost."""
from __future__ import annotations

import socket
import threading
import time

import pytest

ELIGIBLE_AFTER = 64 * 1024  # leave listings and Metalinks alone: faults hit file bodies only
BURST = 0.1  # seconds of unused rate a throttled proxy may catch up on


class FaultProxy:
    def __init__(self, upstream_port: int, *, cuts: list[int] | None = None, flips: list[int] | None = None,
                 rate: float | None = None, hold_at: int | None = None, upstream_buffer: int | None = None):
        self.upstream_port = upstream_port
        self.cuts = sorted(cuts or [])     # global downstream byte counts at which to cut a connection
        self.flips = sorted(flips or [])   # ... at which to flip one byte
        self.rate = rate                   # bytes per second, all connections together
        # A pause point: forwarding stops when ``hold_at`` bytes went to the client (``holding`` is set)
        # until ``release()``, so a test can change the shop while a transfer is known to be mid-way.
        self.hold_at = hold_at
        self.holding = threading.Event()
        self.released = threading.Event()
        # A fixed receive buffer towards the server (no autotuning, which may grow to tcp_rmem's
        # maximum, 32 MiB here): bounds how far the server can get ahead of a held or slow proxy.
        self.upstream_buffer = upstream_buffer
        self.forwarded = 0                 # bytes sent to the client
        self.faults_done = 0
        self.lock = threading.Lock()
        self.throttle_due = 0.0            # when the bytes forwarded so far were due at ``rate``
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.sockets: list[socket.socket] = []
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                if self.upstream_buffer:  # before connect: the window is negotiated at the handshake
                    upstream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.upstream_buffer)
                upstream.settimeout(10)
                upstream.connect(("127.0.0.1", self.upstream_port))
            except OSError:
                upstream.close()
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
                    relayed += self._forward(dst, data)
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

    def _forward(self, dst: socket.socket, data: bytearray) -> int:
        """Send ``data`` to the client, stopping at the pause point until ``release()``."""
        with self.lock:
            room = None if self.hold_at is None else self.hold_at - self.forwarded
        if room is not None and room < len(data):
            head = data[:max(0, room)]
            self._send_counted(dst, head)
            self.holding.set()
            if not self.released.wait(60):  # a test that forgot release(): fail, never hang
                raise OSError("the proxy was held and never released")
            data = data[len(head):]
            return len(head) + self._send_counted(dst, data)
        return self._send_counted(dst, data)

    def _send_counted(self, dst: socket.socket, data: bytearray) -> int:
        if data:
            dst.sendall(data)
            with self.lock:
                self.forwarded += len(data)
        return len(data)

    def release(self) -> None:
        with self.lock:
            self.hold_at = None
        self.released.set()

    def _throttle(self, n: int) -> None:
        """Keep to ``rate`` with at most BURST seconds of saved-up credit: time spent before the first
        request (client start-up, a slow machine) must not become a burst at full speed."""
        rate = self.rate
        if not rate:
            return
        with self.lock:
            now = time.monotonic()
            self.throttle_due = max(self.throttle_due, now - BURST) + n / rate
            pause = self.throttle_due - now
        if pause > 0:
            time.sleep(min(pause, 1.0))

    def retarget(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port

    def stop(self) -> None:
        self.stopped = True
        self.released.set()  # a held pump thread ends with its sockets
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
