"""Screenshots of the main owner pages for the README (docs/screenshots/): a throw-away SQLite instance with sample data,
the store under gunicorn on loopback, headless Chromium.

    .venv/bin/python scripts/admin_screenshots.py [--out docs/screenshots]
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PAGES = [("admin-dashboard", "/admin/"), ("admin-packages", "/admin/packages"),
         ("admin-package-editor", "/admin/packages/starter-bundle"), ("admin-files", "/admin/files"),
         ("admin-order", None), ("admin-download-log", "/admin/log")]


def seed(env: dict[str, str]) -> tuple[int, str]:
    """Sample shop: products with files, two packages, orders with deliveries and a shared link."""
    import flask_migrate
    from app import create_app
    from app.accounts.models import User
    from app.cli import MIGRATIONS_DIR
    from app.downloads import packages
    from app.downloads.grants import grant_downloads
    from app.downloads.index import index_files
    from app.downloads.models import Delivery, DownloadLog, FileEntry
    from app.extensions import db
    from app.store.catalog import add_product
    from app.store.orders import Line, create_order
    from app.timeutil import utcnow

    app = create_app(env=env)
    with app.app_context():
        flask_migrate.upgrade(directory=MIGRATIONS_DIR)
        owner = User(email="owner@example.com", role="admin", email_confirmed_at=utcnow())
        owner.set_password("screenshots-only")
        db.session.add(owner)
        root = Path(app.config["DOWNLOAD_DIR"])
        files = {"EBOOK": {"guide.pdf": 800_000, "extras/cheatsheet.pdf": 120_000},
                 "VIDEO": {"lesson1.mp4": 3_000_000, "lesson2.mp4": 2_500_000},
                 "TOOLS": {"tool-linux.tar.gz": 1_500_000, "README.txt": 4_000}}
        for sku, items in files.items():
            for rel, size in items.items():
                path = root / sku / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(os.urandom(size))
        index_files(db.session, root)
        products = [add_product(db.session, sku=sku, name=name, price=price) for sku, name, price in
                    (("EBOOK", "The Field Guide (PDF)", "19.00"), ("VIDEO", "Video course", "49.00"),
                     ("TOOLS", "Command-line tools", "9.99"))]
        bundle = packages.create_package(db.session, "starter-bundle", lifetime_days=90,
                                         expires_on=utcnow().date() + timedelta(days=180))
        packages.add_files(db.session, root, bundle, ["EBOOK/guide.pdf", "VIDEO/lesson1.mp4", "TOOLS/README.txt"])
        packages.create_package(db.session, "spring-sale")
        add_product(db.session, sku="BUNDLE", name="Starter bundle", price="59.00", package_name="starter-bundle")
        db.session.scalars(db.select(FileEntry).where(FileEntry.path == "lesson2.mp4")).one().flagged = \
            "SHA-256 changed on disk since it was indexed"
        now = utcnow()
        first_po = None
        for n in range(9):
            order = create_order(db.session, email=f"buyer{n}@example.com",
                                 lines=[Line(products[n % 3])], payment_reference=f"demo-{n}")
            order.created_at = now - timedelta(days=n)
            grant = grant_downloads(db.session, order)[0].grant
            first_po = first_po or order.po_number
            for day in range(n % 3 + 1):
                entry = db.session.scalars(db.select(FileEntry).where(FileEntry.sku == grant.sku)).first()
                db.session.add(Delivery(grant_id=grant.id, sku=entry.sku, path=entry.path, sha256=entry.sha256,
                                        size=entry.size, budget_bytes=entry.size * 3 // 2, covered_bytes=entry.size,
                                        charged_bytes=entry.size, evidence="verified" if (n + day) % 2 else "transferred",
                                        counted=True, completed_at=now - timedelta(days=n + day)))
                for ip in ([f"203.0.113.{k}" for k in range(1, 5)] if n == 0 else [f"198.51.100.{n}"]):
                    db.session.add(DownloadLog(grant_id=grant.id, order_po=order.po_number, path=entry.path,
                                               client_ip=ip, status=200, bytes_sent=entry.size, outcome="complete",
                                               user_agent="softgoods-fetch/1.0", at=now - timedelta(days=n + day)))
        db.session.commit()
        return owner.id, first_po


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(ROOT / "docs" / "screenshots"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sgshots-") as tmp:
        env = {"SOFTGOODS_INSTANCE_DIR": f"{tmp}/instance", "DATABASE_URL": f"sqlite:///{tmp}/shots.db",
               "SOFTGOODS_SECRET_KEY": "screenshots-" + os.urandom(16).hex(), "SOFTGOODS_DOWNLOAD_DIR": f"{tmp}/downloads"}
        user_id, po = seed(env)
        port = free_port()
        proc = subprocess.Popen([str(Path(sys.executable).parent / "gunicorn"), "--bind", f"127.0.0.1:{port}",
                                 "wsgi:app"], cwd=ROOT, env={**os.environ, **env}, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            base = f"http://127.0.0.1:{port}"
            for _ in range(100):
                try:
                    urllib.request.urlopen(base + "/", timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.1)
            from app import create_app
            from tests.browser import browser_page

            app = create_app(env=env)
            cookie = app.session_interface.get_signing_serializer(app).dumps({"_user_id": str(user_id), "_fresh": True})
            with browser_page(viewport=(1280, 900)) as page:
                page.context.add_cookies([{"name": "session", "value": cookie, "domain": "127.0.0.1", "path": "/"}])
                for name, path in PAGES:
                    page.goto(base + (path or f"/admin/orders/{po}"))
                    page.screenshot(path=str(out / f"{name}.png"), full_page=True)
                    print(out / f"{name}.png")
        finally:
            os.killpg(proc.pid, 15)
            proc.wait(10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
