"""Package manager and editor: list, create empty, edit attributes, assign/remove files, delete.

Opening the manager deletes expired packages first (records and ZIPs; the original files stay).
"""
from __future__ import annotations

from datetime import date
from typing import Callable

from flask import abort, flash, redirect, render_template, request, url_for
from flask_login import current_user
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm.exc import StaleDataError

from app.accounts.models import User
from app.admin.blueprint import audit, bp, confirm_page, confirmed, download_dir, refuse
from app.downloads import packages as rules
from app.downloads.errors import InvalidInput
from app.downloads.models import PACKAGES_SKU, FileEntry, Package
from app.extensions import db
from app.timeutil import utcnow


def _form_date(text: str | None) -> date | None:
    text = (text or "").strip()
    if not text:
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise InvalidInput(f"expiry must be a date like 2030-12-31, not {text!r}") from None


def _form_days(text: str | None) -> int | None:
    text = (text or "").strip()
    if not text:
        return None
    if not (text.isascii() and text.isdigit()):  # str.isdigit() alone takes "²", which int() refuses
        raise InvalidInput(f"lifetime must be a whole number of days, not {text!r}")
    return int(text)


def _managed(name: str) -> Package:
    package = db.session.scalar(select(Package).where(Package.name == name))
    if package is None:
        abort(404, f"There is no package named {name}.")
    if not rules.can_manage(current_user, package):
        abort(403, f"You may not manage package {name}: ask an administrator to add you to its managers.")
    return package


def _report(result: rules.BuildResult, done: str) -> None:
    if result.ok:
        flash(done, "success")
        if result.notice:
            flash(result.notice[0].upper() + result.notice[1:] + ".", "info")
    else:
        flash(result.error or "the ZIP could not be built", "error")


@bp.get("/packages")
def packages():
    expired = rules.purge_expired_packages(db.session, download_dir(), utcnow().date())
    if expired:
        audit("package.purge", "packages " + ", ".join(expired), "expired; removed when the package manager opened")
        db.session.commit()
        flash(f"Expired packages removed: {', '.join(expired)} (their original files stay).", "info")
    rows = []
    for package in db.session.scalars(select(Package).order_by(Package.name)):
        rows.append({"package": package, "zip": rules.zip_entry(db.session, package.name),
                     "may_manage": rules.can_manage(current_user, package),
                     "on_sale": rules.on_sale(package)})
    return render_template("admin/packages.html", title="Packages", rows=rows, owners=_owners())


def _owners() -> list[User]:
    return list(db.session.scalars(select(User).where(User.role == "owner").order_by(User.email)))


@bp.post("/packages/new")
def package_new():
    name = (request.form.get("name") or "").strip()
    try:
        rules.create_package(db.session, name, _form_date(request.form.get("expires_on")),
                             _form_days(request.form.get("lifetime_days")), request.form.getlist("managers"))
        audit("package.create", f"package {name}")
        db.session.commit()
    except InvalidInput as exc:
        return refuse(exc, url_for("admin.packages"))
    except IntegrityError:  # another request created the same name a moment ago
        return refuse(InvalidInput(f"a package named {name} already exists", status=409), url_for("admin.packages"))
    flash(f"Package {name} created. Add files to build its ZIP.", "success")
    return redirect(url_for("admin.package_edit", name=name))


@bp.get("/packages/<name>")
def package_edit(name: str):
    package = _managed(name)
    assigned = {pf.file_path for pf in package.files}
    entries = {e.registered_path: e for e in db.session.scalars(
        select(FileEntry).where(FileEntry.sku != PACKAGES_SKU).order_by(FileEntry.sku, FileEntry.path))}
    available = [e for path, e in entries.items() if path not in assigned and not e.missing]
    return render_template("admin/package_edit.html", title=f"Package {name}", package=package,
                           zip=rules.zip_entry(db.session, name), entries=entries, available=available,
                           owners=_owners(), manager_ids={m.user_id for m in package.managers},
                           on_sale=rules.on_sale(package))


