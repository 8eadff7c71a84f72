"""Release/liquidation PSBTs: build, sign with real embit keys, check uploads,
merge, finalize with bdk. No node needed: the previous transactions are built
here, and the finalized transactions are checked by parsing them."""

from __future__ import annotations

import base64
import hashlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import bdkpython as bdk
import pytest
from embit import bip32
from embit.ec import PrivateKey, PublicKey, Signature
from embit.psbt import PSBT, DerivationPath, InputScope, OutputScope
from embit.script import Script
from embit.transaction import SIGHASH, Transaction, TransactionInput, TransactionOutput
from embit.util import secp256k1

from custody.signing.psbt import (
    RBF_SEQUENCE,
    CannotFinalize,
    CollateralInput,
    PayTo,
    PayToCollateral,
    build_psbt,
    check_and_merge,
    check_upload,
    dust_limit,
    estimate_vsize,
    finalize,
    input_vbytes,
    merge_signatures,
    output_vbytes,
    parse_psbt,
    signers_per_input,
    unsigned_txid,
)
from pledge.addresses import address_script_pubkey
from pledge.descriptors import CollateralDescriptor
from pledge.errors import InvalidInput
from pledge.keys import CollateralKey, FixedKey, parse_fixed_key, parse_hd_key
from pledge.network import NetworkName
from regtest.testkeys import make_fixed_test_key, make_test_key

NET: Final[NetworkName] = "regtest"
MINER_RETURN = "bcrt1qw508d6qejxtdg4y5r3zarvary0c5xw7kygt080"
BANK_LIQUIDATION = "bcrt1qrp33g0q5c5txsp9arysrx4k6zdkfs4nce4xj0gdcccefvpysxf3qzf4jry"
PARTIES = ("miner", "bank", "arbiter")
SECP256K1_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


def seed(label: str) -> bytes:
    return hashlib.sha256(label.encode()).digest()


@dataclass
class Loan:
    """A loan's descriptor plus the private material that plays the three devices."""

    descriptor: CollateralDescriptor
    roots: dict[str, Any]  # party -> embit HD root, or PrivateKey for a fixed (HSM) key

    def fund(self, index: int, amounts: list[int], change: bool = False) -> list[CollateralInput]:
        """A previous transaction paying `amounts` to the address at `index`."""
        spk = Script(self.descriptor.script_pubkey(index, change))
        prev = Transaction(
            version=2,
            vin=[TransactionInput(seed(f"funding {index} {amounts}"), 0)],
            vout=[TransactionOutput(a, spk) for a in amounts],
        )
        raw = prev.serialize()
        txid = prev.txid().hex()
        return [
            CollateralInput(txid, vout, amount, index, change, raw)
            for vout, amount in enumerate(amounts)
        ]


def make_loan(label: str, fixed_bank: bool = False) -> Loan:
    keys: list[CollateralKey] = []
    roots: dict[str, Any] = {}
    for party in PARTIES:
        if fixed_bank and party == "bank":
            private, pub_hex = make_fixed_test_key(seed(f"{label} {party}"), NET)
            keys.append(parse_fixed_key(pub_hex, field="key"))
            roots[party] = private
        else:
            master, origin, xpub = make_test_key(seed(f"{label} {party}"), NET)
            keys.append(parse_hd_key(origin + xpub, NET, field="key"))
            roots[party] = master
    return Loan(CollateralDescriptor((keys[0], keys[1], keys[2]), NET), roots)


def sign(psbt_b64: str, loan: Loan, party: str, sighash: int = SIGHASH.ALL) -> str:
    """What a party's device returns: the request with its signatures added."""
    psbt = PSBT.from_base64(psbt_b64)
    root = loan.roots[party]
    if isinstance(root, PrivateKey):  # the HSM signs over embit's BIP-143 sighash
        for n, inp in enumerate(psbt.inputs):
            digest = psbt.tx.sighash_segwit(n, inp.witness_script, inp.utxo.value, sighash=sighash)
            inp.partial_sigs[root.get_public_key()] = root.sign(digest).serialize() + bytes(
                [sighash]
            )
        return str(psbt.to_base64())
    if sighash != SIGHASH.ALL:
        for inp in psbt.inputs:
            inp.sighash_type = None
    assert psbt.sign_with(root, sighash=sighash) == len(psbt.inputs)
    return str(psbt.to_base64())


