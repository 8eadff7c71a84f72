"""Shared key factories for the bitcoin library tests."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import pytest

from pledge.keys import FixedKey, HDKey, parse_fixed_key, parse_hd_key
from pledge.network import NetworkName
from regtest.testkeys import make_fixed_test_key, make_test_key_text


def seed_for(label: str) -> bytes:
    """Deterministic 32-byte seed so a failing case can be reproduced."""
    return hashlib.sha256(label.encode()).digest()


@pytest.fixture
def hd_key() -> Callable[..., HDKey]:
    def make(label: str, network: NetworkName = "regtest", account: int = 0) -> HDKey:
        text = make_test_key_text(seed_for(label), network, account)
        return parse_hd_key(text, network, field="key")

    return make


@pytest.fixture
def fixed_key() -> Callable[..., FixedKey]:
    def make(label: str, network: NetworkName = "regtest") -> FixedKey:
        _, hex_key = make_fixed_test_key(seed_for(label), network)
        return parse_fixed_key(hex_key, field="key")

    return make
