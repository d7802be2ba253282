"""The ``flask --app wsgi softgoods`` group. Features add their commands in ``register_commands``.

Every command exits 0 on success and 2 with one line on bad arguments, and never shows a traceback.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click
from flask import current_app
from flask.cli import AppGroup

from app.downloads.errors import InvalidInput
from app.downloads.models import AuditEntry
from app.extensions import db
from app.text_input import NOT_TEXT, first_unstorable

MIGRATIONS_DIR = str(Path(__file__).resolve().parent.parent / "migrations")


def _one_line(make_context):
    def wrapped(self, info_name, args, parent=None, **extra):
        if first_unstorable(args) is not None:  # an undecodable byte arrives as a lone surrogate
            raise click.UsageError(NOT_TEXT)
        try:
            return make_context(self, info_name, args, parent=parent, **extra)
        except click.UsageError as exc:
            exc.ctx = None  # click prints usage and a hint when it knows the context: one line instead
            raise
    return wrapped


class OneLineCommand(click.Command):
    make_context = _one_line(click.Command.make_context)


class OneLineGroup(AppGroup):
    command_class = OneLineCommand
    make_context = _one_line(AppGroup.make_context)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            exc.ctx = None
            raise


OneLineGroup.group_class = OneLineGroup

softgoods = OneLineGroup("softgoods", help="Softgoods store, delivery and maintenance commands.")


def fail(message: str, code: int = 2) -> None:
    """Refuse with one line on stderr; the caller has written nothing (or rolled back)."""
    db.session.rollback()
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def run_rule(fn, *args, **kwargs):
    """Call a rule function; turn its InvalidInput into the one-line refusal."""
    try:
        return fn(*args, **kwargs)
    except InvalidInput as exc:
        fail(exc.message)


def audit(action: str, target: str, detail: str = "") -> None:
    """Record an owner's action done from the command line, like the owner pages do; committed with it."""
    db.session.add(AuditEntry(actor="cli", action=action, target=target[:200], detail=detail))


@softgoods.command("init")
def init_command() -> None:
    """Create or migrate the database, and the instance and download folders."""
    import flask_migrate

    for key in ("INSTANCE_DIR", "DOWNLOAD_DIR", "OUTBOX_DIR", "SYMLINK_DIR"):
        Path(current_app.config[key]).mkdir(parents=True, exist_ok=True)
    flask_migrate.upgrade(directory=MIGRATIONS_DIR)
    click.echo(f"database ready: {db.engine.url.render_as_string(hide_password=True)}")


def register_commands(app) -> None:
    from app.accounts import cli as accounts_cli
    from app.downloads import cli as downloads_cli
    from app.downloads import package_cli
    from app.downloads import maintenance_cli
    from app.store import cli as store_cli

    for module in (accounts_cli, store_cli, downloads_cli, package_cli, maintenance_cli):
        module.register(softgoods)
    app.cli.add_command(softgoods)
