"""gunicorn settings for the store: ``gunicorn -c app/gunicorn.conf.py --bind HOST:PORT wsgi:app``.

Threaded workers with a bounded header-read time (app/gunicorn_worker.py): slow or stalled clients
hold a cheap thread for at most SOFTGOODS_STORE_HEADER_TIMEOUT seconds, never a whole process the
way ``sync`` workers were held. Override with SOFTGOODS_STORE_WORKERS / SOFTGOODS_STORE_THREADS /
SOFTGOODS_STORE_HEADER_TIMEOUT (read here: this file is gunicorn's config, not the app's).
"""
import os

from app import gunicorn_worker

worker_class = "app.gunicorn_worker.HeaderDeadlineWorker"
workers = int(os.environ.get("SOFTGOODS_STORE_WORKERS") or 2)
# Idle threads cost little; enough of them that a few hundred slow clients, each held for at most the
# header timeout, leave threads free for shoppers.
threads = int(os.environ.get("SOFTGOODS_STORE_THREADS") or 128)
# A worker whose threads are all busy stops accepting, so connections go to one with a free thread
# instead of queueing behind slow clients. No keep-alive, then: an idle kept-alive connection would
# count against that limit (nginx in front talks HTTP/1.0 to its upstream by default anyway).
worker_connections = threads
keepalive = 0
gunicorn_worker.HEADER_SECONDS = float(os.environ.get("SOFTGOODS_STORE_HEADER_TIMEOUT") or 10)
timeout = 60
graceful_timeout = 10
backlog = 2048
limit_request_line = 8190
limit_request_fields = 100
limit_request_field_size = 8190
accesslog = None
errorlog = "-"


def on_starting(server):
    """Check the settings once in the master: a bad one (say an example SOFTGOODS_SECRET_KEY) stops
    gunicorn with its one-line reason instead of workers failing and being respawned forever."""
    from app.config import load_settings

    load_settings()
