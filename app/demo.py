"""The one-command demo (``scripts/demo``): an instance with sample products and files, an owner
account, then the store and the sidecar on loopback until Ctrl-C.

Idempotent: a second run keeps the database, files and owner password and just starts the servers.
``--no-serve`` prepares everything and exits (what the tests run).
"""
from __future__ import annotations

import argparse
import io
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
OWNER_EMAIL = "owner@example.com"


def _pdf(title: str) -> bytes:
    """A small but valid one-page PDF, so the sample opens in any viewer."""
    text = f"BT /F1 24 Tf 72 720 Td ({title}) Tj ET".encode()
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
               b"/Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length %d >>\nstream\n%s\nendstream" % (len(text), text),
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = io.BytesIO(), []
    out.write(b"%PDF-1.4\n")
    for number, body in enumerate(objects, 1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n%s\nendobj\n" % (number, body))
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    for offset in offsets:
        out.write(b"%010d 00000 n \n" % offset)
    out.write(b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref))
    return out.getvalue()


def _video(size: int) -> bytes:
    """An MP4-shaped file of the given size (a real ftyp box, then filler): enough to exercise delivery."""
    head = b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2"
    return head + os.urandom(size - len(head))


def _software_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("toolkit/README.txt", "Softgoods sample toolkit 1.0\n")
        zf.writestr("toolkit/toolkit.py", "print('hello from the sample toolkit')\n")
        zf.writestr("toolkit/data.bin", os.urandom(256 * 1024))
    return buf.getvalue()


def sample_catalog() -> list[dict]:
    return [
        {"sku": "MANUAL", "name": "The Complete Field Manual", "price": "29.00",
         "description": "A manual in chapters: PDFs, a video and an appendix, in subfolders.",
         "files": {"README.txt": lambda: b"Start with ch1/intro.pdf.\n", "ch1/intro.pdf": lambda: _pdf("Chapter 1"),
                   "ch1/video.mp4": lambda: _video(4 * 1024 * 1024), "ch2/advanced.pdf": lambda: _pdf("Chapter 2"),
                   "ch2/appendix/tables.csv": lambda: b"item,value\nalpha,1\nbeta,2\n"}},
        {"sku": "TOOLKIT", "name": "Sample Toolkit 1.0 (software)", "price": "49.99",
         "description": "A software download: one ZIP archive.", "options": {"max_downloads": 3},
         "files": {"toolkit-1.0.zip": _software_zip}},
        {"sku": "FILM-METROPOLIS", "name": "Metropolis (1927)", "price": "3.99",
         "description": "A classic film.", "options": {"content_class": "classics"},
         "files": {"metropolis.mp4": lambda: _video(2 * 1024 * 1024)}},
        {"sku": "FILM-NOSFERATU", "name": "Nosferatu (1922)", "price": "3.99",
         "description": "A classic film.", "options": {"content_class": "classics"},
         "files": {"nosferatu.mp4": lambda: _video(2 * 1024 * 1024)}},
        {"sku": "FILM-GENERAL", "name": "The General (1926)", "price": "3.99",
         "description": "A classic film.", "options": {"content_class": "classics"},
         "files": {"the-general.mp4": lambda: _video(2 * 1024 * 1024)}},
        {"sku": "CLASSICS-2", "name": "Any 2 Classics", "price": "6.00",
         "description": "Choose any two films of the classics collection after you buy.",
         "options": {"entitlement_class": "classics", "entitlement_count": 2}, "files": {}},
    ]


def prepare(app) -> tuple[str, str]:
    """Database, sample files and products, index, owner account. Returns (owner email, password)."""
    import flask_migrate

    from app.accounts.models import User
    from app.cli import MIGRATIONS_DIR
    from app.downloads.index import index_files
    from app.extensions import db
    from app.store.catalog import add_product
    from app.store.models import Product

    cfg = app.config
    with app.app_context():
        for key in ("INSTANCE_DIR", "DOWNLOAD_DIR", "OUTBOX_DIR", "SYMLINK_DIR"):
            Path(cfg[key]).mkdir(parents=True, exist_ok=True)
        flask_migrate.upgrade(directory=MIGRATIONS_DIR)
        download_dir = Path(cfg["DOWNLOAD_DIR"])
        for sample in sample_catalog():
            for rel, make in sample["files"].items():
                path = download_dir / sample["sku"] / rel
                if not path.exists():
                    path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = path.with_name("." + path.name + ".tmp")
                    tmp.write_bytes(make())
                    tmp.replace(path)
            if db.session.scalar(select(Product.id).where(Product.sku == sample["sku"])) is None:
                add_product(db.session, sku=sample["sku"], name=sample["name"], price=sample["price"],
                            description=sample["description"], **sample.get("options", {}))
        index_files(db.session, cfg["DOWNLOAD_DIR"])
        password = _owner_password(db.session, User, Path(cfg["INSTANCE_DIR"]))
        db.session.commit()
    return OWNER_EMAIL, password


