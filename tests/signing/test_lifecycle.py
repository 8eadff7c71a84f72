"""Collateral moving for real: regtest btcd, the watcher, signing requests through the
HTTP API, software HD signers for the miner's and arbiter's devices, and for the bank its
signer (SoftHSM2, its own registry, node and price feed) on two people's signatures."""

from __future__ import annotations

import base64
import os
from typing import Any

import pytest
from support.lending import (
    COLLATERAL,
    bank_sign,
    funded_loan,
    request,
    sign,
    the_psbt,
    upload,
)
from support.signer_world import SignerWorld
from support.world import World

from custody.watcher.service import Watcher
from regtest.faucet import random_p2wpkh_address
from regtest.node import RegtestNode
from regtest.price_feed import PriceFeed


def test_release_signed_by_miner_and_bank_returns_everything_to_the_miner(
    world: World, regtest_node: RegtestNode, watcher: Watcher
) -> None:
    """Here the bank's key is an xpub on a hardware wallet: the air-gapped .psbt path."""
    f = funded_loan(world, regtest_node, watcher, hsm_bank=False)
    lid = f.loan["id"]
    req = request(world, "bank_operator", lid, action="release")
    assert req["state"] == "awaiting_signatures"
    assert req["required_seats"] == ["miner", "bank"]
    assert world.call("miner", "GET", f"/v1/loans/{lid}").json()["state"] == "releasing"
    [out] = req["outputs"]
    assert out["address"] == f.loan["terms"]["miner_return_address"]
    assert out["amount_sats"] + req["fee_sats"] == COLLATERAL

    # The miner signs the PSBT it downloaded; the bank signs the binary file.
    r = upload(
        world, "miner", req["id"], sign(the_psbt(world, "miner", req["id"]), f.roots["miner"])
    )
    assert r.status_code == 200, r.text
    assert r.json()["signed_seats"] == ["miner"] and r.json()["state"] == "awaiting_signatures"
    # 4-eyes before the bank's device signs: without an approval the upload is refused.
    early = sign(the_psbt(world, "miner", req["id"]), f.roots["bank"])
    r = upload(world, "bank_operator", req["id"], early)
    assert r.status_code == 409 and "approv" in r.json()["message"]
    assert r.json()["error"] == "bank_approval_required"
    assert req["signer_statement_id"] is None  # the signer does not hold this key
    r = world.call("bank_approver", "POST", f"/v1/signing-requests/{req['id']}/approve")
    assert r.status_code == 200, r.text  # approval only: the bank's device signs next
    binary = world.call("bank_operator", "GET", f"/v1/signing-requests/{req['id']}/psbt.bin")
    assert binary.headers["content-type"] == "application/octet-stream"
    bank_signed = sign(base64.b64encode(binary.content).decode(), f.roots["bank"])
    r = upload(world, "bank_operator", req["id"], bank_signed, binary=True)
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "broadcast", r.json()
    txid = req["unsigned_txid"]
    assert txid in regtest_node.rpc.get_raw_mempool()

    regtest_node.mine(1)
    watcher.step()
    done = world.call("miner", "GET", f"/v1/signing-requests/{req['id']}").json()
    assert done["state"] == "confirmed"
    loan = world.call("miner", "GET", f"/v1/loans/{lid}").json()
    assert loan["state"] == "released"
    paid = regtest_node.rpc.get_tx_out(txid, 0, include_mempool=False)
    assert paid is not None and paid["value_sat"] == out["amount_sats"]
    assert paid["scriptPubKey"]["address"] == out["address"]
    [dep] = world.call("miner", "GET", f"/v1/loans/{lid}/deposits").json()
    assert dep["state"] == "spent" and dep["spent_txid"] == txid


