"""What maintenance means for people: an expired (and purged) link answers 410 with a page that says
when it expired and whom to contact; a changed product file gets a new SHA-256 and ETag."""
from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from app.downloads.models import UserDownload
from app.extensions import db
from app.timeutil import utcnow
from tests.helpers import grant_link, make_product
from tests.maintenance.conftest import JSON, eventually


@pytest.mark.parametrize("purged", [False, True])
def test_expired_link_answers_410_saying_when_and_whom_to_contact(app, sc, runner, purged):
    make_product(app, "KIT", {"a.bin": 1000})
    link = grant_link(app, "KIT")
    expired_at = utcnow() - timedelta(hours=3)
    with app.app_context():
        grant = db.session.scalar(select(UserDownload))
        grant.expires_at = expired_at
        db.session.commit()
    if purged:
        assert runner.invoke(args=["softgoods", "purge"]).exit_code == 0
    path = link.split("127.0.0.1:9", 1)[1]
    page = sc.get(path)
    assert page.status_code == 410
    text = page.get_data(as_text=True)
    assert f"expired on {expired_at:%Y-%m-%d %H:%M} UTC" in text
    assert "contact the shop" in text and "order number" in text
    answer = sc.get(path, headers=JSON)
    assert answer.status_code == 410 and "expired on" in answer.get_json()["error"]
    assert sc.get(path + "f/a.bin").status_code == 410


@pytest.mark.config(WATCH_DEBOUNCE_MS=300, REHASH_BYTES_PER_SECOND=0)
def test_a_changed_file_gets_a_new_sha256_and_etag(app, sc, watching):
    make_product(app, "KIT", {"a.bin": 5000})
    path = grant_link(app, "KIT", max_downloads=None).split("127.0.0.1:9", 1)[1]
    before = sc.get(path, headers=JSON).get_json()["files"][0]["sha256"]
    etag = sc.head(path + "f/a.bin").headers["ETag"]
    watching()
    target = Path(app.config["DOWNLOAD_DIR"]) / "KIT" / "a.bin"
    target.write_bytes(os.urandom(5000))  # same size: only the content (and mtime) differ
    later = time.time() + 5
    os.utime(target, (later, later))
    new = eventually(lambda: (sha := sc.get(path, headers=JSON).get_json()["files"][0]["sha256"]) != before and sha,
                     what="new SHA-256 in the listing")
    new_etag = sc.head(path + "f/a.bin").headers["ETag"]
    assert new_etag != etag and new[:40] in new_etag
    # a resume that names the old version restarts cleanly with the whole new file
    resumed = sc.get(path + "f/a.bin", headers={"Range": "bytes=100-", "If-Range": etag})
    assert resumed.status_code == 200 and resumed.data == target.read_bytes()
