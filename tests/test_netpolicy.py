"""The address rules behind webhook URLs (custody.netpolicy), on their own."""

from __future__ import annotations

import ipaddress

import pytest

from custody.errors import UrlNotAllowed
from custody.netpolicy import UrlPolicy, check_url, is_loopback_host, parse_url, refusal
from pledge.errors import InvalidInput

STRICT = UrlPolicy.for_network("mainnet")
REGTEST = UrlPolicy.for_network("regtest")


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("10.0.0.1", "private"),
        ("172.16.0.1", "private"),
        ("192.168.0.1", "private"),
        ("fc00::1", "private"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("100.64.0.1", "carrier-grade NAT"),
        ("224.0.0.251", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("240.0.0.1", "private"),  # reserved; `ipaddress` files it as private first
        ("::ffff:127.0.0.1", "loopback: it carries 127.0.0.1"),
        ("::ffff:169.254.169.254", "link-local: it carries 169.254.169.254"),
        ("2002:a9fe:a9fe::1", "link-local: it carries 169.254.169.254"),  # 6to4
        ("192.0.2.1", "private"),  # documentation
        ("8.8.8.8", None),
        ("2606:4700:4700::1111", None),
        ("::ffff:8.8.8.8", None),
    ],
)
def test_refusal_names_why_an_address_is_not_public(address: str, reason: str | None) -> None:
    assert refusal(ipaddress.ip_address(address)) == reason


def test_loopback_hosts_by_name_or_literal() -> None:
    assert is_loopback_host("localhost") and is_loopback_host("LOCALHOST.")
    assert is_loopback_host("127.0.0.2") and is_loopback_host("::1") and is_loopback_host("[::1]")
    assert not is_loopback_host("10.0.0.1") and not is_loopback_host("localhost.example")


def test_shape_errors_and_the_pinned_url() -> None:
    for url in ("https://u:p@example.com/", "https:///x", "https://example.com/#f", "x" * 2001):
        with pytest.raises(InvalidInput):
            parse_url(url, REGTEST)
    for url in ("ftp://example.com/", "http://example.com/", "gopher://127.0.0.1/"):
        with pytest.raises(UrlNotAllowed):
            parse_url(url, REGTEST)
    target = parse_url("https://Hooks.Example:8443/in?x=1", STRICT)
    assert target.host == "hooks.example" and target.port == 8443 and target.path == "/in?x=1"
    assert target.host_header == "hooks.example:8443"
    assert (
        target.pinned(ipaddress.ip_address("2606:4700::1")) == "https://[2606:4700::1]:8443/in?x=1"
    )
    assert parse_url("https://hooks.example", STRICT).host_header == "hooks.example"


def test_check_url_asks_the_resolver_only_when_an_address_rule_applies() -> None:
    asked: list[str] = []

    def resolve(host: str, port: int) -> list[ipaddress.IPv4Address]:
        asked.append(host)
        return [ipaddress.IPv4Address("8.8.8.8")]

    check_url("https://hooks.example/", STRICT, resolve)
    check_url("https://hooks.example/", REGTEST, resolve)  # any address on regtest
    assert asked == ["hooks.example"]
    with pytest.raises(UrlNotAllowed):
        check_url("http://localhost:9/", REGTEST, resolve)  # "localhost" that is not local
