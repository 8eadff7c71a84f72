"""The control proof (BIP-127 style): the bank's signer signs a proof-of-reserves PSBT over
the loan's coins only when its first input is the commitment to the auditor's challenge
and its one output is an OP_RETURN of the exact sum; with the miner's signature the
kernel's verifier accepts it. Every "proof" that could move coins is refused, the token
signing nothing (a real SoftHSM2 token and seed, coins on a real btcd)."""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator

import pytest
from embit.psbt import PSBT
from embit.script import Script, address_to_scriptpubkey
from embit.transaction import SIGHASH, Transaction, TransactionInput, TransactionOutput
from support.signer_world import Loan, SignerWorld, in_process_world

from hsm.signer import PolicyViolation
from pledge import proof
from regtest.faucet import random_p2wpkh_address
from regtest.node import RegtestNode
from regtest.price_feed import PriceFeed
from regtest.softhsm import SoftHsmToken

CHALLENGE = "Audit of pledge custody, 2 December 2026, nonce 5f1c"
SATS = 30_000_000


@pytest.fixture(scope="module", params=["fixed", "hd"])
def signer_world(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    regtest_node: RegtestNode,
    softhsm_token: SoftHsmToken,
    module_feed: PriceFeed,
) -> Iterator[SignerWorld]:
    """In process only (the attack corpus runs both transports; this op is the same JSON
    through either), with each kind of bank key."""
    base = tmp_path_factory.mktemp(f"proof-signer-{request.param}")
    with in_process_world(base, regtest_node, module_feed, softhsm_token) as world:
        world.bank_key = "hd" if request.param == "hd" else None
        yield world


def _coins(loan: Loan) -> list[proof.ProofCoin]:
    return [
        proof.ProofCoin(c.txid, c.vout, c.amount_sats, c.address_index, c.change)
        for c in loan.coins
    ]