def pubkey_of(loan: Loan, party: str, index: int = 0, change: bool = False) -> bytes:
    key = loan.descriptor.keys[PARTIES.index(party)]
    if isinstance(key, FixedKey):
        return key.public_key
    return key.public_key(int(change), index)


def release(loan: Loan, inputs: list[CollateralInput], fee: int = 1_000) -> str:
    total = sum(i.amount_sats for i in inputs)
    return build_psbt(
        loan.descriptor, NET, inputs, [PayTo(MINER_RETURN, total - fee, "miner_return")]
    )


@pytest.fixture(scope="module")
def loan() -> Loan:
    return make_loan("loan A")


@pytest.fixture(scope="module")
def hsm_loan() -> Loan:
    return make_loan("loan HSM", fixed_bank=True)


# -- contents ------------------------------------------------------------------


def test_psbt_carries_what_hardware_wallets_need(loan: Loan) -> None:
    inputs = loan.fund(3, [60_000_000]) + loan.fund(5, [40_000_000], change=True)
    outputs: list[PayTo | PayToCollateral] = [
        PayTo(BANK_LIQUIDATION, 30_000_000, "bank_liquidation"),
        PayToCollateral(7, True, 69_990_000),
    ]
    psbt = PSBT.from_base64(build_psbt(loan.descriptor, NET, inputs, outputs, locktime=123))
    assert psbt.version is None  # v0: the global unsigned tx
    assert psbt.tx.version == 2 and psbt.tx.locktime == 123
    for inp, item in zip(psbt.inputs, inputs, strict=True):
        assert (inp.txid.hex(), inp.vout, inp.sequence) == (item.txid, item.vout, RBF_SEQUENCE)
        assert inp.sighash_type == SIGHASH.ALL
        assert inp.non_witness_utxo.txid().hex() == item.txid
        assert inp.witness_utxo.value == item.amount_sats
        assert inp.witness_utxo.script_pubkey.data == loan.descriptor.script_pubkey(
            item.address_index, item.change
        )
        assert inp.witness_script.data == loan.descriptor.witness_script(
            item.address_index, item.change
        )
        derivations = {pub.sec(): d for pub, d in inp.bip32_derivations.items()}
        assert len(derivations) == 3
        for key in loan.descriptor.hd_keys:
            d = derivations[key.public_key(int(item.change), item.address_index)]
            fingerprint, path = key.derivation(int(item.change), item.address_index)
            assert (d.fingerprint, d.derivation) == (fingerprint, path)
            assert path[-2:] == [int(item.change), item.address_index]
    assert psbt.outputs[0].script_pubkey.data == address_script_pubkey(BANK_LIQUIDATION, NET)
    assert psbt.outputs[0].witness_script is None and not psbt.outputs[0].bip32_derivations
    change_out = psbt.outputs[1]
    assert change_out.value == 69_990_000
    assert change_out.script_pubkey.data == loan.descriptor.script_pubkey(7, True)
    assert change_out.witness_script.data == loan.descriptor.witness_script(7, True)
    assert {p.sec() for p in change_out.bip32_derivations} == {
        k.public_key(1, 7) for k in loan.descriptor.hd_keys
    }
    xpubs = {x.to_base58(): d for x, d in psbt.xpubs.items()}
    assert set(xpubs) == {k.xpub for k in loan.descriptor.hd_keys}
    for key in loan.descriptor.hd_keys:
        assert xpubs[key.xpub].fingerprint.hex() == key.fingerprint
        assert xpubs[key.xpub].derivation == key.path


