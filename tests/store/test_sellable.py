"""Nothing to deliver, nothing for sale: a product without an indexed file or a live package is not
in the catalog, its page says it is unavailable, cart and checkout refuse it, the owner sees why."""
from __future__ import annotations

import pytest
from sqlalchemy import func, select

from app.downloads.models import Package
from app.downloads.packages import add_files, create_package, remove_files
from app.extensions import db
from app.store.models import Order, Product
from tests.admin.conftest import log_in, make_user
from tests.helpers import make_product
from tests.store.shop import add_to_cart, checkout_form, error_text


@pytest.fixture
def shop(app):
    make_product(app, "KIT", {"a.bin": 1000})
    with app.app_context():
        package = create_package(db.session, "P1")
        add_files(db.session, app.config["DOWNLOAD_DIR"], package, ["KIT/a.bin"])
        db.session.commit()
    make_product(app, "PKG", name="Package product", price="49.99", package_name="P1")
    make_product(app, "EMPTY", name="Empty product", price="5.00")  # no file under EMPTY/
    return app


def orders(app) -> int:
    with app.app_context():
        return db.session.scalar(select(func.count()).select_from(Order))


def test_a_product_with_no_file_is_not_sold_and_the_owner_sees_why(shop, client):
    assert "Empty product" not in client.get("/").text
    page = client.get("/p/EMPTY")
    assert page.status_code == 404 and "unavailable" in page.text and "Add to cart" not in page.text
    refused = add_to_cart(client, "EMPTY")
    assert refused.status_code == 422 and "Empty product (EMPTY) is not available" in error_text(refused.text)
    log_in(client, make_user(shop, "owner@example.com", "owner"))
    assert "no file is indexed under EMPTY/" in client.get("/admin/products").text


def test_a_deleted_package_takes_its_product_off_sale_and_checkout_charges_nothing(shop, client, runner):
    assert "Package product" in client.get("/").text
    add_to_cart(client, "PKG")
    form = checkout_form(client)
    result = runner.invoke(args=["softgoods", "package", "delete", "P1"])
    assert result.exit_code == 0, result.output
    assert "product PKG withdrawn from sale: it sold package P1" in result.output
    paid = client.post("/checkout", data=form)
    assert paid.status_code in (409, 422) and orders(shop) == 0  # refused: the product left the cart
    assert "Package product" not in client.get("/").text
    assert client.get("/p/PKG").status_code == 404
    refused = add_to_cart(client, "PKG")
    assert refused.status_code == 422
    with shop.app_context():
        assert db.session.scalar(select(Product.active).where(Product.sku == "PKG")) is False


def test_an_empty_package_is_unavailable_and_the_cart_drops_it(shop, client):
    add_to_cart(client, "PKG")
    form = checkout_form(client)
    with shop.app_context():
        package = db.session.scalar(select(Package).where(Package.name == "P1"))
        remove_files(db.session, shop.config["DOWNLOAD_DIR"], package, ["KIT/a.bin"])  # no files: no ZIP
        db.session.commit()
    page = client.get("/p/PKG")
    assert page.status_code == 404 and "unavailable" in page.text
    client.post("/checkout", data=form)
    assert orders(shop) == 0
    log_in(client, make_user(shop, "owner@example.com", "owner"))
    assert "its package P1 has no ZIP" in client.get("/admin/products").text


def test_deleting_a_package_on_the_owner_page_says_which_products_it_withdraws(shop, client):
    log_in(client, make_user(shop, "admin@example.com", "admin"))
    ask = client.post("/admin/packages/P1/delete")
    assert "Product(s) PKG sell it: deleting it withdraws them from sale" in ask.text.replace("&#39;", "'")
    done = client.post("/admin/packages/P1/delete", data={"confirm": "yes"}, follow_redirects=True)
    assert "Withdrawn from sale: PKG." in done.text
