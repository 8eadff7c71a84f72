"""Deterministic software keys for tests and the regtest demo.

A seed held in memory is not custody: this module refuses mainnet outright so a
test helper can never end up holding a real loan's key.
"""

from __future__ import annotations

import hashlib

from embit.bip32 import HDKey as EmbitHDKey
from embit.ec import PrivateKey

from pledge.errors import Unsupported
from pledge.keys import account_path
from pledge.network import NetworkName, check_network, embit_network


def _refuse_mainnet(network: NetworkName) -> None:
    if check_network(network) == "mainnet":
        raise Unsupported("software test keys are never created on mainnet", field="network")


def make_test_key(
    seed: bytes, network: NetworkName, account: int = 0
) -> tuple[EmbitHDKey, str, str]:
    """(master private HDKey, origin `[fp/48h/1h/<account>h/2h]`, account xpub).

    `origin + xpub` is the text a party would register; the master key signs in
    tests (derive `account_path(...)` then `/change/index`)."""
    _refuse_mainnet(network)
    if not 16 <= len(seed) <= 64:
        raise ValueError("seed must be 16..64 bytes")
    if not 0 <= account < 2**31:
        raise ValueError("account must be in [0, 2**31)")
    params = embit_network(network)
    master = EmbitHDKey.from_seed(seed, version=params["xprv"])
    path = account_path(network, account)
    xpub: str = master.derive(path).to_public().to_base58(version=params["xpub"])
    origin = f"[{master.my_fingerprint.hex()}{path[1:]}]"
    return master, origin, xpub


def make_test_key_text(seed: bytes, network: NetworkName, account: int = 0) -> str:
    """`[fp/48h/1h/0h/2h]tpub...`, ready for `parse_hd_key`."""
    _, origin, xpub = make_test_key(seed, network, account)
    return origin + xpub


def make_fixed_test_key(seed: bytes, network: NetworkName) -> tuple[PrivateKey, str]:
    """(private key, compressed public key hex): stands in for an HSM key in tests."""
    _refuse_mainnet(network)
    secret = hashlib.sha256(b"pledge-custody fixed test key" + seed).digest()
    private = PrivateKey(secret)
    return private, private.get_public_key().sec().hex()
