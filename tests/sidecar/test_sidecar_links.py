"""Opening links: validation order, pages and JSON for each refusal, the listing, class picks,
guess limiting, health and metrics. Test client of the sidecar app, on both backends."""
from __future__ import annotations

import hashlib
import hmac
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from app.downloads.models import DownloadLog, UserDownload
from app.extensions import db
from app.timeutil import utcnow
from tests.servers import path_of
from tests.helpers import grant_link, make_product

JSON = {"Accept": "application/json"}
FILES = {"readme.txt": b"hello reader\n", "ch1/intro.pdf": 5000, "ch1/deep/notes.md": 300}


def _grant(app) -> UserDownload:
    return db.session.scalars(select(UserDownload).order_by(UserDownload.id.desc())).first()


def test_listing_json_is_the_contract(app, sc):
    make_product(app, "BOOK", FILES)
    link = grant_link(app, "BOOK", max_downloads=3)
    resp = sc.get(path_of(link), headers=JSON)
    assert resp.status_code == 200
    data = resp.get_json()
    assert set(data) >= {"order", "expires_at", "confirm_url", "files", "order_status"}
    assert data["order_status"] == "pending"
    paths = [f["path"] for f in data["files"]]
    assert sorted(paths) == sorted(FILES)
    readme = next(f for f in data["files"] if f["path"] == "readme.txt")
    assert readme["sha256"] == hashlib.sha256(FILES["readme.txt"]).hexdigest()
    assert readme["size"] == len(FILES["readme.txt"]) and readme["media_type"] == "text/plain"
    assert readme["downloads_left"] == 3 and readme["evidence"] is None
    assert readme["url"].endswith("/f/readme.txt") and readme["metalink_url"].endswith(".meta4")
    body = sc.get(path_of(readme["url"]))
    assert body.status_code == 200 and body.data == FILES["readme.txt"]
    assert body.headers["Content-Disposition"] == "attachment; filename=\"readme.txt\"; filename*=UTF-8''readme.txt"
    assert body.headers["Repr-Digest"].startswith("sha-256=:") and body.headers["Accept-Ranges"] == "bytes"
    assert body.headers["ETag"].startswith('"') and "Last-Modified" in body.headers
    assert 'rel=describedby' in body.headers["Link"]


def test_listing_html_shows_names_sizes_and_buttons(app, sc):
    make_product(app, "BOOK", FILES)
    link = grant_link(app, "BOOK")
    page = sc.get(path_of(link)).get_data(as_text=True)
    assert "ch1/deep/notes.md" in page and "Download" in page and "SHA-256" in page
    assert hashlib.sha256(FILES["readme.txt"]).hexdigest()[:16] in page


def _forged(link: str) -> str:
    i = len(link) - 8
    return link[:i] + ("x" if link[i] != "x" else "y") + link[i + 1:]


@pytest.mark.parametrize("case, status, text", [
    ("forged", 404, "This download link is not valid."),
    ("revoked", 403, "withdrawn by the shop"),
    ("expired", 410, "expired on"),
    ("exhausted", 403, "All downloads of this link have been used."),
    ("other-address", 403, "bound to another network address"),
    ("unknown-file", 404, "There is no such file in this download."),
])
def test_refusals_answer_pages_and_json(app, sc, case, status, text):
    make_product(app, "BOOK", FILES)
    link = grant_link(app, "BOOK", max_downloads=2, client_ip="203.0.113.9" if case == "other-address" else None)
    if case == "exhausted":  # the limit is per file: every file delivered twice uses the link up
        for _ in range(2):
            for name in FILES:
                assert sc.get(path_of(link) + "f/" + name).status_code == 200
    with app.app_context():
        grant = _grant(app)
        if case == "revoked":
            grant.status = "revoked"
        elif case == "expired":
            grant.expires_at = utcnow() - timedelta(minutes=1)
        elif case == "other-address":
            grant.bound_ip = "203.0.113.9"
        db.session.commit()
    url = path_of(_forged(link) if case == "forged" else link)
    if case == "unknown-file":
        url += "f/nothing-here.txt"
    page = sc.get(url)
    assert page.status_code == status and text in page.get_data(as_text=True)
    assert "Traceback" not in page.get_data(as_text=True)
    as_json = sc.get(url, headers=JSON)
    assert as_json.status_code == status and text in as_json.get_json()["error"]


