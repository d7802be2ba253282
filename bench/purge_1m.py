"""Purge benchmark: 1,000,000 expired grants (plus live ones and some symlink folders) on SQLite
and PostgreSQL, each in its own throw-away database. Target: purge < 10 s on each.

    .venv/bin/python bench/purge_1m.py [--grants 1000000] [--links 1000] [--backend sqlite|postgresql]

Rows are made inside the database (a recursive CTE on SQLite, generate_series on PostgreSQL), so
setting up a million grants takes seconds, not minutes.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import flask_migrate  # noqa: E402
import psycopg  # noqa: E402
from sqlalchemy import func, select, text  # noqa: E402

from app import create_app  # noqa: E402
from app.cli import MIGRATIONS_DIR  # noqa: E402
from app.downloads.maintenance import purge  # noqa: E402
from app.downloads.models import UserDownload  # noqa: E402
from app.extensions import db  # noqa: E402
from app.timeutil import utcnow  # noqa: E402

PG_ADMIN = os.environ.get("SOFTGOODS_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def fill(total: int, n_links: int, symlink_dir: Path) -> None:
    """One order and ``total`` grants: one in 11 valid for a week, mixed in, the others expired two
    days ago; the first ``n_links`` (expired) own a symlink folder."""
    now = utcnow()
    dead = (now - timedelta(days=2)).replace(tzinfo=None, microsecond=0)
    live = (now + timedelta(days=7)).replace(tzinfo=None, microsecond=0)
    db.session.execute(text("INSERT INTO orders (po_number, email, total_cents, currency, item_count, status, "
                            "created_at) VALUES ('SG-BENCH-1', 'bench@example.com', 0, 'USD', 1, 'pending', :t)"),
                       {"t": dead})
    order_id = db.session.scalar(text("SELECT id FROM orders WHERE po_number = 'SG-BENCH-1'"))
    if db.engine.dialect.name == "postgresql":
        series = "SELECT generate_series(1, :total) AS n"
        cte = ""
    else:
        cte = "WITH RECURSIVE s(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM s WHERE n < :total) "
        series = "SELECT n FROM s"
    db.session.execute(text(
        cte + "INSERT INTO user_downloads (order_id, sku, key_nonce, key_hash, expires_at, downloads_used, status, "
        "symlink_token, created_at) "
        "SELECT :order_id, 'BENCH', 'nonce', 'hash', "
        "CASE WHEN n % 11 = 0 AND n > :links THEN :live ELSE :dead END, 0, 'active', "
        "CASE WHEN n <= :links THEN 'tok' || n ELSE NULL END, :dead "
        f"FROM ({series}) AS numbers"),
        {"order_id": order_id, "total": total, "links": n_links, "live": live, "dead": dead})
    db.session.commit()
    for n in range(1, n_links + 1):
        folder = symlink_dir / f"tok{n}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "file.bin").symlink_to("/dev/null")


def run(backend: str, total: int, n_links: int) -> dict[str, float]:
    root = Path(tempfile.mkdtemp(prefix=f"purge-bench-{backend}-"))
    pg_name = None
    if backend == "postgresql":
        pg_name = f"sg_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{pg_name}"')
        url = f"postgresql://postgres@127.0.0.1:5432/{pg_name}"
    else:
        url = f"sqlite:///{root / 'bench.db'}"
    env = {"SOFTGOODS_INSTANCE_DIR": str(root / "instance"), "DATABASE_URL": url,
           "SOFTGOODS_SECRET_KEY": "bench-" + os.urandom(16).hex(), "SOFTGOODS_DOWNLOAD_DIR": str(root / "downloads"),
           "SOFTGOODS_SYMLINK_DIR": str(root / "links")}
    app = create_app({"TESTING": True}, env=env)
    figures = {}
    try:
        with app.app_context():
            flask_migrate.upgrade(directory=MIGRATIONS_DIR)
            t0 = time.perf_counter()
            fill(total, n_links, Path(env["SOFTGOODS_SYMLINK_DIR"]))
            figures["fill_s"] = time.perf_counter() - t0
            if backend == "postgresql":
                db.session.execute(text("ANALYZE"))
                db.session.commit()
            expired = db.session.scalar(select(func.count()).select_from(UserDownload)
                                        .where(UserDownload.expires_at < utcnow()))
            figures["expired_rows"] = expired
            kwargs = dict(download_dir=env["SOFTGOODS_DOWNLOAD_DIR"], symlink_dir=env["SOFTGOODS_SYMLINK_DIR"],
                          grace_seconds=3600, log_retention_days=365)
            t0 = time.perf_counter()
            dry = purge(db.session, utcnow(), dry_run=True, **kwargs)
            figures["dry_run_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            report = purge(db.session, utcnow(), dry_run=False, **kwargs)
            figures["purge_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            again = purge(db.session, utcnow(), dry_run=False, **kwargs)
            figures["second_purge_s"] = time.perf_counter() - t0
            assert dry.grants_expired == report.grants_expired == expired, (dry.grants_expired, report.grants_expired)
            assert again.grants_expired == 0
            assert len(report.symlink_dirs) == n_links, len(report.symlink_dirs)
            left = db.session.scalar(select(func.count()).select_from(UserDownload)
                                     .where(UserDownload.status == "active"))
            figures["live_left"] = left
            db.session.remove()
            db.engine.dispose()
    finally:
        if pg_name:
            with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{pg_name}" WITH (FORCE)')
        shutil.rmtree(root, ignore_errors=True)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grants", type=int, default=1_000_000, help="expired grants")
    parser.add_argument("--links", type=int, default=1000, help="expired grants owning a symlink folder")
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), action="append")
    args = parser.parse_args()
    worst = 0.0
    for backend in args.backend or ["sqlite", "postgresql"]:
        # one grant in 11 is live, so this many rows hold `--grants` expired ones (and a tenth as many live)
        figures = run(backend, args.grants + args.grants // 10, args.links)
        worst = max(worst, figures["purge_s"])
        print(f"{backend:10s} expired grants {figures['expired_rows']:>9,}  fill {figures['fill_s']:5.1f} s  "
              f"dry-run {figures['dry_run_s']:5.2f} s  purge {figures['purge_s']:5.2f} s  "
              f"second purge {figures['second_purge_s']:5.2f} s  live left {figures['live_left']:,}", flush=True)
    print(f"target: purge < 10 s on each backend: {'met' if worst < 10 else 'MISSED'} (worst {worst:.2f} s)")
    return 0 if worst < 10 else 1


if __name__ == "__main__":
    sys.exit(main())
