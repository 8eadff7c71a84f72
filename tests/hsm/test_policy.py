"""The signer's own policy check: valid release/liquidation/partial PSBTs pass with the
amounts recomputed from the evidence; every tampering a compromised API could try is
refused by name. No HSM here: the bank key is a fixed software test key."""

from __future__ import annotations

import base64
import copy
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from decimal import Decimal

import pytest
from embit.psbt import PSBT, OutputScope
from embit.script import Script, address_to_scriptpubkey
from embit.transaction import Transaction, TransactionInput, TransactionOutput

from custody.signing.psbt import CollateralInput, PayTo, PayToCollateral, build_psbt
from hsm.policy import ApprovedAction, LoanContext, PolicyViolation, check_psbt
from hsm.signer import SignerRefused
from pledge.amounts import liquidation_split, partial_liquidation_split
from pledge.descriptors import CollateralDescriptor
from pledge.keys import parse_fixed_key, parse_hd_key
from regtest.testkeys import make_fixed_test_key, make_test_key

MINER_RETURN = "bcrt1qw508d6qejxtdg4y5r3zarvary0c5xw7kygt080"
BANK_LIQUIDATION = "bcrt1qrp33g0q5c5txsp9arysrx4k6zdkfs4nce4xj0gdcccefvpysxf3qzf4jry"
STRANGER = "bcrt1q6rhpng9evdsfnn833a4f4vej0asu6dk5srld6x"
FEE = 3_000
PRICE = Decimal("8000000")  # RUB per BTC
DEBT = 200_000_00  # 200,000 RUB in kopecks -> 2,500,000 sats at PRICE


@dataclass
class Loan:
    descriptor: CollateralDescriptor
    inputs: list[CollateralInput]
    ctx: LoanContext

    @property
    def total(self) -> int:
        return sum(i.amount_sats for i in self.inputs)


def make_loan(amounts: tuple[int, ...] = (3_000_000, 2_000_000)) -> Loan:
    _, miner_origin, miner_xpub = make_test_key(os.urandom(32), "regtest")
    _, arbiter_origin, arbiter_xpub = make_test_key(os.urandom(32), "regtest")
    _, bank_pub = make_fixed_test_key(os.urandom(32), "regtest")
    descriptor = CollateralDescriptor(
        (
            parse_hd_key(miner_origin + miner_xpub, "regtest", field="k"),
            parse_fixed_key(bank_pub, field="k"),
            parse_hd_key(arbiter_origin + arbiter_xpub, "regtest", field="k"),
        ),
        "regtest",
    )
    inputs = [_deposit(descriptor, amount, index) for index, amount in enumerate(amounts, start=0)]
    ctx = LoanContext(
        network="regtest",
        descriptor=descriptor.descriptor,
        bank_key_ref=None,
        collateral={(i.txid, i.vout): (i.amount_sats, i.address_index, i.change) for i in inputs},
        miner_return_address=MINER_RETURN,
        bank_liquidation_address=BANK_LIQUIDATION,
    )
    return Loan(descriptor, inputs, ctx)


def _deposit(descriptor: CollateralDescriptor, amount: int, index: int) -> CollateralInput:
    """A made-up funding transaction paying the loan's address (its txid is real)."""
    prev = Transaction(
        vin=[TransactionInput(os.urandom(32), 0)],
        vout=[
            TransactionOutput(1_000, address_to_scriptpubkey(STRANGER)),
            TransactionOutput(amount, Script(descriptor.script_pubkey(index))),
        ],
    )
    return CollateralInput(prev.txid().hex(), 1, amount, index, False, prev.serialize())


def release_psbt(loan: Loan, fee: int = FEE) -> str:
    return build_psbt(
        loan.descriptor,
        "regtest",
        loan.inputs,
        [PayTo(MINER_RETURN, loan.total - fee, "miner_return")],
    )


def liquidation_psbt(loan: Loan, shift: int = 0) -> str:
    """The liquidation the service would build; `shift` moves sats from miner to bank."""
    split = liquidation_split(loan.total, FEE, DEBT, PRICE, bank_dust=294, miner_dust=294)
    bank = split.outputs["bank_liquidation"] + shift
    miner = split.outputs["miner_return"] - shift
    return build_psbt(
        loan.descriptor,
        "regtest",
        loan.inputs,
        [PayTo(BANK_LIQUIDATION, bank, "bank_liquidation"), PayTo(MINER_RETURN, miner, "m")],
    )


def partial_psbt(loan: Loan, change_index: int = 7, shift: int = 0) -> str:
    split = partial_liquidation_split(
        loan.total, FEE, DEBT, PRICE, 5_000, bank_dust=294, change_dust=330
    )
    bank = split.outputs["bank_liquidation"] + shift
    change = split.outputs["collateral_change"] - shift
    return build_psbt(
        loan.descriptor,
        "regtest",
        loan.inputs,
        [
            PayTo(BANK_LIQUIDATION, bank, "bank_liquidation"),
            PayToCollateral(change_index, False, change),
        ],
    )


