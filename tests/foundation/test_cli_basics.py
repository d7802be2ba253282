import pytest
from sqlalchemy import func, select

from app.extensions import db
from app.store.models import Product


def count_products(app):
    with app.app_context():
        return db.session.scalar(select(func.count()).select_from(Product))


def test_product_add_then_grant_prints_link_last(app, runner):
    result = runner.invoke(args=["softgoods", "product", "add", "--sku", "EBOOK1", "--name", "Book", "--price", "9.99"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(args=["softgoods", "grant", "--sku", "EBOOK1", "--email", "Buyer@Example.com"])
    assert result.exit_code == 0, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith(app.config["SIDECAR_URL"] + "/d/")
    assert "SG-" in result.output


@pytest.mark.parametrize("args, reason", [
    (["--sku", "../evil", "--name", "x", "--price", "1"], "SKU"),
    (["--sku", ".packages", "--name", "x", "--price", "1"], "SKU"),
    (["--sku", "OK1", "--name", "x", "--price", "-5"], "zero or more"),
    (["--sku", "OK1", "--name", "x", "--price", "abc"], "number"),
    (["--sku", "OK1", "--name", "x", "--price", "1.001"], "fractions of a cent"),
    (["--sku", "OK1", "--name", "", "--price", "1"], "name"),
    (["--sku", "OK1", "--name", "x"], "--price"),
    (["--sku", "OK1", "--name", "x", "--price", "1", "--max-downloads", "many"], "max-downloads"),
    (["--sku", "OK1", "--name", "x", "--price", "1", "--package", "NOPE"], "package"),
])
def test_product_add_refuses_bad_input_with_one_line(app, runner, args, reason):
    result = runner.invoke(args=["softgoods", "product", "add", *args])
    assert result.exit_code == 2
    lines = [l for l in result.output.splitlines() if l.strip()]
    assert len(lines) == 1 and reason in lines[0], result.output
    assert "Traceback" not in result.output
    assert count_products(app) == 0


def test_money_is_exact_cents(app, runner):
    runner.invoke(args=["softgoods", "product", "add", "--sku", "A", "--name", "A", "--price", "0.10"])
    runner.invoke(args=["softgoods", "product", "add", "--sku", "B", "--name", "B", "--price", "0.20"])
    with app.app_context():
        prices = db.session.scalars(select(Product.price_cents).order_by(Product.sku)).all()
    assert prices == [10, 20] and sum(prices) == 30
