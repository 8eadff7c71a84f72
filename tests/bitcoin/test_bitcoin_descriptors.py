# ruff: noqa: E501  (published test vectors are copied verbatim, unwrapped)
"""Collateral descriptor: library cross-checks and published BIP test vectors."""

from __future__ import annotations

import os
from collections.abc import Callable
from unittest import mock

import bdkpython as bdk
import pytest
from embit import hashes
from embit.bip32 import HDKey as EmbitHDKey
from embit.descriptor import Descriptor as EmbitDescriptor
from embit.script import Script, p2wsh

from pledge.descriptors import (
    CollateralDescriptor,
    descriptor_checksum,
    has_valid_checksum,
    parse_collateral_descriptor,
)
from pledge.errors import InvalidInput, LibraryDisagreement
from pledge.keys import (
    CollateralKey,
    FixedKey,
    HDKey,
    parse_fixed_key,
    parse_hd_key,
)
from pledge.network import NetworkName, embit_network
from regtest.testkeys import make_fixed_test_key, make_test_key_text

# ---------------------------------------------------------------------------
# Published vectors. Source: bitcoin/bips, bip-0380.mediawiki "Test Vectors"
# (checksum section), bip-0383.mediawiki "Test Vectors", bip-0389.mediawiki
# "Test Vectors". Copied verbatim.
# ---------------------------------------------------------------------------

BIP380_VALID_CHECKSUM = "raw(deadbeef)#89f8spxm"
BIP380_INVALID = {
    "missing checksum": "raw(deadbeef)#",
    "too long checksum": "raw(deadbeef)#89f8spxmx",
    "too short checksum": "raw(deadbeef)#89f8spx",
    "error in payload": "raw(deedbeef)#89f8spxm",
    "error in checksum": "raw(deedbeef)##9f8spxm",
    "invalid characters in payload": "raw(\u00dc)#00000000",
}

X1 = "xpub6ERApfZwUNrhLCkDtcHTcxd75RbzS1ed54G1LkBUHQVHQKqhMkhgbmJbZRkrgZw4koxb5JaHWkY4ALHY2grBGRjaDMzQLcgJvLJuZZvRcEL"
X2 = "xpub68NZiKmJWnxxS6aaHmn81bvJeTESw724CRDs6HbuccFQN9Ku14VQrADWgqbhhTHBaohPX4CjNLf9fq9MYo6oDaPPLPxSb7gwQN3ih19Zm4Y"
X3 = "xpub661MyMwAqRbcGDZQUKLqmWodYLcoBQnQH33yYkkF3jjxeLvY8qr2wWGEWkiKFaaQfJCoi3HeEq3Dc5DptfbCyjD38fNhSqtKc1UHaP4ba3t"
XPRV_A = "xprvA1RpRA33e1JQ7ifknakTFpgNXPmW2YvmhqLQYMmrj4xJXXWYpDPS3xz7iAxn8L39njGVyuoseXzU6rcxFLJ8HFsTjSyQbLYnMpCqE2VbFWc"
XPRV_B = "xprv9uPDJpEQgRQfDcW7BkF7eTya6RPxXeJCqCJGHuCJ4GiRVLzkTXBAJMu2qaMWPrS7AANYqdq6vcBcBUdJCVVFceUvJFjaPdGZ2y9WACViL4L"

# BIP-383: sortedmulti(2,X1/*,X2/0/0/*) -> scripts at index 0, 1, 2.
BIP383_SORTEDMULTI = f"sortedmulti(2,{X1}/*,{X2}/0/0/*)"
BIP383_SORTEDMULTI_SCRIPTS = [
    "5221025d5fc65ebb8d44a5274b53bac21ff8307fec2334a32df05553459f8b1f7fe1b62102fbd47cc8034098f0e6a94c6aeee8528abf0a2153a5d8e46d325b7284c046784652ae",
    "52210264fd4d1f5dea8ded94c61e9641309349b62f27fbffe807291f664e286bfbe6472103f4ece6dfccfa37b211eb3d0af4d0c61dba9ef698622dc17eecdf764beeb005a652ae",
    "5221022ccabda84c30bad578b13c89eb3b9544ce149787e5b538175b1d1ba259cbb83321024d902e1a2fc7a8755ab5b694c575fce742c48d9ff192e63df5193e4c7afe1f9c52ae",
]
# BIP-383: sh(multi(2,[00000000/111'/222]xprvA...,xprv9uP.../0)) -> one script.
BIP383_SH_MULTI = f"sh(multi(2,[00000000/111'/222]{XPRV_A},{XPRV_B}/0))"
BIP383_SH_MULTI_SCRIPT = "a91445a9a622a8b0a1269944be477640eedc447bbd8487"
# BIP-383: multi() with a threshold of 0 is invalid.
BIP383_THRESHOLD_ZERO = (
    "multi(0,03a34b99f22c790c4e36b2b3c2c35a36db06226e41c692fc82b8b56ac1c540c5bd,"
    "04a34b99f22c790c4e36b2b3c2c35a36db06226e41c692fc82b8b56ac1c540c5bd5b8dec5235a0fa8722476c7"
    "709c02559e3aa73aa03918ba2d492eea75abea235)"
)

