"""A real SMTP server (aiosmtpd) on a free loopback port that collects every message it receives.

Use in a test module or conftest: ``from tests.smtp import smtp_server  # noqa: F401`` and then
``smtp_server.url`` (for SOFTGOODS_SMTP_URL / config SMTP_URL), ``smtp_server.messages`` and
``smtp_server.wait_for(n)``. The fixture starts the server and always stops it.
"""
from __future__ import annotations

import email
import email.policy
import threading
import time
from dataclasses import dataclass, field
from email.message import EmailMessage

import pytest
from aiosmtpd.controller import Controller

from tests.helpers import free_port


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage

    @property
    def text(self) -> str:
        return self.message.get_body(("plain",)).get_content()

    @property
    def html(self) -> str:
        return self.message.get_body(("html",)).get_content()


@dataclass
class _Collector:
    messages: list[Received] = field(default_factory=list)
    arrived: threading.Condition = field(default_factory=threading.Condition)

    async def handle_DATA(self, server, session, envelope) -> str:  # aiosmtpd's handler hook
        parsed = email.message_from_bytes(envelope.original_content or envelope.content,
                                          policy=email.policy.default)
        with self.arrived:
            self.messages.append(Received(envelope.mail_from, list(envelope.rcpt_tos), parsed))
            self.arrived.notify_all()
        return "250 Message accepted for delivery"


class SMTPServer:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"smtp://127.0.0.1:{self.port}"
        self._collector = _Collector()
        self._controller = Controller(self._collector, hostname="127.0.0.1", port=self.port,
                                      ready_timeout=10)

    @property
    def messages(self) -> list[Received]:
        return list(self._collector.messages)

    def wait_for(self, count: int = 1, timeout: float = 10.0) -> list[Received]:
        """At least ``count`` messages, waiting up to ``timeout`` seconds; fails the test otherwise."""
        deadline = time.monotonic() + timeout
        with self._collector.arrived:
            while len(self._collector.messages) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    pytest.fail(f"expected {count} email(s), the SMTP server received "
                                f"{len(self._collector.messages)} in {timeout:.0f} s")
                self._collector.arrived.wait(left)
        return self.messages

    def start(self) -> "SMTPServer":
        self._controller.start()
        return self

    def stop(self) -> None:
        self._controller.stop()


@pytest.fixture
def smtp_server():
    server = SMTPServer().start()
    try:
        yield server
    finally:
        server.stop()
