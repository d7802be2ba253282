"""gunicorn settings for the sidecar (DESIGN.md measurements).

gthread: sendfile works (gevent's socket falls back to send(), 0.3-0.44x nginx), and a slow download
holds one cheap thread, not a process, so hundreds of them leave listings answered in milliseconds.
Override with SOFTGOODS_SIDECAR_WORKERS / SOFTGOODS_SIDECAR_THREADS (read here: this file is gunicorn's
config, not the app's).
"""
import os
import resource

# gthread, and it stops accepting while all its threads are busy (sidecar/worker.py).
worker_class = "sidecar.worker.DownloadWorker"
workers = int(os.environ.get("SOFTGOODS_SIDECAR_WORKERS") or 2)
# 2 x 5,000: 10,000 concurrent slow downloads, a thread each (README "Performance": memory per worker).
threads = int(os.environ.get("SOFTGOODS_SIDECAR_THREADS") or 5000)
# Beyond the threads, room for as many idle kept-alive connections (an fd each): gthread keeps a
# connection alive only while fewer than worker_connections - threads are kept.
worker_connections = 2 * threads
# A download holds its socket and its file open, a kept-alive connection its socket: ~3 fds per thread,
# more than the usual soft limit of 1,024. Raised to the hard limit (the workers inherit it).
_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
_most = _hard if _hard != resource.RLIM_INFINITY else 1 << 20
if _soft != resource.RLIM_INFINITY and _soft < _most:
    resource.setrlimit(resource.RLIMIT_NOFILE, (_most, _hard))
if _most < 3 * threads + 64:
    print(f"sidecar: only {_most} file descriptors per worker for {threads} threads; raise the hard limit "
          "(ulimit -Hn, LimitNOFILE=) or lower SOFTGOODS_SIDECAR_THREADS", flush=True)
# sendfile: leave UNSET. gunicorn's Config.sendfile is False whenever the setting is not None, so
# "sendfile = True" here would switch it off (measured: 3,000 read()+sendto() per 24 MiB instead of
# one sendfile). Unset, it is on unless the SENDFILE environment variable says otherwise.
keepalive = 5
timeout = 60  # the worker heartbeat; long transfers run in threads and do not block it
graceful_timeout = 10
backlog = 4096  # connections a burst leaves queued in the kernel (capped by net.core.somaxconn)
accesslog = None
errorlog = "-"



def on_starting(server):
    """Check the settings once in the master: a bad one (say an example SOFTGOODS_SECRET_KEY) stops
    gunicorn with its one-line reason instead of workers failing and being respawned forever."""
    from app.config import load_settings

    load_settings()
