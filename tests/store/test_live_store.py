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
from sqlalchemy import func, select

from app.downloads.models import OutboxMessage, UserDownload
from app.extensions import db
from app.store.models import Order
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