def test_liquidation_pays_the_bank_exactly_the_debt(
    world: World, regtest_node: RegtestNode, watcher: Watcher, feed: PriceFeed
) -> None:
    """At the signer's price, from its own feed: the price the request names is not used."""
    f = funded_loan(
        world, regtest_node, watcher, principal_kopecks=1_500_000_00, interest_rate_bps=0
    )
    lid = f.loan["id"]
    feed.set("6000000")
    req = request(
        world,
        "bank_operator",
        lid,
        action="liquidation",
        price_rub_per_btc="9000000",  # what a bank operator claims; the signer prices it
        price_source="manual:test",
    )
    assert req["required_seats"] == ["bank", "arbiter"]
    assert req["evidence"]["price_rub_per_btc"] == "6000000"
    assert req["evidence"]["price_source"].startswith("bank signer valuation")
    assert req["evidence"]["debt_kopecks"] == 1_500_000_00
    bank_out, miner_out = req["outputs"]
    # 1,500,000 RUB at 6,000,000 RUB/BTC is exactly 0.25 BTC
    assert bank_out["role"] == "bank_liquidation" and bank_out["amount_sats"] == 25_000_000
    assert miner_out["amount_sats"] == COLLATERAL - 25_000_000 - req["fee_sats"]
    # Signatures in the other order: arbiter first.
    psbt = the_psbt(world, "arbiter", req["id"])
    assert upload(world, "arbiter", req["id"], sign(psbt, f.roots["arbiter"])).status_code == 200
    r = bank_sign(world, req["id"])
    assert r.status_code == 200 and r.json()["state"] == "done", r.text
    assert _state(world, req["id"]) == "broadcast"
    regtest_node.mine(1)
    watcher.step()
    assert world.call("miner", "GET", f"/v1/loans/{lid}").json()["state"] == "liquidated"
    txid = req["unsigned_txid"]
    to_bank = regtest_node.rpc.get_tx_out(txid, 0, include_mempool=False)
    to_miner = regtest_node.rpc.get_tx_out(txid, 1, include_mempool=False)
    assert to_bank and to_bank["value_sat"] == 25_000_000
    assert to_bank["scriptPubKey"]["address"] == f.loan["terms"]["bank_liquidation_address"]
    assert to_miner and to_miner["value_sat"] == miner_out["amount_sats"]


def _state(world: World, rid: int) -> str:
    state: str = world.call("miner", "GET", f"/v1/signing-requests/{rid}").json()["state"]
    return state


def test_dispute_release_signed_by_miner_and_arbiter(
    world: World, regtest_node: RegtestNode, watcher: Watcher
) -> None:
    f = funded_loan(world, regtest_node, watcher)
    lid = f.loan["id"]
    # The bank cannot ask for a dispute release; the arbiter can.
    r = world.call(
        "bank_operator",
        "POST",
        f"/v1/loans/{lid}/signing-requests",
        json={"action": "dispute_release"},
    )
    assert r.status_code == 403
    req = request(world, "arbiter", lid, action="dispute_release")
    assert req["required_seats"] == ["miner", "arbiter"]
    psbt = the_psbt(world, "miner", req["id"])
    assert upload(world, "miner", req["id"], sign(psbt, f.roots["miner"])).status_code == 200
    r = upload(world, "arbiter", req["id"], sign(psbt, f.roots["arbiter"]))
    assert r.json()["state"] == "broadcast", r.text
    regtest_node.mine(1)
    watcher.step()
    assert world.call("miner", "GET", f"/v1/loans/{lid}").json()["state"] == "released"


@pytest.mark.parametrize(
    "order",
    [("miner", "bank"), ("bank", "miner"), ("arbiter", "miner", "bank"), ("all-at-once",)],
)
def test_every_signing_order_finalizes_the_same_transaction(
    world: World, regtest_node: RegtestNode, watcher: Watcher, order: tuple[str, ...]
) -> None:
    f = funded_loan(world, regtest_node, watcher)
    req = request(world, "bank_operator", f.loan["id"], action="release", fee_rate_sat_vb="3")
    psbt = the_psbt(world, "miner", req["id"])
    if order == ("all-at-once",):
        # The miner and the arbiter sign one PSBT, then the HSM: all three keys signed.
        both = sign(sign(psbt, f.roots["miner"]), f.roots["arbiter"])
        r = upload(world, "miner", req["id"], both)
        assert r.status_code == 200, r.text
        assert r.json()["state"] == "awaiting_signatures"  # the bank is required
        r = bank_sign(world, req["id"])
        assert r.json()["state"] == "done", r.text
        signed = world.call("miner", "GET", f"/v1/signing-requests/{req['id']}").json()
        assert signed["signed_seats"] == ["miner", "bank", "arbiter"], signed
    else:
        for seat in order:
            if seat == "bank":
                r = bank_sign(world, req["id"])
                assert r.json()["state"] == "done", r.text
            else:
                r = upload(world, seat, req["id"], sign(psbt, f.roots[seat]))
            assert r.status_code == 200, r.text
    final = world.call("miner", "GET", f"/v1/signing-requests/{req['id']}").json()
    assert final["state"] == "broadcast"
    raw = regtest_node.rpc.get_raw_transaction(req["unsigned_txid"])
    from embit.transaction import Transaction

    tx = Transaction.parse(raw)
    assert tx.txid().hex() == req["unsigned_txid"]
    assert [o.value for o in tx.vout] == [o["amount_sats"] for o in req["outputs"]]


