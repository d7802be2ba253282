"""Class-entitlement picks under real concurrency: several pickers post at once to a gunicorn sidecar
(two worker processes, many threads) and exactly N picks ever succeed, on both backends."""
from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

from sqlalchemy import func, select

from app.downloads.models import EntitlementChoice
from app.extensions import db
from tests.helpers import grant_link, make_product

PRODUCTS = ["NOVEL-A", "NOVEL-B", "NOVEL-C", "NOVEL-D"]
ALLOWED = 2
RUNS = 6


def _pick(link: str, sku: str, start: threading.Barrier, statuses: list[int]) -> None:
    request = urllib.request.Request(link + "choose", data=json.dumps({"sku": sku}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    start.wait()
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            statuses.append(resp.status)
    except urllib.error.HTTPError as exc:
        exc.close()
        statuses.append(exc.code)


def test_concurrent_picks_never_exceed_the_entitlement(app, sidecar):
    sidecar(workers=2, threads=8)
    for sku in PRODUCTS:
        make_product(app, sku, {f"{sku.lower()}.epub": 100}, content_class="classics")
    make_product(app, "PICK2", entitlement_class="classics", entitlement_count=ALLOWED)
    for run in range(RUNS):
        link = grant_link(app, "PICK2", email=f"reader{run}@example.com")
        start = threading.Barrier(len(PRODUCTS))
        statuses: list[int] = []
        pickers = [threading.Thread(target=_pick, args=(link, sku, start, statuses)) for sku in PRODUCTS]
        for picker in pickers:
            picker.start()
        for picker in pickers:
            picker.join(60)
        assert sorted(statuses) == [200] * ALLOWED + [403] * (len(PRODUCTS) - ALLOWED), f"run {run}: {statuses}"
    with app.app_context():
        per_grant = db.session.execute(select(EntitlementChoice.grant_id, func.count())
                                       .group_by(EntitlementChoice.grant_id)).all()
    assert sorted(n for _, n in per_grant) == [ALLOWED] * RUNS