# BIP-389: a multipath descriptor and the descriptors it expands into.
BIP389_MULTIPATH = f"sh(multi(2,{X1}/<1;2;3>/0/*,{X2}/0/*,{X3}/0/0/<3;4;5>/*))"
BIP389_EXPANDED = [
    f"sh(multi(2,{X1}/1/0/*,{X2}/0/*,{X3}/0/0/3/*))",
    f"sh(multi(2,{X1}/2/0/*,{X2}/0/*,{X3}/0/0/4/*))",
    f"sh(multi(2,{X1}/3/0/*,{X2}/0/*,{X3}/0/0/5/*))",
]
BIP389_INVALID = {
    "multiple multipath specifiers": (
        "pkh(xprv9s21ZrQH143K31xYSDQpPDxsXRTUcvj2iNHm5NUtrGiGG5e2DtALGdso3pGz6ssrdK4PFmM8NSpSBHNqPqm"
        "55Qn3LqFtT2emdEXVYsCzC2U/<0;1>/<2;3>)"
    ),
    "multipath in origin": f"pkh([deadbeef/<0;1>]{X3}/0)".replace(
        X3,
        "xpub661MyMwAqRbcFW31YEwpkMuc5THy2PSt5bDMsktWQcFF8syAmRUapSCGu8ED9W6oDMSgv6Zz8idoc4a6mr8BDzTJY47LJhkJ8UB7WEGuduB",
    ),
    "empty multipath": (
        "wpkh(xpub661MyMwAqRbcFW31YEwpkMuc5THy2PSt5bDMsktWQcFF8syAmRUapSCGu8ED9W6oDMSgv6Zz8idoc4a6mr8"
        "BDzTJY47LJhkJ8UB7WEGuduB/<>/*)"
    ),
    "missing multipath start": (
        "wpkh(xpub661MyMwAqRbcFW31YEwpkMuc5THy2PSt5bDMsktWQcFF8syAmRUapSCGu8ED9W6oDMSgv6Zz8idoc4a6mr8"
        "BDzTJY47LJhkJ8UB7WEGuduB/0>/*)"
    ),
    "missing multipath end": (
        "wpkh(xpub661MyMwAqRbcFW31YEwpkMuc5THy2PSt5bDMsktWQcFF8syAmRUapSCGu8ED9W6oDMSgv6Zz8idoc4a6mr8"
        "BDzTJY47LJhkJ8UB7WEGuduB/<0/*)"
    ),
    "missing index": (
        "wpkh(xpub661MyMwAqRbcFW31YEwpkMuc5THy2PSt5bDMsktWQcFF8syAmRUapSCGu8ED9W6oDMSgv6Zz8idoc4a6mr8"
        "BDzTJY47LJhkJ8UB7WEGuduB/<0;>/*)"
    ),
}


def strip_checksum(desc: str) -> str:
    return desc.split("#", 1)[0]


# -- BIP-380 ---------------------------------------------------------------------


def test_bip380_valid_checksum() -> None:
    assert descriptor_checksum("raw(deadbeef)") == "89f8spxm"
    assert has_valid_checksum(BIP380_VALID_CHECKSUM)


@pytest.mark.parametrize("case", sorted(BIP380_INVALID))
def test_bip380_invalid_checksums(case: str) -> None:
    assert not has_valid_checksum(BIP380_INVALID[case])


def test_bip380_no_checksum_is_not_a_valid_checksum() -> None:
    assert not has_valid_checksum("raw(deadbeef)")


def test_checksum_helper_refuses_text_with_checksum() -> None:
    with pytest.raises(ValueError):
        descriptor_checksum(BIP380_VALID_CHECKSUM)


# -- BIP-383 ---------------------------------------------------------------------


