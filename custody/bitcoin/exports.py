"""Wallet exports so each party can verify the collateral address on its own
device or software instead of trusting the service's screen.

Formats:
- a plain descriptor bundle (Bitcoin Core, BDK, Sparrow, any descriptor wallet);
- a Coldcard multisig setup file;
- a BIP-129 (BSMS) descriptor record;
- a Caravan wallet config (Sparrow imports it too).

Coldcard and Caravan describe a multisig wallet as a list of xpubs, so they cannot
hold a fixed (HSM) key: those exports raise `Unsupported` with a message naming
the tools that can sign such a loan, instead of writing a file a device rejects.
"""

from __future__ import annotations

import re
from typing import Any, Final

from custody.errors import ExportUnsupported
from pledge.descriptors import PARTIES, CollateralDescriptor
from pledge.keys import HDKey

MAX_WALLET_NAME: Final = 20
DEFAULT_WALLET_NAME: Final = "pledge-loan"
BSMS_VERSION: Final = "BSMS 1.0"
BSMS_PATH_RESTRICTIONS: Final = "/0/*,/1/*"

_NAME_ALLOWED: Final = re.compile(r"[^A-Za-z0-9 ._-]+")

FIXED_KEY_SIGNERS: Final = (
    "Trezor, Bitcoin Core, BDK and Sparrow-style descriptor signers (use the descriptor export)"
)

_CARAVAN_NETWORKS: Final[dict[str, str]] = {
    "mainnet": "mainnet",
    "testnet": "testnet",
    "signet": "signet",
    "regtest": "regtest",
}


def sanitise_wallet_name(name: str, max_len: int = MAX_WALLET_NAME) -> str:
    """ASCII letters, digits, space, dot, dash, underscore; at most `max_len` chars.

    Coldcard refuses names that are not 1..20 printable ASCII characters, and the
    other formats end up as file names, so one conservative rule serves all."""
    cleaned = _NAME_ALLOWED.sub("-", name if isinstance(name, str) else "")
    cleaned = re.sub(r"\s+", " ", cleaned).strip(" .-_")
    cleaned = cleaned[:max_len].strip(" .-_")
    return cleaned or DEFAULT_WALLET_NAME


def _require_all_hd(cd: CollateralDescriptor, fmt: str) -> list[HDKey]:
    if cd.has_fixed_key:
        raise ExportUnsupported(
            f"{fmt} cannot describe this loan: one of its keys is a fixed HSM key, and "
            "Coldcard (and Ledger) register a multisig wallet only when every key is an "
            f"xpub. Verify and sign this loan with {FIXED_KEY_SIGNERS}."
        )
    return cd.hd_keys


def _apostrophe_path(origin_path: str) -> str:
    return origin_path.replace("h", "'")


def export_descriptor(cd: CollateralDescriptor, name: str) -> dict[str, Any]:
    """Descriptors for any descriptor wallet, plus the first address to compare."""
    note = (
        "2-of-3 multisig (sortedmulti, native segwit P2WSH) over the miner, bank and "
        "arbiter keys, in that order. Import the descriptor as watch-only, then check "
        "that your wallet shows the same first address before anyone deposits."
    )
    if cd.has_fixed_key:
        note += (
            " This loan uses a fixed HSM key: Coldcard and Ledger cannot register it; "
            f"use {FIXED_KEY_SIGNERS}."
        )
    return {
        "name": sanitise_wallet_name(name),
        "network": cd.network,
        "descriptor": cd.descriptor,
        "receive_descriptor": cd.receive_descriptor,
        "change_descriptor": cd.change_descriptor,
        "first_address": cd.address(0),
        "keys": [
            {"party": party, "key": key.descriptor_key}
            for party, key in zip(PARTIES, cd.keys, strict=True)
        ],
        "note": note,
    }


def export_coldcard(cd: CollateralDescriptor, name: str) -> str:
    """Coldcard multisig setup file (`Name:`, `Policy:`, `Format:`, then per key a
    `Derivation:` line and an `XFP: xpub` line), as Coldcard's firmware parses it."""
    keys = _require_all_hd(cd, "A Coldcard multisig file")
    wallet = sanitise_wallet_name(name)
    lines = [
        f"# Coldcard multisig setup file: pledge custody loan collateral ({cd.network})",
        f"# Keys in order: {', '.join(PARTIES)}. First address: {cd.address(0)}",
        "#",
        f"Name: {wallet}",
        "Policy: 2 of 3",
        "Format: P2WSH",
    ]
    for key in keys:
        lines += ["", f"Derivation: {key.origin_path}", f"{key.fingerprint.upper()}: {key.xpub}"]
    return "\n".join(lines) + "\n"


def export_bsms(cd: CollateralDescriptor, name: str) -> str:
    """BIP-129 descriptor record (round 2, NO_ENCRYPTION, i.e. the plaintext).

    Line 1 `BSMS 1.0`; line 2 the descriptor template (xpubs as `KEY/**`);
    line 3 the path restrictions `/0/*,/1/*`; line 4 the first address.

    Fixed keys: BIP-129 lets a KEY be "a public key or an XPUB" (its first test
    vector is a sortedmulti of plain public keys with "No path restrictions"), and
    the template rule only replaces `/**`, so a fixed key is simply written as its
    hex and stays the same in every expanded descriptor. With all three keys fixed
    the record holds the full descriptor with checksum and "No path restrictions",
    exactly like the BIP's vector. `name` is not part of the format (BIP-129 has no
    name field); it is accepted for a uniform export interface.
    """
    del name
    if not cd.has_wildcard:
        return "\n".join([BSMS_VERSION, cd.descriptor, "No path restrictions", cd.address(0)])
    template_keys = [
        f"{key.key_expression}/**" if isinstance(key, HDKey) else key.descriptor_key
        for key in cd.keys
    ]
    template = f"wsh(sortedmulti(2,{','.join(template_keys)}))"
    return "\n".join([BSMS_VERSION, template, BSMS_PATH_RESTRICTIONS, cd.address(0)])


def export_caravan(cd: CollateralDescriptor, name: str) -> dict[str, Any]:
    """Caravan wallet configuration (JSON object).

    Caravan validates BIP-32 paths with `'` as the only hardened marker, so this
    export alone writes `m/48'/1'/0'/2'`. No `client` block: the party chooses
    its own node or block explorer in Caravan.
    """
    keys = _require_all_hd(cd, "A Caravan wallet config")
    return {
        "name": sanitise_wallet_name(name),
        "addressType": "P2WSH",
        "network": _CARAVAN_NETWORKS[cd.network],
        "quorum": {"requiredSigners": 2, "totalSigners": 3},
        "extendedPublicKeys": [
            {
                "name": party,
                "bip32Path": _apostrophe_path(key.origin_path),
                "xpub": key.xpub,
                "xfp": key.fingerprint,
                "method": "text",
            }
            for party, key in zip(PARTIES, keys, strict=True)
        ],
        "startingAddressIndex": 0,
    }
