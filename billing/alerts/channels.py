"""Alert channels of a budget: validation, and the guard against private targets.

A budget's `channels` come from an API call, and the service later POSTs to their URLs
from inside the network it runs in: unchecked, a webhook is a way to make the service
call its own admin endpoints, a metadata service or a database (SSRF). So a URL whose
host is, or resolves to, a loopback, private, link-local, unique-local, multicast,
unspecified or reserved address is refused unless the operator allows it
(`METERING_WEBHOOK_ALLOW_PRIVATE=true`, for a gateway on a private network or tests).

The check runs twice: here, when a budget is saved (`validate_channels`), and again at
every send (`billing.alerts.outbox`), because DNS may have changed since; the sender
then connects to the very address it checked (`public_addresses`), so a name that
resolves to a public address for the check and to a private one for the connection
(DNS rebinding) gets nowhere.

Errors are API rules, "channels[i].field: rule", collected for every channel at once.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from typing import Any
from urllib.parse import urlsplit

CHANNEL_TYPES = ("webhook", "slack", "email")
MAX_CHANNELS = 20
MAX_URL_LENGTH = 2048
MAX_SECRET_LENGTH = 256
MAX_EMAIL_LENGTH = 254
PRIVATE_RULE = (
    "must not target a loopback or private address "
    "(set METERING_WEBHOOK_ALLOW_PRIVATE=true to allow)"
)
_FIELDS: dict[str, tuple[str, ...]] = {
    "webhook": ("type", "url", "secret"),
    "slack": ("type", "url"),
    "email": ("type", "to"),
}
# RFC 5322 dot-atom local part (no quoted strings, no comments) @ a DNS name of at least
# two labels. Stricter than the RFC on purpose: no spaces, no CR/LF, nothing that could
# split an SMTP command or a header.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_EMAIL = re.compile(rf"^(?P<local>{_ATEXT}(?:\.{_ATEXT})*)@(?P<domain>{_LABEL}(?:\.{_LABEL})+)$")
# The numeric forms inet_aton accepts besides dotted quads ("2130706433", "0x7f.1",
# "127.1"): resolvers turn them into addresses, so they are addresses here too.
_LEGACY_IPV4 = re.compile(r"^(?:0x[0-9a-f]+|[0-9]+)(?:\.(?:0x[0-9a-f]+|[0-9]+)){0,3}$")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class ChannelError(ValueError):
    """Channels that break a rule; `errors` lists each as "channels[i].field: rule"."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__(errors[0] if errors else "channels: invalid")
        self.errors = errors


class PrivateAddressError(ValueError):
    """A host that is, or resolves to, an address the service must not call."""


class UnresolvableHostError(ValueError):
    """A host name that does not resolve."""