def test_partial_liquidation_sells_down_to_the_target_and_keeps_the_rest(
    world: World,
    regtest_node: RegtestNode,
    watcher: Watcher,
    feed: PriceFeed,
    bank_signer: SignerWorld,
) -> None:
    # 1,500,000 RUB owed on 0.5 BTC at 4,000,000 RUB/BTC (the signer's feed): LTV 75%.
    f = funded_loan(
        world,
        regtest_node,
        watcher,
        principal_kopecks=1_500_000_00,
        interest_rate_bps=0,
        required_collateral_sats=COLLATERAL,
    )
    lid = f.loan["id"]
    feed.set("4000000")
    req = request(
        world,
        "bank_operator",
        lid,
        action="partial_liquidation",
        price_rub_per_btc="5000000",  # the signer prices it, not the request
        price_source="manual:test",
        target_ltv_bps=6_000,
    )
    assert req["evidence"]["price_rub_per_btc"] == "4000000"
    sold, kept = req["outputs"]
    assert sold["role"] == "bank_liquidation" and kept["role"] == "collateral_change"
    assert sold["amount_sats"] + kept["amount_sats"] + req["fee_sats"] == COLLATERAL
    addresses = [
        a["address"] for a in world.call("miner", "GET", f"/v1/loans/{lid}/addresses").json()
    ]
    assert kept["address"] in addresses  # a new collateral address of the same loan
    psbt = the_psbt(world, "bank_operator", req["id"])
    assert bank_sign(world, req["id"]).json()["state"] == "done"
    r = upload(world, "arbiter", req["id"], sign(psbt, f.roots["arbiter"]))
    assert r.json()["state"] == "broadcast", r.text
    regtest_node.mine(1)
    watcher.step()
    loan = world.call("miner", "GET", f"/v1/loans/{lid}").json()
    assert loan["state"] == "active"
    assert loan["collateral"]["confirmed_sats"] == kept["amount_sats"]
    credited = req["evidence"]["credited_kopecks"]
    debt = 1_500_000_00 - credited
    from decimal import Decimal

    from pledge.amounts import ltv_bps

    assert 5_999 <= ltv_bps(debt, kept["amount_sats"], Decimal(4_000_000)) <= 6_000
    # The signer credits the same sale once it sees it confirmed: both owe the same debt,
    # and it sees the kept collateral at the change address.
    ref = world.call("bank_operator", "GET", f"/v1/signer-statements/{req['signer_statement_id']}")
    valuation = bank_signer.client.valuation(ref.json()["statement"]["loan_ref"])
    assert valuation["debt_kopecks"] == debt
    assert valuation["collateral_sats"] == kept["amount_sats"]


