"""A control proof in a proof document, end to end: the service builds the BIP-127 PSBT
over a loan's coins, the bank's signer (SoftHSM2, its own registry and node) signs it,
the miner's device adds its signature, `attach` puts it in the document and the verifier
requires it for the auditor's challenge."""

from __future__ import annotations

import copy

import pytest
from support.lending import funded_loan, sign
from support.signer_fixtures import bank_signer, feed, world
from support.signer_world import SignerWorld
from support.world import World

from custody.proof.node import NodeChainView
from custody.proof.service import build, control_proof
from custody.watcher.service import Watcher
from pledge import proof
from regtest.node import RegtestNode

__all__ = ["bank_signer", "feed", "world"]

CHALLENGE = "auditor's challenge 2026-12-02 #41c7"


def test_a_control_proof_signed_by_the_banks_signer_and_the_miner_is_required_and_holds(
    world: World, bank_signer: SignerWorld, regtest_node: RegtestNode, watcher: Watcher
) -> None:
    funded = funded_loan(world, regtest_node, watcher)  # the bank key is the signer's
    loan_id = funded.loan["id"]
    before = bank_signer.bank_signatures()
    psbt = control_proof(
        world.engine, bank_signer.client, "regtest", loan_id=loan_id, challenge=CHALLENGE
    )
    assert bank_signer.bank_signatures() == before + 1  # one coin, the bank's signature
    doc = build(world.engine, regtest_node.rpc, "regtest")
    chain = NodeChainView(regtest_node.rpc)
    # The bank's signature alone is not enough to attach...
    with pytest.raises(proof.ProofInvalid, match="1 valid signature"):
        proof.attach_control_proof(doc, loan_id, CHALLENGE, psbt)
    both = sign(psbt, funded.roots["miner"])
    # ...nor two signatures for another challenge.
    with pytest.raises(proof.ProofInvalid, match="not the commitment to the challenge"):
        proof.attach_control_proof(doc, loan_id, "another challenge", both)
    assert not proof.verify_document(doc, chain, challenge=CHALLENGE).ok  # none attached
    attached = proof.attach_control_proof(doc, loan_id, CHALLENGE, both)
    verdict = proof.verify_document(attached, chain, challenge=CHALLENGE)
    assert verdict.ok, verdict.failures
    assert f"loan {loan_id}: its control proof holds" in verdict.checks
    # An auditor with a fresh challenge is not fooled by this one.
    assert not proof.verify_document(attached, chain, challenge="a fresh challenge").ok
    # A signature swapped for garbage: the document's control proof fails.
    broken = copy.deepcopy(attached)
    broken["loans"][0]["control_proof"]["psbt"] = psbt  # the bank's signature only
    failures = proof.verify_document(broken, chain).failures
    assert any("its control proof fails" in f for f in failures)
