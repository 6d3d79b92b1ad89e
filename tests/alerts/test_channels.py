"""Validation of a budget's channels: every rule, and the refusal of private targets."""

from __future__ import annotations

from typing import Any

import pytest

from billing.alerts import channels as rules
from billing.alerts.channels import ChannelError, public_channel, validate_channels

PRIVATE = f"channels[0].url: {rules.PRIVATE_RULE}"
GOOD = [
    {"type": "webhook", "url": "https://8.8.8.8/hooks/budget?x=1", "secret": "k"},
    {"type": "slack", "url": "https://1.1.1.1/services/T/B/X"},
    {"type": "email", "to": "ops.team+alerts@example.co.uk"},
]


def errors_of(raw: object, *, allow_private: bool = False, resolve: bool = False) -> list[str]:
    with pytest.raises(ChannelError) as caught:
        validate_channels(raw, allow_private=allow_private, resolve=resolve)
    assert str(caught.value) == caught.value.errors[0]
    return caught.value.errors


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """A stand-in resolver: names map to the addresses listed, others do not resolve."""
    answers: dict[str, list[str]] = {}

    def resolve(host: str, port: int) -> list[str]:
        if host not in answers:
            raise OSError(f"{host}: name does not resolve")
        return answers[host]

    monkeypatch.setattr(rules, "resolve_host", resolve)
    return answers


def test_good_channels_come_back_normalized() -> None:
    assert validate_channels(GOOD, allow_private=False) == GOOD
    assert validate_channels([], allow_private=False) == []


def hook(url: object = "https://8.8.8.8/", **fields: object) -> list[dict[str, object]]:
    return [{"type": "webhook", "url": url, **fields}]


def mail(to: object) -> list[dict[str, object]]:
    return [{"type": "email", "to": to}]


URL = "channels[0].url: "
SECRET = "channels[0].secret: required, 1 to 256 characters"
ONE_ADDRESS = "channels[0].to: must be one email address (local@domain)"
TYPES = "channels[0].type: must be one of webhook, slack, email"
LONG_DOMAIN = "b" * 60 + "." + "c" * 60 + "." + "d" * 60 + "." + "e" * 70 + ".io"


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        ({"type": "email"}, "channels: must be a list"),
        (mail("a@b.io") * 21, "channels: at most 20 channels"),
        (["webhook"], "channels[0]: must be an object"),
        ([{"type": "sms", "to": "1"}], TYPES),
        ([{"url": "https://8.8.8.8/"}], TYPES),
        ([{"type": "email", "to": "a@b.io", "foo": 1}], "channels[0].foo: unknown field"),
        ([{"type": "slack", "url": "https://8.8.8.8/", "secret": "k"}],
         "channels[0].secret: unknown field"),
        ([{"type": "webhook", "secret": "k"}], URL + "required, a URL"),
        (hook("ftp://8.8.8.8/", secret="k"), URL + "must be an http or https URL"),
        (hook("https:///path", secret="k"), URL + "must have a host"),
        (hook("not a url", secret="k"), URL + "must not contain spaces or control characters"),
        (hook("https://8.8.8.8:99999/", secret="k"), URL + "must be a valid URL"),
        (hook("https://8.8.8.8/" + "a" * 2040, secret="k"), URL + "at most 2048 characters"),
        (hook(), SECRET),
        (hook(secret=""), SECRET),
        (hook(secret=7), SECRET),
        (hook(secret="k" * 257), "channels[0].secret: at most 256 characters"),
        ([{"type": "slack", "url": "http://8.8.8.8/services/x"}], URL + "must be an https URL"),
        ([{"type": "email"}], "channels[0].to: required, an email address"),
        (mail(["a@b.io"]), "channels[0].to: required, an email address"),
        (mail("a@b.io, c@d.io"), ONE_ADDRESS),
        (mail("no-at-sign"), ONE_ADDRESS),
        (mail("a@localhost"), ONE_ADDRESS),
        (mail("a..b@example.com"), ONE_ADDRESS),
        (mail("a@b.io\r\nBcc: x@y.io"), ONE_ADDRESS),
        (mail("x" * 65 + "@example.com"), ONE_ADDRESS),
        (mail("a@" + LONG_DOMAIN), "channels[0].to: at most 254 characters"),
    ],
)  # fmt: skip
def test_each_rule_names_the_field(raw: object, error: str) -> None:
    assert errors_of(raw) == [error]