def test_a_fee_bump_the_signer_refuses_answers_422_and_the_stuck_one_stays(
    world: World, regtest_node: RegtestNode, watcher: Watcher, bank_signer: SignerWorld
) -> None:
    """A replacement is checked like a new request: one built from a rewritten loan record
    is refused by the signer, the answer says so (as for a new request), and the broadcast
    original is untouched."""
    from sqlmodel import Session

    from custody.db.models import Loan

    f = funded_loan(world, regtest_node, watcher)
    lid = f.loan["id"]
    low = request(world, "bank_operator", lid, action="release", fee_rate_sat_vb="2")
    upload(world, "miner", low["id"], sign(the_psbt(world, "miner", low["id"]), f.roots["miner"]))
    assert bank_sign(world, low["id"]).json()["state"] == "done"
    assert _state(world, low["id"]) == "broadcast"
    with Session(world.engine) as s:  # the replacement would pay an attacker
        loan = s.get(Loan, lid)
        assert loan is not None
        loan.miner_return_address = random_p2wpkh_address()
        s.add(loan)
        s.commit()
    r = world.call(
        "bank_operator",
        "POST",
        f"/v1/signing-requests/{low['id']}/bump",
        json={"fee_rate_sat_vb": "12"},
    )
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "request_refused_by_signer", r.text
    assert r.json()["check"] == "foreign_output", r.text
    refused = world.call("miner", "GET", f"/v1/signing-requests/{r.json()['request_id']}").json()
    assert refused["state"] == "cancelled" and refused["replaces_id"] == low["id"]
    assert _state(world, low["id"]) == "broadcast"
    assert low["unsigned_txid"] in regtest_node.rpc.get_raw_mempool()


def test_fee_bump_replaces_a_stuck_release(
    world: World, regtest_node: RegtestNode, watcher: Watcher, bank_signer: SignerWorld
) -> None:
    f = funded_loan(world, regtest_node, watcher)
    lid = f.loan["id"]
    low = request(world, "bank_operator", lid, action="release", fee_rate_sat_vb="2")
    psbt = the_psbt(world, "miner", low["id"])
    upload(world, "miner", low["id"], sign(psbt, f.roots["miner"]))
    assert bank_sign(world, low["id"]).json()["state"] == "done"
    assert _state(world, low["id"]) == "broadcast"

    r = world.call(
        "bank_operator",
        "POST",
        f"/v1/signing-requests/{low['id']}/bump",
        json={"fee_rate_sat_vb": "1"},
    )
    assert r.status_code == 422 and r.json()["field"] == "fee_rate_sat_vb"
    r = world.call(
        "bank_operator",
        "POST",
        f"/v1/signing-requests/{low['id']}/bump",
        json={"fee_rate_sat_vb": "12"},
    )
    assert r.status_code == 201, r.text
    high = r.json()
    assert high["replaces_id"] == low["id"] and high["state"] == "awaiting_signatures"
    assert high["fee_sats"] > low["fee_sats"]
    assert high["unsigned_txid"] != low["unsigned_txid"]
    # The replacement is a new transaction: a new statement, of exactly it, signed again.
    assert high["signer_statement_id"] not in (None, low["signer_statement_id"])
    view = world.call(
        "bank_operator", "GET", f"/v1/signer-statements/{high['signer_statement_id']}"
    ).json()
    assert view["state"] == "open" and view["signed_by"] == []
    assert view["statement"]["unsigned_txid"] == high["unsigned_txid"]
    assert view["statement"]["fee_sats"] == high["fee_sats"]
    psbt = the_psbt(world, "miner", high["id"])
    upload(world, "miner", high["id"], sign(psbt, f.roots["miner"]))
    assert _state(world, high["id"]) == "awaiting_signatures"  # the old approvals do not carry
    before = bank_signer.bank_signatures()
    r = bank_sign(world, high["id"])
    assert r.json()["state"] == "done", r.text
    assert bank_signer.bank_signatures() == before + 1
    assert _state(world, high["id"]) == "broadcast"
    mempool = regtest_node.rpc.get_raw_mempool()
    assert high["unsigned_txid"] in mempool and low["unsigned_txid"] not in mempool

    regtest_node.mine(1)
    watcher.step()
    states = {rid: _state(world, rid) for rid in (low["id"], high["id"])}
    assert states == {low["id"]: "replaced", high["id"]: "confirmed"}
    assert world.call("miner", "GET", f"/v1/loans/{lid}").json()["state"] == "released"


