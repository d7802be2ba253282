"""gunicorn settings for the sidecar (DESIGN.md measurements).

gthread: sendfile works (gevent's socket falls back to send(), 0.3-0.44x nginx), and a slow download
holds one cheap thread, not a process, so hundreds of them leave listings answered in milliseconds.
Override with SOFTGOODS_SIDECAR_WORKERS / SOFTGOODS_SIDECAR_THREADS (read here: this file is gunicorn's
config, not the app's).
"""
import os

worker_class = "gthread"
workers = int(os.environ.get("SOFTGOODS_SIDECAR_WORKERS") or 2)
threads = int(os.environ.get("SOFTGOODS_SIDECAR_THREADS") or 1000)
# A worker whose threads are all busy must stop accepting, so new connections go to a worker that has
# a free thread instead of waiting in a full one's queue (measured: 209 of 1,000 slow downloads
# starved with 2 x 600 threads and worker_connections = 1,300).
worker_connections = threads
# sendfile: leave UNSET. gunicorn's Config.sendfile is False whenever the setting is not None, so
# "sendfile = True" here would switch it off (measured: 3,000 read()+sendto() per 24 MiB instead of
# one sendfile). Unset, it is on unless the SENDFILE environment variable says otherwise.
keepalive = 5
timeout = 60  # the worker heartbeat; long transfers run in threads and do not block it
graceful_timeout = 10
backlog = 2048
accesslog = None
errorlog = "-"



def on_starting(server):
    """Check the settings once in the master: a bad one (say an example SOFTGOODS_SECRET_KEY) stops
    gunicorn with its one-line reason instead of workers failing and being respawned forever."""
    from app.config import load_settings

    load_settings()
