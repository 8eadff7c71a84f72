"""Wallet exports: every format is read back by a reader written from the format's own
specification or reference source (tests/support/wallet_formats) and must yield the
loan's receive and change addresses; fixed-key loans get only the exports that can
hold them, and plain advice otherwise."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from embit.bip32 import HDKey as EmbitHDKey
from support.wallet_formats import FormatError, ParsedKey, ParsedWallet, addresses
from support.wallet_formats.bip129 import BIP129_VECTORS, parse_bsms
from support.wallet_formats.bip388 import (
    BIP388_INVALID_TEMPLATES,
    BIP388_MULTISIG_VECTOR,
    check_template,
    parse_wallet_policy,
)
from support.wallet_formats.caravan import parse_caravan
from support.wallet_formats.coldcard import parse_coldcard
from support.wallet_formats.sparrow import import_descriptor_file, parse_output_descriptor

from custody.bitcoin.exports import (
    FIXED_KEY_ADVICE,
    FIXED_KEY_WORKS_WITH,
    export_bsms,
    export_caravan,
    export_coldcard,
    export_descriptor,
    export_notice,
    export_sparrow,
    export_wallet_policy,
    sanitise_wallet_name,
)
from custody.errors import ExportUnsupported
from pledge.descriptors import CollateralDescriptor, has_valid_checksum
from pledge.keys import FixedKey, HDKey, parse_hd_key
from pledge.network import NetworkName, coin_type, embit_network

pytestmark = pytest.mark.unit

INDEXES = [0, 1, 2, 19, 1000]
NETWORKS: list[NetworkName] = ["regtest", "mainnet"]


def _account_key(seed: int, network: NetworkName, account: int = 0) -> HDKey:
    """A BIP-48 account key on any network (the test-key kit refuses mainnet)."""
    params = embit_network(network)
    master = EmbitHDKey.from_seed(bytes([seed]) * 32, version=params["xprv"])
    path = f"m/48h/{coin_type(network)}h/{account}h/2h"
    xpub = master.derive(path).to_public().to_base58(version=params["xpub"])
    text = f"[{master.my_fingerprint.hex()}{path[1:]}]{xpub}"
    return parse_hd_key(text, network, field="key")


def _all_hd(network: NetworkName) -> CollateralDescriptor:
    keys = (_account_key(1, network), _account_key(2, network), _account_key(3, network, 7))
    return CollateralDescriptor(keys, network)


@pytest.fixture(params=NETWORKS)
def all_hd(request: pytest.FixtureRequest) -> CollateralDescriptor:
    return _all_hd(request.param)


@pytest.fixture
def with_fixed(
    hd_key: Callable[..., HDKey], fixed_key: Callable[..., FixedKey]
) -> CollateralDescriptor:
    return CollateralDescriptor((hd_key("miner"), fixed_key("hsm"), hd_key("arb")), "regtest")


@pytest.fixture
def all_fixed(fixed_key: Callable[..., FixedKey]) -> CollateralDescriptor:
    return CollateralDescriptor((fixed_key("a"), fixed_key("b"), fixed_key("c")), "regtest")


def expected_keys(cd: CollateralDescriptor) -> tuple[ParsedKey, ...]:
    """The loan's keys as a reader should find them: xpub, fingerprint, full origin."""
    return tuple(
        ParsedKey(k.xpub, k.fingerprint, tuple(k.path))
        if isinstance(k, HDKey)
        else ParsedKey(k.public_key_hex)
        for k in cd.keys
    )


def assert_same_addresses(wallet: ParsedWallet, cd: CollateralDescriptor) -> None:
    """What the importing wallet derives is what the service hands out, both branches."""
    indexes = INDEXES if cd.has_wildcard else [0]
    for change in (False, True):
        ours = [cd.address(i, change=change) for i in indexes]
        assert addresses(wallet, cd.network, indexes, change=change) == ours


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


def test_descriptor_export_all_hd(all_hd: CollateralDescriptor) -> None:
    exported = json.loads(json.dumps(export_descriptor(all_hd, "Loan 1")))
    assert exported["descriptor"] == all_hd.descriptor
    assert exported["first_address"] == all_hd.address(0)
    assert [k["party"] for k in exported["keys"]] == ["miner", "bank", "arbiter"]
    assert (
        "Bitcoin Core (importdescriptors: receive_descriptor and change_descriptor)"
        in (exported["works_with"])
    )
    for field in ("descriptor", "receive_descriptor", "change_descriptor"):
        assert has_valid_checksum(exported[field])
    # read as a descriptor wallet does (Sparrow's parser is one), the same addresses
    assert_same_addresses(parse_output_descriptor(exported["descriptor"]), all_hd)


