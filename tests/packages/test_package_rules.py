"""Package rules: empty package, ZIP built on assignment, deterministic, stored media, refusals, purge."""
from __future__ import annotations

import hashlib
import zipfile
from datetime import date, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from app.accounts.models import User
from app.downloads import packages as rules
from app.downloads.errors import InvalidInput
from app.downloads.models import PACKAGES_SKU, FileEntry, Package
from app.extensions import db
from tests.helpers import make_product

TODAY = date(2030, 6, 15)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def kit(app):
    make_product(app, "KIT", {"a.bin": 300_000, "b/c.txt": b"hello " * 2000, "photo.jpg": 50_000})
    return Path(app.config["DOWNLOAD_DIR"])


def test_empty_package_has_no_zip_and_assigning_files_builds_it(app, kit):
    with app.app_context():
        package = rules.create_package(db.session, "P1", lifetime_days=30)
        assert not rules.zip_path(kit, "P1").exists()
        result = rules.add_files(db.session, kit, package, ["KIT/a.bin", "KIT/b/c.txt", "KIT/photo.jpg"])
        db.session.commit()
        assert result.ok and package.built_at is not None and package.build_error is None
        target = rules.zip_path(kit, "P1")
        with zipfile.ZipFile(target) as archive:
            infos = archive.infolist()
            assert [i.filename for i in infos] == ["KIT/a.bin", "KIT/b/c.txt", "KIT/photo.jpg"]
            for info in infos:
                assert archive.read(info) == (kit / info.filename).read_bytes()
                assert info.date_time == (1980, 1, 1, 0, 0, 0)
                assert info.external_attr >> 16 == 0o100644
            kinds = {i.filename: i.compress_type for i in infos}
        assert kinds == {"KIT/a.bin": zipfile.ZIP_DEFLATED, "KIT/b/c.txt": zipfile.ZIP_DEFLATED,
                         "KIT/photo.jpg": zipfile.ZIP_STORED}
        entry = rules.zip_entry(db.session, "P1")
        assert entry.sku == PACKAGES_SKU and entry.sha256 == sha(target) and entry.size == target.stat().st_size


def test_same_files_give_the_same_bytes(app, kit):
    with app.app_context():
        package = rules.create_package(db.session, "P1")
        rules.add_files(db.session, kit, package, ["KIT/b/c.txt", "KIT/a.bin"])
        first = sha(rules.zip_path(kit, "P1"))
        rules.remove_files(db.session, kit, package, ["KIT/b/c.txt"])
        with zipfile.ZipFile(rules.zip_path(kit, "P1")) as archive:
            assert archive.namelist() == ["KIT/a.bin"]
        (kit / "KIT" / "b" / "c.txt").touch()  # a new mtime must not change the archive
        rules.add_files(db.session, kit, package, ["KIT/b/c.txt"])
        assert sha(rules.zip_path(kit, "P1")) == first
        other = rules.create_package(db.session, "P2")
        rules.add_files(db.session, kit, other, ["KIT/a.bin", "KIT/b/c.txt"])
        assert sha(rules.zip_path(kit, "P2")) == first


def test_removing_the_last_file_removes_the_zip_and_its_index_entry(app, kit):
    with app.app_context():
        package = rules.create_package(db.session, "P1")
        rules.add_files(db.session, kit, package, ["KIT/a.bin"])
        rules.remove_files(db.session, kit, package, ["KIT/a.bin"])
        db.session.commit()
        assert not rules.zip_path(kit, "P1").exists()
        assert rules.zip_entry(db.session, "P1") is None


@pytest.mark.parametrize("bad, message", [
    ("../../etc/passwd", "not a registered file"),
    ("/etc/passwd", "not a registered file"),
    ("KIT/../../secret", "not a registered file"),
    ("KIT/./a.bin", "not a registered file"),
    ("KIT\\a.bin", "not a registered file"),
    ("KIT", "not a registered file"),
    (".packages/P1.zip", "not a registered file"),
    ("KIT/nope.bin", "is not registered"),
    ("", "not a registered file"),
])
def test_unregistered_or_escaping_paths_are_refused_and_nothing_changes(app, kit, bad, message):
    with app.app_context():
        package = rules.create_package(db.session, "P1")
        rules.add_files(db.session, kit, package, ["KIT/a.bin"])
        db.session.commit()
        before = sha(rules.zip_path(kit, "P1"))
        with pytest.raises(InvalidInput, match=message):
            rules.add_files(db.session, kit, package, ["KIT/b/c.txt", bad])
        db.session.rollback()
        assert [f.file_path for f in db.session.get(Package, package.id).files] == ["KIT/a.bin"]
        assert sha(rules.zip_path(kit, "P1")) == before


@pytest.mark.backends("sqlite")
def test_a_file_missing_from_disk_is_refused(app, kit):
    with app.app_context():
        (kit / "KIT" / "a.bin").unlink()
        from app.downloads.index import index_files
        index_files(db.session, kit)
        package = rules.create_package(db.session, "P1")
        with pytest.raises(InvalidInput, match="missing"):
            rules.add_files(db.session, kit, package, ["KIT/a.bin"])


