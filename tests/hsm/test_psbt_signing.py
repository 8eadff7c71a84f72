"""The bank signs collateral PSBTs with a REAL SoftHSM2 key, under its own policy.

Valid release / liquidation / partial liquidation PSBTs (built by the service's
builder) get the HSM signature, a second signature from an embit HD key (the
miner's or the arbiter's "hardware wallet"), and finalize with bdkpython. Every
tampered PSBT is refused with its reason and with ZERO calls to `sign_digest`."""

from __future__ import annotations

import copy
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from decimal import Decimal

import pytest
from embit import bip32
from embit.ec import PublicKey, Signature
from embit.psbt import PSBT, OutputScope
from embit.script import Script, address_to_scriptpubkey
from embit.transaction import SIGHASH, Transaction, TransactionInput, TransactionOutput

from custody.signing.psbt import (
    CollateralInput,
    PayTo,
    PayToCollateral,
    build_psbt,
    check_upload,
    finalize,
)
from hsm.pkcs11_backend import Pkcs11Signer
from hsm.policy import ApprovedAction, LoanContext, PolicyViolation
from hsm.psbt_signing import sign_psbt_with, sign_psbt_with_report
from hsm.signer import Signer, SignerError, SignerRefused
from pledge.amounts import liquidation_split, partial_liquidation_split
from pledge.descriptors import CollateralDescriptor
from pledge.keys import parse_fixed_key, parse_hd_key
from regtest.software_signer import SoftwareHDSigner
from regtest.testkeys import make_test_key

pytestmark = pytest.mark.hsm

MINER_RETURN = "bcrt1qw508d6qejxtdg4y5r3zarvary0c5xw7kygt080"
BANK_LIQUIDATION = "bcrt1qrp33g0q5c5txsp9arysrx4k6zdkfs4nce4xj0gdcccefvpysxf3qzf4jry"
STRANGER = "bcrt1q6rhpng9evdsfnn833a4f4vej0asu6dk5srld6x"
FEE = 3_000
PRICE = Decimal("8000000")
DEBT = 200_000_00  # kopecks: 2,500,000 sats at PRICE


class CountingSigner(Signer):
    """Wraps the real HSM signer and counts digest signatures (the thing that must
    not happen on a refused PSBT). `corrupt` flips the returned signature."""

    def __init__(self, inner: Signer, *, corrupt: bool = False) -> None:
        self.inner = inner
        self.calls = 0
        self.corrupt = corrupt

    @property
    def name(self) -> str:
        return f"counting({self.inner.name})"

    def public_key(self, key_ref: str) -> bytes:
        return self.inner.public_key(key_ref)

    def sign_digest(self, key_ref: str, digest: bytes) -> bytes:
        self.calls += 1
        der = self.inner.sign_digest(key_ref, digest)
        if self.corrupt:
            # a valid-looking signature for a different digest
            der = self.inner.sign_digest(key_ref, bytes(b ^ 1 for b in digest))
        return der


@dataclass
class Loan:
    descriptor: CollateralDescriptor
    inputs: list[CollateralInput]
    ctx: LoanContext
    miner: SoftwareHDSigner
    arbiter: SoftwareHDSigner
    bank_pub: bytes

    @property
    def total(self) -> int:
        return sum(i.amount_sats for i in self.inputs)


def make_loan(hsm: Pkcs11Signer, amounts: tuple[int, ...] = (3_000_000, 2_000_000)) -> Loan:
    """A loan whose bank key lives in the HSM and whose other two keys are embit HD keys."""
    info = hsm.generate_loan_key(f"psbt-{uuid.uuid4().hex[:16]}")
    miner_root, miner_origin, miner_xpub = make_test_key(os.urandom(32), "regtest")
    arbiter_root, arbiter_origin, arbiter_xpub = make_test_key(os.urandom(32), "regtest")
    descriptor = CollateralDescriptor(
        (
            parse_hd_key(miner_origin + miner_xpub, "regtest", field="k"),
            parse_fixed_key(info.public_key.hex(), field="k"),
            parse_hd_key(arbiter_origin + arbiter_xpub, "regtest", field="k"),
        ),
        "regtest",
    )
    inputs = [_deposit(descriptor, amount, index) for index, amount in enumerate(amounts)]
    ctx = LoanContext(
        network="regtest",
        descriptor=descriptor.descriptor,
        bank_key_ref=info.key_ref,
        collateral={(i.txid, i.vout): (i.amount_sats, i.address_index, i.change) for i in inputs},
        miner_return_address=MINER_RETURN,
        bank_liquidation_address=BANK_LIQUIDATION,
    )
    return Loan(
        descriptor,
        inputs,
        ctx,
        SoftwareHDSigner(miner_root, "regtest"),
        SoftwareHDSigner(arbiter_root, "regtest"),
        info.public_key,
    )