def test_bip383_sortedmulti_scripts_both_libraries() -> None:
    # Wrapped in wsh() so bdkpython will parse it; the multisig script is the
    # witness script and the output is its P2WSH.
    desc = f"wsh({BIP383_SORTEDMULTI})"
    embit_desc = EmbitDescriptor.from_string(desc)
    bdk_desc = bdk.Descriptor(desc, bdk.NetworkKind.MAIN)
    for index, script_hex in enumerate(BIP383_SORTEDMULTI_SCRIPTS):
        script = bytes.fromhex(script_hex)
        assert embit_desc.derive(index).witness_script().data == script
        spk = bdk_desc.derive_address(index, bdk.Network.BITCOIN).script_pubkey().to_bytes()
        assert spk == b"\x00\x20" + hashes.sha256(script)


def test_bip383_sh_multi_both_libraries() -> None:
    # embit applies the fixed "/0" step only in derive(): script_pubkey() on the
    # underived descriptor gives a different script, so always derive.
    embit_spk = EmbitDescriptor.from_string(BIP383_SH_MULTI).derive(0).script_pubkey().data
    bdk_spk = (
        bdk.Descriptor(BIP383_SH_MULTI, bdk.NetworkKind.MAIN)
        .derive_address(0, bdk.Network.BITCOIN)
        .script_pubkey()
        .to_bytes()
    )
    assert embit_spk.hex() == BIP383_SH_MULTI_SCRIPT
    assert bdk_spk.hex() == BIP383_SH_MULTI_SCRIPT


def test_bip383_threshold_zero_refused() -> None:
    with pytest.raises(Exception):  # noqa: B017 - any library error is a refusal
        bdk.Descriptor(f"sh({BIP383_THRESHOLD_ZERO})", bdk.NetworkKind.MAIN)
    with pytest.raises(Exception):  # noqa: B017
        EmbitDescriptor.from_string(f"sh({BIP383_THRESHOLD_ZERO})")


# -- BIP-389 ---------------------------------------------------------------------


def test_bip389_expansion_both_libraries() -> None:
    singles = bdk.Descriptor(BIP389_MULTIPATH, bdk.NetworkKind.MAIN).to_single_descriptors()
    assert [strip_checksum(str(d)) for d in singles] == BIP389_EXPANDED
    embit_desc = EmbitDescriptor.from_string(BIP389_MULTIPATH)
    assert embit_desc.num_branches == 3
    assert [embit_desc.branch(i).to_string() for i in range(3)] == BIP389_EXPANDED


@pytest.mark.parametrize("case", sorted(BIP389_INVALID))
def test_bip389_invalid_refused_by_both(case: str) -> None:
    text = BIP389_INVALID[case]
    with pytest.raises(Exception):  # noqa: B017
        bdk.Descriptor(text, bdk.NetworkKind.MAIN)
    with pytest.raises(Exception):  # noqa: B017
        EmbitDescriptor.from_string(text)


def test_our_multipath_is_receive_then_change(hd_key: Callable[..., HDKey]) -> None:
    cd = CollateralDescriptor((hd_key("m"), hd_key("b"), hd_key("a")), "regtest")
    singles = bdk.Descriptor(cd.descriptor, bdk.NetworkKind.TEST).to_single_descriptors()
    assert len(singles) == 2
    as_h = [strip_checksum(str(d)).replace("'", "h") for d in singles]
    assert as_h == [strip_checksum(cd.receive_descriptor), strip_checksum(cd.change_descriptor)]


# -- the collateral descriptor -------------------------------------------------------


def test_descriptor_text(hd_key: Callable[..., HDKey], fixed_key: Callable[..., FixedKey]) -> None:
    miner, bank, arbiter = hd_key("miner"), fixed_key("bank"), hd_key("arbiter")
    cd = CollateralDescriptor((miner, bank, arbiter), "regtest")
    body = (
        f"wsh(sortedmulti(2,{miner.descriptor_key},{bank.public_key_hex},{arbiter.descriptor_key}))"
    )
    assert cd.descriptor == f"{body}#{descriptor_checksum(body)}"
    assert has_valid_checksum(cd.descriptor)
    assert "/<0;1>/*" not in cd.receive_descriptor
    assert f"{miner.key_expression}/0/*" in cd.receive_descriptor
    assert f"{miner.key_expression}/1/*" in cd.change_descriptor
    assert bank.public_key_hex in cd.change_descriptor
    assert has_valid_checksum(cd.receive_descriptor)
    assert has_valid_checksum(cd.change_descriptor)
    assert cd.has_wildcard
    assert cd.key_set_identity == frozenset({miner.identity, bank.identity, arbiter.identity})


