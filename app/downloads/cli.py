"""Delivery-domain commands: ``index`` (and, from their features, purge, watch, package)."""
from __future__ import annotations

import click
from flask import current_app

from app.downloads.index import index_files
from app.downloads.progress import ProgressBar
from app.extensions import db


def register(group: click.Group) -> None:
    @group.command("index")
    def index() -> None:
        """Scan DOWNLOAD_DIR, compute checksums and piece manifests of new or changed files."""
        bar = ProgressBar("hashing")
        report = index_files(db.session, current_app.config["DOWNLOAD_DIR"], progress=bar)
        bar.finish()
        db.session.commit()
        for path in report.added:
            click.echo(f"added    {path}")
        for path in report.changed:
            click.echo(f"changed  {path}")
        for path in report.removed:
            click.echo(f"missing  {path}")
        for path in report.skipped:
            click.echo(f"skipped  {path} (try again when it is complete)")
        click.echo(f"indexed: {len(report.added)} added, {len(report.changed)} changed, "
                   f"{len(report.removed)} missing, {report.unchanged} unchanged")