def _deposit(descriptor: CollateralDescriptor, amount: int, index: int) -> CollateralInput:
    prev = Transaction(
        vin=[TransactionInput(os.urandom(32), 0)],
        vout=[TransactionOutput(amount, Script(descriptor.script_pubkey(index)))],
    )
    return CollateralInput(prev.txid().hex(), 0, amount, index, False, prev.serialize())


def release_psbt(loan: Loan, fee: int = FEE) -> str:
    return build_psbt(
        loan.descriptor, "regtest", loan.inputs, [PayTo(MINER_RETURN, loan.total - fee, "m")]
    )


def liquidation_psbt(loan: Loan) -> str:
    split = liquidation_split(loan.total, FEE, DEBT, PRICE, bank_dust=294, miner_dust=294)
    return build_psbt(
        loan.descriptor,
        "regtest",
        loan.inputs,
        [
            PayTo(BANK_LIQUIDATION, split.outputs["bank_liquidation"], "bank_liquidation"),
            PayTo(MINER_RETURN, split.outputs["miner_return"], "miner_return"),
        ],
    )


def partial_psbt(loan: Loan) -> str:
    split = partial_liquidation_split(
        loan.total, FEE, DEBT, PRICE, 5_000, bank_dust=294, change_dust=330
    )
    return build_psbt(
        loan.descriptor,
        "regtest",
        loan.inputs,
        [
            PayTo(BANK_LIQUIDATION, split.outputs["bank_liquidation"], "bank_liquidation"),
            PayToCollateral(4, False, split.outputs["collateral_change"]),
        ],
    )


RELEASE = ApprovedAction("release")
LIQUIDATION = ApprovedAction("liquidation", debt_kopecks=DEBT, price_rub_per_btc=PRICE)
PARTIAL = ApprovedAction(
    "partial_liquidation",
    debt_kopecks=DEBT,
    price_rub_per_btc=PRICE,
    target_ltv_bps=5_000,
    change_address_index=4,
)


def _bank_sigs_verify(loan: Loan, signed_b64: str) -> int:
    """Verify the bank's partial signatures with code outside hsm.psbt_signing:
    embit's own PSBT sighash for each input."""
    psbt = PSBT.from_string(signed_b64)
    pub = PublicKey.parse(loan.bank_pub)
    count = 0
    for i, inp in enumerate(psbt.inputs):
        sig = inp.partial_sigs[pub]
        assert sig[-1] == SIGHASH.ALL
        assert pub.verify(Signature.parse(sig[:-1]), psbt.sighash(i, SIGHASH.ALL))
        count += 1
    return count


@pytest.mark.parametrize(
    ("build", "approved", "cosigner"),
    [
        (release_psbt, RELEASE, "miner"),
        (liquidation_psbt, LIQUIDATION, "arbiter"),
        (partial_psbt, PARTIAL, "arbiter"),
    ],
    ids=["release", "liquidation", "partial_liquidation"],
)
def test_hsm_signs_and_the_result_finalizes(
    pkcs11_signer: Pkcs11Signer,
    build: Callable[[Loan], str],
    approved: ApprovedAction,
    cosigner: str,
) -> None:
    loan = make_loan(pkcs11_signer)
    request = build(loan)
    counting = CountingSigner(pkcs11_signer)
    result = sign_psbt_with_report(counting, request, loan.ctx, approved)
    assert counting.calls == len(loan.inputs) == result.signatures
    assert result.report.action == approved.action
    assert _bank_sigs_verify(loan, result.psbt) == 2
    # the service's own upload check accepts the HSM's signatures as the bank's
    new = check_upload(request, result.psbt, loan.descriptor, loan.inputs)
    assert set(new) == {0, 1}
    assert all(set(sigs) == {loan.bank_pub} for sigs in new.values())
    # one signature is not a quorum; the second one (embit, independent path) is
    other: SoftwareHDSigner = getattr(loan, cosigner)
    both = other.sign_psbt(result.psbt)
    raw = finalize(both)
    tx = Transaction.parse(raw)
    assert tx.txid() == PSBT.from_string(request).tx.txid()
    for vin in tx.vin:
        items = vin.witness.items
        assert len(items) == 4 and items[0] == b""  # dummy, 2 signatures, witness script
    assert sum(o.value for o in tx.vout) == loan.total - FEE


