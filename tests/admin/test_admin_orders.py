"""Orders, grant actions with their confirmation step, the download log, its CSV, and the dashboard."""
from __future__ import annotations

import csv
import html
import io
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from app.downloads.models import AuditEntry, Delivery, DownloadLog, UserDownload
from app.extensions import db
from app.store.models import Order, Product
from app.timeutil import utcnow
from tests.helpers import grant_link, make_product


def shown(response) -> str:
    return html.unescape(response.get_data(as_text=True))


@pytest.fixture
def order(app):
    """A paid order of one product with one grant, two deliveries and a few log lines."""
    make_product(app, "KIT", {"a.bin": 1000, "b.bin": 2000}, max_downloads=3)
    grant_link(app, "KIT", "buyer@example.com")
    with app.app_context():
        grant = db.session.scalars(select(UserDownload)).one()
        po = grant.order.po_number
        now = utcnow()
        db.session.add_all([
            Delivery(grant_id=grant.id, sku="KIT", path="a.bin", sha256="0" * 64, size=1000, budget_bytes=1500,
                     covered_bytes=1000, evidence="verified", counted=True, completed_at=now),
            Delivery(grant_id=grant.id, sku="KIT", path="b.bin", sha256="1" * 64, size=2000, budget_bytes=3000,
                     covered_bytes=2000, evidence="transferred", counted=True, completed_at=now - timedelta(days=1)),
        ])
        for i, ip in enumerate(["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.1"]):
            db.session.add(DownloadLog(grant_id=grant.id, order_po=po, path="a.bin", client_ip=ip,
                                       status=206 if i else 200, bytes_sent=100 * i, outcome="complete",
                                       user_agent="=cmd|' /C calc'!A0" if i == 3 else "curl"))
        db.session.commit()
        return {"po": po, "grant": grant.id}


def test_order_page_shows_items_grants_and_evidence(client, owner, order):
    page = shown(client.get(f"/admin/orders/{order['po']}"))
    assert "buyer@example.com" in page and "KIT" in page
    assert f'data-grant="{order["grant"]}"' in page and "3 per file" in page  # the limit is per file
    evidence = page.split('id="evidence"')[1].split("</table>")[0]
    assert "verified" in evidence and "transferred" in evidence
    header = [c.split("<")[0] for c in evidence.split("<th>")[1:]]
    rows = [[c.split("<")[0] for c in row.split("<td>")[1:]] for row in evidence.split("<tr>")[2:]]
    assert [row[header.index("downloads left")] for row in rows] == ["2", "2"]  # 3 minus that file's one
    assert order["po"] in shown(client.get("/admin/orders?q=buyer@"))
    assert order["po"] not in shown(client.get("/admin/orders?q=nobody@"))


def test_grant_actions_ask_first_then_act_and_are_audited(app, client, owner, order):
    url = f"/admin/grants/{order['grant']}"
    with app.app_context():
        before = db.session.get(UserDownload, order["grant"]).expires_at
    page = shown(client.post(f"{url}/extend", data={"days": "10"}))
    assert f"Extend grant {order['grant']} of order {order['po']} (KIT) by 10 day(s)?" in page
    with app.app_context():
        assert db.session.get(UserDownload, order["grant"]).expires_at == before
    client.post(f"{url}/extend", data={"days": "10", "confirm": "yes"})
    client.post(f"{url}/add-downloads", data={"count": "2", "confirm": "yes"})
    assert "Revoke grant" in shown(client.post(f"{url}/revoke"))
    client.post(f"{url}/revoke", data={"confirm": "yes"})
    with app.app_context():
        grant = db.session.get(UserDownload, order["grant"])
        assert grant.expires_at == before + timedelta(days=10)
        assert grant.max_downloads == 5 and grant.status == "revoked"
        audit = [(a.actor, a.action) for a in db.session.scalars(select(AuditEntry).order_by(AuditEntry.id))]
    assert audit == [("owner@example.com", "grant.extend"), ("owner@example.com", "grant.add-downloads"),
                     ("owner@example.com", "grant.revoke")]


@pytest.mark.backends("sqlite")
@pytest.mark.parametrize("action, form, message", [
    ("extend", {"days": "zero"}, "days must be a whole number, not 'zero'"),
    ("extend", {"days": "0"}, "days must be between 1 and 3650"),
    ("add-downloads", {"count": "-1"}, "downloads must be between 1 and 10000"),
    ("add-downloads", {}, "downloads must be a whole number"),
])
def test_bad_grant_actions_are_refused(app, client, owner, order, action, form, message):
    page = shown(client.post(f"/admin/grants/{order['grant']}/{action}", data={**form, "confirm": "yes"},
                             follow_redirects=True))
    assert message in page
    with app.app_context():
        assert db.session.get(UserDownload, order["grant"]).max_downloads == 3
        assert db.session.scalars(select(AuditEntry)).all() == []