RELEASE = ApprovedAction("release")
LIQUIDATION = ApprovedAction("liquidation", debt_kopecks=DEBT, price_rub_per_btc=PRICE)
PARTIAL = ApprovedAction(
    "partial_liquidation",
    debt_kopecks=DEBT,
    price_rub_per_btc=PRICE,
    target_ltv_bps=5_000,
    change_address_index=7,
)


def tamper(psbt_b64: str, edit: Callable[[PSBT], None]) -> str:
    psbt = PSBT.from_string(psbt_b64)
    edit(psbt)
    out: str = psbt.to_string()
    return out


def refused(psbt_b64: str, ctx: LoanContext, approved: ApprovedAction) -> PolicyViolation:
    with pytest.raises(PolicyViolation) as info:
        check_psbt(psbt_b64, ctx, approved)
    assert isinstance(info.value, SignerRefused)
    assert info.value.status_code == 422
    return info.value


# -- what passes ----------------------------------------------------------------------


def test_release_passes_with_a_report() -> None:
    loan = make_loan()
    report = check_psbt(release_psbt(loan), loan.ctx, RELEASE)
    assert report.total_in_sats == 5_000_000
    assert report.fee_sats == FEE
    assert report.outputs == (("miner_return", 5_000_000 - FEE),)
    assert {(t, v) for t, v, _ in report.inputs} == set(loan.ctx.collateral)
    assert 200 < report.vsize_estimate < 300  # 2 inputs of ~105 vB, one output
    assert len(report.checks) >= 5


def test_dispute_release_follows_the_release_rules() -> None:
    loan = make_loan()
    report = check_psbt(release_psbt(loan), loan.ctx, ApprovedAction("dispute_release"))
    assert report.action == "dispute_release"
    with pytest.raises(PolicyViolation):
        check_psbt(liquidation_psbt(loan), loan.ctx, ApprovedAction("dispute_release"))


def test_liquidation_pays_the_bank_what_the_evidence_says() -> None:
    loan = make_loan()
    report = check_psbt(liquidation_psbt(loan), loan.ctx, LIQUIDATION)
    assert report.expected_bank_sats == 2_500_000
    assert report.outputs == (
        ("bank_liquidation", 2_500_000),
        ("miner_return", 5_000_000 - FEE - 2_500_000),
    )
    assert sum(a for _, a in report.outputs) + report.fee_sats == report.total_in_sats
    # an action outside the kernel's vocabulary is refused, however well the PSBT matches
    unknown = replace(LIQUIDATION, action="dispute_liquidation")  # type: ignore[arg-type]
    assert refused(liquidation_psbt(loan), loan.ctx, unknown).check == "approved_action"


def test_liquidation_tolerance_is_a_hard_bound() -> None:
    loan = make_loan()
    tolerant = replace(LIQUIDATION, tolerance_sats=5)
    assert check_psbt(liquidation_psbt(loan, shift=5), loan.ctx, tolerant)
    assert refused(liquidation_psbt(loan, shift=6), loan.ctx, tolerant).check == "bank_overpaid"
    # the bank is protected too: less than it is owed is refused
    assert refused(liquidation_psbt(loan, shift=-6), loan.ctx, tolerant).check == "bank_underpaid"


def test_liquidation_when_collateral_is_short_gives_the_bank_everything() -> None:
    loan = make_loan((1_000_000,))
    psbt = build_psbt(
        loan.descriptor,
        "regtest",
        loan.inputs,
        [PayTo(BANK_LIQUIDATION, 1_000_000 - FEE, "bank_liquidation")],
    )
    report = check_psbt(psbt, loan.ctx, LIQUIDATION)
    assert report.expected_bank_sats == 1_000_000 - FEE


def test_partial_liquidation_recomputes_the_sale() -> None:
    loan = make_loan()
    report = check_psbt(partial_psbt(loan), loan.ctx, PARTIAL)
    roles = dict(report.outputs)
    assert roles["bank_liquidation"] == report.expected_bank_sats
    # (D - X) / (C - f - X) = 0.5 with D = 2.5M, C - f = 4,997,000 -> X = 3,000
    assert roles["bank_liquidation"] == 3_000
    assert roles["collateral_change"] == 5_000_000 - FEE - 3_000


# -- what is refused ------------------------------------------------------------------


def test_output_to_another_address_is_refused() -> None:
    loan = make_loan()

    def redirect(psbt: PSBT) -> None:
        psbt.outputs[0].script_pubkey = address_to_scriptpubkey(STRANGER)

    err = refused(tamper(release_psbt(loan), redirect), loan.ctx, RELEASE)
    assert err.check == "foreign_output"
    assert STRANGER in err.reason


