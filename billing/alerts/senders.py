"""Sending one delivery: an HTTP POST (webhook, Slack) or an email over SMTP.

Each sender returns on success and raises `RetryableError` (the outbox tries again
later) or `PermanentError` (no retry can help: the configuration is missing).

HTTP: no redirects are followed (a 3xx is a failure: a redirect could point anywhere),
proxies from the environment are not used, and a fresh client per send keeps a
connection verified for one host from serving another. Unless private targets are
allowed, the host is resolved and checked again at send time, and the request goes to
the very address that passed the check (the URL's host is kept in `Host` and, for
HTTPS, in SNI and certificate verification), so DNS that changes between the check and
the connection cannot redirect it to an internal address.

SMTP: `smtp://user:pass@host:port` (STARTTLS when the server offers it; port 25 by
default) or `smtps://...` (implicit TLS; port 465 by default).
"""

from __future__ import annotations

import smtplib
import ssl
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from ipaddress import IPv6Address
from urllib.parse import unquote, urlsplit, urlunsplit

import httpx

from billing.alerts import channels as rules

MAX_ERROR_LENGTH = 500


class RetryableError(Exception):
    """A failed attempt that a later one may fix (network, 5xx, DNS)."""


class PermanentError(Exception):
    """A failure no retry can fix: the delivery fails at once."""


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text[:MAX_ERROR_LENGTH]


def _pinned(url: str) -> tuple[str, dict[str, str], dict[str, str]]:
    """(URL to connect to, extra headers, httpx extensions) after the send-time check."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    default_port = 443 if parts.scheme == "https" else 80
    try:
        addresses = rules.public_addresses(host, parts.port or default_port)
    except rules.PrivateAddressError as exc:
        raise RetryableError(f"url: {rules.PRIVATE_RULE}") from exc
    except rules.UnresolvableHostError as exc:
        raise RetryableError(f"url: host {host} does not resolve") from exc
    if rules.literal_address(host) is not None:
        return url, {}, {}
    address = addresses[0]
    literal = f"[{address}]" if isinstance(address, IPv6Address) else str(address)
    port = f":{parts.port}" if parts.port else ""
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@{literal}{port}" if userinfo else f"{literal}{port}"
    pinned = urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))
    extensions = {"sni_hostname": host} if parts.scheme == "https" else {}
    return pinned, {"Host": f"{host}{port}"}, extensions


def post(
    url: str, body: bytes, headers: dict[str, str], *, allow_private: bool, timeout: float
) -> None:
    """POST `body` to `url`; a 2xx is success, anything else is retryable."""
    target, extra, extensions = (url, {}, {}) if allow_private else _pinned(url)
    try:
        with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client:
            response = client.post(
                target, content=body, headers={**headers, **extra}, extensions=extensions
            )
    except (httpx.HTTPError, httpx.InvalidURL, OSError, ValueError) as exc:
        raise RetryableError(_describe(exc)) from exc
    if not 200 <= response.status_code < 300:
        raise RetryableError(f"HTTP {response.status_code}")


@dataclass(frozen=True)
class SmtpServer:
    implicit_tls: bool
    host: str
    port: int
    user: str | None
    password: str | None


def parse_smtp_url(url: str) -> SmtpServer:
    """`smtp://user:pass@host:587` or `smtps://...`; ValueError names what is wrong."""
    parts = urlsplit(url)
    if parts.scheme not in ("smtp", "smtps"):
        raise ValueError("must be an smtp:// or smtps:// URL")
    if not parts.hostname:
        raise ValueError("must have a host")
    implicit = parts.scheme == "smtps"
    return SmtpServer(
        implicit_tls=implicit,
        host=parts.hostname,
        port=parts.port or (465 if implicit else 25),
        user=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
    )


def send_email(
    *,
    smtp_url: str | None,
    smtp_from: str | None,
    to: str,
    subject: str,
    text: str,
    delivery_id: str,
    timeout: float,
) -> None:
    """Send one plain-text message; configuration gaps are permanent, the rest retryable."""
    if not smtp_url:
        raise PermanentError("email: METERING_SMTP_URL is not set")
    if not smtp_from:
        raise PermanentError("email: METERING_SMTP_FROM is not set")
    try:
        server = parse_smtp_url(smtp_url)
    except ValueError as exc:
        raise PermanentError(f"email: METERING_SMTP_URL {exc}") from exc
    message = EmailMessage()
    message["From"] = smtp_from
    message["To"] = to
    message["Subject"] = subject
    message["Date"] = formatdate(usegmt=True)
    domain = smtp_from.rpartition("@")[2].strip(" >") or "metering.invalid"
    message["Message-ID"] = make_msgid(idstring=delivery_id, domain=domain)
    message["X-Metering-Delivery"] = delivery_id
    message.set_content(text)
    context = ssl.create_default_context()
    try:
        smtp: smtplib.SMTP
        if server.implicit_tls:
            smtp = smtplib.SMTP_SSL(server.host, server.port, timeout=timeout, context=context)
        else:
            smtp = smtplib.SMTP(server.host, server.port, timeout=timeout)
        with smtp:
            smtp.ehlo()
            if not server.implicit_tls and smtp.has_extn("starttls"):
                smtp.starttls(context=context)
                smtp.ehlo()
            if server.user is not None:
                smtp.login(server.user, server.password or "")
            smtp.send_message(message, to_addrs=[to])
    except (smtplib.SMTPException, OSError, ValueError) as exc:
        raise RetryableError(_describe(exc)) from exc
