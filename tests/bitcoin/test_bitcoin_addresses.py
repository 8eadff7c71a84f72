"""Payout address validation: accepted types, normalisation, network mix-ups."""

from __future__ import annotations

import hashlib

import pytest
from embit.ec import PrivateKey
from embit.script import p2pkh, p2sh, p2tr, p2wpkh, p2wsh

from pledge.addresses import address_kind, address_script_pubkey, validate_address
from pledge.errors import InvalidInput
from pledge.network import NetworkName, embit_network

# Published vectors: BIP-173 (bech32) and BIP-350 (bech32m) "Test vectors",
# bitcoin/bips bip-0173.mediawiki and bip-0350.mediawiki.
BIP173_P2WPKH_UPPER = "BC1QW508D6QEJXTDG4Y5R3ZARVARY0C5XW7KV8F3T4"
BIP173_P2WPKH_SCRIPT = "0014751e76e8199196d454941c45d1b3a323f1433bd6"
BIP173_TESTNET_P2WSH = "tb1qrp33g0q5c5txsp9arysrx4k6zdkfs4nce4xj0gdcccefvpysxf3q0sl5k7"
BIP173_TESTNET_P2WSH_SCRIPT = "00201863143c14c5166804bd19203356da136c985678cd4d27a1b8c6329604903262"
BIP350_P2TR = "bc1p0xlxvlhemja6c4dqv22uapctqupfhlxm9h8z3k2e72q4k9hcz7vqzk5jj0"
BIP350_WITNESS_V2 = "bc1zw508d6qejxtdg4y5r3zarvaryvaxxpcs"
BIP173_BAD_CHECKSUM = "bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t5"

KEY = PrivateKey(hashlib.sha256(b"address tests").digest()).get_public_key()


def sample_addresses(network: NetworkName) -> dict[str, str]:
    """One address of every accepted type, built by embit for `network`."""
    net = embit_network(network)
    return {
        "P2PKH": p2pkh(KEY).address(net),
        "P2SH": p2sh(p2wpkh(KEY)).address(net),
        "P2WPKH": p2wpkh(KEY).address(net),
        "P2WSH": p2wsh(p2pkh(KEY)).address(net),
        "P2TR": p2tr(KEY).address(net),
    }


def refusal(text: str, network: NetworkName) -> str:
    with pytest.raises(InvalidInput) as info:
        validate_address(text, network, field="return_address")
    assert info.value.field == "return_address"
    return info.value.message


@pytest.mark.parametrize("network", ["mainnet", "testnet", "signet", "regtest"])
def test_every_standard_type_accepted(network: NetworkName) -> None:
    for kind, address in sample_addresses(network).items():
        assert validate_address(address, network, field="f") == address
        assert address_kind(address, network) == kind


def test_published_vectors() -> None:
    assert validate_address(BIP173_P2WPKH_UPPER, "mainnet", field="f") == (
        BIP173_P2WPKH_UPPER.lower()
    )
    assert address_script_pubkey(BIP173_P2WPKH_UPPER, "mainnet").hex() == BIP173_P2WPKH_SCRIPT
    assert (
        address_script_pubkey(BIP173_TESTNET_P2WSH, "testnet").hex() == BIP173_TESTNET_P2WSH_SCRIPT
    )
    assert address_kind(BIP350_P2TR, "mainnet") == "P2TR"
    assert "checksum" in refusal(BIP173_BAD_CHECKSUM, "mainnet")


def test_future_witness_versions_refused() -> None:
    assert "unsupported address type" in refusal(BIP350_WITNESS_V2, "mainnet")


def test_wrong_network_messages() -> None:
    mainnet = sample_addresses("mainnet")
    testnet = sample_addresses("testnet")
    regtest = sample_addresses("regtest")
    assert refusal(testnet["P2WPKH"], "mainnet") == (
        "wrong network: this is an address for testnet/signet, the service runs on mainnet"
    )
    assert refusal(mainnet["P2PKH"], "regtest") == (
        "wrong network: this is a mainnet address, the service runs on regtest"
    )
    assert "regtest" in refusal(regtest["P2WSH"], "testnet")
    # regtest segwit is bcrt1, so a tb1 address is wrong there...
    assert "testnet/signet" in refusal(testnet["P2TR"], "regtest")
    # ...but regtest shares the base58 prefixes with testnet and signet.
    assert validate_address(testnet["P2PKH"], "regtest", field="f") == regtest["P2PKH"]
    assert validate_address(testnet["P2SH"], "signet", field="f") == testnet["P2SH"]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("bc1" + "q" * 120, "too long"),
        ("bc1q w508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t4", "spaces"),
        ("bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t\u00e9", "non-ASCII"),
        ("hello", "not a valid Bitcoin address"),
        ("1BvBMSEYstWetqTFn5Au4m4GFg7xJaNVN3", "not a valid Bitcoin address"),
    ],
)
def test_garbage_refused(text: str, fragment: str) -> None:
    assert fragment in refusal(text, "mainnet")


def test_non_string_refused() -> None:
    with pytest.raises(InvalidInput):
        validate_address(42, "mainnet", field="f")  # type: ignore[arg-type]


def test_surrounding_whitespace_is_trimmed() -> None:
    address = sample_addresses("regtest")["P2WPKH"]
    assert validate_address(f"  {address}\n", "regtest", field="f") == address
