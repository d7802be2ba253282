"""A shopper in headless Chromium against the store under gunicorn, with a real SMTP server:
browse, buy with the approving card, see the link on the page, in the email and under My downloads
(after registering and confirming); then a declining card shows the decline and no link."""
import re
import sys

import pytest

from tests.browser import browser_page
from tests.helpers import ROOT, ServerProcess, free_port, make_product

ARTIFACTS = ROOT / "tests" / "artifacts"


@pytest.fixture
def store(app, env, tmp_path, smtp_server):
    make_product(app, "EBOOK1", {"book.pdf": 5000, "extras/notes.txt": b"notes"}, price="9.99",
                 name="The Field Guide", description="Everything about the field.")
    make_product(app, "SONG", {"song.mp3": 2000}, price="0.99", name="A Song")
    port = free_port()
    server = ServerProcess([sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "wsgi:app"],
                           env={**env, "SOFTGOODS_SMTP_URL": smtp_server.url,
                                "SOFTGOODS_STORE_URL": f"http://127.0.0.1:{port}"},
                           port=port, log_path=tmp_path / "store.log")
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_shopper_buys_finds_the_link_in_email_and_my_downloads_then_a_card_is_declined(store, smtp_server):
    with browser_page() as page:
        page.goto(store.url + "/")
        assert page.locator("h2", has_text="The Field Guide").is_visible()
        page.click("text=The Field Guide")
        assert page.locator("td", has_text="extras/notes.txt").is_visible()
        page.click("button:has-text('Add to cart')")
        assert page.locator("[data-testid=cart-count]").inner_text() == "1"
        assert page.locator("[data-testid=cart-total]").inner_text() == "$9.99"
        page.click("text=Checkout")
        page.fill("input[name=email]", "reader@example.com")
        page.fill("input[name=card_number]", "4242 4242 4242 4242")
        page.fill("input[name=expiry]", "12/39")
        page.fill("input[name=cvc]", "123")
        shot(page, "checkout")
        page.click("[data-testid=pay]")
        page.wait_for_url(re.compile(r"/orders/SG-\d{4}-\d{6}$"))
        po = page.locator("[data-testid=po-number]").inner_text()
        links = page.locator("a.download-link").all_inner_texts()
        assert len(links) == 1 and links[0].startswith("http://127.0.0.1:9/d/")
        shot(page, "thanks")

        [mail] = smtp_server.wait_for(1)
        assert mail.rcpt_tos == ["reader@example.com"] and po in mail.message["Subject"]
        assert links[0] in mail.text and f'href="{links[0]}"' in mail.html

        page.click("text=Register")
        page.fill("input[name=email]", "reader@example.com")
        page.click("button:has-text('Register')")
        assert page.locator("[data-testid=sent]").is_visible()  # no account until the address is proven
        setup = smtp_server.wait_for(2)[1]
        [setup_url] = re.findall(r"http://\S+/account/setup/\S+", setup.text)
        page.goto(setup_url)
        page.fill("input[name=password]", "correct horse")
        page.fill("input[name=confirm]", "correct horse")
        page.click("button:has-text('Save the password')")
        page.wait_for_url(re.compile(r"/account/downloads$"))
        assert page.locator("a.download-link").all_inner_texts() == links
        assert page.locator("h2", has_text=po).is_visible()
        shot(page, "my-downloads")

        page.goto(store.url + "/")
        page.click("[data-testid=add-SONG]")
        page.click("text=Checkout")
        assert page.locator("input[name=email]").input_value() == "reader@example.com"
        page.fill("input[name=card_number]", "4000 0000 0000 0002")
        page.fill("input[name=expiry]", "12/39")
        page.fill("input[name=cvc]", "123")
        page.click("[data-testid=pay]")
        error = page.locator("[data-testid=checkout-error]")
        assert error.inner_text() == "Your payment was declined: card declined."
        assert page.locator("a.download-link").count() == 0
        shot(page, "declined")
    assert len(smtp_server.messages) == 2  # no email for the declined payment
