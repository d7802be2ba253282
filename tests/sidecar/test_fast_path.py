"""The sidecar's fast path for file GETs (sidecar/fast_files.py, app/downloads/fast_store.py) must
answer and record exactly what the Flask view and the ORM rules do: same rows, same headers. Both
backends; the Flask path is the same app built with SIDECAR_FAST_PATH off."""
from __future__ import annotations

import json
import threading

import pytest
from sqlalchemy import event, select

from app.downloads import fast_store
from app.downloads.fast_store import RawStore
from app.downloads.models import Delivery, DownloadLog, UserDownload
from app.extensions import db
from app.store.models import Order
from app.timeutil import utcnow
from sidecar import create_sidecar
from tests.conftest import wipe_database
from tests.helpers import grant_link, make_product
from tests.servers import path_of

FILES = {"a.pdf": 3000, "ch 1/ünï code.bin": 1_000_000, "c.txt": 700}


def _scenario(app, sc) -> list[tuple]:
    """Full copies, a resume, a second copy, the limit, conditional and odd ranges, a broken-off
    transfer, and the file that ships the order. Returns what the shopper saw."""
    make_product(app, "BOOK", FILES)
    link = path_of(grant_link(app, "BOOK", max_downloads=2))
    big = link + "f/ch%201/%C3%BCn%C3%AF%20code.bin"
    seen = []

    def get(url, **headers):
        response = sc.get(url, headers=headers)
        seen.append((url.rsplit("/", 1)[-1], response.status_code, len(response.data),
                     response.headers.get("Content-Range")))
        response.close()
        return response

    get(link + "f/a.pdf")
    get(link + "f/a.pdf", Range="bytes=0-999")
    get(link + "f/a.pdf", Range="bytes=1000-")  # a resume within the budget: same delivery
    get(link + "f/a.pdf")  # the second copy
    get(link + "f/a.pdf")  # the limit: 403 before any byte
    etag = sc.head(big).headers["ETag"]
    get(big, Range="bytes=-500", **{"If-Range": etag})
    get(big, Range="bytes=0-99,200-299")  # multipart: the Flask view
    get(big, **{"If-None-Match": etag})  # 304: the Flask view
    broken = sc.get(big)  # read one block, then hang up
    next(iter(broken.response))
    broken.close()
    get(big, Range="bytes=262144-")  # the resume finishes the delivery
    get(link + "f/c.txt")  # the last file: the order ships
    return seen


def _rows(app) -> dict[str, list]:
    """What the rules recorded, without ids, times and request tokens."""
    with app.app_context():
        deliveries = [(d.grant_id, d.sku, d.path, d.size, d.budget_bytes, d.charged_bytes, d.coverage, d.covered_bytes,
                       d.evidence, d.counted, d.attempts, d.holds_slot, d.closed,
                       [r[1:5] for r in json.loads(d.open_ranges)])
                      for d in db.session.scalars(select(Delivery).order_by(Delivery.id))]
        log = [(r.grant_id, r.delivery_id, r.order_po, r.path, r.client_ip, r.method, r.range_header, r.status,
                r.start_offset, r.bytes_sent, r.outcome, r.source)
               for r in db.session.scalars(select(DownloadLog).order_by(DownloadLog.id))]
        grants = [(g.downloads_used, g.downloads_held) for g in db.session.scalars(select(UserDownload))]
        orders = [(o.status, o.evidence) for o in db.session.scalars(select(Order))]
        return {"deliveries": deliveries, "log": log, "grants": grants, "orders": orders}


@pytest.fixture
def flask_path(env):
    """A test client of the same sidecar without the fast path: every request through Flask and the ORM."""
    made = []

    def client():
        application = create_sidecar({"TESTING": True, "RATELIMIT_ENABLED": False, "SIDECAR_FAST_PATH": False},
                                     env=env)
        assert "softgoods_fast_files" not in application.extensions
        made.append(application)
        return application.test_client()

    yield client
    for application in made:
        with application.app_context():
            db.session.remove()
            db.engine.dispose()


def test_the_fast_path_records_exactly_what_the_orm_rules_record(app, sidecar_app, sc, flask_path):
    fast_seen = _scenario(app, sc)
    fast_rows = _rows(app)
    with app.app_context():
        wipe_database()
    slow_seen = _scenario(app, flask_path())
    assert fast_seen == slow_seen
    assert fast_rows == _rows(app)
    # The scenario reaches every branch: the limit (403), Flask-only answers (multipart, 304), two
    # counted copies of a.pdf (the second continues an unfinished delivery), a resumed broken transfer.
    assert [status for _name, status, _n, _r in fast_seen] == [200, 206, 206, 200, 403, 206, 206, 304, 206, 200]
    assert fast_rows["orders"] == [("shipped", "transferred")] and fast_rows["grants"] == [(4, 0)]
    assert any(outcome == "aborted" for *_, outcome, _source in fast_rows["log"])


