"""accel and symlink modes keep the download limit: the sidecar reserves before nginx sends a byte
(403 past the limit, exactly as pipe mode), and nginx log ingestion settles that reservation.
Against a real gunicorn sidecar and nginx, on SQLite and PostgreSQL."""
from __future__ import annotations

import http.client
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from threading import Barrier
from urllib.parse import urlsplit

import pytest
from sqlalchemy import func, select

from app.downloads.index import index_one
from app.downloads.models import NginxHandoff, UserDownload
from app.extensions import db
from app.store.models import Order
from app.timeutil import utcnow
from tests.helpers import grant_link, make_product
from tests.maintenance.test_nginx_log import (behind_nginx, broken_off_get, curl, deliveries, fetch_in_two_parts,
                                              ingest, used, wait_logged)

SIZE = 3_000_000
MODES = pytest.mark.parametrize("mode", ["accel", "symlink"])


@pytest.fixture
def product(app):
    make_product(app, "GAME", {"setup/big file.bin": SIZE})
    return Path(app.config["DOWNLOAD_DIR"]) / "GAME" / "setup" / "big file.bin"


def ask(url: str, headers: dict[str, str] | None = None) -> tuple[int, str | None]:
    """One GET, redirects not followed: the status and what was handed out (the accel redirect or the link)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=20)
    try:
        conn.request("GET", parts.path, headers=headers or {})
        resp = conn.getresponse()
        resp.read()
        return resp.status, resp.getheader("X-Accel-Redirect") or resp.getheader("Location")
    finally:
        conn.close()


def code(*args: str) -> str:
    return curl("-L", "-o", "/dev/null", "-w", "%{http_code}", *args).stdout.decode()


def order_status(app) -> str:
    with app.app_context():
        value = db.session.scalar(select(Order.status))
        db.session.rollback()
        return value


def open_handoffs(app) -> int:
    with app.app_context():
        value = db.session.scalar(select(func.count()).select_from(NginxHandoff)
                                  .where(NginxHandoff.settled_at.is_(None)))
        db.session.rollback()
        return value


@MODES
def test_past_the_limit_nothing_is_handed_to_nginx_and_ingestion_counts_once(app, sidecar, nginx, product,
                                                                              tmp_path, mode):
    front, _link, url = behind_nginx(app, sidecar, nginx, mode, max_downloads=1)
    # a partial download and its resume through nginx: one delivery, not two
    fetch_in_two_parts(url, tmp_path, product)
    # the delivery in progress holds the only slot: a second copy is refused before any hand-off
    assert code(url) == "403"
    assert ask(url) == (403, None)
    wait_logged(front, 4 if mode == "accel" else 6)
    report = ingest(app, front.access_log, accel=mode == "accel")
    assert report.recorded == 2, report.summary()
    assert deliveries(app) == [("transferred", SIZE, True)]
    assert used(app) == 1 and order_status(app) == "shipped" and open_handoffs(app) == 0
    # the same log again (or by a second ingester): nothing counted twice
    again = ingest(app, front.access_log, accel=mode == "accel")
    assert (again.recorded, again.already) == (0, 2)
    assert used(app) == 1 and len(deliveries(app)) == 1
    assert code(url) == "403"


@MODES
def test_concurrent_requests_never_hand_out_more_than_the_limit(app, sidecar, product, mode):
    server = sidecar(SOFTGOODS_DELIVERY=mode, workers=2, threads=10)
    url = grant_link(app, "GAME", max_downloads=2) + "f/setup/big%20file.bin"
    start = Barrier(12)

    def one(_n):
        start.wait()
        return ask(url)

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(one, range(12)))
    handed = [a for a in answers if a[1]]
    assert len(handed) == 2, answers
    assert sorted(status for status, _ in answers if not _) == [403] * 10
    assert open_handoffs(app) == 2


@MODES
def test_a_broken_transfer_gives_its_bytes_back_when_ingested(app, sidecar, nginx, product, mode):
    huge = Path(app.config["DOWNLOAD_DIR"]) / "GAME" / "huge.iso"
    with open(huge, "wb") as fh:  # sparse: bigger than any socket buffer, cheap to make and hash
        fh.truncate(64 * 1024 * 1024)
    with app.app_context():
        index_one(db.session, app.config["DOWNLOAD_DIR"], "GAME", "huge.iso")
        db.session.commit()
    server = sidecar(SOFTGOODS_DELIVERY=mode, SOFTGOODS_PROXY_COUNT="1")
    front = nginx(mode, upstream=server.url)
    url = grant_link(app, "GAME", max_downloads=1).replace(server.url, front.url) + "f/huge.iso"
    target = url
    if mode == "symlink":
        status, location = ask(url)
        assert status == 302
        target = front.url + location
    broken_off_get(target, 100_000)
    wait_logged(front, 1 if mode == "accel" else 2)
    at_sidecar = url.replace(front.url, server.url)  # what the sidecar hands to nginx, unfollowed
    assert ask(at_sidecar)[0] == 403  # still in flight as far as anyone knows: a second full copy waits
    assert ingest(app, front.access_log, accel=mode == "accel").recorded == 1
    [(evidence, covered, counted)] = deliveries(app)
    assert (evidence, counted) == (None, False) and 0 < covered < huge.stat().st_size
    assert used(app) == 0 and open_handoffs(app) == 0
    status, handed = ask(at_sidecar)  # the broken transfer's bytes went back: the shopper may start again
    assert status in (200, 302) and handed


@pytest.mark.config(NGINX_HANDOFF_SECONDS=0)
@MODES
def test_a_reservation_whose_log_line_never_comes_is_released_by_the_purge(app, runner, sidecar, product, mode):
    server = sidecar(SOFTGOODS_DELIVERY=mode)
    url = grant_link(app, "GAME", max_downloads=1) + "f/setup/big%20file.bin"
    status, handed = ask(url)  # handed out, never fetched from nginx
    assert status in (200, 302) and handed
    assert ask(url)[0] == 403
    result = runner.invoke(args=["softgoods", "purge"])
    assert "released 1 reservation(s) handed to nginx" in result.output, result.output
    assert open_handoffs(app) == 0 and used(app) == 0
    if mode == "symlink":  # the link went with its reservation
        with app.app_context():
            folder = Path(app.config["SYMLINK_DIR"]) / db.session.scalar(select(UserDownload.symlink_token))
        assert not any(folder.iterdir())
    status, handed = ask(url)
    assert status in (200, 302) and handed


def test_a_symlink_fetched_again_still_counts_and_is_gone_once_ingested(app, sidecar, nginx, product, tmp_path):
    front, _link, url = behind_nginx(app, sidecar, nginx, "symlink", max_downloads=1)
    status, location = ask(url)
    assert status == 302 and "?" not in location
    direct = front.url + location
    # the shopper keeps the link and fetches it again (and with a query nginx ignores) before ingestion
    for variant in (direct, direct, direct + "?handoff=someone-else"):
        assert curl("-o", str(tmp_path / "copy"), variant).returncode == 0
        assert (tmp_path / "copy").read_bytes() == product.read_bytes()
    wait_logged(front, 4)
    report = ingest(app, front.access_log, accel=False)
    assert report.recorded == 3
    assert used(app) == 1  # the first copy settled the reservation; the others were past the limit
    assert len(report.refused) == 2 and all("refused-403" in r for r in report.refused)
    assert code(direct) == "404"  # the link went when its reservation was settled
    assert code(url) == "403"


def test_settled_reservations_go_with_the_download_log(app, runner, sidecar_app, sc, product):
    from tests.servers import path_of

    sidecar_app.config["DELIVERY"] = "accel"
    link = path_of(grant_link(app, "GAME", max_downloads=None)) + "f/setup/big file.bin"
    assert sc.get(link).headers["X-Accel-Redirect"] and sc.get(link).headers["X-Accel-Redirect"]
    with app.app_context():
        old, recent = db.session.scalars(select(NginxHandoff).order_by(NginxHandoff.id)).all()
        old.settled_at = utcnow() - timedelta(days=app.config["LOG_RETENTION_DAYS"] + 1)
        recent.settled_at, kept = utcnow(), recent.id
        db.session.commit()
    assert runner.invoke(args=["softgoods", "purge"]).exit_code == 0
    with app.app_context():
        assert db.session.scalars(select(NginxHandoff.id)).all() == [kept]
