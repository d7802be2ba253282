"""Issue 12 item 10: a product file changed on disk without the watcher is re-indexed by the sidecar
in the background (one hash per host, paced, requests never wait) and then served in its new version.
Real gunicorn sidecars with 2 workers, both databases, no watcher running."""
from __future__ import annotations

import hashlib
import json
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.helpers import grant_link, make_product

SIZE = 6 * 1024 * 1024


def fetch(url: str, accept: str = "*/*") -> tuple[int, bytes, dict]:
    req = urllib.request.Request(url, headers={"Accept": accept, "Connection": "close"})
    try:
        with urllib.request.urlopen(req, timeout=20) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as refused:
        body = refused.read()
        refused.close()
        return refused.code, body, dict(refused.headers)


def replace_file(path: Path, content: bytes) -> None:
    """What an owner's editor or copy does: new bytes, a new size and mtime, a moment ago."""
    path.write_bytes(content)
    past = time.time() - 5  # already quiet: the test need not wait out the debounce
    os.utime(path, (past, past))


def test_a_changed_file_is_rehashed_once_and_then_served(app, sidecar, tmp_path):
    make_product(app, "MANUAL", {"book.bin": SIZE})
    # 3 MiB/s: the 7 MiB re-hash takes ~2 s, long enough to see both workers ask for it meanwhile.
    server = sidecar(SOFTGOODS_REINDEX_BYTES_PER_SECOND=str(3 * 1024 * 1024))
    link = grant_link(app, "MANUAL", max_downloads=None)
    url = link + "f/book.bin"
    assert fetch(url)[0] == 200
    new = os.urandom(SIZE + 1024 * 1024)
    replace_file(Path(app.config["DOWNLOAD_DIR"]) / "MANUAL" / "book.bin", new)

    status, body, headers = fetch(url, "application/json")
    assert status == 503 and json.loads(body)["error"] == "This file is being updated right now."
    assert int(headers["Retry-After"]) > 0

    deadline = time.monotonic() + 30
    answers = []
    while time.monotonic() < deadline:
        with ThreadPoolExecutor(4) as pool:  # several at once, so both workers see the change
            started = time.monotonic()
            batch = list(pool.map(lambda _: fetch(url)[0], range(4)))
            answers.append((batch, time.monotonic() - started))
        listing = json.loads(fetch(link, "application/json")[1])
        if batch == [200] * 4:
            break
        time.sleep(0.2)
    assert batch == [200] * 4, answers
    assert all(elapsed < 2 for _, elapsed in answers)  # nobody waited for the hash
    status, body, _ = fetch(url)
    assert status == 200 and hashlib.sha256(body).hexdigest() == hashlib.sha256(new).hexdigest()
    (file,) = json.loads(fetch(link, "application/json")[1])["files"]
    assert file["size"] == len(new) and file["sha256"] == hashlib.sha256(new).hexdigest()
    assert listing["files"][0]["size"] in (SIZE, len(new))
    assert server.log_tail().count("re-indexed MANUAL/book.bin") == 1  # one hash for the host


def test_two_changed_files_are_hashed_one_at_a_time(app, sidecar):
    make_product(app, "MANUAL", {"a.bin": SIZE, "b.bin": SIZE})
    server = sidecar(SOFTGOODS_REINDEX_BYTES_PER_SECOND=str(6 * 1024 * 1024))
    link = grant_link(app, "MANUAL", max_downloads=None)
    folder = Path(app.config["DOWNLOAD_DIR"]) / "MANUAL"
    new = {name: os.urandom(SIZE // 2) for name in ("a.bin", "b.bin")}
    for name, content in new.items():
        replace_file(folder / name, content)
    started = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        assert set(pool.map(lambda n: fetch(link + "f/" + n)[0], ["a.bin", "b.bin"] * 4)) == {503}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        codes = [fetch(link + "f/" + name)[0] for name in new]
        if codes == [200, 200]:
            break
        time.sleep(0.1)
    assert codes == [200, 200]
    # 2 x 3 MiB at 6 MiB/s: one after the other takes ~1 s at least (at once, each at full pace: ~0.5 s).
    assert time.monotonic() - started >= 0.9
    assert server.log_tail().count("re-indexed MANUAL/") == 2