def test_extra_output_is_refused() -> None:
    loan = make_loan()

    def extra(psbt: PSBT) -> None:
        psbt.outputs[0].value -= 10_000
        psbt.outputs.append(
            OutputScope(
                unknown={}, vout=TransactionOutput(10_000, address_to_scriptpubkey(STRANGER))
            )
        )

    assert refused(tamper(release_psbt(loan), extra), loan.ctx, RELEASE).check == "foreign_output"


def test_duplicate_output_is_refused() -> None:
    loan = make_loan()

    def split_in_two(psbt: PSBT) -> None:
        psbt.outputs[1].value -= 10_000
        psbt.outputs.append(
            OutputScope(
                unknown={}, vout=TransactionOutput(10_000, address_to_scriptpubkey(MINER_RETURN))
            )
        )

    err = refused(tamper(liquidation_psbt(loan), split_in_two), loan.ctx, LIQUIDATION)
    assert err.check == "duplicate_output"


def test_release_with_a_bank_output_is_refused() -> None:
    loan = make_loan()
    err = refused(liquidation_psbt(loan), loan.ctx, RELEASE)
    assert err.check == "foreign_output"


def test_partial_liquidation_change_to_the_wrong_index_is_refused() -> None:
    loan = make_loan()
    err = refused(partial_psbt(loan, change_index=8), loan.ctx, PARTIAL)
    assert err.check == "foreign_output"
    assert refused(partial_psbt(loan, shift=1), loan.ctx, PARTIAL).check == "bank_overpaid"


def test_input_from_another_loan_is_refused() -> None:
    loan, other = make_loan(), make_loan((1_000_000,))
    other_psbt = PSBT.from_string(release_psbt(other))

    def add_foreign(psbt: PSBT) -> None:
        psbt.inputs.append(other_psbt.inputs[0])
        psbt.outputs[0].value += 1_000_000

    err = refused(tamper(release_psbt(loan), add_foreign), loan.ctx, RELEASE)
    assert err.check == "foreign_input"
    assert other.inputs[0].txid in err.reason


def test_leaving_collateral_unspent_is_refused() -> None:
    loan = make_loan()

    def drop(psbt: PSBT) -> None:
        gone = psbt.inputs.pop()
        psbt.outputs[0].value -= gone.witness_utxo.value

    err = refused(tamper(release_psbt(loan), drop), loan.ctx, RELEASE)
    assert err.check == "collateral_not_spent"


def test_duplicate_input_is_refused() -> None:
    loan = make_loan()

    def dup(psbt: PSBT) -> None:
        psbt.inputs.append(copy.deepcopy(psbt.inputs[0]))

    assert refused(tamper(release_psbt(loan), dup), loan.ctx, RELEASE).check == "duplicate_input"


def test_fee_caps() -> None:
    loan = make_loan()
    err = refused(release_psbt(loan, fee=1_000_001), loan.ctx, RELEASE)
    assert err.check == "fee_cap"
    assert "1000001" in err.reason
    # 2 inputs + 1 output is ~250 vB: 200,000 sats is ~800 sat/vB, above 500
    assert refused(release_psbt(loan, fee=200_000), loan.ctx, RELEASE).check == "fee_rate"
    tight = replace(RELEASE, max_fee_sats=2_999)
    assert refused(release_psbt(loan), loan.ctx, tight).check == "fee_cap"
    assert check_psbt(release_psbt(loan, fee=100_000), loan.ctx, RELEASE).fee_sats == 100_000


@pytest.mark.parametrize(
    ("sighash", "name"),
    [
        (2, "SIGHASH_NONE"),
        (3, "SIGHASH_SINGLE"),
        (0x81, "SIGHASH_ALL|ANYONECANPAY"),
        (0, "DEFAULT"),
    ],
)
def test_sighash_other_than_all_is_refused_by_name(sighash: int, name: str) -> None:
    loan = make_loan()

    def set_sighash(psbt: PSBT) -> None:
        psbt.inputs[1].sighash_type = sighash

    err = refused(tamper(release_psbt(loan), set_sighash), loan.ctx, RELEASE)
    assert err.check == "sighash"
    assert name in err.reason


def test_absent_sighash_type_is_accepted() -> None:
    loan = make_loan()

    def clear(psbt: PSBT) -> None:
        for inp in psbt.inputs:
            inp.sighash_type = None

    assert check_psbt(tamper(release_psbt(loan), clear), loan.ctx, RELEASE).fee_sats == FEE


def test_wrong_witness_utxo_amount_is_refused() -> None:
    loan = make_loan()

    def inflate(psbt: PSBT) -> None:
        psbt.inputs[0].witness_utxo.value += 50_000

    err = refused(tamper(release_psbt(loan), inflate), loan.ctx, RELEASE)
    assert err.check == "witness_utxo_amount"