def _owner_password(session, User, instance_dir: Path) -> str:
    """The demo owner's password: made once, kept (mode 0600) in the instance so re-runs print it again."""
    from app.timeutil import utcnow

    saved = instance_dir / "demo-owner-password"
    password = saved.read_text().strip() if saved.exists() else ""
    owner = session.scalar(select(User).where(User.email == OWNER_EMAIL))
    if owner is not None and password and owner.check_password(password):
        return password
    password = secrets.token_urlsafe(12)
    if owner is None:
        owner = User(email=OWNER_EMAIL, role="owner", email_confirmed_at=utcnow())
        session.add(owner)
    owner.set_password(password)
    fd = os.open(saved, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(password + "\n")
    return password


def _wait_up(url: str, proc: subprocess.Popen, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            time.sleep(0.2)
    return False


def serve(store_port: int, sidecar_port: int, env: dict[str, str], summary: str) -> int:
    """Run the store, the sidecar and the watcher until Ctrl-C (or one of them dies); stop them all
    either way. The watcher keeps the index current as files change, as in a deployment."""
    gunicorn = [sys.executable, "-m", "gunicorn"]
    commands = {
        # No control sockets: both would claim the same default path in the home folder.
        "store": gunicorn + ["-c", "app/gunicorn.conf.py", "--bind", f"127.0.0.1:{store_port}",
                             "--no-control-socket", "wsgi:app"],
        "sidecar": gunicorn + ["-c", "sidecar/gunicorn.conf.py", "--bind", f"127.0.0.1:{sidecar_port}",
                               "--no-control-socket", "sidecar.wsgi:app"],
        "watcher": [sys.executable, "-m", "flask", "--app", "wsgi", "softgoods", "watch"],
    }
    busy = [port for port in (store_port, sidecar_port) if not port_free(port)]
    if busy:
        print(f"error: port {', '.join(map(str, busy))} is already in use (another demo still running?); "
              "stop it or choose --store-port / --sidecar-port", file=sys.stderr)
        return 1
    procs: dict[str, subprocess.Popen] = {}
    previous = {sig: signal.signal(sig, _stop_signal) for sig in STOP_SIGNALS}
    try:
        for name, argv in commands.items():
            procs[name] = subprocess.Popen(argv, cwd=ROOT, env=env, start_new_session=True)
        for name, url in (("store", f"http://127.0.0.1:{store_port}/"),
                          ("sidecar", f"http://127.0.0.1:{sidecar_port}/healthz")):
            if not _wait_up(url, procs[name]) or procs[name].poll() is not None:
                print(f"error: the {name} did not start on {url} (is the port in use?)", file=sys.stderr)
                return 1
        # Again after the servers' start-up logs, so the URLs and the password are the last thing shown.
        print(f"\n{summary}\nstore:     http://127.0.0.1:{store_port}/\n"
              f"sidecar:   http://127.0.0.1:{sidecar_port}/\nwatcher:   re-indexes changed product files\n"
              "Ctrl-C stops all three.\n", flush=True)
        while all(p.poll() is None for p in procs.values()):
            time.sleep(0.5)
        dead = [n for n, p in procs.items() if p.poll() is not None]
        print(f"error: the {', '.join(dead)} stopped; stopping the rest", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping…", flush=True)
        return 0
    finally:
        for sig in STOP_SIGNALS:  # a second Ctrl-C must not cut the stopping short
            signal.signal(sig, signal.SIG_IGN)
        for proc in procs.values():
            _stop(proc)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# Ctrl-C, kill and a closed terminal all stop the servers this demo started (they run in their own
# sessions, so the signal does not reach them by itself).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _stop_signal(signum, _frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def port_free(port: int) -> bool:
    """Nothing listens on 127.0.0.1:port (checked by binding it, as gunicorn is about to)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/demo", description=__doc__.splitlines()[0])
    parser.add_argument("--store-port", type=int, default=8000)
    parser.add_argument("--sidecar-port", type=int, default=8001)
    parser.add_argument("--no-serve", action="store_true", help="prepare the instance, then exit")
    args = parser.parse_args(argv)
    # The children read their settings from the environment like any deployment (app/config.py).
    env = dict(os.environ)
    env.setdefault("SOFTGOODS_SIDECAR_URL", f"http://127.0.0.1:{args.sidecar_port}")
    env.setdefault("SOFTGOODS_STORE_URL", f"http://127.0.0.1:{args.store_port}")

    from app import create_app

    app = create_app(env=env)
    email, password = prepare(app)
    database = make_url(app.config["SQLALCHEMY_DATABASE_URI"]).render_as_string(hide_password=True)
    print(f"instance:  {app.config['INSTANCE_DIR']}\ndatabase:  {database}")
    print(f"products:  {', '.join(s['sku'] for s in sample_catalog())} (files in {app.config['DOWNLOAD_DIR']})")
    print(f"mail:      {app.config['SMTP_URL'] or 'written to ' + app.config['OUTBOX_DIR']}")
    summary = (f"owner:     {email}  password: {password}  (log in, then Admin)\n"
               "test card: 4242 4242 4242 4242, any future expiry, any CVC")
    print(summary, flush=True)
    if args.no_serve:
        return 0
    return serve(args.store_port, args.sidecar_port, env, summary)


if __name__ == "__main__":
    sys.exit(main())
