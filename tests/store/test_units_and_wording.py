"""One size unit everywhere, the download limit named for what it counts, comp orders that add up."""
from __future__ import annotations

import re

import pytest
from sqlalchemy import select

from app.extensions import db
from app.sizes import format_size
from app.store.models import Order
from tests.admin.conftest import log_in, make_user
from tests.helpers import grant_link, make_product
from tests.servers import path_of

SIZE = 2_500_000  # 2.4 MiB, but 2.5 MB: the two systems disagree visibly


@pytest.mark.parametrize("size, shown", [
    (None, "-"), (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (SIZE, "2.4 MiB"),
    (5 << 30, "5.0 GiB"), (3 << 40, "3.0 TiB"), (1 << 60, "1048576.0 TiB"),
])
def test_sizes_are_binary_units(size, shown):
    assert format_size(size) == shown


def test_a_file_reads_the_same_size_in_the_shop_the_owner_pages_and_the_sidecar_listing(app, client, sc):
    make_product(app, "BOOK", {"book.pdf": SIZE}, name="The Book")
    link = grant_link(app, "BOOK")
    log_in(client, make_user(app, "owner@example.com", "owner"))
    pages = {"shop": client.get("/p/BOOK").text, "file manager": client.get("/admin/files").text,
             "sidecar listing": sc.get(path_of(link)).text}
    for where, html in pages.items():
        assert "2.4 MiB" in html, where
        assert not re.search(r"\d(\.\d)? [KMGT]B\b", html), f"{where} shows a decimal unit"


def test_the_owner_pages_name_the_limit_per_file(app, client):
    make_product(app, "BOOK", {"book.pdf": 100})
    log_in(client, make_user(app, "owner@example.com", "owner"))
    for page in ("/admin/products", "/admin/products/BOOK"):
        html = client.get(page).text
        assert "Downloads per file" in html and "per link" not in html, page


def test_a_comp_order_shows_a_zero_unit_price_beside_its_zero_total(app, runner, client):
    make_product(app, "BOOK", {"book.pdf": 100}, price="49.99")
    result = runner.invoke(args=["softgoods", "grant", "--sku", "BOOK", "--email", "friend@example.com"])
    assert result.exit_code == 0, result.output
    with app.app_context():
        order = db.session.scalar(select(Order))
        assert order.total_cents == 0 and [i.unit_price_cents for i in order.items] == [0]
        po = order.po_number
    log_in(client, make_user(app, "owner@example.com", "owner"))
    html = client.get(f"/admin/orders/{po}").text
    assert "$0.00" in html and "$49.99" not in html
