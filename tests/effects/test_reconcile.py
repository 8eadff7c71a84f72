"""Crashes between a call to the node or the bank's signer and the record of its answer,
then the reconciler (`custody.signer.reconcile`): each intent left without its outcome is
found, settled with the node or the signer, and audited. A crash is the service's process
dying at that point: the call-out raises (before the real call, or after it with the
answer lost) and nothing more is committed. Real btcd, real signer on SoftHSM2, SQLite and
PostgreSQL."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlmodel import Session, col, select
from support.effects import Crash, CrashingNode, CrashingSigner
from support.lending import bank_sign, funded_loan, request, sign, the_psbt, upload
from support.signer_world import SignerWorld
from support.world import World

from custody.db.models import AuditEvent, Loan, SignerStatement
from custody.signer import service as statements
from custody.signer.reconcile import ACTOR, Reconciler
from custody.watcher.service import Watcher
from hsm.client import BankSigner
from regtest.node import RegtestNode

pytestmark = [pytest.mark.node, pytest.mark.hsm]


def _reconciler(world: World, node: RegtestNode, signer: BankSigner, **kw: Any) -> Reconciler:
    return Reconciler(world.engine, network="regtest", chain=node.rpc, signer=signer, **kw)


def _now(world: World, node: RegtestNode, signer: BankSigner) -> Reconciler:
    """A reconciler with no grace: every intent without an outcome is taken as lost."""
    return _reconciler(world, node, signer, grace=timedelta(0))


def _reconciled(world: World, **where: Any) -> list[dict[str, Any]]:
    """The reconciler's own findings (it also acts as itself in the events it causes)."""
    query = (
        select(AuditEvent)
        .where(AuditEvent.actor == ACTOR, col(AuditEvent.action).startswith("reconcile."))
        .order_by(col(AuditEvent.id))
    )
    for name, value in where.items():
        query = query.where(getattr(AuditEvent, name) == value)
    with Session(world.engine) as s:
        return [
            {
                "action": e.action,
                "decision": e.decision,
                "reason": e.reason,
                "data": json.loads(e.data),
            }
            for e in s.exec(query).all()
        ]


def _endorse(world: World, statement_id: int) -> Any:
    """An operator and an approver sign the statement; the last answer (the signer is
    called on the second), whatever its status."""
    view = world.call("bank_operator", "GET", f"/v1/signer-statements/{statement_id}").json()
    answer = None
    for who in ("operator", "approver"):
        answer = world.call(
            "bank_operator",
            "POST",
            f"/v1/signer-statements/{statement_id}/endorsements",
            json=world.staff[who].endorse(view["statement"]),
        )
    return answer


def _request(world: World, rid: int) -> dict[str, Any]:
    body: dict[str, Any] = world.call("bank_operator", "GET", f"/v1/signing-requests/{rid}").json()
    return body


