"""Contract details that belong to no single feature: init, grant options, cookies, IP binding,
revocation in symlink mode, and whom a refused shopper can ask."""
from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from app.downloads.grant_actions import revoke
from app.downloads.models import UserDownload
from app.downloads.receipts import address_tag, read_receipt
from app.extensions import db
from app.timeutil import utcnow
from tests.helpers import grant_link, make_product

JSON = {"Accept": "application/json"}


def path_of(link: str) -> str:
    return "/" + link.split("/", 3)[3]


@pytest.mark.backends("sqlite")
def test_init_creates_folders_and_is_safe_to_run_again(runner, app, tmp_path):
    for _ in range(2):
        result = runner.invoke(args=["softgoods", "init"])
        assert result.exit_code == 0, result.output
        assert "database ready" in result.output
    for key in ("DOWNLOAD_DIR", "OUTBOX_DIR", "SYMLINK_DIR"):
        assert Path(app.config[key]).is_dir()


def test_grant_options_shape_the_grant(app, runner):
    make_product(app, "EBOOK1", {"book.pdf": 100})
    result = runner.invoke(args=["softgoods", "grant", "--sku", "EBOOK1", "--email", "a@example.com",
                                 "--days", "2", "--max-downloads", "7"])
    assert result.exit_code == 0, result.output
    with app.app_context():
        grant = db.session.scalar(select(UserDownload))
        assert grant.max_downloads == 7
        assert timedelta(days=1, hours=23) < grant.expires_at - utcnow() <= timedelta(days=2)
        assert grant.order.total_cents == 0 and grant.order.po_number.startswith("SG-")


@pytest.mark.parametrize("args, reason", [
    (["--email", "not-an-email"], "valid email"),
    (["--days", "0"], "--days"),
    (["--max-downloads", "-3"], "max-downloads"),
    (["--max-downloads", "lots"], "max-downloads"),
])
def test_grant_refuses_bad_arguments_and_writes_nothing(app, runner, args, reason):
    make_product(app, "EBOOK1", {"book.pdf": 100})
    base = {"--sku": "EBOOK1", "--email": "a@example.com"}
    for i in range(0, len(args), 2):
        base[args[i]] = args[i + 1]
    result = runner.invoke(args=["softgoods", "grant", *[x for kv in base.items() for x in kv]])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and reason in lines[0], result.output
    with app.app_context():
        assert db.session.scalar(select(UserDownload)) is None


@pytest.mark.backends("sqlite")
@pytest.mark.config(SESSION_COOKIE_SECURE=True)
def test_session_cookie_is_httponly_samesite_and_secure_when_asked(app, client):
    make_product(app, "EBOOK1", {"book.pdf": 100}, price="1.00")  # sellable: it has a file
    response = client.post("/cart/add", data={"sku": "EBOOK1", "quantity": "1"})
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Secure" in cookie


@pytest.mark.config(BIND_IP=True)
def test_a_bound_link_carries_a_keyed_hash_and_opens_only_from_its_address(app, sc):
    make_product(app, "EBOOK1", {"book.pdf": 100})
    link = grant_link(app, "EBOOK1", client_ip="10.1.2.3")
    receipt = read_receipt(app.config["SECRET_KEY"], link.split("/d/")[1].rstrip("/"))
    # every field of the signed (readable) payload: the address travels only as a keyed tag
    assert "10.1.2.3" not in json.dumps(receipt.dump())
    assert receipt.address_tag == address_tag(app.config["SECRET_KEY"], "10.1.2.3")
    ok = sc.get(path_of(link), headers=JSON, environ_base={"REMOTE_ADDR": "10.1.2.3"})
    assert ok.status_code == 200
    refused = sc.get(path_of(link), headers=JSON, environ_base={"REMOTE_ADDR": "10.9.9.9"})
    assert refused.status_code == 403 and "address" in refused.get_json()["error"]


@pytest.mark.config(SHOP_CONTACT="help@shop.example")
def test_expired_link_page_says_when_and_whom_to_ask(app, sc):
    make_product(app, "EBOOK1", {"book.pdf": 100})
    link = grant_link(app, "EBOOK1")
    with app.app_context():
        grant = db.session.scalar(select(UserDownload))
        grant.expires_at = utcnow() - timedelta(days=3)
        expired_on = f"{grant.expires_at:%Y-%m-%d}"
        db.session.commit()
    page = sc.get(path_of(link))
    assert page.status_code == 410
    assert expired_on in page.text and "help@shop.example" in page.text


def test_revoking_in_symlink_mode_removes_the_folder_nginx_serves(app):
    make_product(app, "EBOOK1", {"book.pdf": 100})
    grant_link(app, "EBOOK1")
    with app.app_context():
        grant = db.session.scalar(select(UserDownload))
        grant.symlink_token = "t" * 32
        folder = Path(app.config["SYMLINK_DIR"]) / grant.symlink_token
        folder.mkdir(parents=True)
        os.symlink(Path(app.config["DOWNLOAD_DIR"]) / "EBOOK1" / "book.pdf", folder / "book.pdf")
        db.session.commit()
        revoke(db.session, grant, app.config["SYMLINK_DIR"])
        db.session.commit()
        assert grant.status == "revoked" and grant.symlink_token is None
    assert not folder.exists()
    assert (Path(app.config["DOWNLOAD_DIR"]) / "EBOOK1" / "book.pdf").exists()


def test_store_healthz_says_why_it_is_unavailable(app, client):
    ok = client.get("/healthz")
    assert ok.status_code == 200 and ok.get_json()["status"] == "ok"
    app.config["DOWNLOAD_DIR"] = "/nonexistent/softgoods-downloads"
    down = client.get("/healthz")
    assert down.status_code == 503 and down.headers["Retry-After"]
    assert "download dir" in down.get_json()["reason"]