def test_checksum_accepted_by_bdk_and_rejected_when_wrong(hd_key: Callable[..., HDKey]) -> None:
    cd = CollateralDescriptor((hd_key("1"), hd_key("2"), hd_key("3")), "testnet")
    bdk.Descriptor(cd.descriptor, bdk.NetworkKind.TEST)  # bdk verifies our checksum
    body, checksum = cd.descriptor.split("#")
    wrong = checksum[:-1] + ("q" if checksum[-1] != "q" else "p")
    with pytest.raises(Exception):  # noqa: B017
        bdk.Descriptor(f"{body}#{wrong}", bdk.NetworkKind.TEST)


def _random_hd(network: NetworkName) -> HDKey:
    return parse_hd_key(make_test_key_text(os.urandom(32), network), network, field="k")


def _random_fixed(network: NetworkName) -> FixedKey:
    return parse_fixed_key(make_fixed_test_key(os.urandom(32), network)[1], field="k")


def _independent_address(cd: CollateralDescriptor, index: int, change: bool) -> str:
    """Rebuild the address from the raw keys with embit primitives only."""
    pubkeys = []
    for key in cd.keys:
        if isinstance(key, HDKey):
            pubkeys.append(key.public_key(int(change), index))
        else:
            pubkeys.append(key.public_key)
    pubkeys.sort()
    script = b"\x52" + b"".join(b"\x21" + pk for pk in pubkeys) + b"\x53\xae"
    address: str = p2wsh(Script(script)).address(embit_network(cd.network))
    return address


@pytest.mark.parametrize("network", ["regtest", "testnet", "signet", "mainnet"])
@pytest.mark.parametrize("shape", ["hd", "one_fixed"])
def test_libraries_agree_on_random_key_sets(network: NetworkName, shape: str) -> None:
    for _ in range(3):
        if network == "mainnet":
            keys_list: list[HDKey | FixedKey] = []
            for _k in range(3):
                master = EmbitHDKey.from_seed(os.urandom(32))
                xpub = master.derive("m/48h/0h/0h/2h").to_public().to_base58()
                keys_list.append(
                    parse_hd_key(
                        f"[{master.my_fingerprint.hex()}/48h/0h/0h/2h]{xpub}", network, field="k"
                    )
                )
        else:
            keys_list = [_random_hd(network) for _k in range(3)]
        if shape == "one_fixed":
            keys_list[1] = _random_fixed("regtest")
        cd = CollateralDescriptor((keys_list[0], keys_list[1], keys_list[2]), network)
        for index in [0, 1, 2, 17, 999, 2**31 - 1]:
            for change in (False, True):
                address = cd.address(index, change=change)  # raises if libraries disagree
                assert address == _independent_address(cd, index, change)
                spk = cd.script_pubkey(index, change=change)
                ws = cd.witness_script(index, change=change)
                assert spk == b"\x00\x20" + hashes.sha256(ws)
        assert cd.address(0) != cd.address(1)
        assert cd.address(0) != cd.address(0, change=True)


def test_many_indexes_agree(hd_key: Callable[..., HDKey]) -> None:
    cd = CollateralDescriptor((hd_key("x"), hd_key("y"), hd_key("z")), "regtest")
    addresses = {cd.address(i) for i in range(200)}
    assert len(addresses) == 200
    assert all(a.startswith("bcrt1q") for a in addresses)


def test_all_fixed_has_exactly_one_address(fixed_key: Callable[..., FixedKey]) -> None:
    cd = CollateralDescriptor((fixed_key("a"), fixed_key("b"), fixed_key("c")), "regtest")
    assert not cd.has_wildcard
    assert cd.receive_descriptor == cd.change_descriptor == cd.descriptor
    assert cd.address(0) == cd.address(0, change=True) == _independent_address(cd, 0, False)
    with pytest.raises(InvalidInput) as info:
        cd.address(1)
    assert info.value.field == "index"
    assert "exactly one address" in info.value.message


@pytest.mark.parametrize("index", [-1, 2**31, True, 1.0, "0"])
def test_bad_index_refused(hd_key: Callable[..., HDKey], index: object) -> None:
    cd = CollateralDescriptor((hd_key("x"), hd_key("y"), hd_key("z")), "regtest")
    with pytest.raises(InvalidInput) as info:
        cd.address(index)  # type: ignore[arg-type]
    assert info.value.field == "index"