def test_fast_and_flask_answers_carry_the_same_headers(app, sidecar_app, sc, flask_path):
    make_product(app, "BOOK", FILES)
    link = path_of(grant_link(app, "BOOK", max_downloads=None))
    slow = flask_path()
    for name, headers in [("ch%201/%C3%BCn%C3%AF%20code.bin", {}), ("a.pdf", {"Range": "bytes=10-"}),
                          ("c.txt", {"Range": "bytes=-5", "Host": "downloads.example.com:8443"})]:
        fast, flask = sc.get(link + "f/" + name, headers=headers), slow.get(link + "f/" + name, headers=headers)
        assert (fast.status_code, fast.data) == (flask.status_code, flask.data)
        assert sorted(fast.headers.items()) == sorted(flask.headers.items())
        assert "filename*=UTF-8''" in fast.headers["Content-Disposition"]
        fast.close()
        flask.close()


@pytest.fixture
def statements(sidecar_app, monkeypatch):
    """The SQL a request runs: through the ORM (the app's engine) and through the fast path."""
    seen = {"orm": [], "fast": []}

    def orm(conn, cursor, statement, parameters, context, executemany) -> None:
        seen["orm"].append(statement)

    real_execute = RawStore._execute

    def fast(self, sql, params=()):
        if not sql.startswith(("BEGIN", "SAVEPOINT", "RELEASE", "ROLLBACK")):  # transaction control
            seen["fast"].append(sql)
        return real_execute(self, sql, params)

    with sidecar_app.app_context():
        engine = db.engine
    event.listen(engine, "before_cursor_execute", orm)
    monkeypatch.setattr(RawStore, "_execute", fast)
    yield seen
    event.remove(engine, "before_cursor_execute", orm)


# read: grant + file; open: (grant lock,) deliveries, slot, insert (+ closing the finished one);
# close: (grant lock,) delivery, count, update, "does the grant still lack evidence" while pending, log row.
GET_BUDGET = 12


def _fetch(sc, url: str) -> None:
    response = sc.get(url)
    assert response.status_code == 200 and len(response.data) == 4096
    response.close()  # the body's close records the delivery


@pytest.mark.parametrize("files", [3, 60])
def test_a_file_get_runs_on_the_fast_path_in_a_few_statements_whatever_the_product_size(
        app, sc, statements, files):
    make_product(app, "SMALL", {f"f{i:03d}.bin": 4096 for i in range(files)}, max_downloads=None)
    link = path_of(grant_link(app, "SMALL", max_downloads=None))
    for name in ("f000.bin", "f001.bin", "f001.bin"):  # a first copy and a second one (closes the first)
        statements["fast"].clear()
        _fetch(sc, link + "f/" + name)
        assert statements["orm"] == []
        assert len(statements["fast"]) <= GET_BUDGET, "\n".join(statements["fast"])
    with app.app_context():
        assert db.session.scalar(select(Order.status)) == "pending"
        assert db.session.query(DownloadLog).filter_by(outcome="complete").count() == 3


def test_a_get_for_a_shipped_order_skips_the_shipping_check(app, sc, statements):
    make_product(app, "ONE", {"only.bin": 4096}, max_downloads=None)
    link = path_of(grant_link(app, "ONE", max_downloads=None))
    _fetch(sc, link + "f/only.bin")
    with app.app_context():
        assert db.session.scalar(select(Order.status)) == "shipped"
    statements["orm"].clear()
    statements["fast"].clear()
    _fetch(sc, link + "f/only.bin")
    assert statements["orm"] == [] and len(statements["fast"]) <= GET_BUDGET
    assert not any("EXISTS" in s or s.lstrip().startswith("UPDATE orders") for s in statements["fast"])


def test_refusals_and_the_shipping_close_go_to_the_flask_view_and_orm(app, sc, statements):
    make_product(app, "ONE", {"only.bin": 100})
    link = path_of(grant_link(app, "ONE", max_downloads=1))
    assert sc.get(link + "f/only.bin").status_code == 200  # its close ships the order: the ORM rules
    assert any("orders" in s for s in statements["orm"])
    statements["orm"].clear()
    refused = sc.get(link + "f/only.bin", headers={"Accept": "application/json"})
    assert refused.status_code == 403 and "error" in refused.get_json()  # the Flask view's answer
    assert statements["orm"]
    with app.app_context():
        assert db.session.scalar(select(Order.status)) == "shipped"
        assert [r.outcome for r in db.session.scalars(select(DownloadLog).order_by(DownloadLog.id))] \
            == ["complete", "refused"]


@pytest.mark.backends("sqlite")
def test_a_batch_commits_together_and_a_failing_unit_undoes_only_itself(app, sidecar_app):
    runner = sidecar_app.extensions["softgoods_fast_files"].runner
    assert isinstance(runner, fast_store.BatchedRunner)
    start = threading.Barrier(9)
    errors = []

    def unit(i: int):
        def work(store: RawStore) -> int:
            store.add_log(grant_id=None, delivery_id=None, order_po=None, path=f"unit-{i}", client_ip="127.0.0.1",
                          user_agent="test", method="GET", range_header=None, status=200, start_offset=0,
                          bytes_sent=0, outcome="complete", at=utcnow())
            store.flush()
            if i == 4:
                raise ValueError("refused")
            return i
        start.wait()
        try:
            runner.run(work)
        except ValueError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=unit, args=(i,)) for i in range(9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(errors) == 1
    with app.app_context():
        paths = sorted(db.session.scalars(select(DownloadLog.path)))
    assert paths == [f"unit-{i}" for i in range(9) if i != 4]
