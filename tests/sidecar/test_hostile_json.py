"""Hostile bodies on the sidecar's JSON endpoints (confirm, choose): every one is a 400 with a JSON
error and writes nothing, on both backends; the worst are also sent to a real gunicorn sidecar."""
from __future__ import annotations

import hashlib
import json
import urllib.error
import urllib.request

import pytest
from sqlalchemy import func, select

from app.downloads.models import Delivery, DownloadLog, EntitlementChoice, UserDownload
from app.extensions import db
from tests.helpers import grant_link, make_product
from tests.servers import path_of

README = b"hello reader\n"
GOOD_SHA = hashlib.sha256(README).hexdigest()
JSON_TYPE = {"Content-Type": "application/json"}

HOSTILE_BODIES = {
    "lone surrogate": '{"path": "\\ud800", "sha256": "%s", "sku": "\\ud800"}' % GOOD_SHA,
    "lone low surrogate in a key": '{"\\udc80": 1, "path": "readme.txt", "sha256": "%s", "sku": "NOVEL-A"}' % GOOD_SHA,
    "NUL": '{"path": "readme.txt\\u0000", "sha256": "%s", "sku": "\\u0000"}' % GOOD_SHA,
    "NUL deep inside": '{"path": "readme.txt", "sha256": "%s", "sku": "NOVEL-A", "x": [[{"y": "\\u0000"}]]}'
                       % GOOD_SHA,
    "100,000 nested [": "[" * 100_000,
    "100,000 nested {": '{"a":' * 100_000,
    "not UTF-8": b'{"path": "\xff\xfe", "sku": "\xff"}',
    "truncated": '{"path": "readme.txt", "sha256": ',
    "a number Python will not convert": '{"path": ' + "9" * 5000 + "}",
    "not an object": '["readme.txt", "%s"]' % GOOD_SHA,
    "empty": "",
}


@pytest.fixture
def shop(app):
    make_product(app, "BOOK", {"readme.txt": README})
    make_product(app, "NOVEL-A", {"a.epub": 100}, content_class="classics")
    make_product(app, "PICK1", entitlement_class="classics", entitlement_count=1)
    return {"confirm": grant_link(app, "BOOK") + "confirm", "choose": grant_link(app, "PICK1") + "choose"}


def _written(app) -> tuple[int, ...]:
    with app.app_context():
        return (db.session.scalar(select(func.count(Delivery.id))),
                db.session.scalar(select(func.count(DownloadLog.id))),
                db.session.scalar(select(func.count(EntitlementChoice.id))),
                db.session.scalar(select(func.sum(UserDownload.downloads_used))))


@pytest.mark.parametrize("endpoint", ["confirm", "choose"])
@pytest.mark.parametrize("body", list(HOSTILE_BODIES.values()), ids=list(HOSTILE_BODIES))
def test_hostile_json_is_a_400_with_a_json_error_and_writes_nothing(app, sc, shop, endpoint, body):
    before = _written(app)
    resp = sc.post(path_of(shop[endpoint]), data=body, headers=JSON_TYPE)
    assert resp.status_code == 400, resp.get_data(as_text=True)[:300]
    assert isinstance(resp.get_json()["error"], str) and resp.get_json()["error"]
    assert _written(app) == before


@pytest.mark.parametrize("field", ["sku", "sk\x00u"])
def test_nul_in_a_pick_form_is_a_400_and_writes_nothing(app, sc, shop, field):
    before = _written(app)
    resp = sc.post(path_of(shop["choose"]), data={field: "NOVEL-A\x00" if field == "sku" else "NOVEL-A"},
                   headers={"Accept": "application/json"})
    assert resp.status_code == 400 and "cannot be stored" in resp.get_json()["error"]
    assert _written(app) == before


def test_the_same_bodies_still_work_when_clean(app, sc, shop):
    """The parsing step refuses only what is hostile: the ordinary calls keep working."""
    chosen = sc.post(path_of(shop["choose"]), json={"sku": "NOVEL-A"})
    assert chosen.status_code == 200 and chosen.get_json()["choices_left"] == 0
    unverified = sc.post(path_of(shop["confirm"]), json={"path": "readme.txt", "sha256": "0" * 64,
                                                           "proof": "0" * 64})
    assert unverified.status_code == 409


@pytest.mark.parametrize("endpoint", ["confirm", "choose"])
@pytest.mark.parametrize("name", ["lone surrogate", "100,000 nested [", "NUL"])
def test_hostile_json_against_gunicorn(app, sidecar, shop, endpoint, name):
    server = sidecar(workers=1, threads=4)
    url = server.url + path_of(shop[endpoint])
    body = HOSTILE_BODIES[name]
    request = urllib.request.Request(url, data=body.encode() if isinstance(body, str) else body,
                                     headers=JSON_TYPE, method="POST")
    before = _written(app)
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    with refused.value:
        assert refused.value.code == 400
        assert json.loads(refused.value.read())["error"]
    assert _written(app) == before
