"""The price feed the signer worlds read (tests/signing's fixture)."""

from __future__ import annotations

from support.signer_fixtures import feed

__all__ = ["feed"]
