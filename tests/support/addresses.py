"""A loan's addresses computed three independent ways, for tests to compare: bdkpython
(rust-miniscript), embit, and HWI's own descriptor code (`hwilib.descriptor`, with its
bech32 encoder): three implementations of BIP-32 derivation, sortedmulti and P2WSH."""

from __future__ import annotations

import bdkpython as bdk
from embit.descriptor import Descriptor as EmbitDescriptor
from embit.networks import NETWORKS
from hwilib import _bech32 as hwi_bech32
from hwilib.descriptor import parse_descriptor as hwi_parse

from pledge.descriptors import parse_collateral_descriptor
from pledge.network import NetworkName

__all__ = ["addresses_three_ways"]

_HRP = {"mainnet": "bc", "testnet": "tb", "signet": "tb", "regtest": "bcrt"}
_BDK_KIND = {"mainnet": bdk.NetworkKind.MAIN}
_BDK_NETWORK = {
    "mainnet": bdk.Network.BITCOIN,
    "testnet": bdk.Network.TESTNET,
    "signet": bdk.Network.SIGNET,
    "regtest": bdk.Network.REGTEST,
}


def _hwi_address(descriptor: str, index: int, network: NetworkName) -> str:
    script = hwi_parse(descriptor).expand(index).output_script
    assert script[0] == 0x00 and script[1] == 32 and len(script) == 34  # P2WSH
    address = hwi_bech32.encode(_HRP[network], 0, script[2:])
    assert address is not None
    return str(address)


def addresses_three_ways(
    descriptor: str, network: NetworkName, indexes: range
) -> dict[str, list[tuple[str, str]]]:
    """{implementation: [(receive, change) address per index]} for a loan's descriptor."""
    parsed = parse_collateral_descriptor(descriptor, network)
    branches = (parsed.receive_descriptor, parsed.change_descriptor)
    kind = _BDK_KIND.get(network, bdk.NetworkKind.TEST)
    bdk_branches = [bdk.Descriptor(b, kind) for b in branches]
    embit_branches = [EmbitDescriptor.from_string(b.split("#")[0]) for b in branches]
    params = NETWORKS["main" if network == "mainnet" else network.replace("testnet", "test")]
    out: dict[str, list[tuple[str, str]]] = {"bdk": [], "embit": [], "hwi": []}
    for i in indexes:
        rb, cb = (str(b.derive_address(i, _BDK_NETWORK[network])) for b in bdk_branches)
        out["bdk"].append((rb, cb))
        re_, ce = (b.derive(i).address(params) for b in embit_branches)
        out["embit"].append((re_, ce))
        out["hwi"].append(tuple(_hwi_address(b, i, network) for b in branches))  # type: ignore[arg-type]
    return out
