"""Against a live store under gunicorn (2 workers x 4 threads): concurrent checkouts get unique
purchase-order numbers, and the same form posted at once from several connections is one order."""
import re
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.cookiejar import CookieJar

import pytest
from sqlalchemy import func, select, update

from app.downloads.models import OutboxMessage, UserDownload
from app.extensions import db
from app.store.models import Order, Product
from tests.helpers import ServerProcess, free_port, make_product
from tests.store.shop import APPROVING, hidden

SHOPPERS = 8


class Browser:
    """One shopper: its own cookies (session, cart), CSRF tokens read from the pages like a browser."""

    def __init__(self, base: str):
        self.base = base
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))

    def open(self, path: str, data: dict | None = None) -> tuple[int, str, str]:
        body = urllib.parse.urlencode(data).encode() if data is not None else None
        try:
            with self.opener.open(self.base + path, data=body, timeout=30) as resp:
                return resp.status, resp.url, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.url, exc.read().decode()

    def add(self, sku: str, quantity: int) -> None:
        token = hidden(self.open(f"/p/{sku}")[2], "csrf_token")
        status, url, _ = self.open("/cart/add", {"sku": sku, "quantity": quantity, "csrf_token": token})
        assert status == 200 and url.endswith("/cart"), status

    def checkout_form(self, email: str) -> dict:
        page = self.open("/checkout")[2]
        return {"csrf_token": hidden(page, "csrf_token"), "checkout_token": hidden(page, "checkout_token"),
                "shown_total": hidden(page, "shown_total"),
                "email": email, "card_number": APPROVING, "expiry": "12/39", "cvc": "123"}

    def pay(self, form: dict) -> str:
        status, url, page = self.open("/checkout", form)
        assert status == 200, (status, page[:300])
        return re.search(r"/orders/(SG-\d{4}-\d{6})$", url)[1]


@pytest.fixture
def live_store(app, env, tmp_path):
    make_product(app, "SONG", {"song.mp3": 1000}, price="0.10", name="A Song")
    make_product(app, "EBOOK1", {"book.pdf": 1000}, price="9.99", name="The Book")
    port = free_port()
    server = ServerProcess(
        [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--workers", "2",
         "--threads", "4", "--worker-class", "gthread", "wsgi:app"],
        env={**env, "SOFTGOODS_CHECKOUT_RATE_LIMIT": "1000 per minute"}, port=port,
        log_path=tmp_path / "store.log")
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def test_concurrent_checkouts_get_unique_po_numbers_and_exact_totals(app, live_store):
    def shop(n: int) -> str:
        browser = Browser(live_store.url)
        browser.add("SONG", 1 + n % 3)
        browser.add("EBOOK1", 1)
        return browser.pay(browser.checkout_form(f"shopper{n}@example.com"))

    with ThreadPoolExecutor(SHOPPERS) as pool:
        numbers = list(pool.map(shop, range(SHOPPERS)))
    assert len(set(numbers)) == SHOPPERS, numbers
    expected = sum(999 + 10 * (1 + n % 3) for n in range(SHOPPERS))
    with app.app_context():
        assert sorted(db.session.scalars(select(Order.po_number))) == sorted(numbers)
        assert db.session.scalar(select(func.sum(Order.total_cents))) == expected
        assert db.session.scalar(select(func.count()).select_from(UserDownload)) == sum(
            2 + n % 3 for n in range(SHOPPERS))


def test_the_same_form_posted_at_once_is_one_order(app, live_store):
    browser = Browser(live_store.url)
    browser.add("EBOOK1", 2)
    form = browser.checkout_form("buyer@example.com")
    start = threading.Barrier(4)

    def press_pay(_) -> str:
        start.wait(10)
        return browser.pay(form)

    with ThreadPoolExecutor(4) as pool:
        numbers = set(pool.map(press_pay, range(4)))
    assert len(numbers) == 1, numbers
    with app.app_context():
        assert db.session.scalar(select(func.count()).select_from(Order)) == 1
        assert db.session.scalar(select(func.count()).select_from(UserDownload)) == 2
        assert db.session.scalar(select(func.count()).select_from(OutboxMessage)) == 1


def test_a_price_change_after_the_checkout_page_opened_charges_nothing_and_shows_the_new_total(app, live_store):
    from app.store.checkout import TotalChanged

    make_product(app, "PRICEY", {"p.bin": 1000}, price="49.99")
    shopper = Browser(live_store.url)
    shopper.add("PRICEY", 1)
    form = shopper.checkout_form("buyer@example.com")
    assert form["shown_total"] == "4999 USD"
    with app.app_context():  # the owner changes the price while the shopper reads the page
        db.session.execute(update(Product).where(Product.sku == "PRICEY").values(price_cents=49999))
        db.session.commit()
    status, _url, page = shopper.open("/checkout", form)
    assert status == TotalChanged("", "").status == 409
    assert "The total changed from $49.99 to $499.99" in page and "nothing was charged" in page
    assert hidden(page, "shown_total") == "49999 USD" and "Pay $499.99" in page
    with app.app_context():
        assert db.session.scalar(select(func.count()).select_from(Order)) == 0
    # A fresh decision on the new total goes through, at the total shown.
    paid = dict(form, shown_total=hidden(page, "shown_total"), checkout_token=hidden(page, "checkout_token"))
    status, url, _ = shopper.open("/checkout", paid)
    assert status == 200 and "/orders/" in url
    with app.app_context():
        assert db.session.scalar(select(Order.total_cents)) == 49999

