"""Wallet exports: every format is parsed back and checked against the loan."""

from __future__ import annotations

import json
from collections.abc import Callable

import bdkpython as bdk
import pytest
from embit.bip32 import HDKey as EmbitHDKey
from embit.descriptor import Descriptor as EmbitDescriptor

from custody.bitcoin.exports import (
    export_bsms,
    export_caravan,
    export_coldcard,
    export_descriptor,
    sanitise_wallet_name,
)
from pledge.descriptors import CollateralDescriptor, has_valid_checksum
from pledge.errors import Unsupported
from pledge.keys import FixedKey, HDKey, parse_hd_key
from pledge.network import NetworkName, bdk_network, bdk_network_kind, coin_type, embit_network

# BIP-129 round-2 descriptor records, NO_ENCRYPTION mode. Source: bitcoin/bips
# bip-0129.mediawiki, "Test Vectors" (my_multisig_wallet.bsms), copied verbatim.
BIP129_PUBKEYS_RECORD = """BSMS 1.0
wsh(sortedmulti(1,[59865f44/48'/0'/0'/2']026d15412460ba0d881c21837bb999233896085a9ed4e5445bd637c10e579768ba,[b7044ca6/48'/0'/0'/2']030baf0497ab406ff50cb48b4013abac8a0338758d2fd54cd934927afa57cc2062))#rzx9dffd
No path restrictions
bc1quqy523xu3l8che3s8vja8n33qtg0uyugr9l5z092s3wa50p8t7rqy6zumf"""
BIP129_XPUB_RECORD = """BSMS 1.0
wsh(sortedmulti(2,[1cf0bf7e/48'/0'/0'/2']xpub6FL8FhxNNUVnG64YurPd16AfGyvFLhh7S2uSsDqR3Qfcm6o9jtcMYwh6DvmcBF9qozxNQmTCVvWtxLpKTnhVLN3Pgnu2D3pAoXYFgVyd8Yz/**,[4fc1dd4a/48'/0'/0'/2']xpub6EebMbEps7ZcV3FYEnddRsvrFWDrt2tiPmCeM7pPXQEmphvq9ZfJ1LWFUDjf3vxCeBuPrfyGrMazWUsYsetrnHatQZVLJH7LsgCjtMqdzgj/**))
/0/*,/1/*
bc1qrgc6p3kylfztu06ysl752gwwuekhvtfh9vr7zg43jvu60mutamcsv948ej"""


def bsms_first_address(record: str, network: NetworkName) -> tuple[str, list[str]]:
    """Read a BSMS descriptor record the way a signer does (BIP-129 round 2):
    expand the template with the first path restriction and derive index 0 with
    both libraries. Returns (first address, expanded descriptors)."""
    lines = record.split("\n")
    assert len(lines) == 4
    assert lines[0] == "BSMS 1.0"
    template, restrictions = lines[1], lines[2]
    if restrictions == "No path restrictions":
        assert "/**" not in template
        expanded = [template]
    else:
        paths = restrictions.split(",")
        assert all(p.startswith("/") for p in paths)
        expanded = [template.replace("/**", p) for p in paths]
    first = expanded[0]
    from_embit = EmbitDescriptor.from_string(first).derive(0).address(embit_network(network))
    bdk_desc = bdk.Descriptor(first, bdk_network_kind(network))
    from_bdk = str(bdk_desc.derive_address(0, bdk_network(network)))
    assert from_embit == from_bdk
    return from_bdk, expanded


def parse_coldcard(text: str) -> dict[str, object]:
    """Read a Coldcard multisig file the way the firmware's from_simple_text does:
    `label: value` lines, '#' comments, `Derivation:` applies to following keys."""
    result: dict[str, object] = {"keys": []}
    derivation = None
    keys: list[tuple[str, str | None, str]] = []
    for raw in text.split("\n"):
        if raw.startswith("#") or ":" not in raw:
            continue
        label, value = (part.strip() for part in raw.split(":", 1))
        label = label.lower()
        if label in ("name", "policy", "format"):
            result[label] = value
        elif label == "derivation":
            derivation = value
        elif len(label) == 8:
            int(label, 16)
            keys.append((label, derivation, value))
    result["keys"] = keys
    return result


