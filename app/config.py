"""Settings, read once from the environment (DESIGN.md: "Configuration by environment variables").

Nothing else in the codebase reads ``os.environ``: everything goes through ``load_settings``,
and ``create_app(config)`` lets tests override any key.
"""
from __future__ import annotations

import ipaddress
import os
import secrets
from datetime import timedelta
from email.utils import parseaddr
from pathlib import Path
from typing import Any, Mapping

DELIVERY_MODES = ("pipe", "symlink", "accel")


def database_url(url: str) -> str:
    """Accept URLs as people write them: ``postgresql://`` uses the psycopg 3 driver we install."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def _secret_key(instance_dir: Path) -> str:
    """The signing key: generated once into the instance folder so links survive restarts."""
    path = instance_dir / "secret_key"
    if path.exists():
        return path.read_text().strip()
    instance_dir.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(48)
    # O_EXCL: when two processes start at once, exactly one key wins and both read it back.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as fh:
        fh.write(key)
    return key


MIN_SECRET_LENGTH = 32
# Secrets printed in shipped examples and docs: anyone can read them, so anyone could sign with them.
EXAMPLE_SECRETS = frozenset({"change-me-to-a-long-random-string", "change-me", "changeme", "secret", "dev"})


def checked_secret(secret: str) -> str:
    """SOFTGOODS_SECRET_KEY signs sessions and download links: refuse a published or guessable one."""
    if secret.strip().lower() in EXAMPLE_SECRETS:
        raise SystemExit("error: SOFTGOODS_SECRET_KEY is the example value; set a random one "
                         "(python3 -c 'import secrets; print(secrets.token_urlsafe(48))') or unset it")
    if len(secret) < MIN_SECRET_LENGTH:
        raise SystemExit(f"error: SOFTGOODS_SECRET_KEY must have at least {MIN_SECRET_LENGTH} characters, "
                         f"not {len(secret)}")
    return secret


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        return int(raw)
    except ValueError:
        raise SystemExit(f"error: {name} must be a whole number, not {raw!r}") from None


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise SystemExit(f"error: {name} must be a positive number, not {raw!r}")
    return value


def _flag(env: Mapping[str, str], name: str) -> bool:
    return (env.get(name) or "0") in ("1", "true", "yes")


def _networks(env: Mapping[str, str], name: str, default: str) -> tuple:
    raw = env.get(name)
    raw = default if raw is None else raw
    try:
        return tuple(ipaddress.ip_network(part.strip(), strict=False) for part in raw.split(",") if part.strip())
    except ValueError as exc:
        raise SystemExit(f"error: {name} must be a comma-separated list of addresses or networks: {exc}") from None


def load_settings(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Flask config keys built from the environment variables of DESIGN.md, with their defaults."""
    env = os.environ if env is None else env
    instance_dir = Path(env.get("SOFTGOODS_INSTANCE_DIR") or "instance").resolve()
    delivery = env.get("SOFTGOODS_DELIVERY") or "pipe"
    if delivery not in DELIVERY_MODES:
        raise SystemExit(f"error: SOFTGOODS_DELIVERY must be one of {', '.join(DELIVERY_MODES)}, not {delivery!r}")
    mail_from = env.get("SOFTGOODS_MAIL_FROM") or "Softgoods <shop@localhost>"
    db_url = env.get("DATABASE_URL") or f"sqlite:///{instance_dir / 'softgoods.db'}"
    return {
        "INSTANCE_DIR": str(instance_dir),
        "SQLALCHEMY_DATABASE_URI": database_url(db_url),
        "SECRET_KEY": (checked_secret(env["SOFTGOODS_SECRET_KEY"]) if env.get("SOFTGOODS_SECRET_KEY")
                       else _secret_key(instance_dir)),
        "DOWNLOAD_DIR": str(Path(env.get("SOFTGOODS_DOWNLOAD_DIR") or instance_dir / "downloads").resolve()),
        "SIDECAR_URL": (env.get("SOFTGOODS_SIDECAR_URL") or "http://127.0.0.1:8001").rstrip("/"),
        "DELIVERY": delivery,
        "SMTP_URL": env.get("SOFTGOODS_SMTP_URL") or None,
        # Shown on every refusal page ("expired", "used up"...) so shoppers know whom to ask.
        "SHOP_CONTACT": env.get("SOFTGOODS_SHOP_CONTACT") or parseaddr(mail_from)[1],
        "MAIL_FROM": mail_from,
        "OUTBOX_DIR": str(instance_dir / "outbox"),
        "SYMLINK_DIR": str(Path(env.get("SOFTGOODS_SYMLINK_DIR") or instance_dir / "links").resolve()),
        "SYMLINK_URL": (env.get("SOFTGOODS_SYMLINK_URL") or "/links").rstrip("/"),
        "ACCEL_PREFIX": env.get("SOFTGOODS_ACCEL_PREFIX") or "/protected/",
        "RATELIMIT_STORAGE_URI": env.get("REDIS_URL") or "memory://",
        # Sidecar: failed link lookups allowed per address before 429; proxies in front (X-Forwarded-For).
        "LINK_GUESS_LIMIT": env.get("SOFTGOODS_LINK_GUESS_LIMIT") or "20 per minute",
        # Shared by every worker of this host (a SQLite file) or, with REDIS_URL, by every host.
        "LINK_GUESS_STORAGE_URI": env.get("REDIS_URL") or f"sqlite:///{instance_dir / 'link-guesses.sqlite'}",
        "RATELIMIT_KEY_PREFIX": env.get("SOFTGOODS_RATELIMIT_PREFIX") or "softgoods",
        "PROXY_COUNT": _int(env, "SOFTGOODS_PROXY_COUNT", 0),
        # 0 sends every file request through the Flask view and the ORM (sidecar/fast_files.py).
        "SIDECAR_FAST_PATH": bool(_int(env, "SOFTGOODS_SIDECAR_FAST_PATH", 1)),
        # Flask-Limiter strings, per client address; POSTs only (pages stay browsable).
        "LOGIN_RATE_LIMIT": env.get("SOFTGOODS_LOGIN_RATE_LIMIT") or "10 per minute",
        "CHECKOUT_RATE_LIMIT": env.get("SOFTGOODS_CHECKOUT_RATE_LIMIT") or "20 per minute",
        "STORE_URL": (env.get("SOFTGOODS_STORE_URL") or "http://127.0.0.1:8000").rstrip("/"),
        # Delivery semantics (DESIGN.md "Delivery semantics"), overridable for owners with odd files.
        "DELIVERY_BUDGET_FACTOR": _float(env, "SOFTGOODS_BUDGET_FACTOR", 1.5),
        "INFLIGHT_ALLOWANCE": _int(env, "SOFTGOODS_INFLIGHT_ALLOWANCE", 16 * 1024 * 1024),
        "EXPIRY_GRACE_SECONDS": _int(env, "SOFTGOODS_EXPIRY_GRACE_SECONDS", 3600),
        # An unfinished delivery idle this long gives its download slot back when another needs it.
        "DELIVERY_STALE_SECONDS": _int(env, "SOFTGOODS_DELIVERY_STALE_SECONDS", 3600),
        # A request in flight that showed no progress this long is presumed dead (DESIGN: at least 60 s;
        # the sidecar's heartbeat refreshes a moving transfer every 20 s).
        "INFLIGHT_IDLE_SECONDS": max(60, _int(env, "SOFTGOODS_INFLIGHT_IDLE_SECONDS", 60)),
        # accel/symlink: a reservation handed to nginx whose access-log line has not been ingested this
        # long is released by the purge (the line, if it comes later, is still counted).
        "NGINX_HANDOFF_SECONDS": _int(env, "SOFTGOODS_NGINX_HANDOFF_SECONDS", 3600),
        "BIND_IP": (env.get("SOFTGOODS_BIND_IP") or "0") in ("1", "true", "yes"),
        "LOG_RETENTION_DAYS": _int(env, "SOFTGOODS_LOG_RETENTION_DAYS", 365),
        # The watcher (README, "Operations"): quiet time before a changed file is re-indexed, how often
        # it expires grants and retries mail, and the background re-hash budget (0 turns it off).
        "WATCH_DEBOUNCE_MS": _int(env, "SOFTGOODS_WATCH_DEBOUNCE_MS", 1000),
        "WATCH_EXPIRY_SECONDS": _int(env, "SOFTGOODS_WATCH_EXPIRY_SECONDS", 5),
        "WATCH_OUTBOX_SECONDS": _int(env, "SOFTGOODS_WATCH_OUTBOX_SECONDS", 60),
        "REHASH_BYTES_PER_SECOND": _int(env, "SOFTGOODS_REHASH_BYTES_PER_SECOND", 20 * 1024 * 1024),
        "REHASH_EVERY_SECONDS": _int(env, "SOFTGOODS_REHASH_EVERY_SECONDS", 7 * 86400),
        # The sidecar re-indexes a file it finds changed on disk at this pace (0: leave it to the watcher).
        # A listing waits at most this long for the close of a file request of its link still in flight.
        "LISTING_CLOSE_WAIT_SECONDS": _float(env, "SOFTGOODS_LISTING_CLOSE_WAIT_SECONDS", 0.1),
        "REINDEX_BYTES_PER_SECOND": _int(env, "SOFTGOODS_REINDEX_BYTES_PER_SECOND", 100 * 1024 * 1024),
        # The file manager imports only from below this server folder (never from anywhere on disk).
        "IMPORT_DIR": str(Path(env.get("SOFTGOODS_IMPORT_DIR") or instance_dir / "import").resolve()),
        "MAX_CONTENT_LENGTH": _int(env, "SOFTGOODS_MAX_UPLOAD_BYTES", 2 * 1024 * 1024 * 1024),
        "MAX_FORM_MEMORY_SIZE": 500_000,
        # Shop and account forms are small: anything bigger is refused (413) before it is parsed.
        "FORM_MAX_BYTES": _int(env, "SOFTGOODS_FORM_MAX_BYTES", 100_000),
        "SESSION_COOKIE_HTTPONLY": True,
        "SESSION_COOKIE_SAMESITE": "Lax",
        "SESSION_COOKIE_SECURE": _flag(env, "SOFTGOODS_SECURE_COOKIES"),
        # "Keep me logged in": revoked with every session of the account (logout, password change/reset).
        "REMEMBER_COOKIE_HTTPONLY": True,
        "REMEMBER_COOKIE_SAMESITE": "Lax",
        "REMEMBER_COOKIE_SECURE": _flag(env, "SOFTGOODS_SECURE_COOKIES"),
        "REMEMBER_COOKIE_DURATION": timedelta(days=_int(env, "SOFTGOODS_REMEMBER_DAYS", 14)),
        # /metrics (store and sidecar): these client networks, or "Authorization: Bearer <token>".
        "METRICS_ALLOW": _networks(env, "SOFTGOODS_METRICS_ALLOW", "127.0.0.0/8,::1"),
        "METRICS_TOKEN": env.get("SOFTGOODS_METRICS_TOKEN") or None,
        "SQLALCHEMY_ENGINE_OPTIONS": {"pool_pre_ping": True},
    }
