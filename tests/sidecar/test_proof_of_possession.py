"""Proof of possession (DESIGN.md, issue 12 item 4): the published SHA-256 proves nothing, only an
HMAC-SHA256 of the file's bytes keyed with the grant's current nonce for that file makes "verified".
Each attack is played against the real sidecar under gunicorn, on both backends."""
from __future__ import annotations

import hashlib
import hmac
import json
import threading
import urllib.error
import urllib.request
from pathlib import Path

from sqlalchemy import select

from app.downloads.models import Delivery, UserDownload
from app.extensions import db
from app.store.models import Order
from tests.helpers import grant_link, make_product

FILES = {"a.bin": 200_000, "b.bin": 100_000}


def listing(link: str) -> dict:
    request = urllib.request.Request(link, headers={"Accept": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def file_info(link: str, path: str) -> dict:
    return next(f for f in listing(link)["files"] if f["path"] == path)


def post_confirm(link: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(listing(link)["confirm_url"], data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as refused:
        return refused.code, json.load(refused)


def proof_of(data: bytes, nonce: str) -> str:
    return hmac.new(bytes.fromhex(nonce), data, hashlib.sha256).hexdigest()


def on_disk(app, path: str) -> bytes:
    return (Path(app.config["DOWNLOAD_DIR"]) / "KIT" / path).read_bytes()


def snapshot(app, link: str) -> dict:
    """Everything a confirm may change: deliveries, counts, the order, and the nonces shown."""
    with app.app_context():
        grants = db.session.scalars(select(UserDownload).order_by(UserDownload.id)
                                    .execution_options(populate_existing=True)).all()
        deliveries = db.session.execute(select(Delivery.grant_id, Delivery.path, Delivery.evidence, Delivery.counted)
                                        .order_by(Delivery.id)).all()
        orders = db.session.execute(select(Order.status, Order.evidence).order_by(Order.id)).all()
        counts = [(g.downloads_used, g.downloads_held) for g in grants]
    nonces = {f["path"]: f.get("proof_nonce") for f in listing(link)["files"]}
    return {"deliveries": deliveries, "orders": orders, "counts": counts, "nonces": nonces}


def test_the_listing_gives_each_file_its_own_nonce_per_grant(app, sidecar):
    sidecar()
    make_product(app, "KIT", FILES, max_downloads=1)
    first, second = grant_link(app, "KIT"), grant_link(app, "KIT", "other@example.com")
    mine, theirs = listing(first)["files"], listing(second)["files"]
    nonces = [f["proof_nonce"] for f in mine + theirs]
    assert all(len(n) == 64 and int(n, 16) >= 0 for n in nonces)
    assert len(set(nonces)) == 4                                     # per grant and per file
    assert [f["proof_nonce"] for f in listing(first)["files"]] == [f["proof_nonce"] for f in mine]  # stable


def test_a_bare_sha256_answers_422_and_changes_nothing(app, sidecar):
    """The attack of the review: POST the listed SHA-256, get "verified", a used download and a shipped
    order without a byte downloaded."""
    sidecar()
    make_product(app, "KIT", FILES, max_downloads=1)
    link = grant_link(app, "KIT")
    info = file_info(link, "a.bin")
    before = snapshot(app, link)
    status, body = post_confirm(link, {"path": "a.bin", "sha256": info["sha256"]})
    assert status == 422 and "proof" in body["error"]
    assert snapshot(app, link) == before
    assert before["deliveries"] == [] and before["orders"] == [("pending", None)] and before["counts"] == [(0, 0)]


def test_a_matching_proof_verifies_once_and_the_spent_nonce_cannot_be_replayed(app, sidecar):
    sidecar()
    make_product(app, "KIT", FILES, max_downloads=1)
    link = grant_link(app, "KIT")
    info = file_info(link, "a.bin")
    proof = proof_of(on_disk(app, "a.bin"), info["proof_nonce"])
    assert post_confirm(link, {"path": "a.bin", "sha256": info["sha256"], "proof": proof}) == (
        200, {"status": "verified"})
    after = snapshot(app, link)
    assert after["deliveries"] == [(1, "a.bin", "verified", True)] and after["counts"] == [(1, 0)]
    assert after["nonces"]["a.bin"] != info["proof_nonce"]           # replaced after the success
    status, body = post_confirm(link, {"path": "a.bin", "sha256": info["sha256"], "proof": proof})
    assert status == 409 and "proof" in body["error"]                # the old nonce's proof: a replay
    assert snapshot(app, link) == after
    fresh = proof_of(on_disk(app, "a.bin"), after["nonces"]["a.bin"])
    assert post_confirm(link, {"path": "a.bin", "sha256": info["sha256"], "proof": fresh})[0] == 200
    assert snapshot(app, link)["counts"] == [(1, 0)]                 # proving again never counts again


def test_proofs_made_with_another_grants_or_another_files_nonce_or_other_bytes_are_409(app, sidecar):
    sidecar()
    make_product(app, "KIT", FILES, max_downloads=1)
    link, other = grant_link(app, "KIT"), grant_link(app, "KIT", "other@example.com")
    a, b = file_info(link, "a.bin"), file_info(link, "b.bin")
    data = on_disk(app, "a.bin")
    before = snapshot(app, link)
    attempts = {
        "another grant's nonce": proof_of(data, file_info(other, "a.bin")["proof_nonce"]),
        "another file's nonce": proof_of(data, b["proof_nonce"]),
        "another file's proof": proof_of(on_disk(app, "b.bin"), b["proof_nonce"]),
        "other bytes": proof_of(data[:-1] + bytes([data[-1] ^ 1]), a["proof_nonce"]),
        "the nonce itself": a["proof_nonce"],
    }
    for what, proof in attempts.items():
        status, body = post_confirm(link, {"path": "a.bin", "sha256": a["sha256"], "proof": proof})
        assert (status, "proof" in body["error"]) == (409, True), what
    assert snapshot(app, link) == before
    with app.app_context():
        assert db.session.scalar(select(Delivery.id)) is None


def test_malformed_proofs_are_400_and_change_nothing(app, sidecar):
    sidecar()
    make_product(app, "KIT", FILES, max_downloads=1)
    link = grant_link(app, "KIT")
    info = file_info(link, "a.bin")
    before = snapshot(app, link)
    for proof in ("xyz", "0" * 63, 12345, ["a"], {"x": 1}, "\ud800" * 64, ""):
        status, body = post_confirm(link, {"path": "a.bin", "sha256": info["sha256"], "proof": proof})
        assert status == 400 and "proof" in body["error"], proof
    assert snapshot(app, link) == before


def test_a_wrong_proof_reads_the_file_once_per_nonce(app, sidecar):
    """Checking a proof costs a full read of the file: done once per nonce and kept, so retried wrong
    proofs cost a lookup (shown here: the file is gone from disk, yet the answers need no read)."""
    sidecar()
    make_product(app, "KIT", FILES, max_downloads=1)
    link = grant_link(app, "KIT")
    info = file_info(link, "a.bin")
    data = on_disk(app, "a.bin")
    assert post_confirm(link, {"path": "a.bin", "sha256": info["sha256"], "proof": "0" * 64})[0] == 409
    disk = Path(app.config["DOWNLOAD_DIR"]) / "KIT" / "a.bin"
    away = disk.with_name("away")
    disk.rename(away)
    try:
        for _ in range(3):
            assert post_confirm(link, {"path": "a.bin", "sha256": info["sha256"], "proof": "1" * 64})[0] == 409
        proof = proof_of(data, info["proof_nonce"])
        assert post_confirm(link, {"path": "a.bin", "sha256": info["sha256"], "proof": proof})[0] == 200
        # the next nonce has no kept proof: checking it needs the file, which is gone -> 503, nothing changed
        before = snapshot(app, link)
        fresh = proof_of(data, before["nonces"]["a.bin"])
        assert post_confirm(link, {"path": "a.bin", "sha256": info["sha256"], "proof": fresh})[0] == 503
        assert snapshot(app, link) == before
    finally:
        away.rename(disk)


def test_concurrent_confirms_with_one_proof_succeed_exactly_once(app, sidecar):
    sidecar()
    make_product(app, "KIT", FILES, max_downloads=1)
    link = grant_link(app, "KIT")
    info = file_info(link, "a.bin")
    body = {"path": "a.bin", "sha256": info["sha256"], "proof": proof_of(on_disk(app, "a.bin"), info["proof_nonce"])}
    statuses: list[int] = []
    threads = [threading.Thread(target=lambda: statuses.append(post_confirm(link, body)[0])) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(statuses) == [200] + [409] * 7
    assert snapshot(app, link)["counts"] == [(1, 0)]