@pytest.mark.backends("sqlite")
def test_resend_email_after_confirmation(app, client, owner, order):
    outbox = Path(app.config["OUTBOX_DIR"])
    before = len(list(outbox.glob("*.eml"))) if outbox.exists() else 0
    assert "Send the download links of order" in shown(client.post(f"/admin/orders/{order['po']}/resend"))
    assert (len(list(outbox.glob("*.eml"))) if outbox.exists() else 0) == before
    page = shown(client.post(f"/admin/orders/{order['po']}/resend", data={"confirm": "yes"}, follow_redirects=True))
    assert "sent again to buyer@example.com" in page
    mails = sorted(outbox.glob("*.eml"))
    assert len(mails) == before + 1 and "buyer@example.com" in mails[-1].read_text()


def test_download_log_filters_csv_and_shared_link_warning(client, owner, order):
    page = shown(client.get("/admin/log"))
    assert 'id="shared-links"' in page and f"grant {order['grant']} of order" in page and "3 addresses" in page
    rows = shown(client.get("/admin/log?ip=10.0.0.1")).split('id="log"')[1]
    assert rows.count("<tr>") == 3  # header + two requests
    rows = shown(client.get("/admin/log?status=200")).split('id="log"')[1]
    assert rows.count("<tr>") == 2
    response = client.get(f"/admin/log.csv?order={order['po']}&ip=10.0.0.1")
    assert response.mimetype == "text/csv" and "attachment" in response.headers["Content-Disposition"]
    table = list(csv.reader(io.StringIO(response.get_data(as_text=True))))
    assert table[0][:4] == ["at", "order_po", "grant_id", "path"] and len(table) == 3
    assert {r[4] for r in table[1:]} == {"10.0.0.1"}
    assert "'=cmd|' /C calc'!A0" in [r[-1] for r in table[1:]]  # a formula is defused


@pytest.mark.backends("sqlite")
@pytest.mark.parametrize("query", ["status=abc", "status=99", "status=%C2%B2%C2%B2%C2%B2"])
def test_bad_log_filters_are_refused(client, owner, query):
    response = client.get(f"/admin/log?{query}")
    assert response.status_code == 400 and "status must be an HTTP status code" in shown(response)


def test_dashboard_shows_sales_chart_and_flagged_files(app, client, owner, order):
    with app.app_context():
        db.session.get(Order, 1).total_cents = 1234
        from app.downloads.models import FileEntry
        db.session.scalars(select(FileEntry).where(FileEntry.path == "b.bin")).one().flagged = "checksum changed"
        db.session.commit()
    page = shown(client.get("/admin/"))
    assert "$12.34" in page
    chart = page.split('id="deliveries-chart"')[1].split("</svg>")[0]
    today, yesterday = utcnow().date(), utcnow().date() - timedelta(days=1)
    assert f"{today}: 1 verified" in chart and f"{yesterday}: 1 transferred" in chart
    assert "KIT/b.bin" in page.split('id="flagged"')[1] and "checksum changed" in page


def test_products_add_and_edit(app, client, owner):
    client.post("/admin/packages/new", data={"name": "P1"})
    client.post("/admin/products/new", data={"sku": "NEW1", "name": "New", "price": "3.50", "max_downloads": "2",
                                             "link_days": "7", "package": "P1"})
    client.post("/admin/products/NEW1", data={"name": "Renamed", "price": "4.00", "max_downloads": "",
                                              "link_days": "30", "package": "", "active": "yes"})
    with app.app_context():
        product = db.session.scalar(select(Product).where(Product.sku == "NEW1"))
        assert (product.name, product.price_cents, product.max_downloads, product.link_days, product.package) == \
            ("Renamed", 400, None, 30, None)
    page = shown(client.post("/admin/products/NEW1", data={"name": "X", "price": "1.001", "link_days": "7"},
                             follow_redirects=True))
    assert "price 1.001 has fractions of a cent" in page


@pytest.mark.backends("sqlite")
@pytest.mark.parametrize("field, value, message", [
    ("max_downloads", "\u00b2", "max downloads must be between 1 and 100000"),
    ("max_downloads", "\uff15", "max downloads must be between 1 and 100000"),
    ("link_days", "\u00b2", "link lifetime must be between 1 and 3650 days"),
])
def test_product_numbers_must_be_plain_digits(app, client, owner, field, value, message):
    form = {"sku": "NEW1", "name": "New", "price": "3.50", "max_downloads": "2", "link_days": "7", field: value}
    response = client.post("/admin/products/new", data=form, follow_redirects=True)
    assert response.status_code == 200 and message in shown(response)
    with app.app_context():
        assert db.session.scalars(select(Product)).all() == []