def test_hsm_loan_has_no_global_xpubs_and_two_derivations(hsm_loan: Loan) -> None:
    inputs = hsm_loan.fund(0, [10_000_000])
    psbt = PSBT.from_base64(release(hsm_loan, inputs))
    assert not psbt.xpubs
    assert len(psbt.inputs[0].bip32_derivations) == 2
    assert pubkey_of(hsm_loan, "bank") not in {p.sec() for p in psbt.inputs[0].bip32_derivations}


def test_build_refuses_caller_mistakes(loan: Loan) -> None:
    good = loan.fund(0, [1_000_000])
    with pytest.raises(ValueError, match="dust"):
        build_psbt(
            loan.descriptor,
            NET,
            good,
            [PayTo(MINER_RETURN, 990_000, "miner_return"), PayTo(BANK_LIQUIDATION, 329, "bank")],
        )
    with pytest.raises(ValueError, match="exceed"):
        build_psbt(loan.descriptor, NET, good, [PayTo(MINER_RETURN, 1_000_001, "miner_return")])
    wrong_amount = [CollateralInput(good[0].txid, 0, 999_999, 0, False, good[0].prev_tx)]
    with pytest.raises(ValueError, match="holds 1000000"):
        release(loan, wrong_amount)
    wrong_index = [CollateralInput(good[0].txid, 0, 1_000_000, 1, False, good[0].prev_tx)]
    with pytest.raises(ValueError, match="does not pay this loan"):
        release(loan, wrong_index)
    other = loan.fund(1, [1_000_000])
    wrong_prev = [CollateralInput(good[0].txid, 0, 1_000_000, 0, False, other[0].prev_tx)]
    with pytest.raises(ValueError, match="has txid"):
        release(loan, wrong_prev)
    with pytest.raises(ValueError, match="twice"):
        release(loan, good + good)
    # Exactly at the dust limit is fine.
    build_psbt(loan.descriptor, NET, good, [PayTo(BANK_LIQUIDATION, 330, "bank")])


# -- signing, checking, merging, finalizing -----------------------------------


def _check_final(
    raw: bytes, request: str, inputs: list[CollateralInput], descriptor: CollateralDescriptor
) -> Any:
    """The finalized transaction spends exactly the request's inputs to its outputs."""
    tx = Transaction.parse(raw)
    unsigned = PSBT.from_base64(request).tx
    assert tx.txid().hex() == unsigned_txid(request) == str(bdk.Transaction(raw).compute_txid())
    assert [(v.txid.hex(), v.vout) for v in tx.vin] == [(i.txid, i.vout) for i in inputs]
    assert [(o.value, o.script_pubkey.data) for o in tx.vout] == [
        (o.value, o.script_pubkey.data) for o in unsigned.vout
    ]
    for vin, item in zip(tx.vin, inputs, strict=True):
        items = vin.witness.items
        # CHECKMULTISIG dummy, exactly two signatures (the quorum), the script.
        assert items[0] == b"" and len(items) == 4
        assert items[-1] == descriptor.witness_script(item.address_index, item.change)
    return tx


@pytest.mark.parametrize(
    "signers",
    [*itertools.combinations(PARTIES, 2), PARTIES],
    ids=lambda s: "+".join(s),
)
def test_quorum_finalizes_in_separate_uploads(loan: Loan, signers: tuple[str, ...]) -> None:
    inputs = loan.fund(2, [30_000_000, 20_000_000])
    request = release(loan, inputs)
    current = request
    for party in signers:
        upload = sign(current, loan, party)
        new = check_upload(current, upload, loan.descriptor, inputs)
        pub = pubkey_of(loan, party, 2)
        assert new == {0: {pub: new[0][pub]}, 1: {pub: new[1][pub]}}  # exactly this party's
        current = merge_signatures(current, new)
        assert all(pub in s for s in signers_per_input(current))
    assert signers_per_input(current) == [{pubkey_of(loan, p, 2) for p in signers}] * 2
    raw = finalize(current)
    _check_final(raw, request, inputs, loan.descriptor)
    # The same uploads through check_and_merge (one parse of the request's PSBT): the same
    # new signatures, the same merged PSBT, its signers read from it.
    again = request
    for party in signers:
        upload = sign(again, loan, party)
        checked = check_and_merge(again, upload, loan.descriptor, inputs)
        assert checked.new == check_upload(again, upload, loan.descriptor, inputs)
        assert checked.merged == merge_signatures(again, checked.new)
        assert checked.signers == signers_per_input(checked.merged)
        again = checked.merged
    assert finalize(again) == raw


