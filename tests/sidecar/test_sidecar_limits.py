"""The download limit is per file (DESIGN.md "A download counts once per complete delivery of a file"),
and an indexed file that cannot be read answers 503, is logged and flagged, never a 500.
Test client of the sidecar app, on both backends."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from sqlalchemy import select

from app.downloads.models import DownloadLog, FileEntry, UserDownload
from app.extensions import db
from tests.helpers import grant_link, make_product
from tests.servers import path_of

JSON = {"Accept": "application/json"}
FILES = {"readme.txt": b"hello reader\n", "ch1/intro.pdf": 5000, "ch1/deep/notes.md": 300}


def left(sc, link: str) -> dict[str, int | None]:
    listing = sc.get(link, headers=JSON)
    assert listing.status_code == 200, listing.get_data(as_text=True)
    return {f["path"]: f["downloads_left"] for f in listing.get_json()["files"]}


def test_a_three_file_product_delivers_each_file_max_downloads_times(app, sc):
    """max_downloads=2 on 3 files: every file twice (six complete downloads, the order ships); a third
    copy of one file is refused with 403 before any byte while the others still work; the listing
    answers 403 only once every file is used up."""
    make_product(app, "BOOK", FILES)
    link = path_of(grant_link(app, "BOOK", max_downloads=2))
    assert left(sc, link) == {"readme.txt": 2, "ch1/intro.pdf": 2, "ch1/deep/notes.md": 2}
    for name in FILES:
        assert sc.get(link + "f/" + name).status_code == 200
    assert left(sc, link) == {"readme.txt": 1, "ch1/intro.pdf": 1, "ch1/deep/notes.md": 1}
    assert sc.get(link + "f/readme.txt").data == FILES["readme.txt"]
    refused = sc.get(link + "f/readme.txt", headers=JSON)
    assert refused.status_code == 403 and refused.get_json()["error"] == "All downloads of this file have been used."
    assert "Content-Range" not in refused.headers and FILES["readme.txt"] not in refused.data
    page = sc.get(link)  # the HTML listing: the limit per file and each file's own count
    text = page.get_data(as_text=True)
    assert page.status_code == 200 and "2 downloads per file" in text
    assert [c.split("<")[0] for c in text.split('class="downloads-left">')[1:]] == ["1", "1", "0"]  # by path
    assert sc.get(link + "f/ch1/intro.pdf").status_code == 200  # the other files still work
    assert left(sc, link) == {"readme.txt": 0, "ch1/intro.pdf": 0, "ch1/deep/notes.md": 1}
    assert sc.get(link + "f/ch1/deep/notes.md").status_code == 200
    with app.app_context():
        grant = db.session.scalar(select(UserDownload))
        assert (grant.downloads_used, grant.downloads_held, grant.order.status) == (6, 0, "shipped")
        logged = db.session.scalars(select(DownloadLog).where(DownloadLog.status == 403)).all()
        assert [(r.path, r.bytes_sent, r.outcome) for r in logged] == [("readme.txt", 0, "refused")]
    for headers in ({}, JSON):  # now every file is used up
        gone = sc.get(link, headers=headers)
        assert gone.status_code == 403 and "All downloads of this link have been used." in gone.get_data(as_text=True)


def test_unlimited_links_list_null_downloads_left(app, sc):
    make_product(app, "BOOK", FILES)
    link = path_of(grant_link(app, "BOOK", max_downloads=None))
    for _ in range(3):
        assert sc.get(link + "f/readme.txt").status_code == 200
    assert set(left(sc, link).values()) == {None}
    assert "per file" not in sc.get(link).get_data(as_text=True)


def test_a_package_is_one_file_with_its_own_limit(app, sc, runner):
    make_product(app, "SRC", FILES)
    for args in (["package", "create", "BUNDLE"], ["package", "add", "BUNDLE", "SRC/readme.txt", "SRC/ch1/intro.pdf"]):
        result = runner.invoke(args=["softgoods", *args])
        assert result.exit_code == 0, result.output
    make_product(app, "PKG", None, package_name="BUNDLE")
    link = path_of(grant_link(app, "PKG", max_downloads=1))
    assert left(sc, link) == {"BUNDLE.zip": 1}
    assert sc.get(link + "f/BUNDLE.zip").status_code == 200
    assert sc.get(link + "f/BUNDLE.zip").status_code == 403
    assert sc.get(link, headers=JSON).status_code == 403


def _make_unreadable(full: Path, how: str) -> None:
    """Unreadable for root too (tests run as root, so chmod 000 would not do)."""
    if how == "directory":
        full.unlink()
        full.mkdir()
    else:  # the file moved away: the indexed path is a link that leads nowhere
        full.rename(full.with_name(".moved-away"))
        full.symlink_to(".nowhere")


@pytest.mark.parametrize("mode", ["pipe", "accel"])
@pytest.mark.parametrize("how", ["directory", "dangling-symlink"])
def test_an_unreadable_product_file_answers_503_is_logged_and_flagged(app, sc, sidecar_app, caplog, how, mode):
    sidecar_app.config["DELIVERY"] = mode
    make_product(app, "BOOK", FILES)
    link = path_of(grant_link(app, "BOOK", max_downloads=1))
    full = Path(app.config["DOWNLOAD_DIR"]) / "BOOK" / "ch1" / "intro.pdf"
    _make_unreadable(full, how)
    if how == "directory":  # the index still matches what stat() says, so only opening the file can tell
        st = os.stat(full)
        with app.app_context():
            entry = db.session.scalar(select(FileEntry).where(FileEntry.path == "ch1/intro.pdf"))
            entry.size, entry.mtime_ns = st.st_size, st.st_mtime_ns
            db.session.commit()
    with caplog.at_level(logging.ERROR, logger="softgoods.sidecar"):
        page = sc.get(link + "f/ch1/intro.pdf")
        as_json = sc.get(link + "f/ch1/intro.pdf", headers=JSON)
    text = page.get_data(as_text=True)
    assert page.status_code == 503 and "temporarily unavailable" in text and "Traceback" not in text
    assert as_json.status_code == 503 and as_json.get_json()["error"] == "This file is temporarily unavailable."
    assert any("ch1/intro.pdf" in r.getMessage() and "flagged" in r.getMessage() for r in caplog.records)
    with app.app_context():
        entry = db.session.scalar(select(FileEntry).where(FileEntry.path == "ch1/intro.pdf"))
        assert entry.flagged is not None and entry.flagged.startswith("unreadable on disk: ")
        grant = db.session.scalar(select(UserDownload))
        assert (grant.downloads_used, grant.downloads_held) == (0, 0)  # nothing reserved, nothing counted
        refused = db.session.scalars(select(DownloadLog).where(DownloadLog.path == "ch1/intro.pdf")).all()
        assert [(r.status, r.outcome, r.bytes_sent) for r in refused] == [(503, "refused", 0)] * 2
    assert sc.get(link + "f/readme.txt").status_code == 200  # the other files are served
    if how == "dangling-symlink":  # the owner puts the file back: served again, the flag goes away
        full.unlink()
        full.symlink_to(".moved-away")
        assert sc.get(link + "f/ch1/intro.pdf").status_code == 200
        with app.app_context():
            assert db.session.scalar(select(FileEntry.flagged).where(FileEntry.path == "ch1/intro.pdf")) is None
