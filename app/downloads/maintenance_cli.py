"""``softgoods purge [--dry-run]``, ``softgoods watch`` and ``softgoods ingest-nginx-log PATH``."""
from __future__ import annotations

import signal
import threading
from pathlib import Path

import click
from flask import current_app

from sqlalchemy.exc import OperationalError

from app.cli import fail
from app.downloads.maintenance import purge
from app.extensions import db
from app.timeutil import utcnow


def register(group: click.Group) -> None:
    @group.command("purge")
    @click.option("--dry-run", is_flag=True, help="print what would be removed and change nothing")
    def purge_command(dry_run: bool) -> None:
        """The cron job: expire grants, remove their links, purge packages and old log rows, retry mail."""
        cfg = current_app.config
        try:
            report = purge(db.session, utcnow(), dry_run=dry_run, download_dir=cfg["DOWNLOAD_DIR"],
                           symlink_dir=cfg["SYMLINK_DIR"], grace_seconds=cfg["EXPIRY_GRACE_SECONDS"],
                           log_retention_days=cfg["LOG_RETENTION_DAYS"])
        except OperationalError as exc:  # what is done is committed; the next run finishes the rest
            fail(f"database unavailable, purge stopped: {str(exc.orig).strip().splitlines()[0]}", code=1)
        if dry_run:
            click.echo("dry run: nothing was changed")
        for line in report.lines():
            click.echo(line)

    @group.command("watch")
    def watch_command() -> None:
        """The watcher: re-index changed files, expire links promptly, re-hash files in the background."""
        from app.downloads.watcher import Watcher

        stop = threading.Event()

        def on_signal(signum, _frame) -> None:
            click.echo(f"{signal.Signals(signum).name}: stopping", err=True)
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        Watcher(current_app._get_current_object(), echo=lambda line: click.echo(line)).run(stop)

    @group.command("ingest-nginx-log")
    @click.argument("path")
    def ingest_command(path: str) -> None:
        """Record deliveries nginx made (symlink/accel modes) from its access log; each line counts once."""
        from app.downloads.nginx_log import LogFormatError, ingest_log

        if not Path(path).is_file():
            fail(f"no log file at {path}")
        try:
            report = ingest_log(db.session, path,
                                state_file=Path(current_app.config["INSTANCE_DIR"]) / "nginx-log-positions.json")
        except LogFormatError as exc:
            fail(str(exc))
        except OperationalError as exc:  # lines recorded so far are committed; the rest next time
            fail(f"database unavailable, ingestion stopped: {str(exc.orig).strip().splitlines()[0]}", code=1)
        db.session.commit()
        click.echo(report.summary())