def test_order_and_grouping_do_not_change_the_transaction(loan: Loan) -> None:
    inputs = loan.fund(4, [12_345_678])
    request = release(loan, inputs)
    results = []
    for order in itertools.permutations(("miner", "arbiter")):
        current = request
        for party in order:
            current = merge_signatures(
                current, check_upload(current, sign(current, loan, party), loan.descriptor, inputs)
            )
        results.append(finalize(current))
    # Both signatures in one upload (a device that signs a PSBT already signed by another).
    both = sign(sign(request, loan, "arbiter"), loan, "miner")
    new = check_upload(request, both, loan.descriptor, inputs)
    assert set(new[0]) == {pubkey_of(loan, "miner", 4), pubkey_of(loan, "arbiter", 4)}
    results.append(finalize(merge_signatures(request, new)))
    # Each signed the request independently (parallel devices), uploaded in turn.
    current = request
    for party in ("arbiter", "miner"):
        current = merge_signatures(
            current, check_upload(current, sign(request, loan, party), loan.descriptor, inputs)
        )
    results.append(finalize(current))
    txs = [_check_final(raw, request, inputs, loan.descriptor) for raw in results]
    assert len({tx.txid() for tx in txs}) == 1
    assert len({tuple(o.serialize() for o in tx.vout) for tx in txs}) == 1


@pytest.mark.parametrize("pair", [("miner", "bank"), ("bank", "arbiter"), ("miner", "arbiter")])
def test_fixed_hsm_key_signs_alongside_hd_keys(hsm_loan: Loan, pair: tuple[str, str]) -> None:
    inputs = hsm_loan.fund(0, [5_000_000, 7_000_000])
    request = release(hsm_loan, inputs)
    current = request
    for party in pair:
        new = check_upload(current, sign(current, hsm_loan, party), hsm_loan.descriptor, inputs)
        assert {set(s) == {pubkey_of(hsm_loan, party)} for s in new.values()} == {True}
        current = merge_signatures(current, new)
    _check_final(finalize(current), request, inputs, hsm_loan.descriptor)


def test_one_signature_cannot_finalize(loan: Loan) -> None:
    inputs = loan.fund(6, [1_000_000])
    request = release(loan, inputs)
    one = merge_signatures(
        request, check_upload(request, sign(request, loan, "bank"), loan.descriptor, inputs)
    )
    with pytest.raises(CannotFinalize) as info:
        finalize(one)
    assert info.value.code == "cannot_finalize" and "finalized" in info.value.message


def test_an_already_finalized_upload_gives_its_signatures(loan: Loan) -> None:
    """Some wallets finalize the PSBT when they complete the quorum."""
    inputs = loan.fund(8, [2_000_000])
    request = release(loan, inputs)
    with_miner = merge_signatures(
        request, check_upload(request, sign(request, loan, "miner"), loan.descriptor, inputs)
    )
    signed = sign(with_miner, loan, "bank")
    result = bdk.Psbt(signed).finalize()
    assert result.could_finalize
    finalized = result.psbt.serialize()
    assert not PSBT.from_base64(finalized).inputs[0].partial_sigs  # sigs only in the witness
    new = check_upload(with_miner, finalized, loan.descriptor, inputs)
    assert new == {0: {pubkey_of(loan, "bank", 8): new[0][pubkey_of(loan, "bank", 8)]}}
    assert finalize(merge_signatures(with_miner, new)) == bytes(
        result.psbt.extract_tx().serialize()
    )


