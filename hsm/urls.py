"""The one rule for where the signer's secrets may travel in clear: nowhere.

A bearer token or an RPC password goes only to `https://` anywhere, or to plain `http://`
on the loopback interface; credentials are never carried inside the URL itself."""

from __future__ import annotations

import ipaddress
from typing import Final
from urllib.parse import urlsplit

__all__ = ["check_secret_url"]

_LOOPBACK_NAMES: Final = frozenset({"localhost"})


def check_secret_url(url: str, what: str) -> str:
    """`url` without a trailing slash, or ValueError naming `what` and the rule."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"pass the credentials of {what} separately, not in its URL")
    if parts.scheme == "https" and host:
        return url.rstrip("/")
    if parts.scheme == "http" and host:
        loopback = host in _LOOPBACK_NAMES
        if not loopback:
            try:
                loopback = ipaddress.ip_address(host).is_loopback
            except ValueError:
                loopback = False
        if loopback:
            return url.rstrip("/")
    raise ValueError(
        f"the URL of {what} must be https:// or http:// on the loopback interface "
        "(127.0.0.1, ::1, localhost)"
    )