def test_descriptor_export_of_a_fixed_key_loan_names_only_the_wallets_that_can(
    with_fixed: CollateralDescriptor,
) -> None:
    exported = export_descriptor(with_fixed, "Loan 1")
    assert exported["descriptor"] == with_fixed.descriptor
    assert exported["works_with"] == ["Trezor via HWI", "Bitcoin Core", "BDK"]
    note = exported["note"]
    assert "fixed HSM public key" in note and FIXED_KEY_ADVICE in note
    assert "Do not use Coldcard, Ledger, BitBox02, Jade, Caravan or Sparrow" in note
    assert with_fixed.address(0) in note


# -- Coldcard ----------------------------------------------------------------------------


def test_coldcard_file_round_trips_for_each_cosigner(all_hd: CollateralDescriptor) -> None:
    text = export_coldcard(all_hd, "Loan 42 / a very long loan name")
    for key in all_hd.hd_keys:  # each party's Coldcard finds its own key exactly once
        parsed = parse_coldcard(
            text, device_xfp=key.fingerprint, testnet=all_hd.network != "mainnet"
        )
        assert parsed.name == "Loan 42 - a very lon"
        assert parsed.address_format == "P2WSH"
        assert parsed.wallet.threshold == 2
        assert parsed.wallet.keys == expected_keys(all_hd)
        assert_same_addresses(parsed.wallet, all_hd)
    assert "# Works with: Coldcard (Settings > Multisig Wallets > Import from File)" in text
    assert all_hd.address(0) in text  # first address in a comment, for comparison
    with pytest.raises(FormatError, match="my key not included"):
        parse_coldcard(text, device_xfp="00000000", testnet=all_hd.network != "mainnet")


def test_coldcard_reader_follows_the_firmware_on_descriptor_text() -> None:
    """The firmware reads any file holding `sortedmulti(` as a descriptor: our comments
    must never say it (this is the check that keeps them honest)."""
    text = export_coldcard(_all_hd("regtest"), "x")
    with pytest.raises(FormatError, match="as a descriptor"):
        parse_coldcard(text.replace("# Keys", "# sortedmulti( Keys"), device_xfp="x", testnet=True)


def test_coldcard_refuses_two_keys_with_one_fingerprint(
    hd_key: Callable[..., HDKey],
) -> None:
    same_seed = CollateralDescriptor(
        (hd_key("miner"), hd_key("bank"), hd_key("miner", account=1)), "regtest"
    )
    with pytest.raises(ExportUnsupported, match="share the master fingerprint"):
        export_coldcard(same_seed, "x")
    export_bsms(same_seed, "x")  # BSMS has no such limit


# -- BSMS --------------------------------------------------------------------------------


def test_bip129_vectors_read_by_our_reader() -> None:
    pubkeys = parse_bsms(BIP129_VECTORS[0], "mainnet")
    assert pubkeys.restrictions == ()
    assert [k.fingerprint for k in pubkeys.wallet.keys] == ["59865f44", "b7044ca6"]
    xpubs = parse_bsms(BIP129_VECTORS[1], "mainnet")
    assert xpubs.restrictions == ("/0/*", "/1/*")
    assert len(xpubs.expanded) == 2
    with pytest.raises(FormatError, match="first address"):
        parse_bsms(BIP129_VECTORS[1].replace("bc1qrgc6", "bc1qrgc7"), "mainnet")


def test_bsms_all_hd_carries_every_origin(all_hd: CollateralDescriptor) -> None:
    record = export_bsms(all_hd, "ignored")
    parsed = parse_bsms(record, all_hd.network)
    assert parsed.restrictions == ("/0/*", "/1/*")
    assert parsed.first_address == all_hd.address(0)
    assert parsed.wallet.keys == expected_keys(all_hd)  # every key with its origin
    assert_same_addresses(parsed.wallet, all_hd)
    assert "#" not in record and len(record.split("\n")) == 4  # nothing but the record


def test_bsms_with_one_fixed_key(with_fixed: CollateralDescriptor) -> None:
    parsed = parse_bsms(export_bsms(with_fixed, "x"), "regtest")
    assert parsed.wallet.keys == expected_keys(with_fixed)
    assert parsed.wallet.keys[1].fingerprint is None  # an HSM key has no origin to give
    assert_same_addresses(parsed.wallet, with_fixed)
    assert export_notice(with_fixed, "bsms").works_with == FIXED_KEY_WORKS_WITH


def test_bsms_all_fixed_matches_bip_shape(all_fixed: CollateralDescriptor) -> None:
    record = export_bsms(all_fixed, "x")
    assert record.split("\n")[1] == all_fixed.descriptor
    parsed = parse_bsms(record, "regtest")
    assert parsed.restrictions == ()
    assert_same_addresses(parsed.wallet, all_fixed)


# -- Caravan -----------------------------------------------------------------------------