def test_forged_link_is_refused_without_database_work(app, sc, sidecar_app):
    from sqlalchemy import event

    make_product(app, "BOOK", FILES)
    link = grant_link(app, "BOOK")
    statements = []

    def record(_conn, _cursor, statement, *_args):
        statements.append(statement)

    with sidecar_app.app_context():
        engine = db.engine
    event.listen(engine, "before_cursor_execute", record)
    try:
        assert sc.get(path_of(_forged(link)), headers=JSON).status_code == 404
        assert sc.get(path_of(_forged(link)) + "f/readme.txt").status_code == 404
        assert statements == []
        assert sc.get(path_of(link), headers=JSON).status_code == 200
        assert statements  # the listener does see the queries of a good link
    finally:
        event.remove(engine, "before_cursor_execute", record)


def test_file_requests_of_an_exhausted_link_are_left_to_the_counting_rules(app, sc):
    """The listing says 403; a file request goes on to open_request (a delivery in progress may finish)."""
    make_product(app, "BOOK", FILES)
    link = grant_link(app, "BOOK", max_downloads=1)
    for name in FILES:  # each file once: every file is used up
        assert sc.get(path_of(link) + "f/" + name).status_code == 200
    assert sc.get(path_of(link)).status_code == 403
    assert sc.get(path_of(link) + "f/readme.txt").status_code == 403  # a new copy: refused by the rules
    piece = sc.get(path_of(link) + "f/ch1/intro.pdf", headers={"Range": "bytes=0-99"})
    assert piece.status_code == 206 and len(piece.data) == 100  # within the delivery's budget: served


@pytest.mark.config(RATELIMIT_ENABLED=True, LINK_GUESS_LIMIT="5 per minute")
def test_guessing_links_from_one_address_gets_429(app, sc):
    make_product(app, "BOOK", FILES)
    link = grant_link(app, "BOOK")
    assert sc.get(path_of(link) + "f/nope.txt").status_code == 404  # a good link's typo is no guess
    for _ in range(5):
        assert sc.get(path_of(_forged(link)), headers=JSON).status_code == 404
    blocked = sc.get(path_of(_forged(link)), headers=JSON)
    assert blocked.status_code == 429 and "Too many attempts" in blocked.get_json()["error"]
    assert sc.get(path_of(link), environ_base={"REMOTE_ADDR": "198.51.100.7"}).status_code == 200


def test_class_entitlement_lists_the_class_and_each_pick_uses_one(app, sc):
    make_product(app, "NOVEL-A", {"a.epub": 100}, content_class="classics")
    make_product(app, "NOVEL-B", {"b.epub": 100}, content_class="classics")
    make_product(app, "NOVEL-C", {"c.epub": 100}, content_class="classics")
    make_product(app, "PICK2", entitlement_class="classics", entitlement_count=2)
    link = path_of(grant_link(app, "PICK2"))
    data = sc.get(link, headers=JSON).get_json()
    assert data["files"] == [] and data["choices_left"] == 2
    assert {o["sku"] for o in data["offer"]} == {"NOVEL-A", "NOVEL-B", "NOVEL-C"}
    assert "Choose this" in sc.get(link).get_data(as_text=True)
    assert sc.post(link + "choose", json={"sku": "NOVEL-A"}).get_json()["choices_left"] == 1
    assert sc.post(link + "choose", data={"sku": "NOVEL-B"}).status_code == 303
    refused = sc.post(link + "choose", json={"sku": "NOVEL-C"})
    assert refused.status_code == 403 and "already chosen all 2" in refused.get_json()["error"]
    data = sc.get(link, headers=JSON).get_json()
    assert [f["path"] for f in data["files"]] == ["NOVEL-A/a.epub", "NOVEL-B/b.epub"]
    assert sc.get(link + "f/NOVEL-A/a.epub").status_code == 200
    assert sc.get(link + "f/NOVEL-C/c.epub").status_code == 404


@pytest.mark.parametrize("sku, message", [("NOPE", "not one of the products"), ("", "Choose a product")])
def test_bad_picks_are_refused_and_change_nothing(app, sc, sku, message):
    make_product(app, "NOVEL-A", {"a.epub": 100}, content_class="classics")
    make_product(app, "PICK1", entitlement_class="classics", entitlement_count=1)
    link = path_of(grant_link(app, "PICK1"))
    resp = sc.post(link + "choose", json={"sku": sku})
    assert resp.status_code == 400 and message in resp.get_json()["error"]
    assert sc.get(link, headers=JSON).get_json()["choices_left"] == 1


@pytest.mark.config(WTF_CSRF_ENABLED=True)
def test_pick_form_needs_its_csrf_token(app, sc):
    make_product(app, "NOVEL-A", {"a.epub": 100}, content_class="classics")
    make_product(app, "PICK1", entitlement_class="classics", entitlement_count=1)
    link = path_of(grant_link(app, "PICK1"))
    assert sc.post(link + "choose", data={"sku": "NOVEL-A"}).status_code == 400
    assert sc.get(link, headers=JSON).get_json()["choices_left"] == 1


