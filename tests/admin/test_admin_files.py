"""The file manager: uploads, import, register, move, delete; only inside DOWNLOAD_DIR/<SKU>/."""
from __future__ import annotations

import hashlib
import html
import io
from pathlib import Path

import pytest
from sqlalchemy import select

from app.downloads.models import AuditEntry, FileEntry
from app.extensions import db
from tests.helpers import make_product, write_files


def upload(client, sku: str, files: dict[str, bytes], folder: str = "", **extra):
    data = {"sku": sku, "folder": folder, "file": [(io.BytesIO(b), name) for name, b in files.items()], **extra}
    return client.post("/admin/files/upload", data=data, content_type="multipart/form-data", follow_redirects=True)


def shown(response) -> str:
    return html.unescape(response.get_data(as_text=True))


def entry(app, sku: str, path: str) -> FileEntry | None:
    with app.app_context():
        return db.session.scalar(select(FileEntry).where(FileEntry.sku == sku, FileEntry.path == path))


def test_upload_registers_and_shows_sha256_and_package_use(app, client, owner):
    content = b"chapter one " * 1000
    page = shown(upload(client, "BOOK", {"intro.pdf": content, "notes.txt": b"n"}, folder="ch1"))
    assert "Uploaded and registered: BOOK/ch1/intro.pdf, BOOK/ch1/notes.txt" in page
    disk = Path(app.config["DOWNLOAD_DIR"]) / "BOOK" / "ch1" / "intro.pdf"
    assert disk.read_bytes() == content
    assert entry(app, "BOOK", "ch1/intro.pdf").sha256 == hashlib.sha256(content).hexdigest()
    client.post("/admin/packages/new", data={"name": "P1"})
    client.post("/admin/packages/P1/add", data={"files": ["BOOK/ch1/intro.pdf"]})
    page = shown(client.get("/admin/files"))
    assert hashlib.sha256(content).hexdigest() in page
    row = page.split('data-path="BOOK/ch1/intro.pdf"')[1].split("</tr>")[0]
    assert "P1" in row
    assert not [p for p in disk.parent.iterdir() if p.name.startswith(".")], "a temp file was left"


def test_no_overwrite_without_asking(app, client, owner):
    upload(client, "BOOK", {"a.txt": b"first"})
    page = shown(upload(client, "BOOK", {"a.txt": b"second"}))
    assert "a.txt already exists; confirm to replace it" in page
    disk = Path(app.config["DOWNLOAD_DIR"]) / "BOOK" / "a.txt"
    assert disk.read_bytes() == b"first"
    upload(client, "BOOK", {"a.txt": b"second"}, overwrite="yes")
    assert disk.read_bytes() == b"second"
    assert entry(app, "BOOK", "a.txt").sha256 == hashlib.sha256(b"second").hexdigest()


@pytest.mark.backends("sqlite")
@pytest.mark.parametrize("files, message", [
    ({"new.txt": b"new", "a.txt": b"second"}, "a.txt already exists; confirm to replace it"),
    ({"new.txt": b"one", "dup/../new.txt": b"two"}, "is not a safe file or folder name"),
])
def test_a_refused_batch_of_uploads_writes_none_of_them(app, client, owner, files, message):
    upload(client, "BOOK", {"a.txt": b"first"})
    page = shown(upload(client, "BOOK", files))
    assert message in page
    folder = Path(app.config["DOWNLOAD_DIR"]) / "BOOK"
    assert sorted(p.name for p in folder.iterdir()) == ["a.txt"] and (folder / "a.txt").read_bytes() == b"first"
    assert entry(app, "BOOK", "new.txt") is None


@pytest.mark.backends("sqlite")
def test_the_same_name_twice_in_one_upload_is_refused(app, client, owner):
    twice = [(io.BytesIO(b"1"), "x2.txt"), (io.BytesIO(b"2"), "x2.txt")]
    page = shown(client.post("/admin/files/upload", data={"sku": "BOOK", "folder": "", "file": twice},
                             content_type="multipart/form-data", follow_redirects=True))
    assert "x2.txt is chosen twice" in page
    assert not (Path(app.config["DOWNLOAD_DIR"]) / "BOOK" / "x2.txt").exists()