def test_a_deleted_source_is_left_out_at_the_next_rebuild_and_the_owner_is_told(app, kit):
    with app.app_context():
        package = rules.create_package(db.session, "P1")
        rules.add_files(db.session, kit, package, ["KIT/a.bin", "KIT/b/c.txt"])
        db.session.commit()
        before = sha(rules.zip_path(kit, "P1"))
        (kit / "KIT" / "a.bin").unlink()
        assert sha(rules.zip_path(kit, "P1")) == before  # deleting affects the package at its next rebuild
        result = rules.build_zip(db.session, kit, package)
        db.session.commit()
        assert result.ok and result.left_out == ("KIT/a.bin",) and "KIT/a.bin" in result.notice
        assert [pf.file_path for pf in package.files] == ["KIT/b/c.txt"]
        with zipfile.ZipFile(rules.zip_path(kit, "P1")) as archive:
            assert archive.namelist() == ["KIT/b/c.txt"]  # record and ZIP agree
        assert not [p for p in (kit / PACKAGES_SKU).iterdir() if p.name != "P1.zip"], "a temp file was left"


@pytest.mark.parametrize("kwargs, message", [
    ({"name": "../x"}, "not allowed"),
    ({"name": ".packages"}, "not allowed"),
    ({"name": "a" * 65}, "not allowed"),
    ({"name": "P1"}, "already exists"),
    ({"name": "P2", "lifetime_days": 0}, "lifetime"),
    ({"name": "P2", "lifetime_days": 5000}, "lifetime"),
    ({"name": "P2", "expires_on": TODAY - timedelta(days=1)}, "already past"),
    ({"name": "P2", "managers": ["nobody@example.com"]}, "no account"),
    ({"name": "P2", "managers": ["buyer@example.com"]}, "not an owner"),
])
def test_create_refuses_bad_attributes(app, kwargs, message):
    with app.app_context():
        db.session.add(User(email="buyer@example.com", password_hash="x", role="customer"))
        rules.create_package(db.session, "P1")
        db.session.commit()
        with pytest.raises(InvalidInput, match=message):
            rules.create_package(db.session, **kwargs, today=TODAY)
        db.session.rollback()
        assert db.session.scalar(select(func.count()).select_from(Package)) == 1


def test_managers_restrict_owners_but_never_admins(app):
    with app.app_context():
        users = {role: User(email=f"{role}@example.com", password_hash="x", role=role)
                 for role in ("customer", "owner", "admin")}
        other = User(email="other@example.com", password_hash="x", role="owner")
        db.session.add_all([*users.values(), other])
        db.session.flush()
        open_package = rules.create_package(db.session, "OPEN")
        closed = rules.create_package(db.session, "CLOSED", managers=["other@example.com"])
        assert rules.can_manage(users["owner"], open_package) and rules.can_manage(users["admin"], open_package)
        assert not rules.can_manage(users["customer"], open_package)
        assert not rules.can_manage(users["owner"], closed)
        assert rules.can_manage(other, closed) and rules.can_manage(users["admin"], closed)


def test_purge_removes_expired_packages_and_zips_but_keeps_originals(app, kit):
    with app.app_context():
        old = rules.create_package(db.session, "OLD", expires_on=TODAY, today=TODAY)
        keep = rules.create_package(db.session, "KEEP", expires_on=TODAY + timedelta(days=1), today=TODAY)
        for package in (old, keep):
            rules.add_files(db.session, kit, package, ["KIT/b/c.txt"])
        db.session.commit()
        assert rules.purge_expired_packages(db.session, kit, TODAY) == []  # the expiry day itself still counts
        later = TODAY + timedelta(days=1)
        assert rules.purge_expired_packages(db.session, kit, later, dry_run=True) == ["OLD"]
        assert rules.zip_path(kit, "OLD").exists()
        assert rules.purge_expired_packages(db.session, kit, later) == ["OLD"]
        db.session.commit()
        assert sorted(db.session.scalars(select(Package.name))) == ["KEEP"]
        assert not rules.zip_path(kit, "OLD").exists() and rules.zip_path(kit, "KEEP").exists()
        assert rules.zip_entry(db.session, "OLD") is None
        assert (kit / "KIT" / "b" / "c.txt").is_file()
        assert db.session.scalar(select(FileEntry).where(FileEntry.path == "b/c.txt")).missing is False


@pytest.mark.backends("sqlite")
def test_on_sale_follows_lifetime_and_expiry(app):
    with app.app_context():
        package = rules.create_package(db.session, "P1", lifetime_days=10)
        created = package.created_at.date()
        assert rules.on_sale(package, created + timedelta(days=9))
        assert not rules.on_sale(package, created + timedelta(days=10))
        package.lifetime_days, package.expires_on = None, created
        assert rules.on_sale(package, created) and not rules.on_sale(package, created + timedelta(days=1))