def test_release_signed_by_the_hsm_twice_is_stable(pkcs11_signer: Pkcs11Signer) -> None:
    loan = make_loan(pkcs11_signer, (1_000_000,))
    once = sign_psbt_with(pkcs11_signer, release_psbt(loan), loan.ctx, RELEASE)
    twice = sign_psbt_with(pkcs11_signer, once, loan.ctx, RELEASE)
    assert PSBT.from_string(twice).tx.serialize() == PSBT.from_string(once).tx.serialize()
    assert _bank_sigs_verify(loan, twice) == 1


# -- the tampered corpus: refused, and the HSM never asked to sign -------------------


def _edit(psbt_b64: str, edit: Callable[[PSBT], None]) -> str:
    psbt = PSBT.from_string(psbt_b64)
    edit(psbt)
    out: str = psbt.to_string()
    return out


def _to_stranger(p: PSBT) -> None:
    p.outputs[0].script_pubkey = address_to_scriptpubkey(STRANGER)


def _miner_to_bank(p: PSBT) -> None:
    p.outputs[0].value += 10_000  # outputs: bank, miner
    p.outputs[1].value -= 10_000


def _extra_output(p: PSBT) -> None:
    p.outputs[0].value -= 5_000
    p.outputs.append(
        OutputScope(unknown={}, vout=TransactionOutput(5_000, address_to_scriptpubkey(STRANGER)))
    )


def _fee_above_cap(p: PSBT) -> None:
    p.outputs[0].value -= 1_000_000


def _sighash(value: int) -> Callable[[PSBT], None]:
    def edit(p: PSBT) -> None:
        p.inputs[0].sighash_type = value

    return edit


def _witness_amount(p: PSBT) -> None:
    p.inputs[1].witness_utxo.value -= 1


CORPUS: list[tuple[str, Callable[[Loan], str], ApprovedAction, Callable[[PSBT], None], str]] = [
    ("output to another address", release_psbt, RELEASE, _to_stranger, "foreign_output"),
    ("miner's sats moved to bank", liquidation_psbt, LIQUIDATION, _miner_to_bank, "bank_overpaid"),
    ("extra output", release_psbt, RELEASE, _extra_output, "foreign_output"),
    ("fee above cap", release_psbt, RELEASE, _fee_above_cap, "fee_cap"),
    ("SIGHASH_NONE", release_psbt, RELEASE, _sighash(SIGHASH.NONE), "sighash"),
    ("SIGHASH_SINGLE", release_psbt, RELEASE, _sighash(SIGHASH.SINGLE), "sighash"),
    ("ANYONECANPAY", release_psbt, RELEASE, _sighash(0x81), "sighash"),
    ("wrong witness_utxo amount", release_psbt, RELEASE, _witness_amount, "witness_utxo_amount"),
]


@pytest.mark.parametrize(
    ("build", "approved", "edit", "check"),
    [case[1:] for case in CORPUS],
    ids=[case[0] for case in CORPUS],
)
def test_tampered_psbt_is_refused_without_touching_the_hsm(
    pkcs11_signer: Pkcs11Signer,
    build: Callable[[Loan], str],
    approved: ApprovedAction,
    edit: Callable[[PSBT], None],
    check: str,
) -> None:
    loan = make_loan(pkcs11_signer)
    counting = CountingSigner(pkcs11_signer)
    tampered = _edit(build(loan), edit)
    with pytest.raises(PolicyViolation) as info:
        sign_psbt_with(counting, tampered, loan.ctx, approved)
    assert info.value.check == check
    assert info.value.reason in str(info.value)
    assert counting.calls == 0
    # and the untampered PSBT from the same builder is signed: the refusal was the edit
    assert sign_psbt_with(counting, build(loan), loan.ctx, approved)
    assert counting.calls == 2