def test_every_problem_of_every_channel_is_listed() -> None:
    raw: list[Any] = [
        GOOD[0],
        {"type": "webhook", "url": "gopher://x", "bar": 1},
        {"type": "carrier-pigeon"},
        {"type": "email", "to": "@"},
    ]
    assert errors_of(raw) == [
        "channels[1].bar: unknown field",
        "channels[1].url: must be an http or https URL",
        "channels[1].secret: required, 1 to 256 characters",
        "channels[2].type: must be one of webhook, slack, email",
        "channels[3].to: must be one email address (local@domain)",
    ]


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "127.8.9.10",
        "[::1]",
        "10.0.0.7",
        "172.16.5.4",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "240.0.0.1",
        "255.255.255.255",
        "[fc00::1]",
        "[fd12:3456::1]",
        "[fe80::1]",
        "[fec0::1]",
        "[ff02::1]",
        "[::]",
        "[::ffff:127.0.0.1]",
        "[::ffff:10.0.0.1]",
        "[64:ff9b::7f00:1]",
        "[2002:c0a8:101::1]",
        "2130706433",
        "0x7f.1",
        "127.1",
        "localhost",
        "LOCALHOST.",
        "api.localhost",
    ],
)
def test_private_and_loopback_hosts_are_refused(host: str) -> None:
    url = f"http://{host}:8080/hook"
    assert errors_of([{"type": "webhook", "url": url, "secret": "k"}]) == [PRIVATE]
    assert validate_channels(
        [{"type": "webhook", "url": url, "secret": "k"}], allow_private=True
    ) == [{"type": "webhook", "url": url, "secret": "k"}]


def test_slack_urls_get_the_same_guard() -> None:
    assert errors_of([{"type": "slack", "url": "https://192.168.0.5/x"}]) == [PRIVATE]


def test_a_name_resolving_to_loopback_is_refused(dns: dict[str, list[str]]) -> None:
    dns["hooks.internal.example"] = ["127.0.0.1"]
    dns["mixed.example"] = ["93.184.215.14", "10.0.0.1"]
    dns["public.example"] = ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"]
    for name in ("hooks.internal.example", "mixed.example"):
        raw = [{"type": "webhook", "url": f"https://{name}/x", "secret": "k"}]
        assert errors_of(raw, resolve=True) == [PRIVATE]
        assert validate_channels(raw, allow_private=True) == raw
        # Without resolving, a name is left to the send-time check.
        assert validate_channels(raw, allow_private=False, resolve=False) == raw
    raw = [{"type": "webhook", "url": "https://public.example/x", "secret": "k"}]
    assert validate_channels(raw, allow_private=False) == raw


def test_a_host_that_does_not_resolve_is_refused(dns: dict[str, list[str]]) -> None:
    raw = [{"type": "webhook", "url": "https://nowhere.invalid/x", "secret": "k"}]
    assert errors_of(raw, resolve=True) == [
        "channels[0].url: host nowhere.invalid does not resolve"
    ]


def test_public_channel_hides_the_webhook_secret_and_the_slack_path() -> None:
    assert [public_channel(c) for c in GOOD] == [
        {"type": "webhook", "url": GOOD[0]["url"], "secret": "***"},
        {"type": "slack", "url": "https://1.1.1.1/***"},
        GOOD[2],
    ]
    assert GOOD[0]["secret"] == "k"  # the stored channel is not changed
