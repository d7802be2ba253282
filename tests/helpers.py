"""Helpers that make a test read like a shopper's story (CTFd's tests/helpers.py)."""
from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from flask import Flask

from app.downloads.grants import grant_downloads
from app.downloads.index import index_files
from app.downloads.packages import SHELL
from app.extensions import db
from app.store.catalog import add_product
from app.store.orders import Line, create_order

ROOT = Path(__file__).resolve().parent.parent


def write_files(download_dir: str | Path, sku: str, files: dict[str, int | bytes]) -> dict[str, Path]:
    """Files under DOWNLOAD_DIR/<sku>/: {relpath: size in random bytes, or the bytes themselves}."""
    made = {}
    for rel, content in files.items():
        path = Path(download_dir) / sku / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(content) if isinstance(content, int) else content)
        made[rel] = path
    return made


def make_product(app: Flask, sku: str, files: dict[str, int | bytes] | None = None, *, price: str = "9.99",
                 name: str | None = None, **options):
    """A product with files on disk, indexed. Returns the Product (in the app's session)."""
    with app.app_context():
        if files:
            write_files(app.config["DOWNLOAD_DIR"], sku, files)
            index_files(db.session, app.config["DOWNLOAD_DIR"])
        if options.get("package_name"):
            options.setdefault("attached_by", SHELL)
        product = add_product(db.session, sku=sku, name=name or f"Product {sku}", price=price, **options)
        db.session.commit()
        return product.id


def grant_link(app: Flask, sku: str, email: str = "buyer@example.com", *, quantity: int = 1,
               days: int | None = None, max_downloads: int | None | bool = False,
               client_ip: str | None = None) -> str:
    """A paid comp order for one product; returns the download link of its first grant."""
    from sqlalchemy import select

    from app.store.models import Product

    with app.app_context():
        product = db.session.scalar(select(Product).where(Product.sku == sku))
        order = create_order(db.session, email=email, lines=[Line(product, quantity)], client_ip=client_ip)
        links = grant_downloads(db.session, order, days=days, max_downloads=max_downloads, client_ip=client_ip)
        db.session.commit()
        return links[0].url


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A real server on loopback, started by a fixture and always stopped by it."""

    def __init__(self, argv: list[str], env: dict[str, str], port: int, health_path: str = "/",
                 log_path: Path | None = None, cwd: Path = ROOT):
        self.argv, self.port, self.health_path = argv, port, health_path
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        full_env = {**os.environ, **env}
        log = open(log_path, "wb") if log_path else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(argv, env=full_env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        finally:
            if log_path:
                log.close()  # the child holds its own copy; ours would leak (ResourceWarning is an error)

    def wait_ready(self, timeout: float = 20.0) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.argv[0]} exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                urllib.request.urlopen(self.url + self.health_path, timeout=1).close()
                return self
            except urllib.error.HTTPError:
                return self  # it answers: up
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.argv[0]} did not answer on port {self.port}: {self.log_tail()}")

    def log_tail(self) -> str:
        if self.log_path and self.log_path.exists():
            return self.log_path.read_text(errors="replace")[-2000:]
        return ""

    def stop(self, sig: int = 15) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(5)