def test_extra_input_from_another_loan_is_refused(pkcs11_signer: Pkcs11Signer) -> None:
    loan, other = make_loan(pkcs11_signer), make_loan(pkcs11_signer, (1_000_000,))
    foreign = PSBT.from_string(release_psbt(other)).inputs[0]

    def add(p: PSBT) -> None:
        p.inputs.append(copy.deepcopy(foreign))
        p.outputs[0].value += 1_000_000

    counting = CountingSigner(pkcs11_signer)
    with pytest.raises(PolicyViolation) as info:
        sign_psbt_with(counting, _edit(release_psbt(loan), add), loan.ctx, RELEASE)
    assert info.value.check == "foreign_input"
    assert counting.calls == 0


def test_another_loans_key_or_descriptor_is_refused(pkcs11_signer: Pkcs11Signer) -> None:
    loan, other = make_loan(pkcs11_signer), make_loan(pkcs11_signer)
    psbt = release_psbt(loan)
    counting = CountingSigner(pkcs11_signer)
    # the right PSBT and records, but the key ref of another loan's HSM key
    wrong_key = replace(loan.ctx, bank_key_ref=other.ctx.bank_key_ref)
    with pytest.raises(PolicyViolation) as info:
        sign_psbt_with(counting, psbt, wrong_key, RELEASE)
    assert info.value.check == "bank_key"
    # another loan's descriptor with this loan's outpoints
    wrong_desc = replace(loan.ctx, descriptor=other.ctx.descriptor)
    with pytest.raises(PolicyViolation) as info:
        sign_psbt_with(counting, psbt, wrong_desc, RELEASE)
    assert info.value.check == "witness_utxo_script"
    # another loan's records altogether (its key ref too)
    with pytest.raises(PolicyViolation) as info:
        sign_psbt_with(counting, psbt, other.ctx, RELEASE)
    assert info.value.check == "foreign_input"
    # an xpub bank key: nothing for the HSM to sign with
    with pytest.raises(SignerRefused, match="xpub"):
        sign_psbt_with(counting, psbt, replace(loan.ctx, bank_key_ref=None), RELEASE)
    assert counting.calls == 0


def test_a_signature_that_does_not_verify_is_never_added(pkcs11_signer: Pkcs11Signer) -> None:
    loan = make_loan(pkcs11_signer, (1_000_000,))
    corrupt = CountingSigner(pkcs11_signer, corrupt=True)
    with pytest.raises(SignerError, match="does not verify"):
        sign_psbt_with(corrupt, release_psbt(loan), loan.ctx, RELEASE)
    assert corrupt.calls == 1


def test_a_software_signer_can_stand_in_for_the_bank() -> None:
    """The digest path is backend-agnostic: a fixed key from the software HD signer."""
    root = bip32.HDKey.from_seed(os.urandom(32), version=bytes.fromhex("04358394"))
    bank = SoftwareHDSigner(root, "regtest")
    key_ref = "m/1h/7"
    _, miner_origin, miner_xpub = make_test_key(os.urandom(32), "regtest")
    _, arb_origin, arb_xpub = make_test_key(os.urandom(32), "regtest")
    descriptor = CollateralDescriptor(
        (
            parse_hd_key(miner_origin + miner_xpub, "regtest", field="k"),
            parse_fixed_key(bank.public_key(key_ref).hex(), field="k"),
            parse_hd_key(arb_origin + arb_xpub, "regtest", field="k"),
        ),
        "regtest",
    )
    deposit = _deposit(descriptor, 500_000, 0)
    ctx = LoanContext(
        "regtest",
        descriptor.descriptor,
        key_ref,
        {(deposit.txid, 0): (500_000, 0, False)},
        MINER_RETURN,
        BANK_LIQUIDATION,
    )
    psbt = build_psbt(descriptor, "regtest", [deposit], [PayTo(MINER_RETURN, 498_000, "m")])
    signed = PSBT.from_string(sign_psbt_with(bank, psbt, ctx, RELEASE))
    assert list(signed.inputs[0].partial_sigs) == [PublicKey.parse(bank.public_key(key_ref))]
