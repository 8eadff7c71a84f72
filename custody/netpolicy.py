"""Where the service may send a request to a URL somebody else gave it (webhooks), and the
one "is this host this machine?" test (webhooks, the node's REST interface).

A webhook URL is a request the service makes on a party's behalf: left unchecked, the
delivery worker would POST to the cloud's metadata endpoint, the database's host or the
bank's intranet for anyone who may register one (server-side request forgery). So, off
regtest, only https, and only to hosts every address of which is public: checked when the
URL is registered and again at every delivery, where the request then goes to the very
address that was checked (`Target.pinned`), never to a second lookup that a DNS
rebinding answer could point elsewhere. On regtest the tests' receivers listen on this
machine: https anywhere, plain http only to loopback.

`Resolver` is a parameter everywhere, so tests hand in their own DNS answers.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from custody.errors import UrlNotAllowed
from pledge.errors import InvalidInput
from pledge.network import NetworkName

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# host, port -> every address the name has (an IP literal: itself)
Resolver = Callable[[str, int], Sequence[IPAddress]]

MAX_URL_LENGTH = 2000
_DEFAULT_PORTS = {"http": 80, "https": 443}
# Carrier-grade NAT (RFC 6598): neither "private" nor global to `ipaddress`, never public.
_SHARED_ADDRESS_SPACE = ipaddress.ip_network("100.64.0.0/10")


def is_loopback_host(host: str) -> bool:
    """`localhost` or a loopback address literal (no DNS lookup)."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries (mapped, 6to4, Teredo client), if any: the
    packet ends up there, so that is the address to judge."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    return None


def refusal(address: IPAddress) -> str | None:
    """Why a request must not go to `address` ("loopback", "private", ...); None: public."""
    if isinstance(address, ipaddress.IPv6Address):
        inner = _embedded_ipv4(address)
        if inner is not None:
            reason = refusal(inner)
            return f"{reason}: it carries {inner}" if reason else None
    checks: list[tuple[bool, str]] = [
        (address.is_unspecified, "unspecified"),
        (address.is_loopback, "loopback"),
        (address.is_link_local, "link-local"),
        (address.is_multicast, "multicast"),
        (address in _SHARED_ADDRESS_SPACE, "carrier-grade NAT"),
        (address.is_private, "private"),
        (address.is_reserved, "reserved"),
        (isinstance(address, ipaddress.IPv6Address) and address.is_site_local, "site-local"),
        (not address.is_global, "not globally routable"),
    ]
    return next((reason for refused, reason in checks if refused), None)


def resolve_host(host: str, port: int) -> list[IPAddress]:
    """Every address the system resolver gives `host` (TCP), in its order, each once."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise UrlNotAllowed(f"webhook host {host!r} does not resolve", field="url") from exc
    seen: dict[IPAddress, None] = {}
    for _family, _type, _proto, _name, sockaddr in infos:
        text = str(sockaddr[0]).split("%", 1)[0]  # drop an IPv6 zone id
        seen.setdefault(ipaddress.ip_address(text), None)
    return list(seen)


@dataclass(frozen=True)
class UrlPolicy:
    """`public_only` (every network but regtest): https only, every address public.
    Otherwise (regtest): https anywhere, http only to loopback."""

    public_only: bool

    @classmethod
    def for_network(cls, network: NetworkName) -> UrlPolicy:
        return cls(public_only=network != "regtest")

    def check_address(self, target: Target, address: IPAddress) -> None:
        """Raise UrlNotAllowed unless a request for `target` may go to `address`."""
        where = f"webhook host {target.host}" + (
            "" if target.literal else f" resolves to {address}"
        )
        if self.public_only:
            reason = refusal(address)
            if reason is not None:
                raise UrlNotAllowed(
                    f"{where}, which is not a public address ({reason}): only public "
                    "addresses receive webhooks",
                    field="url",
                )
        elif target.scheme == "http" and not address.is_loopback:
            raise UrlNotAllowed(
                f"{where}, not a loopback address: plain http only to loopback",
                field="url",
            )


@dataclass(frozen=True)
class Target:
    """A checked URL's parts, enough to send it to one chosen address."""

    url: str
    scheme: str
    host: str  # no brackets
    port: int
    path: str  # path and query, at least "/"
    literal: bool  # the host is an IP address

    @property
    def host_header(self) -> str:
        """The Host header the URL itself implies (the port only when not the default)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == _DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"

    def pinned(self, address: IPAddress) -> str:
        """The URL with its host replaced by `address` (Host and TLS SNI keep the name)."""
        host = f"[{address}]" if isinstance(address, ipaddress.IPv6Address) else str(address)
        return f"{self.scheme}://{host}:{self.port}{self.path}"


def parse_url(url: str, policy: UrlPolicy) -> Target:
    """Shape and scheme, and an address literal's address: everything but DNS."""
    if len(url) > MAX_URL_LENGTH:
        raise InvalidInput("webhook url is too long", field="url")
    try:
        parts = urlsplit(url)
        host = parts.hostname
        port = parts.port
    except ValueError as exc:
        raise InvalidInput(f"webhook url is malformed: {exc}", field="url") from exc
    if not host:
        raise InvalidInput("webhook url has no host", field="url")
    if parts.username is not None or parts.password is not None:
        # Credentials in a URL end up in logs and listings; the HMAC secret authenticates.
        raise InvalidInput("webhook url must not contain credentials", field="url")
    if parts.fragment:
        raise InvalidInput("webhook url must not contain a fragment", field="url")
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or (scheme == "http" and policy.public_only):
        raise UrlNotAllowed(
            "webhook url must be https"
            + ("" if policy.public_only else " (plain http only to a loopback address)"),
            field="url",
        )
    if scheme == "http" and not is_loopback_host(host):
        raise UrlNotAllowed(
            "webhook url must be https (plain http only to a loopback address)", field="url"
        )
    try:
        address: IPAddress | None = ipaddress.ip_address(host)
    except ValueError:
        address = None
    path = parts.path or "/"
    target = Target(
        url=url,
        scheme=scheme,
        host=host,
        port=port if port is not None else _DEFAULT_PORTS[scheme],
        path=f"{path}?{parts.query}" if parts.query else path,
        literal=address is not None,
    )
    if address is not None:
        policy.check_address(target, address)
    return target


def checked_addresses(target: Target, policy: UrlPolicy, resolve: Resolver) -> list[IPAddress]:
    """Every address of the target's host, each allowed by `policy` (else UrlNotAllowed).
    A DNS lookup: never inside a database transaction."""
    addresses = list(resolve(target.host, target.port))
    if not addresses:
        raise UrlNotAllowed(f"webhook host {target.host!r} does not resolve", field="url")
    for address in addresses:
        policy.check_address(target, address)
    return addresses


def check_url(url: str, policy: UrlPolicy, resolve: Resolver) -> Target:
    """The whole check a URL passes at registration: shape, scheme, every address (not
    looked up for https on regtest, where any address may receive it)."""
    target = parse_url(url, policy)
    if policy.public_only or target.scheme == "http":
        checked_addresses(target, policy, resolve)
    return target