def test_non_witness_utxo_must_agree() -> None:
    loan = make_loan()
    other = make_loan()

    def swap(psbt: PSBT) -> None:
        psbt.inputs[0].non_witness_utxo = Transaction.parse(other.inputs[0].prev_tx)

    err = refused(tamper(release_psbt(loan), swap), loan.ctx, RELEASE)
    assert err.check == "non_witness_utxo"


def test_witness_script_must_be_the_loans() -> None:
    loan, other = make_loan(), make_loan()

    def swap(psbt: PSBT) -> None:
        psbt.inputs[0].witness_script = Script(other.descriptor.witness_script(0))

    assert refused(tamper(release_psbt(loan), swap), loan.ctx, RELEASE).check == "witness_script"


def test_another_loans_records_refuse_the_psbt() -> None:
    loan, other = make_loan(), make_loan()
    psbt = release_psbt(loan)
    # the other loan's records altogether: none of the inputs are its collateral
    assert refused(psbt, other.ctx, RELEASE).check == "foreign_input"
    # our outpoints but the other loan's descriptor: the scripts do not match
    mixed = replace(loan.ctx, descriptor=other.descriptor.descriptor)
    assert refused(psbt, mixed, RELEASE).check == "witness_utxo_script"


def _zero_sequence(psbt_b64: str) -> str:
    """Splice a sequence of 0 into the global unsigned tx (embit cannot write one)."""
    psbt = PSBT.from_string(psbt_b64)
    old = psbt.tx.serialize()
    tx = psbt.tx
    tx.vin[0].sequence = 0
    new = tx.serialize()
    assert len(new) == len(old) and new != old
    raw = base64.b64decode(psbt_b64).replace(old, new)
    return base64.b64encode(raw).decode()


def test_locktime_and_version() -> None:
    loan = make_loan()

    def timestamp(psbt: PSBT) -> None:
        psbt.locktime = 1_700_000_000

    def version3(psbt: PSBT) -> None:
        psbt.tx_version = 3

    assert refused(tamper(release_psbt(loan), timestamp), loan.ctx, RELEASE).check == "locktime"
    assert refused(tamper(release_psbt(loan), version3), loan.ctx, RELEASE).check == "tx_version"
    # embit would re-serialise a zero sequence as 0xffffffff: refused, not mis-signed
    err = refused(_zero_sequence(release_psbt(loan)), loan.ctx, RELEASE)
    assert err.check == "psbt_format"

    def height(psbt: PSBT) -> None:
        psbt.locktime = 499_999_999

    # a height locktime is post-dated unless the signer's own tip has reached it
    dated = tamper(release_psbt(loan), height)
    assert refused(dated, loan.ctx, RELEASE).check == "locktime"
    from dataclasses import replace

    low = replace(loan.ctx, tip_height=499_999_998)
    assert refused(dated, low, RELEASE).check == "locktime"
    assert check_psbt(dated, replace(loan.ctx, tip_height=499_999_999), RELEASE)

    def version1(psbt: PSBT) -> None:
        psbt.tx_version = 1

    assert refused(tamper(release_psbt(loan), version1), loan.ctx, RELEASE).check == "tx_version"


def test_garbage_and_bad_evidence() -> None:
    loan = make_loan()
    assert refused("not a psbt", loan.ctx, RELEASE).check == "psbt_format"
    assert refused("", loan.ctx, RELEASE).check == "psbt_format"
    no_price = ApprovedAction("liquidation", debt_kopecks=DEBT)
    assert refused(liquidation_psbt(loan), loan.ctx, no_price).check == "approved_action"
    no_index = replace(PARTIAL, change_address_index=None)
    assert refused(partial_psbt(loan), loan.ctx, no_index).check == "approved_action"
    same = replace(loan.ctx, bank_liquidation_address=MINER_RETURN)
    assert refused(release_psbt(loan), same, RELEASE).check == "loan_context"
    mainnet = replace(loan.ctx, miner_return_address="bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t4")
    err = refused(release_psbt(loan), mainnet, RELEASE)
    assert err.check == "loan_context"
    assert "mainnet" in err.reason
    no_checksum = replace(loan.ctx, descriptor=loan.descriptor.descriptor.split("#")[0])
    assert refused(release_psbt(loan), no_checksum, RELEASE).check == "loan_context"


def test_nothing_to_sell_is_refused() -> None:
    loan = make_loan()
    tiny_debt = replace(PARTIAL, debt_kopecks=100)
    err = refused(partial_psbt(loan), loan.ctx, tiny_debt)
    assert err.check == "partial_split"
    assert "nothing to sell" in err.reason
