"""Network name mapping for the two Bitcoin libraries we use.

The service speaks one vocabulary (`NetworkName`: mainnet/testnet/signet/regtest);
embit and bdkpython each have their own. Mapping them in one place keeps a
"regtest" loan from ever being derived with mainnet parameters by accident.
"""

from __future__ import annotations

from typing import Any, Final, Literal, get_args

from embit.networks import NETWORKS

from pledge.bdk_ffi import bdk
from pledge.errors import InvalidInput

NetworkName = Literal["mainnet", "testnet", "signet", "regtest"]

NETWORK_NAMES: Final[tuple[NetworkName, ...]] = get_args(NetworkName)

_EMBIT_KEYS: Final[dict[str, str]] = {
    "mainnet": "main",
    "testnet": "test",
    "signet": "signet",
    "regtest": "regtest",
}

_BDK_NETWORKS: Final[dict[str, bdk.Network]] = {
    "mainnet": bdk.Network.BITCOIN,
    "testnet": bdk.Network.TESTNET,
    "signet": bdk.Network.SIGNET,
    "regtest": bdk.Network.REGTEST,
}


def check_network(name: str) -> NetworkName:
    """Return `name` typed as a NetworkName, or refuse it (a typo must not fall back silently)."""
    if name not in NETWORK_NAMES:
        raise InvalidInput(
            f"unknown network {name!r}: expected one of {', '.join(NETWORK_NAMES)}",
            field="network",
        )
    return name


def embit_network(name: NetworkName) -> dict[str, Any]:
    """embit's parameter table (address prefixes, xpub versions) for `name`."""
    table: dict[str, Any] = NETWORKS[_EMBIT_KEYS[check_network(name)]]
    return table


def bdk_network(name: NetworkName) -> bdk.Network:
    """bdkpython's Network enum for `name` (testnet means testnet3, not testnet4)."""
    return _BDK_NETWORKS[check_network(name)]


def bdk_network_kind(name: NetworkName) -> bdk.NetworkKind:
    """bdkpython's NetworkKind: MAIN for mainnet, TEST for every test network.

    Descriptors are parsed with a kind, not a network, because test networks share
    xpub version bytes."""
    return bdk.NetworkKind.MAIN if check_network(name) == "mainnet" else bdk.NetworkKind.TEST


def coin_type(name: NetworkName) -> int:
    """BIP-44/48 coin type: 0 on mainnet, 1 on every test network."""
    return 0 if check_network(name) == "mainnet" else 1


def is_test_network(name: NetworkName) -> bool:
    return check_network(name) != "mainnet"
