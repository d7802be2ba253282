"""The expected proof of a large file is computed while the file is sent (app.downloads.proof
ProofPrecomputer), so the confirm that follows answers without reading the file again; nothing in
that changes who can confirm. ``PRECOMPUTE_MIN_BYTES`` is lowered so small files stand for large ones."""
from __future__ import annotations

import time

import pytest
from sqlalchemy import select

from app.downloads import proof
from app.downloads.models import ProofNonce
from app.extensions import db
from tests.helpers import grant_link, make_product
from tests.sidecar.test_proof_of_possession import proof_of
from tests.servers import path_of

FILES = {"big.bin": 300_000, "other.bin": 200_000}


@pytest.fixture(autouse=True)
def small_files_count_as_large(monkeypatch):
    monkeypatch.setattr(proof, "PRECOMPUTE_MIN_BYTES", 100_000)


def kept(app, grant_path: str) -> dict[tuple[int, str], str | None]:
    with app.app_context():
        rows = db.session.execute(select(ProofNonce.grant_id, ProofNonce.path, ProofNonce.expected_proof_hash)).all()
        db.session.rollback()
    return {(g, p): h for g, p, h in rows if p == grant_path}


def wait_kept(app, path: str, count: int) -> dict:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = kept(app, path)
        if sum(h is not None for h in found.values()) >= count:
            return found
        time.sleep(0.02)
    pytest.fail(f"the expected proof of {path} was not computed in the background")


def listed(sc, link: str) -> dict:
    return sc.get(path_of(link), headers={"Accept": "application/json"}).get_json()


def info(listing: dict, path: str) -> dict:
    return next(f for f in listing["files"] if f["path"] == path)


def test_a_download_prepares_the_confirm_which_then_reads_no_file(app, sc, monkeypatch):
    make_product(app, "KIT", FILES)
    link = grant_link(app, "KIT")
    listing = listed(sc, link)
    big = info(listing, "big.bin")
    body = sc.get(path_of(big["url"])).get_data()
    assert len(body) == FILES["big.bin"]
    wait_kept(app, "big.bin", 1)
    assert all(h is None for h in kept(app, "other.bin").values())  # only the file that was sent

    def no_reading(*_args):
        raise AssertionError("the confirm read the file although its proof was ready")

    with monkeypatch.context() as patched:
        patched.setattr(proof, "file_proof", no_reading)
        wrong = sc.post(path_of(listing["confirm_url"]), json={
            "path": "big.bin", "sha256": big["sha256"], "proof": proof_of(body[:-1] + b"x", big["proof_nonce"])})
        assert wrong.status_code == 409  # a prepared proof changes nothing for a wrong one
        right = sc.post(path_of(listing["confirm_url"]), json={
            "path": "big.bin", "sha256": big["sha256"], "proof": proof_of(body, big["proof_nonce"])})
        assert right.status_code == 200 and right.get_json()["status"] == "verified"
    replay = sc.post(path_of(listing["confirm_url"]), json={"path": "big.bin", "sha256": big["sha256"],
                                                            "proof": proof_of(body, big["proof_nonce"])})
    assert replay.status_code == 409  # the nonce was spent: what was prepared for it went with it
    assert info(listed(sc, link), "big.bin")["proof_nonce"] != big["proof_nonce"]


def test_only_a_download_from_the_start_of_a_listed_nonce_is_prepared_for_that_grant(app, sc):
    make_product(app, "KIT", FILES, max_downloads=5)
    first, second = grant_link(app, "KIT"), grant_link(app, "KIT")
    url = info(listed(sc, first), "big.bin")["url"]
    assert sc.get(path_of(url), headers={"Range": "bytes=1000-"}).status_code == 206
    assert sc.get(path_of(url), headers={"Range": "bytes=0-10,20-30"}).status_code == 206  # multipart
    time.sleep(0.3)
    assert all(h is None for h in kept(app, "big.bin").values())  # a resumed or partial fetch proves nothing yet
    listed(sc, second)  # the second shopper's nonce exists but they download nothing
    sc.get(path_of(url)).get_data()
    found = wait_kept(app, "big.bin", 1)
    assert sorted(h is not None for h in found.values()) == [False, True]  # the first grant's only

