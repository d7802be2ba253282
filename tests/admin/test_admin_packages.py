"""The package manager and editor pages."""
from __future__ import annotations

import threading
import zipfile
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from app.downloads.models import AuditEntry, Package
from app.extensions import db
from app.timeutil import utcnow
from tests.admin.conftest import log_in, make_user
from tests.helpers import make_product


@pytest.fixture
def kit(app):
    make_product(app, "KIT", {"a.bin": 100_000, "b/c.txt": b"words " * 300, "d.mp4": 20_000})
    return Path(app.config["DOWNLOAD_DIR"])


def test_new_assign_several_remove_and_delete(app, client, owner, kit):
    response = client.post("/admin/packages/new", data={"name": "P1", "lifetime_days": "30"})
    assert response.headers["Location"].endswith("/admin/packages/P1")
    page = client.get("/admin/packages/P1").text
    assert "no ZIP" in page and 'value="KIT/a.bin"' in page
    zip_file = kit / ".packages" / "P1.zip"
    assert not zip_file.exists()

    page = client.post("/admin/packages/P1/add", data={"files": ["KIT/a.bin", "KIT/d.mp4"]},
                       follow_redirects=True).text
    assert "Added 2 file(s); the ZIP was rebuilt." in page
    assert zipfile.ZipFile(zip_file).namelist() == ["KIT/a.bin", "KIT/d.mp4"]
    listing = client.get("/admin/packages").text
    assert ".packages/P1.zip" in listing and "on sale" in listing

    page = client.post("/admin/packages/P1/remove", data={"files": ["KIT/a.bin"]},
                       follow_redirects=True).text
    assert "Removed 1 file(s); the ZIP was rebuilt." in page
    assert zipfile.ZipFile(zip_file).namelist() == ["KIT/d.mp4"]

    confirm = client.post("/admin/packages/P1/delete").text
    assert "The original files stay" in confirm or "file(s) stay" in confirm
    assert zip_file.exists()
    client.post("/admin/packages/P1/delete", data={"confirm": "yes"})
    assert not zip_file.exists() and (kit / "KIT" / "d.mp4").is_file()
    with app.app_context():
        audit = [(a.actor, a.action, a.target) for a in db.session.scalars(select(AuditEntry).order_by(AuditEntry.id))]
    assert audit == [("owner@example.com", "package.create", "package P1"),
                     ("owner@example.com", "package.add", "package P1"),
                     ("owner@example.com", "package.remove", "package P1"),
                     ("owner@example.com", "package.delete", "package P1")]


@pytest.mark.backends("sqlite")
@pytest.mark.parametrize("form, message", [
    ({"name": "../evil"}, "is not allowed"),
    ({"name": "P1", "expires_on": "tomorrow"}, "expiry must be a date"),
    ({"name": "P1", "lifetime_days": "-3"}, "lifetime must be a whole number"),
    ({"name": "P1", "lifetime_days": "0"}, "lifetime must be between 1 and 3650"),
    ({"name": "P1", "lifetime_days": "\u00b2"}, "lifetime must be a whole number"),
    ({"name": "P1", "managers": ["ghost@example.com"]}, "no account for manager ghost@example.com"),
])
def test_new_package_refusals_are_shown_and_nothing_is_created(app, client, owner, form, message):
    page = client.post("/admin/packages/new", data=form, follow_redirects=True).text
    assert message in page
    with app.app_context():
        assert db.session.scalars(select(Package)).all() == []


@pytest.mark.backends("sqlite")
@pytest.mark.parametrize("files, message", [
    (["../../etc/passwd"], "is not a registered file"),
    (["KIT/nope.bin"], "KIT/nope.bin is not registered"),
    ([], "name at least one file to add"),
])
def test_assigning_bad_files_is_refused(app, client, owner, kit, files, message):
    client.post("/admin/packages/new", data={"name": "P1"})
    page = client.post("/admin/packages/P1/add", data={"files": files}, follow_redirects=True).text
    assert message in page
    assert not (kit / ".packages" / "P1.zip").exists()


def test_an_owner_who_is_not_a_manager_is_refused(app, client, kit):
    make_user(app, "alice@example.com", "owner")
    bob = make_user(app, "bob@example.com", "owner")
    admin = make_user(app, "admin@example.com", "admin")
    log_in(client, admin)
    client.post("/admin/packages/new", data={"name": "ALICE", "managers": ["alice@example.com"]})
    log_in(client, bob)
    for method, path in [("get", "/admin/packages/ALICE"), ("post", "/admin/packages/ALICE/add"),
                         ("post", "/admin/packages/ALICE/remove"), ("post", "/admin/packages/ALICE/delete"),
                         ("post", "/admin/packages/ALICE/settings"), ("post", "/admin/packages/ALICE/rebuild")]:
        assert getattr(client, method)(path, data={"files": ["KIT/a.bin"], "confirm": "yes"}).status_code == 403
    assert "no access" in client.get("/admin/packages").text
    log_in(client, admin)
    assert client.get("/admin/packages/ALICE").status_code == 200