def _swap_signer(world: World, signer: BankSigner) -> None:
    world.client.app.state.signer = signer


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_request_whose_statement_was_never_stored_gets_one(
    world: World,
    regtest_node: RegtestNode,
    watcher: Watcher,
    bank_signer: SignerWorld,
    when: str,
) -> None:
    """The request is committed; the service dies asking the signer for its statement
    (`after`: the signer issued one, its answer lost). The reconciler asks again."""
    f = funded_loan(world, regtest_node, watcher)
    _swap_signer(world, CrashingSigner(bank_signer.client, "prepare", when))
    r = world.call(
        "bank_operator",
        "POST",
        f"/v1/loans/{f.loan['id']}/signing-requests",
        json={"action": "release"},
    )
    assert r.status_code == 500
    _swap_signer(world, bank_signer.client)
    [req] = world.call("bank_operator", "GET", f"/v1/loans/{f.loan['id']}/signing-requests").json()
    assert req["state"] == "awaiting_signatures" and req["signer_statement_id"] is None
    # Within the grace period the call may still be in flight elsewhere: left alone.
    patient = _reconciler(world, regtest_node, bank_signer.client).run_once()
    assert not patient.acted and not patient.errors, patient
    report = _now(world, regtest_node, bank_signer.client).run_once()
    assert report.statements_reissued == [req["id"]] and not report.errors, report
    [event] = _reconciled(world, request_id=req["id"])
    assert event["action"] == "reconcile.statement_missing" and event["decision"] == "reissued"
    assert "no signer statement" in event["reason"]
    after = _request(world, req["id"])
    assert after["signer_statement_id"] == event["data"]["statement_id"]
    assert not _now(world, regtest_node, bank_signer.client).run_once().acted  # once only
    # The reissued statement is the real thing: people sign it, the signer signs.
    psbt = sign(the_psbt(world, "miner", req["id"]), f.roots["miner"])
    assert upload(world, "miner", req["id"], psbt).status_code == 200
    assert bank_sign(world, req["id"]).json()["state"] == "done"
    assert _request(world, req["id"])["state"] == "broadcast"


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_ready_request_is_settled_with_the_node(
    world: World,
    regtest_node: RegtestNode,
    watcher: Watcher,
    bank_signer: SignerWorld,
    when: str,
) -> None:
    """Quorum is committed; the service dies broadcasting: before the node was asked (the
    reconciler sends it), or after `sendrawtransaction` reached it (the reconciler finds
    it in the mempool and records the broadcast)."""
    f = funded_loan(world, regtest_node, watcher)
    rid = request(world, "bank_operator", f.loan["id"], action="release")["id"]
    assert bank_sign(world, rid).json()["state"] == "done"  # the bank's signature first
    world.client.app.state.chain = CrashingNode(regtest_node.rpc, when)
    psbt = sign(the_psbt(world, "miner", rid), f.roots["miner"])
    assert upload(world, "miner", rid, psbt).status_code == 500
    world.client.app.state.chain = regtest_node.rpc
    assert _request(world, rid)["state"] == "ready"
    txid = _request(world, rid)["unsigned_txid"]
    assert (txid in regtest_node.rpc.get_raw_mempool()) == (when == "after")

    report = _now(world, regtest_node, bank_signer.client).run_once()
    assert not report.errors, report
    [event] = _reconciled(world, request_id=rid)
    assert event["action"] == "reconcile.broadcast_unknown"
    if when == "after":
        assert report.broadcast_found == [rid] and event["decision"] == "found"
    else:
        assert report.rebroadcast == [rid] and event["decision"] == "sent"
    assert _request(world, rid)["state"] == "broadcast"
    assert txid in regtest_node.rpc.get_raw_mempool()
    regtest_node.mine(1)
    watcher.step()
    assert _request(world, rid)["state"] == "confirmed"
    assert world.call("miner", "GET", f"/v1/loans/{f.loan['id']}").json()["state"] == "released"


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_signature_call_with_no_answer_recorded_is_settled(
    world: World,
    regtest_node: RegtestNode,
    watcher: Watcher,
    bank_signer: SignerWorld,
    when: str,
) -> None:
    """Two people signed; the service dies calling the signer: `before` (the signer never
    heard of it: the reconciler takes the statement to it, it signs) or `after` (it signed,
    the answer is lost: it refuses the used statement, the reconciler has a fresh one
    issued for people to sign, and nothing is signed behind their backs)."""
    f = funded_loan(world, regtest_node, watcher)
    req = request(world, "bank_operator", f.loan["id"], action="release")
    rid, sid = req["id"], req["signer_statement_id"]
    psbt = sign(the_psbt(world, "miner", rid), f.roots["miner"])
    assert upload(world, "miner", rid, psbt).status_code == 200
    before = bank_signer.bank_signatures()
    _swap_signer(world, CrashingSigner(bank_signer.client, "sign", when))
    assert _endorse(world, sid).status_code == 500
    _swap_signer(world, bank_signer.client)
    with Session(world.engine) as s:
        st = s.get(SignerStatement, sid)
        assert st is not None and st.outcome == statements.TAKEN_TO_SIGNER and st.result is None
    assert bank_signer.bank_signatures() == before + (1 if when == "after" else 0)

    report = _now(world, regtest_node, bank_signer.client).run_once()
    assert not report.errors, report
    events = _reconciled(world, request_id=rid)
    assert events[0]["action"] == "reconcile.signer_answer_unknown"
    assert events[0]["reason"] == "taken to the signer, its answer never recorded"
    if when == "before":
        assert report.statements_retried == {sid: "done"} and events[0]["decision"] == "done"
        assert len(events) == 1
        assert bank_signer.bank_signatures() == before + 1
        assert _request(world, rid)["state"] == "broadcast"  # execute broadcast it
        return
    assert report.statements_retried == {sid: "refused"}
    assert events[0]["data"]["check"] == "approval_replayed"
    assert report.statements_reissued == [rid]
    assert [e["action"] for e in events[1:]] == ["reconcile.statement_missing"]
    assert events[1]["decision"] == "reissued" and "never reached" in events[1]["reason"]
    fresh = _request(world, rid)
    assert fresh["state"] == "awaiting_signatures" and fresh["signed_seats"] == ["miner"]
    assert fresh["signer_statement_id"] not in (None, sid)
    assert bank_signer.bank_signatures() == before + 1  # nothing signed without new approvals
    assert bank_sign(world, rid).json()["state"] == "done"
    assert bank_signer.bank_signatures() == before + 2
    assert _request(world, rid)["state"] == "broadcast"