def test_binary_upload_and_text_forms_are_accepted(loan: Loan) -> None:
    inputs = loan.fund(9, [3_000_000])
    request = release(loan, inputs)
    upload = sign(request, loan, "arbiter")
    binary = base64.b64decode(upload)
    assert binary.startswith(b"psbt\xff")
    expected = check_upload(request, upload, loan.descriptor, inputs)
    assert check_upload(request, binary, loan.descriptor, inputs) == expected
    wrapped = "\n".join(upload[i : i + 76] for i in range(0, len(upload), 76))
    for form in (f"  {upload}\r\n", upload.encode(), wrapped):
        assert check_upload(request, form, loan.descriptor, inputs) == expected
    assert parse_psbt(binary).tx.txid() == parse_psbt(upload).tx.txid()


# -- the corpus of bad uploads -------------------------------------------------


def _edit(psbt_b64: str, change: Callable[[Any], None]) -> str:
    psbt = PSBT.from_base64(psbt_b64)
    change(psbt)
    return str(psbt.to_base64())


def _sig_of(psbt_b64: str, n: int) -> tuple[Any, bytes]:
    ((pub, sig),) = PSBT.from_base64(psbt_b64).inputs[n].partial_sigs.items()
    return pub, bytes(sig)


def _replace_sig(psbt_b64: str, n: int, new_sig: Callable[[bytes], bytes]) -> str:
    def change(psbt: Any) -> None:
        inp = psbt.inputs[n]
        ((pub, sig),) = inp.partial_sigs.items()
        inp.partial_sigs[pub] = new_sig(bytes(sig))

    return _edit(psbt_b64, change)


def _high_s(sig: bytes) -> bytes:
    compact_sig = secp256k1.ecdsa_signature_serialize_compact(
        secp256k1.ecdsa_signature_parse_der(sig[:-1])
    )
    r, s = compact_sig[:32], int.from_bytes(compact_sig[32:], "big")
    high = r + (SECP256K1_ORDER - s).to_bytes(32, "big")
    der = secp256k1.ecdsa_signature_serialize_der(secp256k1.ecdsa_signature_parse_compact(high))
    assert der != sig[:-1]
    return bytes(der) + sig[-1:]


def _stranger_signature(request: str, loan: Loan) -> str:
    """Sign with a key outside the loan, its derivation spliced into the PSBT."""
    stranger = bip32.HDKey.from_seed(seed("stranger"))
    path = [48 + 2**31, 1 + 2**31, 2**31, 2 + 2**31, 0, 0]

    def change(psbt: Any) -> None:
        for inp in psbt.inputs:
            inp.bip32_derivations[stranger.derive(path).get_public_key()] = DerivationPath(
                stranger.my_fingerprint, path
            )
        assert psbt.sign_with(stranger) == len(psbt.inputs)

    return _edit(request, change)