@pytest.mark.parametrize("network", ["mainnet", "testnet", "signet", "regtest"])
def test_caravan_config(network: NetworkName) -> None:
    cd = _all_hd(network)
    config = json.loads(json.dumps(export_caravan(cd, "Loan 7")))
    assert config["name"] == "Loan 7"
    assert config["network"] == network
    assert [e["name"] for e in config["extendedPublicKeys"]] == ["miner", "bank", "arbiter"]
    coin = coin_type(network)
    assert config["extendedPublicKeys"][2]["bip32Path"] == f"m/48'/{coin}'/7'/2'"
    wallet = parse_caravan(config)
    assert wallet.threshold == 2
    assert wallet.keys == expected_keys(cd)
    assert_same_addresses(wallet, cd)
    # Only Caravan's own fields (the file is imported as is; the advice is in the headers)
    assert set(config) == {
        "name",
        "addressType",
        "network",
        "quorum",
        "extendedPublicKeys",
        "startingAddressIndex",
    }
    assert export_notice(cd, "caravan").works_with[0] == "Caravan (Import wallet configuration)"


# -- BIP-388 wallet policy ---------------------------------------------------------------


def test_bip388_reader_against_the_bip_vectors() -> None:
    policy = parse_wallet_policy({"name": "vector", **BIP388_MULTISIG_VECTOR})
    assert policy.descriptor == BIP388_MULTISIG_VECTOR["descriptor"]
    for template in BIP388_INVALID_TEMPLATES:
        with pytest.raises(FormatError):
            check_template(template, 2)


def test_wallet_policy_round_trips(all_hd: CollateralDescriptor) -> None:
    exported = json.loads(json.dumps(export_wallet_policy(all_hd, "Loan 12345678901234")))
    assert exported["descriptor_template"] == "wsh(sortedmulti(2,@0/**,@1/**,@2/**))"
    coin = coin_type(all_hd.network)
    assert exported["keys_info"][0].startswith(
        f"[{all_hd.hd_keys[0].fingerprint}/48'/{coin}'/0'/2']"
    )
    policy = parse_wallet_policy(exported)
    assert policy.name == "Loan 12345678901"  # Ledger's 16 characters
    assert policy.wallet.keys == expected_keys(all_hd)
    assert_same_addresses(policy.wallet, all_hd)
    assert exported["first_address"] == all_hd.address(0)
    assert exported["works_with"][0].startswith("Ledger Bitcoin app 2.1+")


# -- Sparrow -----------------------------------------------------------------------------


def test_sparrow_import_yields_the_loans_addresses(all_hd: CollateralDescriptor) -> None:
    text = export_sparrow(all_hd, "Loan 3")
    assert text.startswith("# Sparrow output descriptor: Loan 3")
    assert "# Works with: Sparrow (File > Import Wallet > Output Descriptor)." in text
    wallet = import_descriptor_file(text)
    assert wallet.threshold == 2
    assert wallet.keys == expected_keys(all_hd)
    assert_same_addresses(wallet, all_hd)


def test_sparrow_misreads_a_fixed_key_descriptor_so_the_export_refuses_it(
    with_fixed: CollateralDescriptor,
) -> None:
    """The attack: handed the fixed-key loan's descriptor, Sparrow's parser drops the
    HSM key and shows a 2-of-2 of the miner and arbiter: not one address is the loan's."""
    misread = parse_output_descriptor(with_fixed.descriptor)
    assert misread.threshold == 2
    assert [k.key for k in misread.keys] == [k.xpub for k in with_fixed.hd_keys]
    theirs = addresses(misread, "regtest", INDEXES)
    assert not set(theirs) & {with_fixed.address(i) for i in INDEXES}
    with pytest.raises(ExportUnsupported) as info:
        export_sparrow(with_fixed, "x")
    assert "silently drop the fixed key and show a 2-of-2" in info.value.message


# -- fixed keys --------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["with_fixed", "all_fixed"])
@pytest.mark.parametrize(
    ("export", "fmt"),
    [
        (export_coldcard, "coldcard"),
        (export_caravan, "caravan"),
        (export_wallet_policy, "wallet-policy"),
        (export_sparrow, "sparrow"),
    ],
)
def test_xpub_only_formats_refuse_fixed_keys_with_the_advice(
    fixture: str, export: Callable[[CollateralDescriptor, str], object], fmt: str,
    request: pytest.FixtureRequest,
) -> None:  # fmt: skip
    cd: CollateralDescriptor = request.getfixturevalue(fixture)
    with pytest.raises(ExportUnsupported) as info:
        export(cd, "x")
    message = info.value.message
    assert message.startswith(
        "This export cannot describe this loan: its bank key is a fixed HSM public key, and "
    )
    assert message.endswith(
        "Verify and sign this loan with Trezor via HWI, Bitcoin Core or BDK only, "
        "from the descriptor export."
    )
    with pytest.raises(ExportUnsupported):
        export_notice(cd, fmt)