def confirmation(listing: dict, path: str, data: bytes) -> dict:
    """What the verifying client posts: the digest and the proof keyed with the file's nonce."""
    nonce = next(f["proof_nonce"] for f in listing["files"] if f["path"] == path)
    return {"path": path, "sha256": hashlib.sha256(data).hexdigest(),
            "proof": hmac.new(bytes.fromhex(nonce), data, hashlib.sha256).hexdigest()}


def test_confirm_checks_the_digest_and_the_proof(app, sc):
    make_product(app, "BOOK", FILES)
    link = path_of(grant_link(app, "BOOK"))
    body = confirmation(sc.get(link, headers=JSON).get_json(), "readme.txt", FILES["readme.txt"])
    assert sc.post(link + "confirm", json={**body, "sha256": "0" * 64}).status_code == 409
    assert sc.post(link + "confirm", json={**body, "proof": "0" * 64}).status_code == 409
    assert sc.post(link + "confirm", json={"path": "readme.txt", "sha256": body["sha256"]}).status_code == 422
    assert sc.post(link + "confirm", json=body).get_json() == {"status": "verified"}
    assert sc.post(link + "confirm", data="not json").status_code == 400


def test_every_file_request_is_logged(app, sc):
    make_product(app, "BOOK", FILES)
    link = path_of(grant_link(app, "BOOK"))
    sc.get(link + "f/readme.txt")
    sc.get(link + "f/readme.txt", headers={"Range": "bytes=0-3"})
    sc.head(link + "f/readme.txt")
    sc.get(link + "f/../secret")
    sc.get(link + "f/readme%00.txt")
    with app.app_context():
        rows = db.session.scalars(select(DownloadLog).order_by(DownloadLog.id)).all()
    assert [(r.status, r.outcome, r.bytes_sent) for r in rows] == [
        (200, "complete", 13), (206, "complete", 4), (200, "head", 0), (404, "refused", 0), (404, "refused", 0)]
    assert rows[1].range_header == "bytes=0-3" and rows[3].path == "../secret"
    assert rows[4].path == "readme\\0.txt"


def test_a_refused_new_delivery_is_logged_and_sends_nothing(app, sc):
    make_product(app, "BOOK", FILES)
    link = path_of(grant_link(app, "BOOK", max_downloads=1))
    assert sc.get(link + "f/readme.txt").data == FILES["readme.txt"]
    refused = sc.get(link + "f/readme.txt", headers=JSON)  # the limit is per file: this one is used up
    assert refused.status_code == 403 and "used" in refused.get_json()["error"]
    with app.app_context():
        last = db.session.scalars(select(DownloadLog).order_by(DownloadLog.id.desc())).first()
    assert (last.path, last.status, last.outcome, last.bytes_sent) == ("readme.txt", 403, "refused", 0)
    assert sc.get(link + "f/ch1/intro.pdf").status_code == 200  # ... another file is not


def test_healthz_and_metrics(app, sc, sidecar_app, tmp_path):
    make_product(app, "BOOK", FILES)
    assert sc.get("/healthz").get_json()["status"] == "ok"
    text = sc.get("/metrics").get_data(as_text=True)
    assert "softgoods_bytes_sent_total 0" in text and "softgoods_transfers_in_progress 0" in text
    assert 'softgoods_deliveries{evidence="verified"}' in text
    sidecar_app.config["DOWNLOAD_DIR"] = str(tmp_path / "gone")
    down = sc.get("/healthz")
    assert down.status_code == 503 and "download dir" in down.get_json()["reason"]


def test_database_down_answers_503_with_retry_after(app, env, tmp_path):
    from sidecar import create_sidecar

    broken = create_sidecar({"TESTING": True}, env={**env, "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"})
    client = broken.test_client()
    health = client.get("/healthz")
    assert health.status_code == 503 and "database unreachable" in health.get_json()["reason"]
    make_product(app, "BOOK", FILES)
    link = grant_link(app, "BOOK")
    resp = client.get(path_of(link), headers=JSON)
    assert resp.status_code == 503 and resp.headers["Retry-After"] and "unavailable" in resp.get_json()["error"]
    with broken.app_context():
        db.engine.dispose()


def test_client_download_is_served_or_explained(sc):
    from sidecar.routes import CLIENT_FILE

    resp = sc.get("/client")
    if CLIENT_FILE.is_file():
        assert resp.status_code == 200 and b"def " in resp.data
    else:
        assert resp.status_code == 503 and b"not installed" in resp.data
    resp.close()


