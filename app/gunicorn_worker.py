"""The store's gunicorn worker: gthread with a bounded time to receive a request's headers.

gunicorn's gthread worker hands a connection to a thread as soon as its first byte arrives, and the
thread then waits for the rest of the headers for as long as the client likes: a few clients sending
one header byte now and then (slowloris) hold every thread and stop the shop. Here every request
gets ``HEADER_SECONDS`` from its first byte to its last header line; a client still sending headers
then is dropped. Bodies and responses run at the client's pace (uploads can be large). nginx in front
(deploy/nginx-store.conf) buffers whole requests anyway; this keeps a store reached directly alive.
"""
from __future__ import annotations

import time

from gunicorn.workers.gthread import ThreadWorker

HEADER_SECONDS = 10.0  # set by app/gunicorn.conf.py from SOFTGOODS_STORE_HEADER_TIMEOUT


class _HeaderClock:
    """The socket the request parser reads from, with the connection's header deadline applied."""

    def __init__(self, sock, conn):
        self._sock, self._conn = sock, conn

    def recv(self, size: int) -> bytes:
        deadline = self._conn.header_deadline
        if deadline is None:
            return self._sock.recv(size)
        left = deadline - time.monotonic()
        if left <= 0:
            return self._time_up()
        self._sock.settimeout(left)
        try:
            return self._sock.recv(size)
        except TimeoutError:
            return self._time_up()
        finally:
            self._sock.settimeout(None)  # blocking again, as gthread expects

    def _time_up(self) -> bytes:
        self._conn.header_timed_out = True
        return b""  # the parser reads this as "client gone" and ends the request quietly

    def __getattr__(self, name):
        return getattr(self._sock, name)


class HeaderDeadlineWorker(ThreadWorker):
    def handle(self, conn):
        conn.header_deadline = time.monotonic() + HEADER_SECONDS  # per request, also on kept-alive connections
        if not getattr(conn, "header_clock", False):
            conn.header_clock = True
            init = conn.init

            def init_with_clock():
                init()
                unreader = getattr(conn.parser, "unreader", None)
                if unreader is not None and hasattr(unreader, "sock"):
                    unreader.sock = _HeaderClock(unreader.sock, conn)

            conn.init = init_with_clock
        return super().handle(conn)

    def finish_request(self, conn, fs):
        if getattr(conn, "header_timed_out", False):
            # No graceful close: it lingers up to 2 s on the main loop reading what the client still
            # sends, and a dripping client always sends; 200 of them would stall accepting for minutes.
            self.nr_conns -= 1
            conn.close()
            return
        super().finish_request(conn, fs)

    def handle_request(self, req, conn):
        conn.header_deadline = None  # the headers are in
        return super().handle_request(req, conn)