@pytest.fixture
def all_hd(hd_key: Callable[..., HDKey]) -> CollateralDescriptor:
    return CollateralDescriptor(
        (hd_key("miner"), hd_key("bank"), hd_key("arb", account=7)), "regtest"
    )


@pytest.fixture
def with_fixed(
    hd_key: Callable[..., HDKey], fixed_key: Callable[..., FixedKey]
) -> CollateralDescriptor:
    return CollateralDescriptor((hd_key("miner"), fixed_key("hsm"), hd_key("arb")), "regtest")


@pytest.fixture
def all_fixed(fixed_key: Callable[..., FixedKey]) -> CollateralDescriptor:
    return CollateralDescriptor((fixed_key("a"), fixed_key("b"), fixed_key("c")), "regtest")


# -- names -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Loan 42", "Loan 42"),
        ("Loan #42 for \u041e\u041e\u041e \u041c\u0430\u0439\u043d\u0435\u0440", "Loan -42 for"),
        ("a" * 40, "a" * 20),
        ("", "pledge-loan"),
        ("\u0416\u0416\u0416", "pledge-loan"),
        ("  tabs\tand\nnewlines ", "tabs-and-newlines"),
    ],
)
def test_sanitise_wallet_name(name: str, expected: str) -> None:
    cleaned = sanitise_wallet_name(name)
    assert cleaned == expected
    assert 1 <= len(cleaned) <= 20
    assert cleaned.isascii()
    assert cleaned.isprintable()


# -- descriptor export -----------------------------------------------------------------


def test_descriptor_export(with_fixed: CollateralDescriptor) -> None:
    exported = export_descriptor(with_fixed, "Loan 1")
    json.dumps(exported)  # must be JSON-serialisable as is
    assert exported["descriptor"] == with_fixed.descriptor
    assert exported["receive_descriptor"] == with_fixed.receive_descriptor
    assert exported["change_descriptor"] == with_fixed.change_descriptor
    assert exported["first_address"] == with_fixed.address(0)
    assert exported["network"] == "regtest"
    assert [k["party"] for k in exported["keys"]] == ["miner", "bank", "arbiter"]
    assert "HSM" in exported["note"]
    for desc in (exported["descriptor"], exported["receive_descriptor"]):
        assert has_valid_checksum(desc)
    # a descriptor wallet reading the receive descriptor finds the same first address
    bdk_desc = bdk.Descriptor(exported["receive_descriptor"], bdk.NetworkKind.TEST)
    assert str(bdk_desc.derive_address(0, bdk.Network.REGTEST)) == exported["first_address"]


# -- Coldcard ----------------------------------------------------------------------------


def test_coldcard_file_parses_back(all_hd: CollateralDescriptor) -> None:
    text = export_coldcard(all_hd, "Loan 42 / a very long loan name")
    parsed = parse_coldcard(text)
    assert parsed["name"] == "Loan 42 - a very lon"
    assert len(str(parsed["name"])) <= 20
    assert parsed["policy"] == "2 of 3"
    assert parsed["format"] == "P2WSH"
    expected = [
        (key.fingerprint, key.origin_path, key.xpub)
        for key in all_hd.keys
        if isinstance(key, HDKey)
    ]
    assert parsed["keys"] == expected
    assert ("m/48h/1h/7h/2h") in text  # per-key derivation, the arbiter's account 7
    assert all_hd.address(0) in text  # first address in a comment, for comparison