def test_log_counts_match(app, sc):
    make_product(app, "BOOK", FILES)
    link = path_of(grant_link(app, "BOOK"))
    for _ in range(3):
        sc.get(link + "f/ch1/intro.pdf", headers={"Range": "bytes=100-"})
    with app.app_context():
        total = db.session.scalar(select(func.sum(DownloadLog.bytes_sent)))
    assert total == 3 * 4900


def test_expired_link_may_finish_a_started_delivery_within_grace(app, sc):
    """Within the grace, a delivery that began before expiry finishes the way the verifying client does
    it: listing, Metalink, the missing bytes, confirm. Nothing new starts; past the grace all is 410."""
    make_product(app, "BOOK", FILES)
    link = path_of(grant_link(app, "BOOK"))
    assert sc.get(link + "f/ch1/intro.pdf", headers={"Range": "bytes=0-999"}).status_code == 206
    with app.app_context():
        from app.downloads.models import Delivery

        _grant(app).expires_at = utcnow() - timedelta(minutes=5)
        for started in db.session.scalars(select(Delivery)):
            started.started_at = utcnow() - timedelta(minutes=10)  # it began before the link expired
        db.session.commit()
    listed = sc.get(link, headers=JSON)
    assert listed.status_code == 200, listed.data
    assert {f["path"] for f in listed.get_json()["files"]} == set(FILES)
    assert sc.get(link + "m/ch1/intro.pdf.meta4").status_code == 200
    assert sc.get(link + "m/readme.txt.meta4").status_code == 410
    assert sc.get(link + "f/readme.txt").status_code == 410  # never started: no grace
    resumed = sc.get(link + "f/ch1/intro.pdf", headers={"Range": "bytes=1000-"})
    assert resumed.status_code == 206 and len(resumed.data) == 4000
    with open(app.config["DOWNLOAD_DIR"] + "/BOOK/ch1/intro.pdf", "rb") as fh:
        intro = confirmation(listed.get_json(), "ch1/intro.pdf", fh.read())
    confirmed = sc.post(link + "confirm", json=intro, headers=JSON)
    assert confirmed.status_code == 200 and confirmed.get_json() == {"status": "verified"}
    readme = confirmation(listed.get_json(), "readme.txt", FILES["readme.txt"])
    assert sc.post(link + "confirm", json=readme, headers=JSON).status_code == 410
    with app.app_context():
        _grant(app).expires_at = utcnow() - timedelta(days=1)  # past the grace period
        db.session.commit()
    assert sc.get(link + "f/ch1/intro.pdf", headers={"Range": "bytes=1000-"}).status_code == 410
    assert sc.get(link, headers=JSON).status_code == 410
    assert sc.get(link + "m/ch1/intro.pdf.meta4").status_code == 410
    assert sc.post(link + "confirm", json=intro, headers=JSON).status_code == 410


@pytest.mark.backends("sqlite")
def test_sqlite_writers_queue_instead_of_polling(app, sidecar_app):
    """Many threads writing at once: every write lands, and no thread keeps the writer lock after
    its commit or rollback (a leak would hang the next writer)."""
    import threading

    from app.downloads.models import AuditEntry

    def work(n: int) -> None:
        with sidecar_app.app_context():
            for i in range(15):
                db.session.add(AuditEntry(actor="t", action="w", target=f"{n}-{i}"))
                if i % 5 == 4:
                    db.session.rollback()
                else:
                    db.session.commit()

    threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    with sidecar_app.app_context():
        assert db.session.scalar(select(func.count()).select_from(AuditEntry)) == 6 * 12
        queue = db.engine._sg_writer_queue
    assert queue._thread_lock.acquire(timeout=1)
    queue._thread_lock.release()


def test_a_package_product_lists_and_serves_its_zip(app, sc):
    import io
    import zipfile

    from app.downloads.packages import add_files, create_package

    make_product(app, "BOOK", FILES)
    with app.app_context():
        package = create_package(db.session, "bundle")
        add_files(db.session, app.config["DOWNLOAD_DIR"], package, ["BOOK/readme.txt", "BOOK/ch1/intro.pdf"])
        db.session.commit()
    make_product(app, "BUNDLE", package_name="bundle")
    link = path_of(grant_link(app, "BUNDLE"))
    files = sc.get(link, headers=JSON).get_json()["files"]
    assert [f["path"] for f in files] == ["bundle.zip"]
    body = sc.get(link + "f/bundle.zip")
    assert body.status_code == 200 and hashlib.sha256(body.data).hexdigest() == files[0]["sha256"]
    assert sorted(zipfile.ZipFile(io.BytesIO(body.data)).namelist()) == ["BOOK/ch1/intro.pdf", "BOOK/readme.txt"]
    assert sc.get(link + "f/readme.txt").status_code == 404  # the product's own files are not this grant's
