"""Catalog and cart: pages, bounded quantities, and clear refusals that change nothing."""
import pytest

from tests.helpers import make_product
from tests.store.shop import add_to_cart, error_text


@pytest.fixture
def shop(app):
    make_product(app, "EBOOK1", {"book.pdf": 2000, "extras/notes.txt": b"notes"}, price="9.99",
                 name="The Book", description="A fine book.")
    make_product(app, "SONG", {"song.mp3": 1000}, price="0.10", name="A Song")
    return app


def cart_of(client) -> dict:
    with client.session_transaction() as s:
        return dict(s.get("cart", {}))


def test_catalog_lists_products_with_prices(shop, client):
    page = client.get("/")
    assert page.status_code == 200
    assert "The Book" in page.text and "$9.99" in page.text and "$0.10" in page.text


def test_product_page_shows_files_in_subfolders(shop, client):
    page = client.get("/p/EBOOK1")
    assert page.status_code == 200
    assert "extras/notes.txt" in page.text and "book.pdf" in page.text and "A fine book." in page.text


def test_unknown_product_page_is_a_404_page(shop, client):
    page = client.get("/p/NOPE")
    assert page.status_code == 404 and "NOPE" in page.text and "Traceback" not in page.text


def test_cart_adds_updates_removes_and_sums_exactly(shop, client):
    assert add_to_cart(client, "SONG", 3).status_code == 303
    assert add_to_cart(client, "EBOOK1", 1).status_code == 303
    assert cart_of(client) == {"SONG": 3, "EBOOK1": 1}
    page = client.get("/cart")
    assert "$10.29" in page.text  # 3 x 0.10 + 9.99, in cents: no float drift
    assert 'data-testid="cart-count">4<' in page.text
    client.post("/cart/update", data={"sku": "SONG", "quantity": "7"})
    assert cart_of(client) == {"SONG": 7, "EBOOK1": 1}
    client.post("/cart/remove", data={"sku": "EBOOK1"})
    assert cart_of(client) == {"SONG": 7}
    assert "$0.70" in client.get("/cart").text


@pytest.mark.parametrize("sku, quantity, message", [
    ("NOPE", "1", "there is no product 'NOPE' for sale"),
    ("../evil", "1", "there is no product '../evil' for sale"),
    ("EBOOK1", "0", "quantity must be between 1 and 10, not 0"),
    ("EBOOK1", "11", "quantity must be between 1 and 10, not 11"),
    ("EBOOK1", "-1", "quantity must be between 1 and 10, not -1"),
    ("EBOOK1", "abc", "quantity must be a whole number from 1 to 10, not 'abc'"),
    ("EBOOK1", "", "quantity must be a whole number from 1 to 10, not ''"),
    ("EBOOK1", "1.5", "quantity must be a whole number from 1 to 10, not '1.5'"),
    ("EBOOK1", "--1", "quantity must be a whole number from 1 to 10, not '--1'"),
    ("EBOOK1", "\u00b2", "quantity must be a whole number from 1 to 10, not '\u00b2'"),
    ("EBOOK1", "\uff13", "quantity must be a whole number from 1 to 10, not '\uff13'"),
])
def test_bad_cart_input_is_refused_and_the_cart_is_unchanged(shop, client, sku, quantity, message):
    add_to_cart(client, "SONG", 2)
    refused = add_to_cart(client, sku, quantity)
    assert refused.status_code == 422
    assert error_text(refused.text) == message
    assert cart_of(client) == {"SONG": 2}


def test_quantity_per_product_is_capped_across_adds(shop, client):
    add_to_cart(client, "SONG", 8)
    refused = add_to_cart(client, "SONG", 3)
    assert refused.status_code == 422 and "at most 10" in error_text(refused.text)
    assert cart_of(client) == {"SONG": 8}


def test_json_clients_get_the_refusal_as_json(shop, client):
    refused = client.post("/cart/add", data={"sku": "EBOOK1", "quantity": "0"},
                          headers={"Accept": "application/json"})
    assert refused.status_code == 422
    assert refused.json == {"error": "quantity must be between 1 and 10, not 0"}


def test_oversized_form_is_refused_with_413(shop, client):
    refused = client.post("/cart/add", data={"sku": "EBOOK1", "quantity": "1", "pad": "x" * 600_000})
    assert refused.status_code == 413 and "Traceback" not in refused.text
    assert cart_of(client) == {}


def test_a_withdrawn_product_drops_out_of_the_cart(shop, client):
    from sqlalchemy import update

    from app.extensions import db
    from app.store.models import Product

    add_to_cart(client, "SONG", 1)
    add_to_cart(client, "EBOOK1", 1)
    with shop.app_context():
        db.session.execute(update(Product).where(Product.sku == "EBOOK1").values(active=False))
        db.session.commit()
    page = client.get("/cart")
    assert "The Book" not in page.text and "$0.10" in page.text


def test_a_package_past_its_lifetime_is_no_longer_sold(app, client):
    from datetime import timedelta

    from app.downloads.packages import add_files, create_package
    from app.extensions import db
    from app.timeutil import utcnow

    make_product(app, "KIT", {"a.bin": 1000})
    with app.app_context():
        package = create_package(db.session, "P1", lifetime_days=30)
        add_files(db.session, app.config["DOWNLOAD_DIR"], package, ["KIT/a.bin"])
        db.session.commit()
    make_product(app, "PKG", name="Package product", package_name="P1")
    assert "Package product" in client.get("/").text
    assert add_to_cart(client, "PKG", 1).status_code == 303
    with app.app_context():
        from app.downloads.models import Package
        package = db.session.scalar(db.select(Package))
        package.created_at = utcnow() - timedelta(days=31)
        db.session.commit()
    assert "Package product" not in client.get("/").text
    assert client.get("/p/PKG").status_code == 404
    assert "Package product" not in client.get("/cart").text
    refused = add_to_cart(client, "PKG", 1)
    assert refused.status_code == 422 and "PKG" in error_text(refused.text)