def resolve_host(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (one seam, so tests can stand in for DNS)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def is_public(address: Address) -> bool:
    """True for a globally routable unicast address; IPv4 embedded in IPv6 is unwrapped."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is None and address.teredo is not None:
            embedded = address.teredo[1]
        if embedded is not None and not is_public(embedded):
            return False
        if address.is_site_local:
            return False
    return not (
        address.is_loopback
        or address.is_private
        or address.is_link_local
        or address.is_multicast
        or address.is_unspecified
        or address.is_reserved
        or not address.is_global
    )


def literal_address(host: str) -> Address | None:
    """The address a URL's host spells directly, or None for a name."""
    text = host.strip("[]").split("%", 1)[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    if _LEGACY_IPV4.match(text.lower()):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(text))
        except OSError:
            return None
    return None


def public_addresses(host: str, port: int, *, resolve: bool = True) -> list[Address]:
    """The addresses of `host`, all public; raise if any is not, or if it does not resolve.

    With `resolve` false a name is not looked up (only literal addresses and `localhost`
    are judged) and the result is empty for it.
    """
    name = host.lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        raise PrivateAddressError(host)
    literal = literal_address(name)
    if literal is not None:
        if not is_public(literal):
            raise PrivateAddressError(host)
        return [literal]
    if not resolve:
        return []
    try:
        found = resolve_host(name, port)
    except (OSError, UnicodeError) as exc:
        raise UnresolvableHostError(host) from exc
    addresses = [literal_address(a) for a in found]
    if not addresses or any(a is None or not is_public(a) for a in addresses):
        raise PrivateAddressError(host)
    return [a for a in addresses if a is not None]


def _check_url(
    value: object,
    where: str,
    schemes: tuple[str, ...],
    *,
    allow_private: bool,
    resolve: bool,
) -> list[str]:
    if not isinstance(value, str) or not value:
        return [f"{where}: required, a URL"]
    if len(value) > MAX_URL_LENGTH:
        return [f"{where}: at most {MAX_URL_LENGTH} characters"]
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        return [f"{where}: must not contain spaces or control characters"]
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        return [f"{where}: must be a valid URL"]
    if parts.scheme.lower() not in schemes:
        return [f"{where}: must be an {' or '.join(schemes)} URL"]
    host = parts.hostname
    if not host:
        return [f"{where}: must have a host"]
    if allow_private:
        return []
    default_port = 443 if parts.scheme.lower() == "https" else 80
    try:
        public_addresses(host, port or default_port, resolve=resolve)
    except PrivateAddressError:
        return [f"{where}: {PRIVATE_RULE}"]
    except UnresolvableHostError:
        return [f"{where}: host {host} does not resolve"]
    return []


def _check_email(value: object, where: str) -> list[str]:
    if not isinstance(value, str) or not value:
        return [f"{where}: required, an email address"]
    if len(value) > MAX_EMAIL_LENGTH:
        return [f"{where}: at most {MAX_EMAIL_LENGTH} characters"]
    match = _EMAIL.match(value)
    if match is None or len(match["local"]) > 64:
        return [f"{where}: must be one email address (local@domain)"]
    return []


def _check_channel(
    index: int, raw: object, *, allow_private: bool, resolve: bool
) -> tuple[dict[str, Any] | None, list[str]]:
    at = f"channels[{index}]"
    if not isinstance(raw, dict):
        return None, [f"{at}: must be an object"]
    kind = raw.get("type")
    if not isinstance(kind, str) or kind not in _FIELDS:
        return None, [f"{at}.type: must be one of {', '.join(CHANNEL_TYPES)}"]
    errors = [f"{at}.{key}: unknown field" for key in raw if key not in _FIELDS[kind]]
    if kind == "webhook":
        errors += _check_url(
            raw.get("url"),
            f"{at}.url",
            ("http", "https"),
            allow_private=allow_private,
            resolve=resolve,
        )
        secret = raw.get("secret")
        if not isinstance(secret, str) or not secret:
            errors.append(f"{at}.secret: required, 1 to {MAX_SECRET_LENGTH} characters")
        elif len(secret) > MAX_SECRET_LENGTH:
            errors.append(f"{at}.secret: at most {MAX_SECRET_LENGTH} characters")
    elif kind == "slack":
        errors += _check_url(
            raw.get("url"), f"{at}.url", ("https",), allow_private=allow_private, resolve=resolve
        )
    else:
        errors += _check_email(raw.get("to"), f"{at}.to")
    if errors:
        return None, errors
    return {key: raw[key] for key in _FIELDS[kind]}, []


def validate_channels(
    raw: object, *, allow_private: bool, resolve: bool = True
) -> list[dict[str, Any]]:
    """The channels of a budget, checked and normalized; ChannelError lists every problem.

    `resolve` false skips DNS (names are then judged at send time only); literal
    addresses and `localhost` are judged either way.
    """
    if not isinstance(raw, list):
        raise ChannelError(["channels: must be a list"])
    if len(raw) > MAX_CHANNELS:
        raise ChannelError([f"channels: at most {MAX_CHANNELS} channels"])
    channels: list[dict[str, Any]] = []
    errors: list[str] = []
    for index, item in enumerate(raw):
        channel, problems = _check_channel(
            index, item, allow_private=allow_private, resolve=resolve
        )
        errors += problems
        if channel is not None:
            channels.append(channel)
    if errors:
        raise ChannelError(errors)
    return channels


def masked_slack_url(url: str) -> str:
    """A Slack incoming-webhook URL is itself a credential: show its origin only."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}/***"


def public_channel(ch: dict[str, Any]) -> dict[str, Any]:
    """A channel as the API shows it: the webhook secret and the Slack URL's path hidden."""
    shown = dict(ch)
    if "secret" in shown:
        shown["secret"] = "***"
    if shown.get("type") == "slack" and isinstance(shown.get("url"), str):
        shown["url"] = masked_slack_url(shown["url"])
    return shown
