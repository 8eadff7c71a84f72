"""Validating payout addresses (the miner's return address, the bank's
liquidation address).

An address typed for the wrong network is the classic costly mistake, so the
error says which network the address belongs to. Note the asymmetry: regtest
segwit addresses use `bcrt1`, but regtest shares base58 prefixes (m/n/2) with
testnet and signet, and testnet and signet share everything.
"""

from __future__ import annotations

from typing import Final

from embit.script import address_to_scriptpubkey

from pledge.bdk_ffi import bdk
from pledge.errors import InvalidInput, LibraryDisagreement
from pledge.network import NETWORK_NAMES, NetworkName, bdk_network, check_network

MAX_ADDRESS_TEXT: Final = 100


def _parse_bdk(text: str, network: NetworkName) -> bdk.Address | None:
    try:
        return bdk.Address(text, bdk_network(network))
    except Exception:
        return None


def _script_kind(script: bytes) -> str | None:
    """Name the standard payout types we accept; None for anything else."""
    n = len(script)
    if n == 25 and script[:3] == b"\x76\xa9\x14" and script[23:] == b"\x88\xac":
        return "P2PKH"
    if n == 23 and script[:2] == b"\xa9\x14" and script[22:] == b"\x87":
        return "P2SH"
    if n == 22 and script[:2] == b"\x00\x14":
        return "P2WPKH"
    if n == 34 and script[:2] == b"\x00\x20":
        return "P2WSH"
    if n == 34 and script[:2] == b"\x51\x20":
        return "P2TR"
    return None


def _other_networks_label(text: str, network: NetworkName) -> str | None:
    valid = [name for name in NETWORK_NAMES if name != network and _parse_bdk(text, name)]
    if not valid:
        return None
    if valid == ["mainnet"]:
        return "a mainnet address"
    return f"an address for {'/'.join(valid)}"


def validate_address(text: str, network: NetworkName, *, field: str) -> str:
    """Return the normalised address (bech32 lower case) or raise InvalidInput."""
    network = check_network(network)
    if not isinstance(text, str):
        raise InvalidInput("the address must be text", field=field)
    text = text.strip()
    if not text:
        raise InvalidInput("the address is empty", field=field)
    if len(text) > MAX_ADDRESS_TEXT:
        raise InvalidInput(
            f"the address is too long ({len(text)} characters): is it really an address?",
            field=field,
        )
    if not text.isascii() or not text.isprintable() or any(c.isspace() for c in text):
        raise InvalidInput(
            "the address contains spaces, control or non-ASCII characters", field=field
        )
    parsed = _parse_bdk(text, network)
    if parsed is None:
        other = _other_networks_label(text, network)
        if other is not None:
            raise InvalidInput(
                f"wrong network: this is {other}, the service runs on {network}", field=field
            )
        raise InvalidInput(
            "this is not a valid Bitcoin address: the checksum does not match or the "
            "format is unknown (check for a mistyped or missing character)",
            field=field,
        )
    script = bytes(parsed.script_pubkey().to_bytes())
    kind = _script_kind(script)
    if kind is None:
        raise InvalidInput(
            "unsupported address type: use a P2PKH, P2SH, P2WPKH, P2WSH or P2TR address",
            field=field,
        )
    normalised = str(parsed)
    try:
        from_embit: bytes = address_to_scriptpubkey(normalised).data
    except Exception:
        from_embit = b""
    if from_embit != script:
        raise LibraryDisagreement(
            "bdkpython and embit disagree on this address's output script: refusing it",
            field=field,
        )
    return normalised


def address_script_pubkey(address: str, network: NetworkName) -> bytes:
    """The output script of a (valid) address on `network`."""
    normalised = validate_address(address, network, field="address")
    parsed = bdk.Address(normalised, bdk_network(network))
    return bytes(parsed.script_pubkey().to_bytes())


def address_kind(address: str, network: NetworkName) -> str:
    """`P2PKH`/`P2SH`/`P2WPKH`/`P2WSH`/`P2TR` for a valid address."""
    kind = _script_kind(address_script_pubkey(address, network))
    assert kind is not None  # validate_address refused anything else
    return kind
