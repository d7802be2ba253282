"""gunicorn's gthread worker, accepting a connection only while one of its threads is free.

gthread stops accepting when its open connections reach ``worker_connections``, kept-alive idle ones
included, and gives keep-alive only to ``worker_connections - threads`` of them. With room for kept-alive
connections, a worker whose threads are all busy sending slow downloads would still accept new
connections and park them in its thread pool's queue, where they starve while the other worker has
free threads (measured before: 209 of 1,000 slow downloads starved with 2 x 600 threads and
worker_connections = 1,300). So this worker also stops accepting while every thread is busy, and
``worker_connections`` can leave room for idle kept-alive connections (an fd each, no thread).
"""
from __future__ import annotations

from gunicorn.workers.gthread import ThreadWorker


class DownloadWorker(ThreadWorker):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.busy_threads = 0  # connections handed to the pool and not finished (main thread only)

    def set_accept_enabled(self, enabled: bool) -> None:
        super().set_accept_enabled(enabled and self.busy_threads < self.cfg.threads)

    def enqueue_req(self, conn) -> None:
        self.busy_threads += 1
        super().enqueue_req(conn)
        if self.busy_threads >= self.cfg.threads:
            self.set_accept_enabled(False)  # the run loop enables it again once a thread is free

    def finish_request(self, conn, fs) -> None:
        self.busy_threads -= 1
        super().finish_request(conn, fs)
