"""The package story in headless Chromium against the store under gunicorn: create a package, upload two
files, assign both at once, see the ZIP, remove one and see the rebuild, expire it and watch it vanish on
the next visit with the originals kept; an owner without access is refused."""
from __future__ import annotations

import sys
import zipfile
from datetime import timedelta
from pathlib import Path

import pytest

from app.downloads import packages as rules
from app.extensions import db
from app.timeutil import utcnow
from tests.admin.conftest import make_user
from tests.browser import browser_page
from tests.helpers import ServerProcess, free_port


@pytest.fixture
def store(env, tmp_path):
    port = free_port()
    server = ServerProcess([str(Path(sys.executable).parent / "gunicorn"), "--bind", f"127.0.0.1:{port}",
                            "--workers", "1", "--threads", "4", "wsgi:app"], env, port, health_path="/admin/",
                           log_path=tmp_path / "store.log")
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def session_cookie(app, user_id: int) -> dict:
    """A signed Flask session for this user, as the login form would set it."""
    value = app.session_interface.get_signing_serializer(app).dumps({"_user_id": f"{user_id}.0", "_fresh": True})
    return {"name": app.config.get("SESSION_COOKIE_NAME", "session"), "value": value, "domain": "127.0.0.1",
            "path": "/"}


@pytest.mark.backends("sqlite")
def test_package_story_in_a_browser(app, store, tmp_path):
    owner = make_user(app, "owner@example.com", "owner")
    stranger = make_user(app, "bob@example.com", "owner")
    with app.app_context():
        rules.create_package(db.session, "PRIVATE", managers=["owner@example.com"])
        db.session.commit()
    download_dir = Path(app.config["DOWNLOAD_DIR"])
    sources = {"guide.pdf": b"%PDF-1.4 guide " * 5000, "notes.txt": b"notes " * 3000}
    for name, content in sources.items():
        (tmp_path / name).write_bytes(content)

    with browser_page() as page:
        page.context.add_cookies([session_cookie(app, owner)])
        page.goto(f"{store.url}/admin/packages")
        page.fill("#new-package input[name=name]", "BUNDLE")
        page.click("#new-package button[type=submit]")
        page.wait_for_url("**/admin/packages/BUNDLE")
        assert page.inner_text("#zip-state") == "no ZIP"

        page.goto(f"{store.url}/admin/files")
        page.fill("#upload input[name=sku]", "KIT")
        page.set_input_files("#upload input[type=file]", [str(tmp_path / n) for n in sources])
        page.click("#upload button[type=submit]")
        page.wait_for_selector("text=Uploaded and registered")

        page.goto(f"{store.url}/admin/packages/BUNDLE")
        page.check("#add-files input[value='KIT/guide.pdf']")
        page.check("#add-files input[value='KIT/notes.txt']")
        page.click("#add-files button[type=submit]")
        page.wait_for_selector("text=Added 2 file(s); the ZIP was rebuilt.")
        assert "KiB" in page.inner_text("#zip-state")
        zip_file = download_dir / ".packages" / "BUNDLE.zip"
        assert zipfile.ZipFile(zip_file).namelist() == ["KIT/guide.pdf", "KIT/notes.txt"]

        page.check("#remove-files input[value='KIT/notes.txt']")
        page.click("#remove-files button:has-text('Remove selected')")
        page.wait_for_selector("text=Removed 1 file(s); the ZIP was rebuilt.")
        assert zipfile.ZipFile(zip_file).namelist() == ["KIT/guide.pdf"]
        page.goto(f"{store.url}/admin/packages")
        assert ".packages/BUNDLE.zip" in page.inner_text("tr[data-package=BUNDLE]")

        page.goto(f"{store.url}/admin/packages/BUNDLE")
        page.fill("#settings input[name=expires_on]", (utcnow() - timedelta(days=1)).date().isoformat())
        page.click("#settings button[type=submit]")
        page.wait_for_selector("text=Package settings saved.")
        page.goto(f"{store.url}/admin/packages")
        page.wait_for_selector("text=Expired packages removed: BUNDLE")
        assert page.locator("tr[data-package=BUNDLE]").count() == 0
        assert not zip_file.exists()
        for name, content in sources.items():
            assert (download_dir / "KIT" / name).read_bytes() == content

        page.context.clear_cookies()
        page.context.add_cookies([session_cookie(app, stranger)])
        response = page.goto(f"{store.url}/admin/packages/PRIVATE")
        assert response.status == 403
        assert "You may not manage package PRIVATE" in page.content()


def test_flags_in_a_browser_deleted_on_purpose_is_not_missing_and_a_flag_can_be_acknowledged(app, store):
    from tests.helpers import make_product

    owner = make_user(app, "owner@example.com", "owner")
    make_product(app, "KIT", {"kept.bin": 1000, "lost.bin": 1000, "unwanted.bin": 1000})
    download_dir = Path(app.config["DOWNLOAD_DIR"])
    with app.app_context():
        from app.downloads.files import delete_file
        from app.downloads.index import index_files

        delete_file(db.session, download_dir, "KIT/unwanted.bin")  # the owner's own deletion
        (download_dir / "KIT" / "lost.bin").unlink()                # gone behind the owner's back
        index_files(db.session, download_dir)
        db.session.commit()
    with browser_page() as page:
        page.context.add_cookies([session_cookie(app, owner)])
        page.goto(f"{store.url}/admin/")
        table = page.inner_text("#flagged")
        assert "KIT/lost.bin" in table and "missing on disk" in table and "unwanted.bin" not in table
        page.click("#flagged button:has-text('Acknowledge')")
        page.wait_for_url(f"{store.url}/admin/")
        assert "acknowledged" in page.content()
        assert "No file is flagged" in page.content()
    with app.app_context():  # the file coming back and going again flags it anew
        (download_dir / "KIT" / "lost.bin").write_bytes(b"x" * 10)
        index_files(db.session, download_dir)
        (download_dir / "KIT" / "lost.bin").unlink()
        index_files(db.session, download_dir)
        db.session.commit()
    with browser_page() as page:
        page.context.add_cookies([session_cookie(app, owner)])
        page.goto(f"{store.url}/admin/")
        assert "KIT/lost.bin" in page.inner_text("#flagged")


def test_acknowledging_needs_the_csrf_token(app):
    from flask.testing import FlaskClient  # noqa: F401  the app's own client, with CSRF on as in production
    from tests.helpers import make_product
    from tests.admin.conftest import log_in

    make_product(app, "KIT", {"lost.bin": 100})
    with app.app_context():
        from app.downloads.index import index_files
        from app.downloads.models import FileEntry

        (Path(app.config["DOWNLOAD_DIR"]) / "KIT" / "lost.bin").unlink()
        index_files(db.session, app.config["DOWNLOAD_DIR"])
        db.session.commit()
        entry_id = db.session.scalar(db.select(FileEntry.id))
    app.config["WTF_CSRF_ENABLED"] = True
    client = app.test_client()
    log_in(client, make_user(app, "owner@example.com", "owner"))
    assert client.post(f"/admin/flags/{entry_id}/acknowledge").status_code == 400
    with app.app_context():
        assert db.session.get(FileEntry, entry_id).acknowledged_at is None
