#!/usr/bin/env python3
"""Sidecar benchmarks against nginx and bare Flask started in the same run (not tests).

    .venv/bin/python bench/sidecar_bench.py            # everything (~3 minutes, writes ~5 GiB to /tmp)
    .venv/bin/python bench/sidecar_bench.py --only big,small,ttfb,slow --slow-clients 1000
    .venv/bin/python bench/sidecar_bench.py --fallocate   # files without written data: quicker, no disk writes

Prints one line per measurement and the ratio to the reference. The 1 GiB and 4 GiB files are written
(zeros, so they sit in the page cache as product files do) in a temporary folder and deleted at the end;
with --fallocate their blocks are only reserved, and the kernel zero-fills every page it sends, which
alone makes a 4 GiB file's first byte ~0.3 ms later, for nginx too. Every server is stopped.
"""
from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.load import latencies, rate, slow_readers  # noqa: E402
from tests.helpers import ServerProcess, free_port  # noqa: E402
from tests.servers import render_nginx_conf  # noqa: E402

GIB = 1 << 30
SMALL_GRANTS = 50
TTFB_PROBES = 20  # each probe of either file opens a link nobody used yet, as a shopper's first click does
VENV_BIN = Path(sys.executable).parent


def make_big_file(path: Path, size: int, written: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if written:
        subprocess.run(["dd", "if=/dev/zero", f"of={path}", "bs=16M", f"count={size // (16 << 20)}", "status=none"],
                       check=True)
    else:
        subprocess.run(["fallocate", "-l", str(size), str(path)], check=True)


def setup(root: Path, small_files: int, database_url: str | None = None, written: bool = True,
          slow_clients: int = 0, huge: bool = True) -> tuple[dict[str, str], dict[str, str]]:
    """An instance with BIG (1 GiB), HUGE (4 GiB), SMALL (4 KiB files) and unlimited links: one per
    slow client (1,000 shoppers, not one link downloaded 1,000 times) and 50 for the small files."""
    env = {"SOFTGOODS_INSTANCE_DIR": str(root / "instance"), "DATABASE_URL": database_url or f"sqlite:///{root / 'db.sqlite'}",
           "SOFTGOODS_SECRET_KEY": "bench-" + os.urandom(16).hex(), "SOFTGOODS_DOWNLOAD_DIR": str(root / "dl"),
           "SOFTGOODS_SYMLINK_DIR": str(root / "links")}
    make_big_file(root / "dl" / "BIG" / "big.bin", GIB, written)
    if huge:  # only the time-to-first-byte probes use it
        make_big_file(root / "dl" / "HUGE" / "huge.bin", 4 * GIB, written)
    for i in range(small_files):
        p = root / "dl" / "SMALL" / f"f{i:03d}.bin"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(os.urandom(4096))
    import flask_migrate

    from app import create_app
    from app.cli import MIGRATIONS_DIR
    from app.downloads.grants import grant_downloads
    from app.downloads.index import index_files
    from app.extensions import db
    from app.store.catalog import add_product
    from app.store.orders import Line, create_order

    app = create_app({"SIDECAR_URL": "http://SIDECAR"}, env=env)
    links = {}
    with app.app_context():
        flask_migrate.upgrade(directory=MIGRATIONS_DIR)
        t0 = time.monotonic()
        index_files(db.session, env["SOFTGOODS_DOWNLOAD_DIR"])
        print(f"index: {(5 if huge else 1) * GIB + small_files * 4096:,} bytes hashed in {time.monotonic() - t0:.1f} s",
              flush=True)
        for sku in ("BIG", "HUGE", "SMALL") if huge else ("BIG", "SMALL"):
            product = add_product(db.session, sku=sku, name=sku, price="1", max_downloads=None)
            # many shoppers of the small files: each link sees a few requests, as in a real shop
            for i in range({"SMALL": SMALL_GRANTS, "BIG": slow_clients + 1, "HUGE": TTFB_PROBES + 1}[sku]):
                order = create_order(db.session, email=f"bench{i}@example.com", lines=[Line(product, 1)])
                key = sku if i == 0 else ("SLOW" if sku == "BIG" else sku) + str(i)
                links[key] = grant_downloads(db.session, order, max_downloads=None)[0].url
        db.session.commit()
        db.engine.dispose()
    return env, links


def start_gunicorn(module: str, env: dict[str, str], log: Path) -> ServerProcess:
    port = free_port()
    return ServerProcess([str(VENV_BIN / "gunicorn"), "-c", "sidecar/gunicorn.conf.py", "--bind",
                          f"127.0.0.1:{port}", module], env, port, health_path="/healthz",
                         log_path=log).wait_ready()


def start_nginx(root: Path, env: dict[str, str]) -> ServerProcess:
    port = free_port()
    prefix = root / "nginx"
    (prefix / "temp").mkdir(parents=True)
    conf = render_nginx_conf(port=port, download_dir=env["SOFTGOODS_DOWNLOAD_DIR"],
                             symlink_dir=env["SOFTGOODS_SYMLINK_DIR"], upstream=None, prefix=prefix, mode="static")
    (prefix / "nginx.conf").write_text(conf)
    return ServerProcess(["/usr/sbin/nginx", "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-g",
                          "daemon off;"], {}, port, health_path="/nginx-health",
                         log_path=prefix / "stderr.log").wait_ready()


def curl_speed(url: str, *headers: str) -> float:
    args = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{speed_download}", "-m", "60"]
    for h in headers:
        args += ["-H", h]
    code, speed = subprocess.run(args + [url], capture_output=True, text=True, check=True).stdout.split()
    assert code in ("200", "206"), code
    return float(speed)


def ttfb(url: str) -> float:
    """Seconds from sending a GET to the first body byte (then hang up)."""
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    t0 = time.perf_counter()
    conn.request("GET", u.path)
    resp = conn.getresponse()
    resp.read(1)
    elapsed = time.perf_counter() - t0
    conn.close()
    return elapsed


def worker_rss(server: ServerProcess) -> list[int]:
    """Resident memory (bytes) of each gunicorn worker of ``server`` (the arbiter's children)."""
    children = Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read_text().split()
    sizes = []
    for pid in children:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                sizes.append(int(line.split()[1]) * 1024)
    return sizes


def mib(sizes: list[int]) -> str:
    return " + ".join(f"{size / (1 << 20):.0f}" for size in sizes) + " MiB"


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="big,small,ttfb,slow")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--slow-clients", type=int, default=1000)
    parser.add_argument("--slow-seconds", type=float, default=30)
    parser.add_argument("--small-seconds", type=float, default=6)
    parser.add_argument("--sidecar-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for the sidecar, e.g. SOFTGOODS_SIDECAR_WORKERS=1")
    parser.add_argument("--database-url", help="default: a fresh SQLite file")
    parser.add_argument("--fallocate", action="store_true", help="reserve the big files' blocks instead of writing them")
    args = parser.parse_args()
    only = set(args.only.split(","))
    os.chdir(ROOT)
    root = Path(tempfile.mkdtemp(prefix="sg-bench-", dir="/tmp"))
    servers: list[ServerProcess] = []
    try:
        env, links = setup(root, small_files=100, database_url=args.database_url, written=not args.fallocate,
                           slow_clients=args.slow_clients if "slow" in only else 0, huge="ttfb" in only)
        extra = dict(item.split("=", 1) for item in args.sidecar_env)
        sidecar = start_gunicorn("sidecar.wsgi:app", {**env, **extra}, root / "sidecar.log")
        servers.append(sidecar)
        nginx = start_nginx(root, env)
        servers.append(nginx)
        links = {k: v.replace("http://SIDECAR", sidecar.url) for k, v in links.items()}
        results = {}
        if "big" in only:
            for label, headers in (("1 GiB full", ()), ("1 GiB Range: bytes=1000-", ("Range: bytes=1000-",))):
                ours, theirs = [], []
                for _ in range(args.runs):  # alternate, so both see the same machine load
                    ours.append(curl_speed(links["BIG"] + "f/big.bin", *headers))
                    theirs.append(curl_speed(nginx.url + "/static-files/BIG/big.bin", *headers))
                o, t = statistics.median(ours), statistics.median(theirs)
                results[label] = o / t
                print(f"{label}: sidecar {o / 1e9:.2f} GB/s, nginx {t / 1e9:.2f} GB/s, ratio {o / t:.2f} "
                      f"(median of {args.runs})", flush=True)
        if "small" in only:
            bare = start_gunicorn("bench.bare_flask:app", {**env, "BENCH_FILES_DIR": env["SOFTGOODS_DOWNLOAD_DIR"]},
                                  root / "bare.log")
            servers.append(bare)
            small_links = [v for k, v in links.items() if k.startswith("SMALL")]
            ours_urls = [link + f"f/f{i:03d}.bin" for i in range(100) for link in small_links]
            bare_urls = [bare.url + f"/files/SMALL/f{i:03d}.bin" for i in range(100)]
            nginx_urls = [nginx.url + f"/static-files/SMALL/f{i:03d}.bin" for i in range(100)]
            o, oerr = rate(ours_urls, args.small_seconds)
            b, berr = rate(bare_urls, args.small_seconds)
            n, _ = rate(nginx_urls, args.small_seconds)
            heads = rate(ours_urls, args.small_seconds / 2, method="HEAD")[0]
            results["4 KiB"] = o / b
            print(f"4 KiB files: sidecar (validated, logged) {o:.0f} req/s, bare Flask send_from_directory "
                  f"{b:.0f} req/s, ratio {o / b:.2f}; nginx {n:.0f} req/s (same Python client); "
                  f"errors {oerr}/{berr}; HEAD through the same links (validation + log row, no delivery "
                  f"accounting) {heads:.0f} req/s", flush=True)
            bare.stop()
        if "ttfb" in only:
            probes = {"4 GiB": [], "4 KiB": [], "nginx 4 GiB": [], "nginx 4 KiB": []}
            for i in range(TTFB_PROBES):  # a pause between probes: each meets an idle server, not the last one's cleanup
                for label, url in (("4 GiB", links[f"HUGE{i + 1}"] + "f/huge.bin"),
                                   ("4 KiB", links[f"SMALL{i + 1}"] + f"f/f{i:03d}.bin"),
                                   ("nginx 4 GiB", nginx.url + "/static-files/HUGE/huge.bin"),
                                   ("nginx 4 KiB", nginx.url + f"/static-files/SMALL/f{i:03d}.bin")):
                    probes[label].append(ttfb(url))
                    time.sleep(0.2)
            m = {label: statistics.median(values) for label, values in probes.items()}
            results["TTFB"] = m["4 GiB"] / m["4 KiB"]
            print(f"time to first byte: 4 GiB {ms(m['4 GiB'])}, 4 KiB {ms(m['4 KiB'])} (median of {TTFB_PROBES}, a fresh "
                  f"link each), ratio {results['TTFB']:.2f}; nginx, same files: {ms(m['nginx 4 GiB'])} vs "
                  f"{ms(m['nginx 4 KiB'])}, ratio {m['nginx 4 GiB'] / m['nginx 4 KiB']:.2f}", flush=True)
        if "slow" in only:
            # every slow client is a socket here: 10,000 need more than the usual 1,024 descriptors
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            idle_rss = worker_rss(sidecar)
            ramp = args.slow_clients / 50 * 0.05  # slow_readers opens 50 connections every 50 ms
            with mp.Pool(1) as pool:
                slow_urls = [link + "f/big.bin" for key, link in links.items() if key.startswith("SLOW")]
                pending = pool.apply_async(slow_readers, (slow_urls, 100_000, args.slow_seconds + ramp))
                time.sleep(max(args.slow_seconds / 3, ramp + 3))  # let every client connect and start
                busy_rss = worker_rss(sidecar)
                req = urllib.request.Request(links["BIG"], headers={"Accept": "application/json"})
                with urllib.request.urlopen(req, timeout=10) as resp:
                    assert json.load(resp)["files"]
                lat = latencies(links["BIG"], 300, {"Accept": "application/json"})
                got, statuses = pending.get(timeout=args.slow_seconds + ramp + 120)
            lat.sort()
            p50, p99 = lat[len(lat) // 2], lat[int(len(lat) * 0.99) - 1]
            receiving = sum(1 for g in got if g > 100_000)
            results["listing p99"] = p99
            print(f"listing under {args.slow_clients} slow downloads (100 KB/s each): p50 {ms(p50)}, p99 {ms(p99)}, "
                  f"max {ms(lat[-1])}; {receiving}/{len(got)} downloads were receiving "
                  f"(median {statistics.median(got) / 1e6:.2f} MB in {args.slow_seconds + ramp:.0f} s; statuses "
                  f"{statuses}); worker RSS idle {mib(idle_rss)}, with the slow downloads {mib(busy_rss)}", flush=True)
        print(json.dumps({k: round(v, 4) for k, v in results.items()}))
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