def test_an_answer_stored_but_never_applied_is_applied_once(
    world: World,
    regtest_node: RegtestNode,
    watcher: Watcher,
    bank_signer: SignerWorld,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The signer's signed PSBT is committed (`result`); the service dies applying it.
    The reconciler applies the stored answer without asking the signer again."""
    f = funded_loan(world, regtest_node, watcher)
    req = request(world, "bank_operator", f.loan["id"], action="release")
    rid, sid = req["id"], req["signer_statement_id"]
    psbt = sign(the_psbt(world, "miner", rid), f.roots["miner"])
    assert upload(world, "miner", rid, psbt).status_code == 200
    before = bank_signer.bank_signatures()

    def dies(*args: Any, **kwargs: Any) -> None:
        raise Crash("applying the answer")

    with monkeypatch.context() as m:
        m.setattr(statements, "_apply", dies)
        assert _endorse(world, sid).status_code == 500
    with Session(world.engine) as s:
        st = s.get(SignerStatement, sid)
        assert st is not None and st.result is not None and st.state == "open"
    report = _now(world, regtest_node, bank_signer.client).run_once()
    assert report.statements_retried == {sid: "done"} and not report.errors, report
    [event] = _reconciled(world, request_id=rid)
    assert event["reason"] == "the signer's answer was stored but never applied"
    assert bank_signer.bank_signatures() == before + 1  # signed once
    assert _request(world, rid)["state"] == "broadcast"


def test_a_repayment_whose_answer_was_lost_is_credited_once(
    world: World, bank_signer: SignerWorld, regtest_node: RegtestNode
) -> None:
    """The signer records the repayment, the answer is lost: taken to it again it says
    it already had it (`recorded: false`), and the loan is credited exactly once."""
    loan = world.funded_ready_loan(hsm_bank=True)
    amount = 150_000_00
    r = world.call(
        "bank_operator",
        "POST",
        f"/v1/loans/{loan['id']}/repayments",
        json={"amount_kopecks": amount, "paid_at": datetime.now(UTC).isoformat()},
    )
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    _swap_signer(world, CrashingSigner(bank_signer.client, "record_repayment", "after"))
    assert _endorse(world, sid).status_code == 500
    _swap_signer(world, bank_signer.client)

    def credited() -> int:
        with Session(world.engine) as s:
            row = s.get(Loan, loan["id"])
            assert row is not None
            return row.credited_kopecks

    assert credited() == 0
    report = _now(world, regtest_node, bank_signer.client).run_once()
    assert report.statements_retried == {sid: "done"} and not report.errors, report
    assert credited() == amount
    assert not _now(world, regtest_node, bank_signer.client).run_once().acted
    assert credited() == amount
    ref = r.json()["statement"]["loan_ref"]
    assert bank_signer.registry().repaid_kopecks(ref, datetime.now(UTC)) == amount
    [event] = _reconciled(world, loan_id=loan["id"])
    assert event["action"] == "reconcile.signer_answer_unknown" and event["decision"] == "done"


def test_a_registration_whose_answer_was_lost_is_recovered(
    world: World, bank_signer: SignerWorld, regtest_node: RegtestNode
) -> None:
    """The signer registers the loan and makes its key, the answer is lost: taken to it
    again it refuses (already registered), and the service takes the key and descriptor
    from the signer's own record of the loan."""
    loan = world.create_loan()
    assert world.register(loan["id"], "miner").status_code == 200
    assert world.register(loan["id"], "arbiter").status_code == 200
    r = world.call("bank_operator", "POST", f"/v1/loans/{loan['id']}/keys/bank/hsm")
    assert r.status_code == 201, r.text
    sid, ref = r.json()["id"], r.json()["statement"]["loan_ref"]
    _swap_signer(world, CrashingSigner(bank_signer.client, "register_loan", "after"))
    assert _endorse(world, sid).status_code == 500
    _swap_signer(world, bank_signer.client)
    assert world.call("miner", "GET", f"/v1/loans/{loan['id']}").json()["state"] == "draft"

    report = _now(world, regtest_node, bank_signer.client).run_once()
    assert report.statements_retried == {sid: "done"} and not report.errors, report
    after = world.call("miner", "GET", f"/v1/loans/{loan['id']}").json()
    assert after["state"] == "awaiting_deposit"
    assert after["descriptor"] == bank_signer.client.loan(ref)["descriptor"]
    [event] = _reconciled(world, loan_id=loan["id"])
    assert event["decision"] == "done" and event["data"]["kind"] == "register_loan"