def test_same_key_twice_refused(hd_key: Callable[..., HDKey]) -> None:
    miner = hd_key("same")
    # the same account xpub, written as Vpub and with another claimed origin
    disguised = parse_hd_key(f"[0badf00d/48h/1h/0h/2h]{miner.xpub}", "regtest", field="k")
    with pytest.raises(InvalidInput) as info:
        CollateralDescriptor((miner, hd_key("other"), disguised), "regtest")
    assert info.value.field == "keys"
    assert "miner and arbiter keys are the same key" in info.value.message


def test_same_fixed_key_twice_refused(fixed_key: Callable[..., FixedKey]) -> None:
    with pytest.raises(InvalidInput, match="same key"):
        CollateralDescriptor((fixed_key("a"), fixed_key("a"), fixed_key("b")), "regtest")


def test_key_from_other_network_refused(hd_key: Callable[..., HDKey]) -> None:
    master = EmbitHDKey.from_seed(os.urandom(32))
    xpub = master.derive("m/48h/0h/0h/2h").to_public().to_base58()
    mainnet_key = HDKey(master.my_fingerprint.hex(), "m/48h/0h/0h/2h", xpub)
    with pytest.raises(InvalidInput) as info:
        CollateralDescriptor((hd_key("a"), hd_key("b"), mainnet_key), "regtest")
    assert info.value.field == "keys"


def test_key_set_identity_detects_reuse_across_loans(
    hd_key: Callable[..., HDKey], fixed_key: Callable[..., FixedKey]
) -> None:
    a, b, c = hd_key("a"), fixed_key("b"), hd_key("c")
    one = CollateralDescriptor((a, b, c), "regtest")
    reordered = CollateralDescriptor((c, b, a), "regtest")
    assert one.key_set_identity == reordered.key_set_identity
    other = CollateralDescriptor((a, b, hd_key("d")), "regtest")
    assert one.key_set_identity != other.key_set_identity


def test_disagreement_is_loud(hd_key: Callable[..., HDKey]) -> None:
    cd = CollateralDescriptor((hd_key("x"), hd_key("y"), hd_key("z")), "regtest")
    other = CollateralDescriptor((hd_key("p"), hd_key("q"), hd_key("r")), "regtest")
    # make bdkpython answer with another descriptor's branch
    cd._bdk_branches = other._bdk_branches
    with pytest.raises(LibraryDisagreement):
        cd.address(0)
    with pytest.raises(LibraryDisagreement):
        cd.script_pubkey(0)


def test_bdk_refusal_is_reported_as_internal(hd_key: Callable[..., HDKey]) -> None:
    with (
        mock.patch.object(bdk, "Descriptor", side_effect=RuntimeError("boom")),
        pytest.raises(LibraryDisagreement),
    ):
        CollateralDescriptor((hd_key("x"), hd_key("y"), hd_key("z")), "regtest")


# -- round trip ---------------------------------------------------------------------


def test_parse_round_trip(hd_key: Callable[..., HDKey], fixed_key: Callable[..., FixedKey]) -> None:
    key_sets: list[tuple[CollateralKey, CollateralKey, CollateralKey]] = [
        (hd_key("a"), hd_key("b"), hd_key("c")),
        (hd_key("a"), fixed_key("b"), hd_key("c")),
        (fixed_key("a"), fixed_key("b"), fixed_key("c")),
    ]
    for keys in key_sets:
        cd = CollateralDescriptor(keys, "regtest")
        again = parse_collateral_descriptor(cd.descriptor, "regtest")
        assert again == cd
        assert again.keys == cd.keys
        assert parse_collateral_descriptor(strip_checksum(cd.descriptor), "regtest") == cd


def test_parse_refusals(hd_key: Callable[..., HDKey]) -> None:
    cd = CollateralDescriptor((hd_key("a"), hd_key("b"), hd_key("c")), "regtest")
    body, checksum = cd.descriptor.split("#")
    bad_inputs = {
        "": "empty",
        f"{body}#{checksum[::-1]}": "checksum",
        body.replace("sortedmulti(2", "sortedmulti(1"): "2-of-3",
        body.replace("wsh(", "sh(", 1): "2-of-3",
        body.replace("/<0;1>/*", "/0/*", 1): "<0;1>",
        body.replace("1h/0h/2h", "1h/0h/1h", 1): "",
    }
    for text, fragment in bad_inputs.items():
        with pytest.raises(InvalidInput) as info:
            parse_collateral_descriptor(text, "regtest")
        assert info.value.field == "descriptor"
        assert fragment in info.value.message
    with pytest.raises(InvalidInput, match="wrong network"):
        parse_collateral_descriptor(cd.descriptor, "mainnet")
