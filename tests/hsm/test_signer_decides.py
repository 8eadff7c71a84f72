"""Positive controls: what the bank's signer must sign, on both transports, end to end on
btcd: a 4-eyes release, a 4-eyes partial liquidation, and an automatic liquidation the
signer decides from its own price, debt and collateral. Each result is low-S, accepted by
the node and mined, and the money adds up exactly."""

from __future__ import annotations

from decimal import Decimal

import pytest
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from embit.networks import NETWORKS
from embit.psbt import PSBT
from support.signer_world import FEE_SATS, Loan, SignerWorld

from pledge.amounts import sats_for_kopecks
from pledge.keys import HDKey

pytestmark = [pytest.mark.node, pytest.mark.hsm]

HALF_ORDER = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0


def _bank_signatures_low_s(psbt_b64: str, loan: Loan) -> int:
    """Low-S SIGHASH_ALL signatures by the loan's bank key: its fixed key, or any child of
    its HD account (the worlds run both kinds)."""
    bank = loan.descriptor.keys[1]
    bank_pubs = (
        {bank.public_key(c, i) for c in (0, 1) for i in range(10)}
        if isinstance(bank, HDKey)
        else {bytes.fromhex(loan.record["public_key"])}
    )
    psbt = PSBT.from_string(psbt_b64)
    count = 0
    for inp in psbt.inputs:
        for pub, sig in inp.partial_sigs.items():
            if pub.sec() in bank_pubs:
                _, s = decode_dss_signature(sig[:-1])
                assert s <= HALF_ORDER, "high-S signature"
                assert sig[-1] == 0x01  # SIGHASH_ALL
                count += 1
    return count


def test_four_eyes_release_is_signed_and_mined(world: SignerWorld) -> None:
    loan = world.register_loan()
    world.fund(loan, 600_000)
    world.fund(loan, 400_000, index=2)
    before = world.bank_signatures()
    signed = world.approved_sign(loan, "release", world.release_psbt(loan))
    assert world.bank_signatures() - before == 2  # one signature per input
    assert _bank_signatures_low_s(signed.psbt, loan) == 2
    txid = world.broadcast(signed.psbt, loan, with_seat="miner")
    tx = world.node.rpc.call("getrawtransaction", txid, 1)
    assert tx["confirmations"] >= 1
    paid = {o["scriptPubKey"]["addresses"][0]: o["value"] for o in tx["vout"]}
    assert paid == {loan.miner_return: pytest.approx((1_000_000 - FEE_SATS) / 1e8)}


def test_automatic_liquidation_on_the_signers_own_figures(world: SignerWorld) -> None:
    loan = world.register_loan(principal_kopecks=5_000_000)  # 50,000 RUB
    world.fund(loan, 1_000_000)
    world.feed.set("8000000")  # LTV 62.5 %: nothing to do
    calm = world.client.valuation(loan.loan_ref)
    assert calm["verdict"] == "ok" and calm["ltv_bps"] == 6_250
    world.feed.set("5500000")  # LTV 90.9 %
    valuation = world.client.valuation(loan.loan_ref)
    assert valuation["verdict"] == "liquidate", valuation
    psbt = world.liquidation_psbt(loan, valuation)
    before = world.bank_signatures()
    signed = world.client.sign(
        loan.loan_ref, "liquidation", psbt, automatic=True, valuation_id=valuation["valuation_id"]
    )
    assert world.bank_signatures() - before == 1
    txid = world.broadcast(signed.psbt, loan, with_seat="arbiter")
    tx = PSBT.from_string(signed.psbt).tx
    owed = sats_for_kopecks(int(valuation["debt_kopecks"]), Decimal("5500000"))
    outs = {o.script_pubkey.address(NETWORKS["regtest"]): o.value for o in tx.vout}
    assert outs[loan.bank_liquidation] == owed == 909_091  # 50,000 RUB at 5.5M, rounded up
    assert outs[loan.miner_return] == 1_000_000 - FEE_SATS - owed
    assert _bank_signatures_low_s(signed.psbt, loan) == 1
    assert world.node.rpc.call("getrawtransaction", txid, 1)["confirmations"] >= 1


def test_four_eyes_partial_liquidation_credits_the_debt_once_mined(world: SignerWorld) -> None:
    loan = world.register_loan(principal_kopecks=6_500_000)
    world.fund(loan, 1_000_000)
    world.feed.set("8000000")  # LTV 81.25 %: margin call
    valuation = world.client.valuation(loan.loan_ref)
    assert valuation["verdict"] == "margin_call"
    psbt = world.partial_psbt(loan, valuation, change_index=3)
    signed = world.approved_sign(loan, "partial_liquidation", psbt, valuation["valuation_id"])
    world.broadcast(signed.psbt, loan, with_seat="arbiter")
    after = world.client.valuation(loan.loan_ref)
    assert after["credited_kopecks"] > 0
    assert after["debt_kopecks"] == valuation["debt_kopecks"] - after["credited_kopecks"]
    # the change went back to index 3 of the loan, and the signer found it there
    assert [c["index"] for c in after["coins"]] == [3]
    assert after["ltv_bps"] <= loan.terms["target_ltv_bps"] + 1
