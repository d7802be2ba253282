"""A shopper's story in test-client calls (CTFd-style helpers): add to cart, check out, log in."""
from __future__ import annotations

import re

from flask.testing import FlaskClient

APPROVING = "4242 4242 4242 4242"
DECLINING = "4000 0000 0000 0002"
INSUFFICIENT = "4000 0000 0000 9995"


def hidden(html: str, name: str) -> str:
    match = re.search(rf'name="{name}" value="([^"]*)"', html)
    assert match, f"no hidden field {name} in the page"
    return match[1]


def add_to_cart(client: FlaskClient, sku: str, quantity: int | str = 1):
    return client.post("/cart/add", data={"sku": sku, "quantity": str(quantity)})


def checkout_form(client: FlaskClient, *, email: str = "buyer@example.com", card: str = APPROVING,
                  expiry: str = "12/39", cvc: str = "123") -> dict[str, str]:
    page = client.get("/checkout")
    assert page.status_code == 200, page.status_code
    return {"checkout_token": hidden(page.text, "checkout_token"), "shown_total": hidden(page.text, "shown_total"),
            "email": email, "card_number": card,
            "expiry": expiry, "cvc": cvc}


def buy(client: FlaskClient, sku: str, quantity: int = 1, **card):
    """Add one product and pay; returns the final response (the thank-you page when approved)."""
    add_to_cart(client, sku, quantity)
    return client.post("/checkout", data=checkout_form(client, **card), follow_redirects=True)


def download_links(html: str) -> list[str]:
    return re.findall(r'class="mono download-link" href="([^"]+)"', html)


def heading(html: str) -> str:
    match = re.search(r"<h1>(.*?)</h1>", html, re.S)
    return match[1].strip() if match else ""


def error_text(html: str) -> str:
    """The message a refused page shows: the checkout/register error box, or the error page's heading."""
    match = re.search(r'role="alert"[^>]*>(.*?)</p>', html, re.S)
    return (match[1] if match else heading(html)).replace("&#39;", "'").replace("&#34;", '"')


def log_in(client: FlaskClient, email: str, password: str, next_url: str = ""):
    return client.post("/account/login", data={"email": email, "password": password, "next": next_url})
