"""What one small-file request costs in SQL: bounded, and the same whatever the number of files in the
product (issue 5's 4 KiB benchmark; the counting rules must not re-read every file per request)."""
from __future__ import annotations

from contextlib import contextmanager

import pytest
from sqlalchemy import event, select

from app.downloads.models import DownloadLog
from app.extensions import db
from app.store.models import Order
from tests.helpers import grant_link, make_product
from tests.servers import path_of

# Request side: grant (+ order, product), file entry, grant lock, the file's deliveries, slot, INSERT.
# Closing side: log row, grant lock, delivery (+ index, order), UPDATE delivery, count; while the
# order is pending, one EXISTS: does this grant still lack evidence for a file?
GET_BUDGET = 12
# A second copy of a shipped order's file: no shipping check, one more UPDATE closing the first delivery.
GET_OF_A_SHIPPED_ORDER_BUDGET = 12


@contextmanager
def counted_statements(sidecar_app):
    seen: list[str] = []

    def count(conn, cursor, statement, parameters, context, executemany) -> None:
        seen.append(statement)

    with sidecar_app.app_context():
        engine = db.engine
    event.listen(engine, "before_cursor_execute", count)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", count)


def fetch(sc, path: str) -> bytes:
    response = sc.get(path)
    body = response.get_data()
    response.close()  # the body's close records the delivery (close_request)
    assert response.status_code == 200, body[:200]
    return body


@pytest.mark.parametrize("files", [3, 60])
def test_a_small_file_get_costs_the_same_few_statements_whatever_the_product_size(app, sidecar_app, sc, files):
    make_product(app, "SMALL", {f"f{i:03d}.bin": 4096 for i in range(files)}, max_downloads=None)
    link = path_of(grant_link(app, "SMALL", max_downloads=None))
    fetch(sc, link + "f/f000.bin")  # warm: first-use work of the app and the pool is not the request's
    with counted_statements(sidecar_app) as seen:
        assert len(fetch(sc, link + "f/f001.bin")) == 4096
    assert len(seen) <= GET_BUDGET, "\n".join(seen)
    with sidecar_app.app_context():
        assert db.session.scalar(select(Order.status)) == "pending"
        assert db.session.query(DownloadLog).filter_by(path="f001.bin", outcome="complete").count() == 1


def test_a_get_for_a_shipped_order_skips_the_shipping_check(app, sidecar_app, sc):
    make_product(app, "ONE", {"only.bin": 4096}, max_downloads=None)
    link = path_of(grant_link(app, "ONE", max_downloads=None))
    fetch(sc, link + "f/only.bin")
    with sidecar_app.app_context():
        assert db.session.scalar(select(Order.status)) == "shipped"
    with counted_statements(sidecar_app) as seen:
        fetch(sc, link + "f/only.bin")
    assert len(seen) <= GET_OF_A_SHIPPED_ORDER_BUDGET, "\n".join(seen)
    assert not any("orders" in s.split("WHERE")[0] and s.lstrip().startswith("UPDATE") for s in seen)