def test_expired_packages_vanish_when_the_manager_opens(app, client, owner, kit):
    client.post("/admin/packages/new", data={"name": "OLD"})
    client.post("/admin/packages/OLD/add", data={"files": ["KIT/b/c.txt"]})
    yesterday = (utcnow() - timedelta(days=1)).date().isoformat()
    client.post("/admin/packages/OLD/settings", data={"expires_on": yesterday, "lifetime_days": ""})
    assert (kit / ".packages" / "OLD.zip").exists()
    page = client.get("/admin/packages").text
    assert "Expired packages removed: OLD" in page
    assert 'data-package="OLD"' not in page
    assert not (kit / ".packages" / "OLD.zip").exists() and (kit / "KIT" / "b" / "c.txt").is_file()
    with app.app_context():
        assert db.session.scalar(select(AuditEntry.action).order_by(AuditEntry.id.desc())) == "package.purge"


def test_the_same_file_added_by_two_requests_at_once_is_assigned_once(app, client, owner, kit, monkeypatch):
    """A second owner adds the same file while this request builds its ZIP: no 500, one assignment."""
    from app.downloads import packages as rules

    client.post("/admin/packages/new", data={"name": "P1"})
    other = app.test_client()
    log_in(other, make_user(app, "other@example.com", "owner"))
    real_write_zip, raced = rules.write_zip, []

    def write_zip_while_another_request_commits(target, members):
        if not raced:  # only the first build: the other request's own build runs unhindered
            raced.append("started")
            # Another thread, so the other request has its own app context and database session.
            thread = threading.Thread(target=lambda: raced.append(
                other.post("/admin/packages/P1/add", data={"files": ["KIT/a.bin"]}).status_code))
            thread.start()
            thread.join(60)
        real_write_zip(target, members)

    monkeypatch.setattr(rules, "write_zip", write_zip_while_another_request_commits)
    response = client.post("/admin/packages/P1/add", data={"files": ["KIT/a.bin", "KIT/d.mp4"]},
                           follow_redirects=True)
    assert raced == ["started", 302]
    assert response.status_code == 200 and "Added 2 file(s); the ZIP was rebuilt." in response.text
    assert zipfile.ZipFile(kit / ".packages" / "P1.zip").namelist() == ["KIT/a.bin", "KIT/d.mp4"]
    with app.app_context():
        package = db.session.scalars(select(Package)).one()
        assert sorted(f.file_path for f in package.files) == ["KIT/a.bin", "KIT/d.mp4"]
        assert [a.actor for a in db.session.scalars(select(AuditEntry).where(AuditEntry.action == "package.add")
                                                   .order_by(AuditEntry.id))] == ["other@example.com",
                                                                                   "owner@example.com"]


def test_only_a_packages_managers_may_sell_it_in_a_product(app, client, kit, runner):
    from app.store.models import Product

    make_user(app, "alice@example.com", "owner")
    bob = make_user(app, "bob@example.com", "owner")
    admin = make_user(app, "admin@example.com", "admin")
    log_in(client, admin)
    client.post("/admin/packages/new", data={"name": "ALICE", "managers": ["alice@example.com"]})
    client.post("/admin/packages/ALICE/add", data={"files": ["KIT/a.bin"]})
    make_product(app, "PLAIN", {"p.bin": 100}, price="5.00")
    log_in(client, bob)
    new = client.post("/admin/products/new", data={"sku": "FREEKIT", "name": "Free kit", "price": "0",
                                                   "max_downloads": "5", "link_days": "7", "package": "ALICE"},
                      follow_redirects=True)
    assert "only the managers of package ALICE" in new.text
    edit = client.post("/admin/products/PLAIN", data={"name": "Plain", "price": "0", "max_downloads": "5",
                                                      "link_days": "7", "package": "ALICE", "active": "yes"},
                       follow_redirects=True)
    assert "only the managers of package ALICE" in edit.text
    with app.app_context():
        assert db.session.scalar(select(Product).where(Product.sku == "FREEKIT")) is None
        plain = db.session.scalar(select(Product).where(Product.sku == "PLAIN"))
        assert (plain.package_id, plain.price_cents) == (None, 500)
    log_in(client, admin)  # an administrator may, and so may the shell (the server's operator)
    client.post("/admin/products/new", data={"sku": "KITPROD", "name": "Kit", "price": "9", "max_downloads": "5",
                                             "link_days": "7", "package": "ALICE"})
    log_in(client, bob)  # and bob may not change the product that sells it
    changed = client.post("/admin/products/KITPROD", data={"name": "Kit", "price": "0", "max_downloads": "5",
                                                           "link_days": "7", "package": "ALICE", "active": "yes"},
                          follow_redirects=True)
    assert "only the managers of package ALICE" in changed.text
    result = runner.invoke(args=["softgoods", "product", "add", "--sku", "SHELLKIT", "--name", "Kit",
                                 "--price", "1", "--package", "ALICE"])
    assert result.exit_code == 0, result.output
    with app.app_context():
        assert db.session.scalar(select(Product.price_cents).where(Product.sku == "KITPROD")) == 900