def test_cancel_returns_the_loan_and_frees_the_slot(
    world: World, regtest_node: RegtestNode, watcher: Watcher
) -> None:
    f = funded_loan(world, regtest_node, watcher)
    lid = f.loan["id"]
    req = request(world, "bank_operator", lid, action="release")
    r = world.call(
        "bank_operator",
        "POST",
        f"/v1/loans/{lid}/signing-requests",
        json={"action": "liquidation", "price_rub_per_btc": "6000000", "price_source": "manual"},
    )
    assert r.status_code == 409 and "open signing request" in r.json()["message"]
    assert r.json()["error"] == "request_already_open"
    r = world.call("bank_operator", "POST", f"/v1/signing-requests/{req['id']}/cancel")
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    assert world.call("miner", "GET", f"/v1/loans/{lid}").json()["state"] == "active"
    again = request(world, "bank_operator", lid, action="release")
    assert again["id"] != req["id"]


def test_two_concurrent_requests_for_one_loan_cannot_both_be_created(
    world: World, regtest_node: RegtestNode, watcher: Watcher
) -> None:
    import threading

    from support.declared import CheckedClient

    f = funded_loan(world, regtest_node, watcher)
    statuses: list[int] = []
    barrier = threading.Barrier(2)

    def ask(action: str) -> None:
        client = CheckedClient(world.client.app, raise_server_exceptions=False)
        body: dict[str, Any] = {"action": action}
        if action == "liquidation":
            body.update(price_rub_per_btc="6000000", price_source="manual")
        barrier.wait()
        r = client.post(
            f"/v1/loans/{f.loan['id']}/signing-requests",
            json=body,
            headers=world.h("bank_operator"),
        )
        statuses.append(r.status_code)

    threads = [threading.Thread(target=ask, args=(a,)) for a in ("release", "liquidation")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(statuses) == [201, 409], statuses
    listed = world.call("bank_operator", "GET", f"/v1/loans/{f.loan['id']}/signing-requests")
    assert len(listed.json()) == 1


def _audit_count(world: World) -> int:
    from sqlmodel import Session, func, select

    from custody.db.models import AuditEvent

    with Session(world.engine) as s:
        return int(s.exec(select(func.count()).select_from(AuditEvent)).one())


def test_bad_uploads_are_refused_and_change_nothing(
    world: World, regtest_node: RegtestNode, watcher: Watcher
) -> None:
    from embit.psbt import PSBT as EmbitPSBT

    f = funded_loan(world, regtest_node, watcher)
    other = funded_loan(world, regtest_node, watcher)
    req = request(world, "bank_operator", f.loan["id"], action="release")
    other_req = request(world, "bank_operator", other.loan["id"], action="release")
    clean = the_psbt(world, "miner", req["id"])

    def tampered_amount() -> str:
        p = EmbitPSBT.from_string(sign(clean, f.roots["miner"]))
        p.outputs[0].value -= 1_000  # embit rebuilds .tx from the output scopes
        return str(p.to_string())

    def _foreign(psbt_b64: str) -> str:
        # A signature by a key outside the loan, spliced in as a partial signature.
        from embit.ec import PrivateKey

        p = EmbitPSBT.from_string(psbt_b64)
        stranger = PrivateKey(os.urandom(32))
        inp = p.inputs[0]
        sighash = p.tx.sighash_segwit(0, inp.witness_script, inp.witness_utxo.value)
        inp.partial_sigs[stranger.get_public_key()] = stranger.sign(sighash).serialize() + b"\x01"
        return str(p.to_string())

    def sighash_none() -> str:
        p = EmbitPSBT.from_string(clean)
        for inp in p.inputs:
            inp.sighash_type = None
        p.sign_with(f.roots["miner"], sighash=2)  # SIGHASH_NONE
        return str(p.to_string())

    cases = {
        "tampered output amount": tampered_amount(),
        "key not in this loan": _foreign(clean),
        "SIGHASH_NONE": sighash_none(),
        "garbage": base64.b64encode(os.urandom(200)).decode(),
        "another loan's PSBT": sign(
            the_psbt(world, "miner", other_req["id"]), other.roots["miner"]
        ),
        "nothing new": clean,
    }
    before_psbt, before_events = the_psbt(world, "miner", req["id"]), _audit_count(world)
    for name, payload in cases.items():
        r = upload(world, "miner", req["id"], payload)
        assert r.status_code == 422, (name, r.text)
        assert r.json()["field"] == "psbt" and r.json()["message"], name
    binary = world.client.post(
        f"/v1/signing-requests/{req['id']}/signatures",
        content=b"psbt\xff" + os.urandom(50),
        headers={**world.h("miner"), "Content-Type": "application/octet-stream"},
    )
    assert binary.status_code == 422
    assert the_psbt(world, "miner", req["id"]) == before_psbt
    assert _audit_count(world) == before_events
    state = world.call("miner", "GET", f"/v1/signing-requests/{req['id']}").json()
    assert state["signed_seats"] == [] and state["state"] == "awaiting_signatures"
    # Outsiders cannot even see the request.
    assert upload(world, "other_miner", req["id"], clean).status_code == 404


def test_the_hsm_refuses_a_psbt_changed_behind_the_services_back(
    world: World, regtest_node: RegtestNode, watcher: Watcher, bank_signer: SignerWorld
) -> None:
    """A compromised API or database makes the request's PSBT pay an attacker. The signer
    checks every PSBT against its own records of the loan, refuses, and says so in the log:
    one the service built from a rewritten loan record is refused before anyone is asked
    to sign it; one swapped in after its statement was issued is refused at signing."""
    from embit.psbt import PSBT as EmbitPSBT
    from embit.script import address_to_scriptpubkey
    from sqlmodel import Session, select

    from custody.db.models import AuditEvent, Loan, SigningRequest

    f = funded_loan(world, regtest_node, watcher)
    lid = f.loan["id"]
    before = bank_signer.bank_signatures()

    # 1. The loan's payout address is rewritten in the service's database: the service
    # builds a release paying the attacker, the signer will not even issue a statement.
    with Session(world.engine) as s:
        loan = s.get(Loan, lid)
        assert loan is not None
        honest, loan.miner_return_address = loan.miner_return_address, random_p2wpkh_address()
        s.add(loan)
        s.commit()
    r = world.call(
        "bank_operator", "POST", f"/v1/loans/{lid}/signing-requests", json={"action": "release"}
    )
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "request_refused_by_signer", r.text
    assert r.json()["check"] == "foreign_output", r.text  # not the loan's registered payout
    refused_id = r.json()["request_id"]
    kept = world.call("miner", "GET", f"/v1/signing-requests/{refused_id}").json()
    assert kept["state"] == "cancelled" and kept["signer_statement_id"] is None
    assert r.json()["check"] in kept["reject_reason"]
    assert world.call("miner", "GET", f"/v1/loans/{lid}").json()["state"] == "active"
    with Session(world.engine) as s:
        loan = s.get(Loan, lid)
        assert loan is not None
        loan.miner_return_address = honest
        s.add(loan)
        s.commit()

    # 2. The PSBT itself is swapped after the signer issued its statement.
    req = request(world, "bank_operator", lid, action="release")
    with Session(world.engine) as s:
        row = s.get(SigningRequest, req["id"])
        assert row is not None
        evil = EmbitPSBT.from_string(row.psbt)
        evil.outputs[0].script_pubkey = address_to_scriptpubkey(random_p2wpkh_address())
        row.psbt = evil.to_string()
        s.add(row)
        s.commit()
    outcome = bank_sign(world, req["id"]).json()
    assert outcome["state"] == "refused", outcome
    assert "approval_other_txid" in outcome["outcome"]

    assert bank_signer.bank_signatures() == before
    with Session(world.engine) as s:
        for rid in (refused_id, req["id"]):
            refusal = s.exec(
                select(AuditEvent).where(
                    AuditEvent.request_id == rid, AuditEvent.action == "signer.refused"
                )
            ).one()
            assert refusal.decision == "refused" and refusal.reason
            row = s.get(SigningRequest, rid)
            assert row is not None and row.signed_seats == ""
    assert (
        world.call("miner", "GET", f"/v1/signing-requests/{req['id']}").json()["signed_seats"] == []
    )
    decisions = [d for d in bank_signer.registry().decisions() if d.decision == "refused"]
    assert len(decisions) == 2, decisions
