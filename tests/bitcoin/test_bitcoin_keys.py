"""Key parsing: every way a pasted key can be wrong gets a clear, field-tagged error."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import bdkpython as bdk
import pytest
from embit import base58
from embit.bip32 import HDKey as EmbitHDKey
from embit.networks import NETWORKS

from pledge.errors import InvalidInput, Unsupported
from pledge.keys import FixedKey, HDKey, parse_fixed_key, parse_hd_key
from pledge.network import (
    NetworkName,
    bdk_network,
    bdk_network_kind,
    check_network,
    coin_type,
    embit_network,
)
from regtest.testkeys import make_fixed_test_key, make_test_key, make_test_key_text

SEED = hashlib.sha256(b"keys-test").digest()


def refused(text: str, network: NetworkName = "regtest", field: str = "miner_key") -> str:
    with pytest.raises(InvalidInput) as info:
        parse_hd_key(text, network, field=field)
    assert info.value.field == field
    return info.value.message


# embit names the test-network SLIP-132 versions after their mainnet twins.
EMBIT_TEST_NAMES = {"tpub": "xpub", "upub": "ypub", "vpub": "zpub", "Upub": "Ypub", "Vpub": "Zpub"}


def reencode(xpub: str, version_name: str) -> str:
    key = EmbitHDKey.from_base58(xpub)
    encoded: str = key.to_base58(version=NETWORKS["test"][EMBIT_TEST_NAMES[version_name]])
    return encoded


# -- network mapping -------------------------------------------------------


def test_network_mapping() -> None:
    assert embit_network("mainnet")["bech32"] == "bc"
    assert embit_network("regtest")["bech32"] == "bcrt"
    assert embit_network("signet")["bech32"] == "tb"
    assert bdk_network("testnet") == bdk.Network.TESTNET
    assert bdk_network("regtest") == bdk.Network.REGTEST
    assert bdk_network_kind("mainnet") == bdk.NetworkKind.MAIN
    assert bdk_network_kind("signet") == bdk.NetworkKind.TEST
    assert [coin_type(n) for n in ("mainnet", "testnet", "signet", "regtest")] == [0, 1, 1, 1]
    with pytest.raises(InvalidInput):
        check_network("testnet4")


# -- the happy path ----------------------------------------------------------


@pytest.mark.parametrize("network", ["testnet", "signet", "regtest", "mainnet"])
def test_parse_canonical_key(network: NetworkName) -> None:
    params = embit_network(network)
    master = EmbitHDKey.from_seed(SEED, version=params["xprv"])
    coin = coin_type(network)
    account = master.derive(f"m/48h/{coin}h/3h/2h").to_public()
    xpub = account.to_base58(version=params["xpub"])
    fp = master.my_fingerprint.hex()
    key = parse_hd_key(f"[{fp}/48'/{coin}'/3'/2']{xpub}", network, field="k")
    assert key == HDKey(fingerprint=fp, origin_path=f"m/48h/{coin}h/3h/2h", xpub=xpub)
    assert key.descriptor_key == f"[{fp}/48h/{coin}h/3h/2h]{xpub}/<0;1>/*"
    assert xpub.startswith("xpub" if network == "mainnet" else "tpub")
    # derived key = the master's own derivation at the full path
    expected = master.derive(f"m/48h/{coin}h/3h/2h/1/7").key.get_public_key().sec()
    assert key.public_key(1, 7) == expected
    fingerprint, path = key.derivation(1, 7)
    assert fingerprint == master.my_fingerprint
    assert path == [48 + 2**31, coin + 2**31, 3 + 2**31, 2 + 2**31, 1, 7]


@pytest.mark.parametrize("suffix", ["", "/<0;1>/*", "/**"])
@pytest.mark.parametrize("marker", ["h", "'", "H"])
def test_accepted_spellings_are_canonicalised(suffix: str, marker: str) -> None:
    master, origin, xpub = make_test_key(SEED, "regtest")
    fp = master.my_fingerprint.hex()
    text = f"  [{fp.upper()}/48{marker}/1{marker}/0{marker}/2{marker}]{xpub}{suffix}\n"
    key = parse_hd_key(text, "regtest", field="k")
    assert key.fingerprint == fp
    assert key.origin_path == "m/48h/1h/0h/2h"
    assert key.descriptor_key == f"{origin}{xpub}/<0;1>/*"


@pytest.mark.parametrize("version_name", ["tpub", "upub", "vpub", "Upub", "Vpub"])
def test_slip132_test_versions_reencoded_with_same_identity(version_name: str) -> None:
    _, origin, tpub = make_test_key(SEED, "regtest")
    slip = reencode(tpub, version_name)
    assert slip.startswith(version_name)
    key = parse_hd_key(origin + slip, "regtest", field="k")
    assert key.xpub == tpub
    assert key.identity == parse_hd_key(origin + tpub, "regtest", field="k").identity


@pytest.mark.parametrize("version_name", ["xpub", "ypub", "zpub", "Ypub", "Zpub"])
def test_slip132_mainnet_versions(version_name: str) -> None:
    master = EmbitHDKey.from_seed(SEED)
    account = master.derive("m/48h/0h/0h/2h").to_public()
    slip = account.to_base58(version=NETWORKS["main"][version_name])
    key = parse_hd_key(f"[{master.my_fingerprint.hex()}/48h/0h/0h/2h]{slip}", "mainnet", field="k")
    assert key.xpub == account.to_base58(version=NETWORKS["main"]["xpub"])


def test_identity_ignores_claimed_origin(hd_key: Callable[..., HDKey]) -> None:
    key = hd_key("alice")
    other_origin = parse_hd_key(f"[deadbeef/48h/1h/0h/2h]{key.xpub}", "regtest", field="k")
    assert other_origin.identity == key.identity
    assert hd_key("bob").identity != key.identity


# -- refusals ----------------------------------------------------------------


def test_private_keys_refused() -> None:
    master, origin, _ = make_test_key(SEED, "regtest")
    account_prv = master.derive("m/48h/1h/0h/2h")
    for version_name in ("xprv", "Zprv"):  # tprv and Vprv in embit's test table
        tprv = account_prv.to_base58(version=NETWORKS["test"][version_name])
        assert "private keys are never accepted" in refused(origin + tprv)
        assert "private keys are never accepted" in refused(tprv)


def test_wrong_network_both_ways() -> None:
    master = EmbitHDKey.from_seed(SEED)
    fp = master.my_fingerprint.hex()
    xpub = master.derive("m/48h/0h/0h/2h").to_public().to_base58()
    message = refused(f"[{fp}/48h/0h/0h/2h]{xpub}", "regtest")
    assert message == "wrong network: this is a mainnet xpub, the service runs on regtest"
    tpub_text = make_test_key_text(SEED, "testnet")
    message = refused(tpub_text, "mainnet")
    assert message.startswith("wrong network: this is a test-network")
    assert message.endswith("the service runs on mainnet")


def test_bad_checksum() -> None:
    text = make_test_key_text(SEED, "regtest")
    last = text[-1]
    broken = text[:-1] + ("2" if last != "2" else "3")
    assert "checksum does not match" in refused(broken)


def test_missing_origin() -> None:
    _, _, xpub = make_test_key(SEED, "regtest")
    message = refused(xpub)
    assert "missing key origin" in message
    assert "48h/1h/<account>h/2h" in message
    assert "no derivation path" in refused(f"[deadbeef]{xpub}")
    assert "not closed" in refused(f"[deadbeef/48h{xpub}")


def test_origin_depth_mismatch() -> None:
    master, _, xpub = make_test_key(SEED, "regtest")
    fp = master.my_fingerprint.hex()
    assert "depth 4" in refused(f"[{fp}/48h/1h/0h]{xpub}")
    assert "depth 4" in refused(f"[{fp}/48h/1h/0h/2h/0]{xpub}")


@pytest.mark.parametrize(
    ("path", "network"),
    [
        ("m/48h/1h/0h/1h", "regtest"),  # P2SH-P2WSH script type
        ("m/48h/0h/0h/2h", "regtest"),  # mainnet coin type on regtest
        ("m/84h/1h/0h/0h", "regtest"),  # single-sig purpose
        ("m/48h/1h/0/2h", "regtest"),  # unhardened account
    ],
)
def test_non_bip48_paths_refused(path: str, network: NetworkName) -> None:
    params = embit_network(network)
    master = EmbitHDKey.from_seed(SEED, version=params["xprv"])
    xpub = master.derive(path).to_public().to_base58(version=params["xpub"])
    origin = path.replace("m", master.my_fingerprint.hex(), 1)
    message = refused(f"[{origin}]{xpub}", network)
    assert "expected m/48h/1h/<account>h/2h" in message


def test_depth1_parent_fingerprint_mismatch() -> None:
    params = embit_network("regtest")
    master = EmbitHDKey.from_seed(SEED, version=params["xprv"])
    child = master.derive("m/48h").to_public().to_base58(version=params["xpub"])
    message = refused(f"[deadbeef/48h]{child}")
    assert "parent fingerprint" in message
    # and with the right fingerprint it fails only on the BIP-48 path rule
    assert "BIP-48" in refused(f"[{master.my_fingerprint.hex()}/48h]{child}")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("x" * 201, "too long"),
        ("[deadbeef/48h/1h/0h/2h]tpub\u00e9", "non-ASCII"),
        ("[deadbeef/48h/1h/0h/2h] tpubXYZ", "spaces"),
        ("[deadbeef/48h/1h/0h/2h]tpub\x00", "control"),
        ("[deadbeeg/48h/1h/0h/2h]tpubXYZ", "fingerprint"),
        ("[deadbeef/48x/1h/0h/2h]tpubXYZ", "not a number"),
        ("[deadbeef/99999999999h/1h/0h/2h]tpubXYZ", "not a number"),
        ("[deadbeef/48h/1h/0h/2h]", "missing"),
        ("[deadbeef/48h/1h/0h/2h]tpub0OIl", "not valid base58"),
        (
            "[deadbeef/48h/1h/0h/2h]tpubD6NzVbkrYhZ4XgiXtGrdW5XDAPFCL9h7we1vwNCpn8tGbBcgfVYjXy",
            "checksum",
        ),
        ("[deadbeef/48h/1h/0h/2h]" + base58.encode_check(b"\x00" * 20), "wrong length"),
        (
            "[deadbeef/48h/1h/0h/2h]" + base58.encode_check(b"\x01\x02\x03\x04" + b"\x00" * 74),
            "unknown extended key version",
        ),
    ],
)
def test_garbage_refused(text: str, fragment: str) -> None:
    assert fragment in refused(text)


def test_non_string_refused() -> None:
    with pytest.raises(InvalidInput):
        parse_hd_key(None, "regtest", field="k")  # type: ignore[arg-type]


@pytest.mark.parametrize("suffix", ["/0/*", "/<0;1>", "/*", "/1/2/*", "/<1;0>/*", "/**/x"])
def test_other_suffixes_refused(suffix: str) -> None:
    text = make_test_key_text(SEED, "regtest")
    assert "unexpected derivation" in refused(text + suffix)


def test_invalid_point_in_xpub() -> None:
    _, origin, xpub = make_test_key(SEED, "regtest")
    raw = bytearray(base58.decode_check(xpub))
    raw[45:] = b"\x02" + b"\xff" * 32  # x >= field prime: not a point
    assert "valid public key" in refused(origin + base58.encode_check(bytes(raw)))


# -- fixed keys ----------------------------------------------------------------


def test_fixed_key_roundtrip() -> None:
    private, hex_key = make_fixed_test_key(SEED, "regtest")
    key = parse_fixed_key(" " + hex_key.upper() + " ", field="bank_key")
    assert key == FixedKey(public_key_hex=hex_key)
    assert key.descriptor_key == hex_key
    assert key.public_key == private.get_public_key().sec()
    assert key.identity == "pk:" + hex_key


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty"),
        ("zz" * 33, "hexadecimal"),
        ("04" + "11" * 64, "uncompressed"),
        ("02" + "11" * 31, "66 hex characters"),
        ("05" + "11" * 32, "starts with 02 or 03"),
        ("02" + "ff" * 32, "not a point"),
        ("02 " + "11" * 32, "spaces"),
    ],
)
def test_fixed_key_refusals(text: str, fragment: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_fixed_key(text, field="bank_key")
    assert info.value.field == "bank_key"
    assert fragment in info.value.message


# -- the test-key factory ------------------------------------------------------


def test_test_keys_refuse_mainnet() -> None:
    with pytest.raises(Unsupported):
        make_test_key(SEED, "mainnet")
    with pytest.raises(Unsupported):
        make_fixed_test_key(SEED, "mainnet")


def test_test_key_factory_is_deterministic_and_parseable() -> None:
    master, origin, xpub = make_test_key(SEED, "signet", account=5)
    assert origin == f"[{master.my_fingerprint.hex()}/48h/1h/5h/2h]"
    assert make_test_key(SEED, "signet", account=5)[2] == xpub
    assert make_test_key(SEED, "signet", account=6)[2] != xpub
    assert parse_hd_key(origin + xpub, "signet", field="k").origin_path == "m/48h/1h/5h/2h"