def _corpus(loan: Loan, other: Loan) -> dict[str, tuple[Callable[[str], bytes | str], str]]:
    """Bad upload name -> (make it from the request, words the refusal must contain)."""

    def signed(req: str) -> str:
        return sign(req, loan, "miner")

    def tx_edit(change: Callable[[Any], None]) -> Callable[[str], str]:
        return lambda req: _edit(signed(req), change)

    def raw_tx_edit(change: Callable[[Any], None]) -> Callable[[str], bytes]:
        """Edit the global unsigned tx in the serialized PSBT: embit's writer would
        turn a zero version or sequence back into its defaults."""

        def make(req: str) -> bytes:
            raw = base64.b64decode(signed(req))
            tx = PSBT.from_base64(req).tx
            old = tx.serialize()
            change(tx)
            new = tx.serialize()
            assert len(new) == len(old) and raw.count(old) == 1
            return raw.replace(old, new)

        return make

    def add_output(psbt: Any) -> None:
        psbt.outputs.append(
            OutputScope(vout=TransactionOutput(1_000, Script(b"\x00\x14" + bytes(20))))
        )

    def add_input(psbt: Any) -> None:
        psbt.inputs.append(
            InputScope(vin=TransactionInput(seed("extra"), 0, sequence=RBF_SEQUENCE))
        )

    def move_sig(psbt: Any) -> None:
        # Inputs 0 and 1 pay the same address: same keys, different sighash.
        psbt.inputs[1].partial_sigs = psbt.inputs[0].partial_sigs.copy()

    def move_sig_across_addresses(psbt: Any) -> None:
        psbt.inputs[2].partial_sigs = psbt.inputs[0].partial_sigs.copy()

    def set_psbt_sighash(value: int) -> Callable[[Any], None]:
        def change(psbt: Any) -> None:
            for inp in psbt.inputs:
                inp.sighash_type = value

        return change

    def other_witness_script(psbt: Any) -> None:
        psbt.inputs[0].witness_script = Script(loan.descriptor.witness_script(11))

    def other_witness_utxo(psbt: Any) -> None:
        psbt.inputs[0].witness_utxo = TransactionOutput(
            psbt.inputs[0].witness_utxo.value + 1, psbt.inputs[0].witness_utxo.script_pubkey
        )

    def with_sighash(value: int, keep_field: bool) -> Callable[[str], str]:
        """Signatures made with `value`; the PSBT's own sighash field is either
        put back to ALL (so the signature byte is what gets caught) or set to `value`."""

        def make(req: str) -> str:
            up = sign(req, loan, "miner", sighash=value)
            return _edit(up, set_psbt_sighash(SIGHASH.ALL if keep_field else value))

        return make

    def truncated_binary(req: str) -> bytes:
        return base64.b64decode(signed(req))[:-7]

    other_inputs = other.fund(10, [1_000_000, 2_000_000, 3_000_000])
    other_request = release(other, other_inputs)
    new_p2wpkh = Script(b"\x00\x14" + hashlib.new("ripemd160", b"x").digest())
    return {
        "tampered output address": (
            tx_edit(lambda p: setattr(p.outputs[0], "script_pubkey", new_p2wpkh)),
            "output 0 pays bcrt1q",
        ),
        "tampered amount": (
            tx_edit(lambda p: setattr(p.outputs[0], "value", p.outputs[0].value + 1)),
            "output 0 pays",
        ),
        "extra output": (tx_edit(add_output), "it has 2 output(s), the request has 1"),
        "extra input": (tx_edit(add_input), "it has 4 input(s), the request has 3"),
        "removed input": (
            tx_edit(lambda p: p.inputs.pop()),
            "it has 2 input(s), the request has 3",
        ),
        "changed sequence": (
            tx_edit(lambda p: setattr(p.inputs[1], "sequence", 0xFFFFFFFE)),
            "input 1 has sequence 0xfffffffe",
        ),
        "changed locktime": (tx_edit(lambda p: setattr(p, "locktime", 800_000)), "locktime"),
        "changed version": (tx_edit(lambda p: setattr(p, "tx_version", 1)), "version is 1"),
        "version zero": (raw_tx_edit(lambda t: setattr(t, "version", 0)), "version is 0"),
        "sequence zero": (
            raw_tx_edit(lambda t: setattr(t.vin[2], "sequence", 0)),
            "input 2 has sequence 0x00000000",
        ),
        "key not in loan": (lambda req: _stranger_signature(req, loan), "key not in this loan"),
        "signature moved to another input": (tx_edit(move_sig), "does not verify"),
        "signature moved across addresses": (
            tx_edit(move_sig_across_addresses),
            "key not in this loan",
        ),
        "signature SIGHASH_NONE": (with_sighash(SIGHASH.NONE, True), "sighash NONE"),
        "signature SIGHASH_SINGLE": (with_sighash(SIGHASH.SINGLE, True), "sighash SINGLE"),
        "signature ALL|ANYONECANPAY": (
            with_sighash(SIGHASH.ALL | SIGHASH.ANYONECANPAY, True),
            "sighash ALL|ANYONECANPAY",
        ),
        "PSBT field SIGHASH_NONE": (with_sighash(SIGHASH.NONE, False), "asks for sighash NONE"),
        "corrupted signature byte": (
            lambda req: _replace_sig(
                signed(req), 0, lambda s: s[:10] + bytes([s[10] ^ 1]) + s[11:]
            ),
            "does not verify",
        ),
        "not DER": (
            lambda req: _replace_sig(signed(req), 0, lambda s: s[:-1] + b"\x00" + s[-1:]),
            "not a strict DER",
        ),
        "high-S signature": (lambda req: _replace_sig(signed(req), 0, _high_s), "high S"),
        "different witness script": (tx_edit(other_witness_script), "different witness_script"),
        "different witness utxo": (tx_edit(other_witness_utxo), "different witness_utxo"),
        "garbage bytes": (lambda req: bytes(range(256)) * 3, "not a PSBT"),
        "garbage text": (lambda req: "hello, this is my signed file", "not a PSBT"),
        "empty": (lambda req: "", "empty"),
        "empty bytes": (lambda req: b"", "empty"),
        "truncated base64": (lambda req: signed(req)[:-9], "not a PSBT"),
        "truncated binary": (truncated_binary, "not a PSBT"),
        "trailing bytes": (lambda req: base64.b64decode(signed(req)) + b"\x00", "after the end"),
        "another loan's PSBT": (
            lambda req: sign(other_request, other, "miner"),
            "not the requested transaction",
        ),
        "unsigned copy": (lambda req: req, "no new signature"),
    }


