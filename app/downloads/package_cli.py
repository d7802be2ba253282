"""``softgoods package create|add|remove|list|delete|rebuild``: the package manager page, from a shell."""
from __future__ import annotations

from datetime import date

import click
from flask import current_app
from sqlalchemy import select

from app.cli import audit, fail, run_rule
from app.downloads import packages as rules
from app.downloads.models import Package
from app.extensions import db


def _date(value: str | None) -> date | None:
    if value is None:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        fail(f"--expires must be a date like 2030-12-31, not {value!r}")


def _audit(action: str, name: str, detail: str = "") -> None:
    audit(action, f"package {name}", detail)


def _finish(result: rules.BuildResult, done: str, package: Package | None = None) -> None:
    """All or nothing: a failed build rolls the change back (the old ZIP stays); a rebuild (``package``)
    records why it failed. A build that left out deleted sources says which."""
    if not result.ok:
        db.session.rollback()
        if package is not None:
            rules.record_build_error(db.session, db.session.merge(package), result)
            db.session.commit()
        click.echo(f"error: {result.error}", err=True)
        raise SystemExit(1)
    db.session.commit()
    click.echo(done)
    if result.notice:
        click.echo(result.notice)


def register(group: click.Group) -> None:
    @group.group("package")
    def package() -> None:
        """Download packages: named ZIPs of registered files."""

    @package.command("create")
    @click.argument("name")
    @click.option("--expires", default=None, metavar="YYYY-MM-DD", help="purge the package after this date")
    @click.option("--days", type=click.IntRange(1, rules.MAX_LIFETIME_DAYS), default=None,
                  help="lifetime: days it is offered for sale")
    @click.option("--managers", default="", metavar="EMAIL,...", help="owner accounts that may manage it")
    def create(name: str, expires: str | None, days: int | None, managers: str) -> None:
        """Create an empty package (its ZIP appears when files are added)."""
        created = run_rule(rules.create_package, db.session, name, _date(expires), days, managers.split(","))
        _audit("package.create", name)
        db.session.commit()
        click.echo(f"package {created.name} created (empty)")

    @package.command("add")
    @click.argument("name")
    @click.argument("files", nargs=-1, required=True)
    def add(name: str, files: tuple[str, ...]) -> None:
        """Assign registered files (<SKU>/<path>) and rebuild the ZIP."""
        pkg = run_rule(rules.get_package, db.session, name)
        result = run_rule(rules.add_files, db.session, current_app.config["DOWNLOAD_DIR"], pkg, list(files))
        _audit("package.add", name, " ".join(files))
        _finish(result, f"package {name}: {len(pkg.files)} file(s), ZIP rebuilt")

    @package.command("remove")
    @click.argument("name")
    @click.argument("files", nargs=-1, required=True)
    def remove(name: str, files: tuple[str, ...]) -> None:
        """Take files out of the package and rebuild the ZIP (no files: no ZIP)."""
        pkg = run_rule(rules.get_package, db.session, name)
        result = run_rule(rules.remove_files, db.session, current_app.config["DOWNLOAD_DIR"], pkg, list(files))
        _audit("package.remove", name, " ".join(files))
        _finish(result, f"package {name}: {len(pkg.files)} file(s)" + (", ZIP rebuilt" if pkg.files else ", no ZIP"))

    @package.command("rebuild")
    @click.argument("name")
    def rebuild(name: str) -> None:
        """Build the ZIP again from the current files (e.g. after a failed build)."""
        pkg = run_rule(rules.get_package, db.session, name)
        result = rules.build_zip(db.session, current_app.config["DOWNLOAD_DIR"], pkg)
        _audit("package.rebuild", name)
        _finish(result, f"package {name} rebuilt", package=pkg)

    @package.command("list")
    def list_() -> None:
        """Packages with their expiry, lifetime, files and ZIP."""
        for pkg in db.session.scalars(select(Package).order_by(Package.name)):
            entry = rules.zip_entry(db.session, pkg.name)
            zip_state = f"zip {entry.size} bytes sha256 {entry.sha256}" if entry else "no zip"
            click.echo(f"{pkg.name}\texpires {pkg.expires_on or '-'}\tlifetime "
                       f"{str(pkg.lifetime_days) + ' days' if pkg.lifetime_days else '-'}\t"
                       f"{len(pkg.files)} file(s)\t{zip_state}" + (f"\tERROR {pkg.build_error}" if pkg.build_error else ""))
            for pf in pkg.files:
                click.echo(f"  {pf.file_path}")

    @package.command("delete")
    @click.argument("name")
    def delete(name: str) -> None:
        """Delete the package and its ZIP (the original files stay)."""
        pkg = run_rule(rules.get_package, db.session, name)
        withdrawn = rules.delete_package(db.session, current_app.config["DOWNLOAD_DIR"], pkg)
        _audit("package.delete", name, f"withdrew {', '.join(withdrawn)}" if withdrawn else "")
        db.session.commit()
        click.echo(f"package {name} deleted")
        for sku in withdrawn:
            click.echo(f"product {sku} withdrawn from sale: it sold package {name}; attach another package "
                       f"or files and put it on sale again in the owner pages")