def _funded(world: SignerWorld) -> Loan:
    loan = world.register_loan()
    world.fund(loan, SATS)
    world.fund(loan, SATS // 3, index=1)
    return loan


def _refused(world: SignerWorld, check: str, call: Callable[[], object]) -> PolicyViolation:
    before = world.bank_signatures()
    with pytest.raises(PolicyViolation) as info:
        call()
    assert world.bank_signatures() == before, "the token signed a refused proof"
    assert info.value.check == check, (info.value.check, info.value.reason)
    return info.value


def test_a_control_proof_signed_by_the_bank_and_the_miner_verifies(world: SignerWorld) -> None:
    loan = _funded(world)
    descriptor = loan.record["descriptor"]
    unsigned = proof.control_proof_psbt(descriptor, "regtest", _coins(loan), CHALLENGE)
    before = world.bank_signatures()
    signed = world.client.sign_proof(loan.loan_ref, unsigned, CHALLENGE)
    assert signed.signatures == 2 and world.bank_signatures() == before + 2
    # The bank's signature alone is one of the two the 2-of-3 script needs.
    problems = proof.check_control_proof(
        signed.psbt, CHALLENGE, descriptor, "regtest", _coins(loan)
    )
    assert problems and all("1 valid signature(s)" in p for p in problems)
    both = loan.miner.sign_psbt(signed.psbt)
    assert proof.check_control_proof(both, CHALLENGE, descriptor, "regtest", _coins(loan)) == []
    # Checked for another challenge, or with a coin more or less, it does not hold.
    other = proof.check_control_proof(both, "another audit", descriptor, "regtest", _coins(loan))
    assert "its first input is not the commitment to the challenge" in other
    fewer = proof.check_control_proof(both, CHALLENGE, descriptor, "regtest", _coins(loan)[:1])
    assert "its other inputs are not exactly the loan's outpoints" in fewer
    # It is a transaction no node accepts: its first input does not exist.
    tx = PSBT.from_string(both).tx
    assert tx.vin[0].txid[::-1] == proof.bip127_commitment(CHALLENGE)
    assert world.node.rpc.get_tx_out(tx.vin[0].txid.hex(), 0) is None


def _psbt(loan: Loan, first: TransactionInput | None, outputs: list[TransactionOutput]) -> str:
    """The proof PSBT with its first input and outputs replaced (the loan's inputs kept)."""
    good = PSBT.from_string(
        proof.control_proof_psbt(loan.record["descriptor"], "regtest", _coins(loan), CHALLENGE)
    )
    vin = ([first] if first is not None else []) + list(good.tx.vin[1:])
    psbt = PSBT(Transaction(version=2, vin=vin, vout=outputs))
    psbt.inputs = ([] if first is None else [psbt.inputs[0]]) + good.inputs[1:]
    out: str = psbt.to_string()
    return out


def test_a_proof_whose_first_input_is_a_real_outpoint_is_refused(world: SignerWorld) -> None:
    """The attack: a "proof" that is a spend. Its first input is one of the loan's own
    coins, and the output an OP_RETURN or someone's address; then variations."""
    loan = _funded(world)
    total = sum(c.amount_sats for c in loan.coins)
    burn = [TransactionOutput(total, Script(proof.CONTROL_OUTPUT_SCRIPT))]
    ref = loan.loan_ref
    # The coins alone, first input a real outpoint, to an OP_RETURN.
    spend = _psbt(loan, None, burn)
    _refused(world, "proof_commitment", lambda: world.client.sign_proof(ref, spend, CHALLENGE))
    # A release to the miner offered as a proof.
    release = world.release_psbt(loan)
    _refused(world, "proof_commitment", lambda: world.client.sign_proof(ref, release, CHALLENGE))
    # The commitment to another challenge (a proof made for someone else, replayed).
    stale = TransactionInput(proof.bip127_commitment("an old audit")[::-1], 0)
    replayed = _psbt(loan, stale, burn)
    _refused(world, "proof_commitment", lambda: world.client.sign_proof(ref, replayed, CHALLENGE))
    # The right commitment at index 1 instead of 0.
    commitment = TransactionInput(proof.bip127_commitment(CHALLENGE)[::-1], 0)
    pieces = PSBT.from_string(_psbt(loan, commitment, burn))
    swapped = PSBT(
        Transaction(
            version=2, vin=pieces.tx.vin[1:2] + pieces.tx.vin[:1] + pieces.tx.vin[2:], vout=burn
        )
    )
    swapped.inputs = [pieces.inputs[1], pieces.inputs[0], *pieces.inputs[2:]]
    moved = swapped.to_string()
    _refused(world, "proof_commitment", lambda: world.client.sign_proof(ref, moved, CHALLENGE))
    # The commitment's outpoint with another index.
    wrong_index = _psbt(loan, TransactionInput(commitment.txid, 1), burn)
    _refused(
        world, "proof_commitment", lambda: world.client.sign_proof(ref, wrong_index, CHALLENGE)
    )


def test_a_proof_that_pays_someone_or_signs_loosely_is_refused(world: SignerWorld) -> None:
    loan = _funded(world)
    ref = loan.loan_ref
    total = sum(c.amount_sats for c in loan.coins)
    commitment = TransactionInput(proof.bip127_commitment(CHALLENGE)[::-1], 0)
    thief = address_to_scriptpubkey(random_p2wpkh_address())
    cases = {
        "to an address": [TransactionOutput(total, thief)],
        "a fee": [TransactionOutput(total - 1_000, Script(proof.CONTROL_OUTPUT_SCRIPT))],
        "two outputs": [
            TransactionOutput(total - 1_000, Script(proof.CONTROL_OUTPUT_SCRIPT)),
            TransactionOutput(1_000, thief),
        ],
    }
    for outputs in cases.values():
        bad = _psbt(loan, commitment, outputs)

        def attempt(bad: str = bad) -> object:
            return world.client.sign_proof(ref, bad, CHALLENGE)

        _refused(world, "proof_outputs", attempt)
    # SIGHASH_ALL|ANYONECANPAY would drop the commitment input from what is signed: the
    # signature would then fit a real spend of the coin.
    loose = PSBT.from_string(
        proof.control_proof_psbt(loan.record["descriptor"], "regtest", _coins(loan), CHALLENGE)
    )
    loose.inputs[1].sighash_type = SIGHASH.ALL | SIGHASH.ANYONECANPAY
    text = loose.to_string()
    _refused(world, "sighash", lambda: world.client.sign_proof(ref, text, CHALLENGE))
    # Another loan's coin among the inputs.
    other = _funded(world)
    mixed = proof.control_proof_psbt(
        loan.record["descriptor"], "regtest", _coins(loan) + _coins(other)[:1], CHALLENGE
    )
    _refused(world, "foreign_input", lambda: world.client.sign_proof(ref, mixed, CHALLENGE))
    assert base64.b64decode(mixed)  # (a well-formed PSBT: refused for what it says)
