"""File manager: upload, import from the server's import folder, register, move, delete.

Everything stays inside DOWNLOAD_DIR/<SKU>/**; the rules in ``app.downloads.files`` check every name.
"""
from __future__ import annotations

from flask import current_app, flash, redirect, render_template, request, url_for

from app.admin.blueprint import audit, bp, confirm_page, confirmed, download_dir, refuse
from app.downloads import files as rules
from app.downloads.errors import InvalidInput
from app.extensions import db


def _overwrite() -> bool:
    return request.form.get("overwrite") == "yes"


@bp.get("/files")
def files():
    return render_template("admin/files.html", title="Files", rows=rules.list_files(db.session, download_dir()),
                           import_dir=current_app.config["IMPORT_DIR"],
                           import_folders=list(rules.iter_import_folders(current_app.config["IMPORT_DIR"])),
                           max_upload=current_app.config.get("MAX_CONTENT_LENGTH"))


@bp.post("/files/upload")
def file_upload():
    back = url_for("admin.files")
    uploads = [u for u in request.files.getlist("file") if u and u.filename]
    try:
        if not uploads:
            raise InvalidInput("choose at least one file to upload")
        sku, folder = request.form.get("sku", ""), request.form.get("folder", "")
        targets = [rules.target_for(sku, folder, u.filename) for u in uploads]  # every name checked first
        saved = rules.save_uploads(db.session, download_dir(), [(t, u.stream) for t, u in zip(targets, uploads)],
                                   overwrite=_overwrite())
    except InvalidInput as exc:
        if exc.status == 409:
            db.session.rollback()
            flash(f"{exc.message}. Tick “replace existing files” and upload again to overwrite.", "error")
            return redirect(back)
        return refuse(exc, back)
    audit("file.upload", ", ".join(saved)[:200], f"{len(saved)} file(s)")
    db.session.commit()
    flash(f"Uploaded and registered: {', '.join(saved)}", "success")
    return redirect(back)


@bp.post("/files/import")
def file_import():
    back = url_for("admin.files")
    try:
        imported = rules.import_folder(db.session, download_dir(), current_app.config["IMPORT_DIR"],
                                       request.form.get("source", ""), request.form.get("sku", "").strip(),
                                       overwrite=_overwrite())
    except InvalidInput as exc:
        return refuse(exc, back)
    audit("file.import", f"{request.form.get('source')} -> {request.form.get('sku')}", "\n".join(imported))
    db.session.commit()
    flash(f"Imported and registered {len(imported)} file(s).", "success")
    return redirect(back)


@bp.post("/files/register")
def file_register():
    path = request.form.get("path", "")
    try:
        rules.register_file(db.session, download_dir(), path)
    except InvalidInput as exc:
        return refuse(exc, url_for("admin.files"))
    audit("file.register", path)
    db.session.commit()
    flash(f"Registered {path}.", "success")
    return redirect(url_for("admin.files"))


@bp.post("/files/move")
def file_move():
    source, destination = request.form.get("path", ""), request.form.get("destination", "").strip()
    try:
        rules.move_file(db.session, download_dir(), source, destination, overwrite=_overwrite())
    except InvalidInput as exc:
        return refuse(exc, url_for("admin.files"))
    audit("file.move", source, f"to {destination}")
    db.session.commit()
    flash(f"Moved {source} to {destination}. Packages that contain it keep their ZIP until rebuilt.", "success")
    return redirect(url_for("admin.files"))


@bp.post("/files/delete")
def file_delete():
    path = request.form.get("path", "")
    if not confirmed():
        return confirm_page(f"Delete {path}?", f"{path} will be deleted from the download folder. Existing package "
                            "ZIPs keep their copy until they are rebuilt.", url_for("admin.file_delete"),
                            url_for("admin.files"), {"path": path})
    try:
        rules.delete_file(db.session, download_dir(), path)
    except InvalidInput as exc:
        return refuse(exc, url_for("admin.files"))
    audit("file.delete", path)
    db.session.commit()
    flash(f"Deleted {path}.", "success")
    return redirect(url_for("admin.files"))
