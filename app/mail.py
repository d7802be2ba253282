"""Email: the order email with its download links, account messages, and the outbox.

Every message is first stored as an ``OutboxMessage`` row (the transactional outbox): checkout commits
the order, its grants and its email together, then tries to send. If SMTP is down nothing is lost; the
message waits and ``flush_outbox`` (called by ``purge`` and the watcher) retries it.

Transport: SMTP when ``SOFTGOODS_SMTP_URL`` is set (``smtp://host:port``, ``smtps://``, optional
``user:password@`` and ``?starttls=1``), otherwise one ``.eml`` file per message in ``OUTBOX_DIR``.
"""
from __future__ import annotations

import email.policy
import logging
import os
import smtplib
import ssl
import tempfile
from email import message_from_string
from email.message import EmailMessage
from email.utils import formatdate, make_msgid, parseaddr
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from flask import current_app, render_template
from sqlalchemy import select, update
from sqlalchemy.orm import Session, object_session

from app.downloads.grants import link_for
from app.downloads.models import OutboxMessage
from app.store.models import Order
from app.timeutil import utcnow

log = logging.getLogger("softgoods.mail")

SMTP_TIMEOUT = 10  # seconds; checkout waits at most this long before leaving the mail to the outbox
MAX_ATTEMPTS = 50  # after this many failures a message stays in the outbox for the owner to see
FLUSH_BATCH = 200


def build_message(to: str, subject: str, text: str, html: str) -> EmailMessage:
    msg = EmailMessage()
    sender = current_app.config["MAIL_FROM"]
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = formatdate(localtime=False, usegmt=True)
    domain = parseaddr(sender)[1].rpartition("@")[2] or "softgoods.local"
    msg["Message-ID"] = make_msgid(domain=domain)
    msg.set_content(text)
    msg.add_alternative(html, subtype="html")
    return msg


def order_links(order: Order) -> list[dict]:
    """One entry per grant: what the thank-you page, the email and My downloads all show."""
    from app.downloads.access import used_up  # not at import: it builds statements over every model

    entries = []
    for grant in sorted(order.downloads, key=lambda g: g.id):
        entries.append({
            "name": grant.order_item.name if grant.order_item else grant.sku,
            "sku": grant.sku,
            "url": link_for(grant),
            "expires_at": grant.expires_at,
            "max_downloads": grant.max_downloads,
            # The limit is per file: the summary says "N downloads per file" and whether all are used.
            "used_up": used_up(object_session(grant), grant),
            "status": grant.status,
            "entitlement": (f"{grant.entitlement_count} items of the {grant.entitlement_class} collection, "
                            "chosen when you open the link") if grant.entitlement_class else None,
        })
    return entries


def build_order_message(order: Order) -> EmailMessage:
    context = {"order": order, "links": order_links(order),
               "downloads_url": current_app.config["STORE_URL"] + "/account/downloads",
               "register_url": current_app.config["STORE_URL"] + "/account/register"}
    return build_message(order.email, f"Your downloads: order {order.po_number}",
                         render_template("mail/order.txt", **context),
                         render_template("mail/order.html", **context))


def queue_message(session: Session, msg: EmailMessage) -> OutboxMessage:
    row = OutboxMessage(to=str(msg["To"]), subject=str(msg["Subject"])[:300], message=msg.as_string())
    session.add(row)
    session.flush()
    return row


def queue_order_email(session: Session, order: Order) -> OutboxMessage:
    """Store the order email to be sent after the caller commits (checkout uses this)."""
    return queue_message(session, build_order_message(order))


def send_order_email(session: Session, order: Order) -> None:
    """Build, store and try to send the order email now (the owner's "re-send email" uses this).
    A failure leaves the message in the outbox; the caller commits."""
    deliver(session, queue_order_email(session, order))


def send_account_email(session: Session, to: str, subject: str, intro: str, link_text: str, url: str,
                       note: str) -> None:
    """Account setup, "you already have an account" and password reset: one short message with one link."""
    context = {"intro": intro, "link_text": link_text, "url": url, "note": note}
    msg = build_message(to, subject, render_template("mail/account.txt", **context),
                        render_template("mail/account.html", **context))
    deliver(session, queue_message(session, msg))


def deliver(session: Session, message: OutboxMessage) -> bool:
    """Claim the message (so a concurrent flush skips it), send it, record the outcome."""
    claimed = session.execute(
        update(OutboxMessage)
        .where(OutboxMessage.id == message.id, OutboxMessage.sent_at.is_(None),
               OutboxMessage.attempts == message.attempts)
        .values(attempts=OutboxMessage.attempts + 1)
        .execution_options(synchronize_session=False)
    ).rowcount
    if claimed != 1:
        return False
    session.refresh(message)
    try:
        _transport(message)
    except (OSError, smtplib.SMTPException) as exc:
        message.last_error = f"{type(exc).__name__}: {exc}"[:1000]
        log.warning("mail to %s not sent yet (attempt %d): %s", message.to, message.attempts, message.last_error)
        session.flush()
        return False
    message.sent_at = utcnow()
    message.last_error = None
    session.flush()
    return True


def flush_outbox(session: Session) -> int:
    """Retry every unsent message; returns how many were sent. Safe to run from several processes
    at once (each message is claimed before it is sent). The caller commits."""
    pending = session.scalars(select(OutboxMessage)
                              .where(OutboxMessage.sent_at.is_(None), OutboxMessage.attempts < MAX_ATTEMPTS)
                              .order_by(OutboxMessage.id).limit(FLUSH_BATCH)).all()
    return sum(1 for message in pending if deliver(session, message))


def _transport(message: OutboxMessage) -> None:
    url = current_app.config.get("SMTP_URL")
    if url:
        _send_smtp(url, message)
    else:
        _write_eml(Path(current_app.config["OUTBOX_DIR"]), message)


def _send_smtp(url: str, message: OutboxMessage) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("smtp", "smtps"):
        raise smtplib.SMTPException(f"SMTP URL must start with smtp:// or smtps://, not {parts.scheme}://")
    options = parse_qs(parts.query)
    host = parts.hostname or "127.0.0.1"
    msg = message_from_string(message.message, policy=email.policy.SMTP)
    if parts.scheme == "smtps":
        server = smtplib.SMTP_SSL(host, parts.port or 465, timeout=SMTP_TIMEOUT,
                                  context=ssl.create_default_context())
    else:
        server = smtplib.SMTP(host, parts.port or 25, timeout=SMTP_TIMEOUT)
    with server:
        if options.get("starttls", ["0"])[0] in ("1", "true", "yes"):
            server.starttls(context=ssl.create_default_context())
        if parts.username:
            server.login(unquote(parts.username), unquote(parts.password or ""))
        server.send_message(msg, from_addr=parseaddr(current_app.config["MAIL_FROM"])[1] or None,
                            to_addrs=[message.to])


def _write_eml(outbox: Path, message: OutboxMessage) -> None:
    """One file per message, written whole then renamed, so a reader never sees half a mail."""
    outbox.mkdir(parents=True, exist_ok=True)
    name = f"{message.created_at:%Y%m%dT%H%M%S}-{message.id:06d}.eml"
    fd, tmp = tempfile.mkstemp(dir=outbox, prefix=".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(message.message)
        os.replace(tmp, outbox / name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