@bp.post("/packages/<name>/settings")
def package_settings(name: str):
    package = _managed(name)
    back = url_for("admin.package_edit", name=name)
    try:
        rules.update_package(db.session, package, expires_on=_form_date(request.form.get("expires_on")),
                             lifetime_days=_form_days(request.form.get("lifetime_days")),
                             managers=request.form.getlist("managers"))
    except InvalidInput as exc:
        return refuse(exc, back)
    audit("package.update", f"package {name}",
          f"expires {package.expires_on or '-'}, lifetime {package.lifetime_days or '-'}, "
          f"managers {len(package.managers)}")
    db.session.commit()
    flash("Package settings saved.", "success")
    return redirect(back)


def _change_files(name: str, change: Callable, action: str, done: Callable[[Package, list[str]], str]):
    """Apply an add/remove of files, commit it with its audit entry, and go back to the editor.

    Another request may assign or remove the same file of the same package at the same moment; then the
    unique constraint (or a row already gone) refuses this commit. Start once more from what that
    request committed, which also rebuilds the ZIP from the true file list; a second clash says so (409).
    """
    back = url_for("admin.package_edit", name=name)
    files = request.form.getlist("files")
    for _attempt in range(2):
        package = _managed(name)
        try:
            result = change(db.session, download_dir(), package, files)
            if not result.ok:  # all or nothing: the files stay as they were, and so does the old ZIP
                return refuse(InvalidInput(result.error or "the ZIP could not be built", status=507), back)
            audit(action, f"package {name}", " ".join(files))
            db.session.commit()
        except InvalidInput as exc:
            return refuse(exc, back)
        except (IntegrityError, StaleDataError):
            db.session.rollback()
            continue
        _report(result, done(package, files))
        return redirect(back)
    return refuse(InvalidInput(f"package {name} was changed by someone else at the same moment: "
                               "check its files and try again", status=409), back)


@bp.post("/packages/<name>/add")
def package_add(name: str):
    return _change_files(name, rules.add_files, "package.add",
                         lambda _package, files: f"Added {len(files)} file(s); the ZIP was rebuilt.")


@bp.post("/packages/<name>/remove")
def package_remove(name: str):
    return _change_files(name, rules.remove_files, "package.remove", lambda package, files: (
        f"Removed {len(files)} file(s); " + ("the ZIP was rebuilt." if package.files else "no files left, no ZIP.")))


@bp.post("/packages/<name>/rebuild")
def package_rebuild(name: str):
    package = _managed(name)
    result = rules.build_zip(db.session, download_dir(), package)
    if not result.ok:
        db.session.rollback()
        rules.record_build_error(db.session, _managed(name), result)
    audit("package.rebuild", f"package {name}")
    db.session.commit()
    _report(result, "The ZIP was rebuilt.")
    return redirect(url_for("admin.package_edit", name=name))


@bp.post("/packages/<name>/delete")
def package_delete(name: str):
    package = _managed(name)
    if not confirmed():
        selling = [p.sku for p in rules.products_selling(db.session, package)]
        products = (f" Product(s) {', '.join(selling)} sell it: deleting it withdraws them from sale. To keep "
                    "selling them, cancel and attach another package to them on the products page first."
                    if selling else "")
        return confirm_page(f"Delete package {name}?",
                            f"Package {name} and its ZIP will be deleted. Its {len(package.files)} original "
                            "file(s) stay in the file manager." + products,
                            url_for("admin.package_delete", name=name), url_for("admin.package_edit", name=name))
    withdrawn = rules.delete_package(db.session, download_dir(), package)
    audit("package.delete", f"package {name}", f"withdrew {', '.join(withdrawn)}" if withdrawn else "")
    db.session.commit()
    flash(f"Package {name} deleted; its original files stay."
          + (f" Withdrawn from sale: {', '.join(withdrawn)}." if withdrawn else ""), "success")
    return redirect(url_for("admin.packages"))