@pytest.mark.backends("sqlite")
@pytest.mark.parametrize("sku, folder, name, message", [
    ("../x", "", "a.txt", "SKU '../x' is not allowed"),
    (".packages", "", "a.txt", "SKU '.packages' is not allowed"),
    ("BOOK", "..", "a.txt", "'..' is not a safe file or folder name"),
    ("BOOK", "a/../../..", "a.txt", "'..' is not a safe file or folder name"),
    ("BOOK", "", "../../etc/passwd", "'../../etc/passwd' is not a safe file or folder name"),
    ("BOOK", "", ".hidden", "'.hidden' is not a safe file or folder name"),
    ("BOOK", "", "my file.txt", "'my file.txt' is not a safe file or folder name: use letters, digits, '.', '_' and '-' (for example 'my_file.txt')"),
    ("BOOK", "", "big.iso.part", "ends like a half-written file"),
])
def test_unsafe_names_are_refused_and_nothing_is_written(app, client, owner, sku, folder, name, message):
    page = shown(upload(client, sku, {name: b"x"}, folder=folder))
    assert message in page
    root = Path(app.config["DOWNLOAD_DIR"])
    assert [p for p in root.rglob("*") if p.is_file()] == []
    with app.app_context():
        assert db.session.scalars(select(FileEntry)).all() == []


@pytest.mark.backends("sqlite")
@pytest.mark.config(MAX_CONTENT_LENGTH=10_000)
def test_uploads_over_the_size_limit_are_refused(app, client, owner):
    response = upload(client, "BOOK", {"big.bin": b"x" * 20_000})
    assert response.status_code == 413
    assert not (Path(app.config["DOWNLOAD_DIR"]) / "BOOK").exists()


def test_import_register_move_delete(app, client, owner):
    source = Path(app.config["IMPORT_DIR"]) / "drop"
    write_files(source.parent, "drop", {"one.bin": 1000, "sub/two.bin": 2000})
    page = shown(client.post("/admin/files/import", data={"source": "drop", "sku": "KIT"},
                             follow_redirects=True))
    assert "Imported and registered 2 file(s)." in page
    assert entry(app, "KIT", "sub/two.bin").size == 2000 and (source / "one.bin").exists()
    page = shown(client.post("/admin/files/import", data={"source": "drop", "sku": "KIT"},
                             follow_redirects=True))
    assert "KIT/one.bin already exists; confirm to replace it" in page

    write_files(app.config["DOWNLOAD_DIR"], "KIT", {"manual.bin": 500})
    assert "not registered" in shown(client.get("/admin/files"))
    client.post("/admin/files/register", data={"path": "KIT/manual.bin"})
    assert entry(app, "KIT", "manual.bin").size == 500

    client.post("/admin/files/move", data={"path": "KIT/manual.bin", "destination": "KIT/docs/manual.bin"})
    assert entry(app, "KIT", "manual.bin").missing and not entry(app, "KIT", "docs/manual.bin").missing

    confirm = shown(client.post("/admin/files/delete", data={"path": "KIT/one.bin"}))
    assert "Confirm" in confirm
    assert (Path(app.config["DOWNLOAD_DIR"]) / "KIT" / "one.bin").exists()
    client.post("/admin/files/delete", data={"path": "KIT/one.bin", "confirm": "yes"})
    assert not (Path(app.config["DOWNLOAD_DIR"]) / "KIT" / "one.bin").exists()
    assert entry(app, "KIT", "one.bin").missing
    with app.app_context():
        actions = list(db.session.scalars(select(AuditEntry.action).order_by(AuditEntry.id)))
    assert actions == ["file.import", "file.register", "file.move", "file.delete"]


@pytest.mark.backends("sqlite")
@pytest.mark.parametrize("url, form, message", [
    ("/admin/files/import", {"source": "../..", "sku": "KIT"}, "is not a folder inside the import folder"),
    ("/admin/files/import", {"source": "/etc", "sku": "KIT"}, "is not a folder inside the import folder"),
    ("/admin/files/register", {"path": "KIT/../../etc/passwd"}, "is not a safe file or folder name"),
    ("/admin/files/register", {"path": "KIT/ghost.bin"}, "KIT/ghost.bin is not a file in the download folder"),
    ("/admin/files/move", {"path": "KIT/a.bin", "destination": "../a.bin"}, "SKU '..' is not allowed"),
    ("/admin/files/move", {"path": "KIT/a.bin", "destination": "KIT/b.bin"}, "KIT/b.bin already exists"),
    ("/admin/files/delete", {"path": "/etc/passwd", "confirm": "yes"}, "SKU '' is not allowed"),
    ("/admin/files/upload", {"sku": "KIT"}, "choose at least one file to upload"),
])
def test_file_actions_never_leave_the_download_folder(app, client, owner, url, form, message):
    make_product(app, "KIT", {"a.bin": 10, "b.bin": 20})
    page = shown(client.post(url, data=form, follow_redirects=True))
    assert message in page
    assert sorted(p.name for p in (Path(app.config["DOWNLOAD_DIR"]) / "KIT").iterdir()) == ["a.bin", "b.bin"]