@pytest.mark.parametrize("fixture", ["with_fixed", "all_fixed"])
def test_coldcard_and_caravan_refuse_fixed_keys(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    cd: CollateralDescriptor = request.getfixturevalue(fixture)
    for export in (export_coldcard, export_caravan):
        with pytest.raises(Unsupported) as info:
            export(cd, "x")
        message = info.value.message
        assert "fixed HSM key" in message
        assert "Coldcard (and Ledger)" in message
        assert "every key is an xpub" in message
        for signer in ("Trezor", "Bitcoin Core", "BDK", "Sparrow"):
            assert signer in message


# -- BSMS --------------------------------------------------------------------------------


def test_bip129_vectors_read_by_our_reader() -> None:
    address, _ = bsms_first_address(BIP129_PUBKEYS_RECORD, "mainnet")
    assert address == BIP129_PUBKEYS_RECORD.split("\n")[3]
    assert has_valid_checksum(BIP129_PUBKEYS_RECORD.split("\n")[1])
    address, expanded = bsms_first_address(BIP129_XPUB_RECORD, "mainnet")
    assert address == BIP129_XPUB_RECORD.split("\n")[3]
    assert len(expanded) == 2


def test_bsms_all_hd(all_hd: CollateralDescriptor) -> None:
    record = export_bsms(all_hd, "ignored")
    lines = record.split("\n")
    assert lines[2] == "/0/*,/1/*"
    assert lines[1].count("/**") == 3
    address, expanded = bsms_first_address(record, "regtest")
    assert address == lines[3] == all_hd.address(0)
    assert [e.replace("/**", "") for e in expanded] == [
        all_hd.receive_descriptor.split("#")[0],
        all_hd.change_descriptor.split("#")[0],
    ]


def test_bsms_with_one_fixed_key(with_fixed: CollateralDescriptor) -> None:
    record = export_bsms(with_fixed, "x")
    lines = record.split("\n")
    assert lines[1].count("/**") == 2
    fixed = with_fixed.keys[1]
    assert isinstance(fixed, FixedKey)
    assert f",{fixed.public_key_hex}," in lines[1]
    address, expanded = bsms_first_address(record, "regtest")
    assert address == lines[3] == with_fixed.address(0)
    assert expanded[1] == with_fixed.change_descriptor.split("#")[0]


def test_bsms_all_fixed_matches_bip_shape(all_fixed: CollateralDescriptor) -> None:
    record = export_bsms(all_fixed, "x")
    lines = record.split("\n")
    assert lines[1] == all_fixed.descriptor
    assert lines[2] == "No path restrictions"
    address, _ = bsms_first_address(record, "regtest")
    assert address == lines[3] == all_fixed.address(0)


# -- Caravan -----------------------------------------------------------------------------


@pytest.mark.parametrize("network", ["mainnet", "testnet", "signet", "regtest"])
def test_caravan_config(network: NetworkName) -> None:
    keys = []
    params = embit_network(network)
    for i in range(3):
        master = EmbitHDKey.from_seed(bytes([i + 1]) * 32, version=params["xprv"])
        path = f"m/48h/{coin_type(network)}h/{i}h/2h"
        xpub = master.derive(path).to_public().to_base58(version=params["xpub"])
        keys.append(
            parse_hd_key(f"[{master.my_fingerprint.hex()}{path[1:]}]{xpub}", network, field="k")
        )
    cd = CollateralDescriptor((keys[0], keys[1], keys[2]), network)
    config = json.loads(json.dumps(export_caravan(cd, "Loan 7")))
    assert config["name"] == "Loan 7"
    assert config["addressType"] == "P2WSH"
    assert config["network"] == network
    assert config["quorum"] == {"requiredSigners": 2, "totalSigners": 3}
    assert config["startingAddressIndex"] == 0
    extended = config["extendedPublicKeys"]
    assert [e["name"] for e in extended] == ["miner", "bank", "arbiter"]
    assert [e["xpub"] for e in extended] == [k.xpub for k in keys]
    assert [e["xfp"] for e in extended] == [k.fingerprint for k in keys]
    assert all(e["method"] == "text" for e in extended)
    # Caravan's path regex accepts only ' as the hardened marker
    coin = coin_type(network)
    assert [e["bip32Path"] for e in extended] == [f"m/48'/{coin}'/{i}'/2'" for i in range(3)]