def _corpus_names() -> list[str]:
    return list(_corpus(make_loan("names"), make_loan("names other")).keys())


@pytest.fixture(scope="module")
def corpus_case(loan: Loan) -> dict[str, Any]:
    inputs = loan.fund(1, [4_000_000, 5_000_000]) + loan.fund(12, [6_000_000])
    request = release(loan, inputs)
    return {"inputs": inputs, "request": request, "cases": _corpus(loan, make_loan("loan B"))}


@pytest.mark.parametrize("name", _corpus_names())
def test_bad_upload_is_refused(loan: Loan, corpus_case: dict[str, Any], name: str) -> None:
    request: str = corpus_case["request"]
    inputs = corpus_case["inputs"]
    make, words = corpus_case["cases"][name]
    before = (request, signers_per_input(request))
    with pytest.raises(InvalidInput) as info:
        check_upload(request, make(request), loan.descriptor, inputs)
    assert info.value.field == "psbt"
    assert words in info.value.message, info.value.message
    assert (request, signers_per_input(request)) == before == (corpus_case["request"], [set()] * 3)


def test_one_bad_signature_spoils_the_whole_upload(loan: Loan) -> None:
    """All or nothing: a good signature on input 0 is not kept if input 1's is bad."""
    inputs = loan.fund(13, [1_000_000, 1_000_000])
    request = release(loan, inputs)
    upload = _replace_sig(sign(request, loan, "bank"), 1, _high_s)
    with pytest.raises(InvalidInput, match="input 1: the bank's signature has a high S"):
        check_upload(request, upload, loan.descriptor, inputs)


def test_resubmitting_known_signatures_is_no_new_signature(loan: Loan) -> None:
    inputs = loan.fund(14, [1_000_000])
    request = release(loan, inputs)
    upload = sign(request, loan, "miner")
    merged = merge_signatures(request, check_upload(request, upload, loan.descriptor, inputs))
    with pytest.raises(InvalidInput, match="no new signature"):
        check_upload(merged, upload, loan.descriptor, inputs)


def test_parse_psbt_names_the_field_and_caps_size() -> None:
    with pytest.raises(InvalidInput) as info:
        parse_psbt("not base64 at all!", field="signed_psbt")
    assert info.value.field == "signed_psbt" and info.value.message.startswith("not a PSBT")
    with pytest.raises(InvalidInput, match="larger than 1 MB"):
        parse_psbt(b"psbt\xff" + bytes(1_000_000))
    with pytest.raises(InvalidInput, match="larger than 1 MB"):
        parse_psbt("cHNidP8" * 300_000)


# -- sizes and dust ------------------------------------------------------------


