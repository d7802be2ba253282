"""One rule decides what a product file is (a regular file whose real path stays inside <SKU>/):
a symlink out of the folder to a secret is never indexed (index command, watcher, file manager),
listed, served or packed (also when swapped in between index and pack); a link inside the folder
that points inside it is an ordinary product file."""
from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest
from sqlalchemy import select

from app.downloads import files as file_manager
from app.downloads import packages
from app.downloads.errors import InvalidInput
from app.downloads.index import index_one
from app.downloads.models import FileEntry
from app.extensions import db
from tests.helpers import grant_link, make_product, write_files
from tests.maintenance.conftest import eventually
from tests.servers import path_of

SECRET = b"SECRET_KEY=do-not-leak\n"
JSON = {"Accept": "application/json"}


@pytest.fixture
def secret(app, tmp_path) -> Path:
    path = Path(app.config["INSTANCE_DIR"]) / "secret_key"
    path.write_bytes(SECRET)
    return path


def _product_dir(app, sku: str = "MANUAL") -> Path:
    return Path(app.config["DOWNLOAD_DIR"]) / sku


def _indexed(app) -> set[str]:
    with app.app_context():
        return {e.registered_path for e in db.session.scalars(select(FileEntry).where(FileEntry.missing.is_(False)))}


def test_index_command_skips_a_link_out_of_the_folder(app, runner, secret):
    write_files(app.config["DOWNLOAD_DIR"], "MANUAL", {"guide.pdf": b"%PDF guide"})
    (_product_dir(app) / "leak.txt").symlink_to(secret)
    (_product_dir(app) / "alias.pdf").symlink_to("guide.pdf")  # inside, pointing inside: a product file
    result = runner.invoke(args=["softgoods", "index"])
    assert result.exit_code == 0, result.output
    assert _indexed(app) == {"MANUAL/guide.pdf", "MANUAL/alias.pdf"}


@pytest.mark.config(WATCH_DEBOUNCE_MS=300, WATCH_EXPIRY_SECONDS=60, REHASH_BYTES_PER_SECOND=0)
def test_the_watcher_never_indexes_a_link_out_of_the_folder(app, watching, secret):
    _product_dir(app).mkdir()
    watcher, _lines = watching()
    (_product_dir(app) / "leak.txt").symlink_to(secret)
    (_product_dir(app) / "later.txt").write_bytes(b"an ordinary file, created after the link")
    eventually(lambda: "MANUAL/later.txt" in watcher.indexed, what="the ordinary file indexed")
    eventually(lambda: "MANUAL/later.txt" in _indexed(app), what="committed")
    assert "MANUAL/leak.txt" not in _indexed(app) and "MANUAL/leak.txt" not in watcher.indexed


def test_the_file_manager_refuses_and_does_not_list_a_link_out(app, secret):
    write_files(app.config["DOWNLOAD_DIR"], "MANUAL", {"guide.pdf": b"%PDF guide"})
    (_product_dir(app) / "leak.txt").symlink_to(secret)
    with app.app_context():
        download_dir = app.config["DOWNLOAD_DIR"]
        with pytest.raises(InvalidInput, match="outside the download folder"):
            file_manager.register_file(db.session, download_dir, "MANUAL/leak.txt")
        with pytest.raises(InvalidInput, match="outside the download folder"):
            file_manager.move_file(db.session, download_dir, "MANUAL/leak.txt", "MANUAL/moved.txt")
        assert index_one(db.session, download_dir, "MANUAL", "leak.txt") is None
        listed = [row.registered_path for row in file_manager.list_files(db.session, download_dir)]
        db.session.rollback()
    assert listed == ["MANUAL/guide.pdf"]
    assert _indexed(app) == set()


def _zip_names_and_bytes(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def test_a_file_swapped_for_a_link_after_indexing_is_not_packed(app, secret):
    write_files(app.config["DOWNLOAD_DIR"], "MANUAL", {"guide.pdf": b"%PDF guide", "notes.txt": b"notes"})
    with app.app_context():
        download_dir = app.config["DOWNLOAD_DIR"]
        file_manager.register_file(db.session, download_dir, "MANUAL/guide.pdf")
        file_manager.register_file(db.session, download_dir, "MANUAL/notes.txt")
        package = packages.create_package(db.session, "BUNDLE")
        assert packages.add_files(db.session, download_dir, package, ["MANUAL/guide.pdf"]).ok
        db.session.commit()
        first_zip = packages.zip_path(download_dir, "BUNDLE").read_bytes()
        notes = _product_dir(app) / "notes.txt"  # indexed as a file, now a link to the secret
        notes.unlink()
        notes.symlink_to(secret)
        result = packages.add_files(db.session, download_dir, package, ["MANUAL/notes.txt"])
        db.session.commit()
    assert not result.ok and "not a product file" in result.error
    zipped = packages.zip_path(app.config["DOWNLOAD_DIR"], "BUNDLE")
    assert zipped.read_bytes() == first_zip  # the previous ZIP is kept, the secret is in no ZIP
    assert SECRET not in b"".join(_zip_names_and_bytes(zipped).values())


def test_the_package_builder_does_not_follow_a_link_swapped_in_after_the_check(app, secret, monkeypatch):
    """The race inside one build: the member passes the rule, then becomes a link before it is opened."""
    write_files(app.config["DOWNLOAD_DIR"], "MANUAL", {"guide.pdf": b"%PDF guide"})
    real_check = packages.product_file_path

    def check_then_swap(download_dir, sku, rel):
        found = real_check(download_dir, sku, rel)
        target = _product_dir(app) / rel
        target.unlink()
        target.symlink_to(secret)
        return found

    with app.app_context():
        download_dir = app.config["DOWNLOAD_DIR"]
        file_manager.register_file(db.session, download_dir, "MANUAL/guide.pdf")
        package = packages.create_package(db.session, "BUNDLE")
        monkeypatch.setattr(packages, "product_file_path", check_then_swap)
        result = packages.add_files(db.session, download_dir, package, ["MANUAL/guide.pdf"])
        db.session.commit()
    assert not result.ok
    assert not packages.zip_path(app.config["DOWNLOAD_DIR"], "BUNDLE").exists()


def test_a_link_out_is_never_listed_or_served(app, sc, secret):
    make_product(app, "MANUAL", {"guide.pdf": b"%PDF guide"})
    (_product_dir(app) / "leak.txt").symlink_to(secret)
    (_product_dir(app) / "alias.pdf").symlink_to("guide.pdf")
    with app.app_context():
        from app.downloads.index import index_files

        index_files(db.session, app.config["DOWNLOAD_DIR"])
        db.session.commit()
    link = path_of(grant_link(app, "MANUAL"))
    listed = [f["path"] for f in sc.get(link, headers=JSON).get_json()["files"]]
    assert listed == ["alias.pdf", "guide.pdf"]
    leak = sc.get(link + "f/leak.txt")
    assert leak.status_code == 404 and SECRET not in leak.get_data()
    assert sc.get(link + "f/alias.pdf").get_data() == b"%PDF guide"
