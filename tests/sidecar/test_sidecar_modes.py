"""The three delivery modes behind a real nginx rendered from deploy/nginx-sidecar.conf."""
from __future__ import annotations

import hashlib
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from app.downloads.models import UserDownload
from app.extensions import db
from app.timeutil import utcnow
from tests.helpers import grant_link, make_product

SIZE = 3_000_000


def curl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-s", "-m", "20", *args], capture_output=True, timeout=30, check=False)


def headers_of(out: bytes) -> dict[str, str]:
    """Headers of the last response in curl -D output (after redirects)."""
    blocks = [b for b in out.decode("latin-1").split("\r\n\r\n") if b.startswith("HTTP/")]
    lines = blocks[-1].split("\r\n")
    result = {"status": lines[0].split()[1]}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        result[key.strip().lower()] = value.strip()
    return result


@pytest.fixture
def product(app):
    make_product(app, "GAME", {"setup/installer bin.exe": SIZE})
    return Path(app.config["DOWNLOAD_DIR"]) / "GAME" / "setup" / "installer bin.exe"


@pytest.mark.backends("sqlite")
@pytest.mark.parametrize("mode", ["pipe", "accel", "symlink"])
def test_every_mode_serves_through_nginx(app, sidecar, nginx, product, tmp_path, mode):
    server = sidecar(SOFTGOODS_DELIVERY=mode, SOFTGOODS_PROXY_COUNT="1")
    front = nginx(mode, upstream=server.url)
    link = grant_link(app, "GAME", max_downloads=None).replace(server.url, front.url)
    url = link + "f/setup/installer%20bin.exe"
    out = tmp_path / "got"
    done = curl("-L", "-D", str(tmp_path / "h"), "-o", str(out), url)
    assert done.returncode == 0
    head = headers_of((tmp_path / "h").read_bytes())
    assert head["status"] == "200" and out.read_bytes() == product.read_bytes()
    assert "attachment" in head["content-disposition"]
    if mode != "symlink":
        assert head["repr-digest"] and "describedby" in head["link"]
    # resume through nginx: Range answered by whoever sends the bytes
    ranged = curl("-L", "-r", "1000-", "-D", "-", "-o", str(tmp_path / "part"), url)
    assert b" 206 " in ranged.stdout and (tmp_path / "part").read_bytes() == product.read_bytes()[1000:]
    log = front.access_log.read_text().splitlines()
    served = [line.split("\t") for line in log if "\t200\t" in line or "\t206\t" in line]
    assert any(fields[7] == "OK" and int(fields[6]) == SIZE for fields in served), log
    for hostile in ("../../GAME/setup/installer%20bin.exe", "..%2F..%2Fsecret", "%2e%2e/%2e%2e/etc/passwd"):
        got = curl("--path-as-is", "-o", "/dev/null", "-w", "%{http_code}", link + "f/" + hostile)
        assert got.stdout in (b"404", b"400"), hostile  # 400: nginx itself refuses a path above the root
    if mode == "accel":
        # the internal location is not reachable from outside
        assert curl("-o", "/dev/null", "-w", "%{http_code}", f"{front.url}/protected/GAME/setup/installer%20bin.exe").stdout == b"404"
    if mode == "symlink":
        with app.app_context():
            token = db.session.scalar(select(UserDownload.symlink_token))
        assert token and len(token) >= 32
        # one folder per reserved GET (the full one and the resume), each with its link to the file
        made = list((Path(app.config["SYMLINK_DIR"]) / token).glob("*/setup/installer bin.exe"))
        assert len(made) == 2 and all(link.resolve() == product.resolve() for link in made)


@pytest.mark.backends("sqlite")
@pytest.mark.parametrize("mode", ["accel", "symlink"])
def test_refusals_come_from_the_sidecar_in_every_mode(app, sidecar, nginx, product, mode):
    server = sidecar(SOFTGOODS_DELIVERY=mode, SOFTGOODS_PROXY_COUNT="1")
    front = nginx(mode, upstream=server.url)
    link = grant_link(app, "GAME").replace(server.url, front.url)
    with app.app_context():
        grant = db.session.scalar(select(UserDownload))
        grant.expires_at = utcnow() - timedelta(hours=2)
        db.session.commit()
    got = curl("-H", "Accept: application/json", "-w", "\n%{http_code}", link + "f/setup/installer%20bin.exe")
    body, _, code = got.stdout.rpartition(b"\n")
    assert code == b"410" and b"expired" in body
    traversal = curl("--path-as-is", "-o", "/dev/null", "-w", "%{http_code}", link + "f/../../GAME/setup")
    assert traversal.stdout == b"410"  # the link is judged first


def test_accel_answer_names_the_internal_file(app, sidecar_app, sc, product):
    sidecar_app.config["DELIVERY"] = "accel"
    from tests.servers import path_of

    link = path_of(grant_link(app, "GAME"))
    resp = sc.get(link + "f/setup/installer bin.exe")
    assert resp.status_code == 200 and resp.data == b""
    assert resp.headers["X-Accel-Redirect"] == "/protected/GAME/setup/installer%20bin.exe"
    assert hashlib.sha256(product.read_bytes()).hexdigest()[:40] in resp.headers["ETag"]
