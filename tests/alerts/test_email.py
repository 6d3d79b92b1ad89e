"""Email alerts reach a real SMTP server (aiosmtpd on 127.0.0.1): plain with AUTH,
STARTTLS when offered, and implicit TLS (smtps://)."""

from __future__ import annotations

import email
import email.policy
import shutil
import socket
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from sqlalchemy.orm import Session as DbSession
from sqlalchemy.orm import sessionmaker

from billing.alerts.outbox import Deliverer
from tests.alerts.conftest import fire, rows

pytestmark = pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")

USER, PASSWORD = "alerts", "p@ss word"
FROM = "Metering <alerts@metering.example>"
TO = "ops@example.com"


@dataclass
class Inbox:
    messages: list[tuple[Envelope, EmailMessage, bool]] = field(default_factory=list)
    logins: list[tuple[bytes, bytes]] = field(default_factory=list)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.content
        assert isinstance(content, bytes)
        message = email.message_from_bytes(content, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        assert server.transport is not None
        encrypted = server.transport.get_extra_info("ssl_object") is not None
        self.messages.append((envelope, message, encrypted))
        return "250 OK"

    def authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        assert isinstance(data, LoginPassword)
        self.logins.append((data.login, data.password))
        ok = (data.login, data.password) == (USER.encode(), PASSWORD.encode())
        return AuthResult(success=ok, handled=False)  # not handled: the server answers 535


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def smtp_server(inbox: Inbox, **options: Any) -> Controller:
    controller = Controller(
        inbox,
        hostname="127.0.0.1",
        port=free_port(),
        authenticator=inbox.authenticate,
        ready_timeout=10,
        **options,
    )
    controller.start()
    return controller


@pytest.fixture
def certificate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ssl.SSLContext]:
    """A self-signed certificate for 127.0.0.1, trusted by the client through SSL_CERT_FILE."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    yield context


def deliver_one(
    sessions: sessionmaker[DbSession], smtp_url: str | None, smtp_from: str | None = FROM
) -> str:
    [(_, [row])] = fire(sessions, [{"type": "email", "to": TO}])
    deliverer = Deliverer(
        sessions=sessions, smtp_url=smtp_url, smtp_from=smtp_from, allow_private=False, timeout=5.0
    )
    assert deliverer.run_due() == 1
    return row.id


def test_email_reaches_a_real_smtp_server_with_auth(sessions: sessionmaker[DbSession]) -> None:
    inbox = Inbox()
    server = smtp_server(inbox, auth_require_tls=False, auth_required=True)
    try:
        delivery = deliver_one(sessions, f"smtp://{USER}:p%40ss%20word@127.0.0.1:{server.port}")
    finally:
        server.stop()
    [(envelope, message, encrypted)] = inbox.messages
    assert inbox.logins == [(USER.encode(), PASSWORD.encode())]
    assert not encrypted
    assert envelope.mail_from == "alerts@metering.example"
    assert envelope.rcpt_tos == [TO]
    assert message["From"] == FROM
    assert message["To"] == TO
    assert message["Subject"] == (
        "Budget 80% threshold crossed: tenant acme / project search, 2026-11"
    )
    assert message["X-Metering-Delivery"] == delivery
    text = message.get_content()
    assert "80% threshold crossed, spend $80.50 of $100.00 for 2026-11." in text
    stored = rows(sessions)[delivery]
    assert (stored.status, stored.attempts, stored.last_error) == ("delivered", 1, None)


def test_a_refused_login_is_retried(sessions: sessionmaker[DbSession]) -> None:
    inbox = Inbox()
    server = smtp_server(inbox, auth_require_tls=False, auth_required=True)
    try:
        delivery = deliver_one(sessions, f"smtp://{USER}:wrong@127.0.0.1:{server.port}")
    finally:
        server.stop()
    assert inbox.messages == []
    stored = rows(sessions)[delivery]
    assert stored.status == "pending"
    assert stored.last_error is not None
    assert stored.last_error.startswith("SMTPAuthenticationError")


def test_starttls_is_used_when_the_server_offers_it(
    sessions: sessionmaker[DbSession], certificate: ssl.SSLContext
) -> None:
    inbox = Inbox()
    server = smtp_server(inbox, tls_context=certificate, require_starttls=True)
    try:
        delivery = deliver_one(sessions, f"smtp://{USER}:p%40ss%20word@127.0.0.1:{server.port}")
    finally:
        server.stop()
    [(envelope, message, encrypted)] = inbox.messages
    assert encrypted
    assert inbox.logins == [(USER.encode(), PASSWORD.encode())]
    assert (envelope.rcpt_tos, message["To"]) == ([TO], TO)
    assert rows(sessions)[delivery].status == "delivered"


def test_an_untrusted_certificate_is_refused(
    sessions: sessionmaker[DbSession],
    certificate: ssl.SSLContext,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SSL_CERT_FILE")
    inbox = Inbox()
    server = smtp_server(inbox, tls_context=certificate, require_starttls=True)
    try:
        delivery = deliver_one(sessions, f"smtp://{USER}:p%40ss%20word@127.0.0.1:{server.port}")
    finally:
        server.stop()
    assert inbox.messages == [] and inbox.logins == []
    stored = rows(sessions)[delivery]
    assert stored.status == "pending"
    assert stored.last_error is not None and "CERTIFICATE_VERIFY_FAILED" in stored.last_error


def test_smtps_uses_implicit_tls(
    sessions: sessionmaker[DbSession], certificate: ssl.SSLContext
) -> None:
    inbox = Inbox()
    server = smtp_server(inbox, ssl_context=certificate, server_hostname="127.0.0.1")
    try:
        delivery = deliver_one(sessions, f"smtps://127.0.0.1:{server.port}")
    finally:
        server.stop()
    [(_, message, encrypted)] = inbox.messages
    assert encrypted and message["From"] == FROM
    assert inbox.logins == []
    assert rows(sessions)[delivery].status == "delivered"


def test_missing_smtp_from_fails_at_once(sessions: sessionmaker[DbSession]) -> None:
    delivery = deliver_one(sessions, "smtp://127.0.0.1:25", smtp_from=None)
    stored = rows(sessions)[delivery]
    assert (stored.status, stored.last_error) == ("failed", "email: METERING_SMTP_FROM is not set")


def test_an_unreachable_smtp_server_is_retried(sessions: sessionmaker[DbSession]) -> None:
    delivery = deliver_one(sessions, f"smtp://127.0.0.1:{free_port()}")
    stored = rows(sessions)[delivery]
    assert stored.status == "pending"
    assert stored.last_error is not None and "refused" in stored.last_error.lower()