@pytest.mark.parametrize("n_inputs", [1, 2, 3])
@pytest.mark.parametrize("pair", [("miner", "bank"), ("bank", "arbiter")])
def test_estimate_is_an_upper_bound_close_to_real(
    loan: Loan, n_inputs: int, pair: tuple[str, str]
) -> None:
    inputs = loan.fund(20 + n_inputs, [1_000_000] * n_inputs)
    outputs: list[PayTo | PayToCollateral] = [
        PayTo(BANK_LIQUIDATION, 400_000 * n_inputs, "bank_liquidation"),
        PayTo(MINER_RETURN, 500_000 * n_inputs, "miner_return"),
        PayToCollateral(30, True, 50_000 * n_inputs),
    ]
    request = build_psbt(loan.descriptor, NET, inputs, outputs)
    current = request
    for party in pair:
        current = merge_signatures(
            current, check_upload(current, sign(current, loan, party), loan.descriptor, inputs)
        )
    real = bdk.Transaction(finalize(current)).vsize()
    scripts = [o.script_pubkey.data for o in PSBT.from_base64(request).tx.vout]
    estimate = estimate_vsize(loan.descriptor, n_inputs, scripts)
    assert real <= estimate <= real + n_inputs  # at most 1 vB per input (a 72-byte signature)


def test_input_and_output_sizes(loan: Loan) -> None:
    # 41 non-witness bytes + (1 + 253) witness bytes / 4, from bdk's 253 WU bound.
    assert input_vbytes(loan.descriptor) == 104.5
    assert output_vbytes(address_script_pubkey(MINER_RETURN, NET)) == 31
    assert output_vbytes(loan.descriptor.script_pubkey(0)) == 43


@pytest.mark.parametrize(
    ("script_hex", "limit"),
    [
        ("76a914" + "11" * 20 + "88ac", 546),  # P2PKH
        ("a914" + "11" * 20 + "87", 540),  # P2SH
        ("0014" + "11" * 20, 294),  # P2WPKH
        ("0020" + "11" * 32, 330),  # P2WSH
        ("5120" + "11" * 32, 330),  # P2TR
        ("6a0401020304", 0),  # OP_RETURN: unspendable
    ],
)
def test_dust_limit_matches_bitcoin_core(script_hex: str, limit: int) -> None:
    assert dust_limit(bytes.fromhex(script_hex)) == limit


def test_signature_helpers_agree_with_embit(loan: Loan) -> None:
    """The test's own high-S maker really makes a signature libsecp256k1 rejects:
    otherwise the corpus case above would prove nothing."""
    inputs = loan.fund(40, [1_000_000])
    request = release(loan, inputs)
    upload = sign(request, loan, "miner")
    pub, sig = _sig_of(upload, 0)
    psbt = PSBT.from_base64(request)
    digest = psbt.tx.sighash_segwit(0, psbt.inputs[0].witness_script, 1_000_000)
    assert PublicKey.parse(pub.sec()).verify(
        Signature(secp256k1.ecdsa_signature_parse_der(sig[:-1])), digest
    )
    high = _high_s(sig)
    assert not pub.verify(Signature(secp256k1.ecdsa_signature_parse_der(high[:-1])), digest)


def test_finalize_checks_signatures_itself(loan: Loan) -> None:
    """bdk re-checks what it finalizes: a corrupted signature merged without
    `check_upload` (a bug upstream) still cannot reach the network."""
    inputs = loan.fund(41, [1_000_000])
    request = release(loan, inputs)
    miner = check_upload(request, sign(request, loan, "miner"), loan.descriptor, inputs)
    bank = check_upload(request, sign(request, loan, "bank"), loan.descriptor, inputs)
    ((pub, sig),) = bank[0].items()
    corrupted = {0: {pub: sig[:10] + bytes([sig[10] ^ 1]) + sig[11:]}}
    with pytest.raises(CannotFinalize, match="index=0"):
        finalize(merge_signatures(merge_signatures(request, miner), corrupted))
    assert finalize(merge_signatures(merge_signatures(request, miner), bank))
