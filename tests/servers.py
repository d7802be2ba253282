"""Real servers for tests: the sidecar under gunicorn and nginx, started on free loopback ports by
fixtures and always stopped by them. Import the fixtures in a conftest.py:

    from tests.servers import sidecar, nginx  # noqa: F401

``sidecar(**env_overrides) -> ServerProcess`` starts ``gunicorn -c sidecar/gunicorn.conf.py`` with the
test ``env``; the first one started also sets ``app.config["SIDECAR_URL"]`` so links minted by
``grant_link(app, ...)`` point at it. ``nginx(mode, upstream=None) -> NginxProcess`` renders
``deploy/nginx-sidecar.conf`` for this test's folders (mode ``accel``, ``symlink`` or ``static``: a
plain file server of DOWNLOAD_DIR for differential tests) and proxies to ``upstream``.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.helpers import ROOT, ServerProcess, free_port

GUNICORN = str(ROOT / ".venv" / "bin" / "gunicorn")
NGINX = "/usr/sbin/nginx"
DEPLOY_CONF = ROOT / "deploy" / "nginx-sidecar.conf"


def path_of(link: str) -> str:
    """The path part of a link, for the Flask test client."""
    return urlsplit(link).path


def _gunicorn() -> str:
    import shutil
    import sys

    candidate = Path(sys.executable).parent / "gunicorn"
    return str(candidate) if candidate.exists() else (shutil.which("gunicorn") or GUNICORN)


@pytest.fixture
def sidecar(app, env, tmp_path):
    started: list[ServerProcess] = []

    def start(*, threads: int = 50, workers: int = 2, **overrides: str) -> ServerProcess:
        port = free_port()
        full_env = {**env, "SOFTGOODS_SIDECAR_URL": f"http://127.0.0.1:{port}",
                    "SOFTGOODS_SIDECAR_THREADS": str(threads), "SOFTGOODS_SIDECAR_WORKERS": str(workers),
                    **overrides}
        server = ServerProcess([_gunicorn(), "-c", "sidecar/gunicorn.conf.py", "--bind", f"127.0.0.1:{port}",
                                "sidecar.wsgi:app"], full_env, port, health_path="/healthz",
                               log_path=tmp_path / f"sidecar-{port}.log")
        started.append(server)
        server.wait_ready()
        if len(started) == 1:
            app.config["SIDECAR_URL"] = server.url
        return server

    yield start
    for server in started:
        server.stop()


class NginxProcess(ServerProcess):
    def __init__(self, argv, env, port, prefix: Path, log_path: Path):
        super().__init__(argv, env, port, health_path="/nginx-health", log_path=log_path)
        self.prefix = prefix
        self.access_log = prefix / "access.log"


def render_nginx_conf(*, port: int, download_dir: str, symlink_dir: str, upstream: str | None,
                      prefix: Path, mode: str) -> str:
    """The shipped example config with this test's ports and folders (so the tests test what we ship)."""
    conf = DEPLOY_CONF.read_text()
    conf = conf.replace("/srv/softgoods/downloads/", download_dir.rstrip("/") + "/")
    conf = conf.replace("/srv/softgoods/links/", symlink_dir.rstrip("/") + "/")
    conf = conf.replace("/var/log/nginx/softgoods-access.log", str(prefix / "access.log"))
    conf = conf.replace("/var/log/nginx/softgoods-error.log", str(prefix / "error.log"))
    conf = conf.replace("/run/nginx-softgoods.pid", str(prefix / "nginx.pid"))
    conf = conf.replace("listen 80;", f"listen 127.0.0.1:{port};")
    conf = conf.replace("server 127.0.0.1:8001;", f"server {upstream or '127.0.0.1:9'};")
    # Test folders are private to this user: workers must run as us (root in CI containers).
    conf = re.sub(r"^user .*;$", "user root;" if os.geteuid() == 0 else "", conf, flags=re.M)
    if mode == "static":  # a bare file server of the download dir: the reference for Range behaviour
        conf = conf.replace("#STATIC# ", "")
    return conf


@pytest.fixture
def nginx(app, tmp_path):
    started: list[NginxProcess] = []

    def start(mode: str = "accel", upstream: str | None = None) -> NginxProcess:
        port = free_port()
        prefix = tmp_path / f"nginx-{port}"
        (prefix / "temp").mkdir(parents=True)
        conf = render_nginx_conf(port=port, download_dir=app.config["DOWNLOAD_DIR"],
                                 symlink_dir=app.config["SYMLINK_DIR"],
                                 upstream=upstream.removeprefix("http://") if upstream else None,
                                 prefix=prefix, mode=mode)
        (prefix / "nginx.conf").write_text(conf)
        server = NginxProcess([NGINX, "-p", str(prefix), "-c", str(prefix / "nginx.conf"),
                               "-g", "daemon off; master_process on;"], {}, port, prefix,
                              log_path=prefix / "stderr.log")
        started.append(server)
        server.wait_ready()
        return server

    yield start
    for server in started:
        server.stop()
