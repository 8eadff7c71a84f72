"""4-eyes approvals and the signer's daily limit, with the bank's key held by the bank's
signer (a real SoftHSM2 token): an operator and an approver sign the signer's own statement
of the transaction, and the signer counts, checks and limits on its own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from embit.psbt import PSBT
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select
from support.lending import bank_sign, funded_loan, request, sign, the_psbt, upload
from support.signer_world import SignerWorld, in_process_world
from support.world import World, audit_actions, build_world

from custody.db.models import Approval, AuditEvent, SigningRequest
from custody.watcher.service import Watcher
from hsm.signer import PolicyViolation
from regtest.node import RegtestNode
from regtest.price_feed import PriceFeed
from regtest.softhsm import SoftHsmToken


def _statement(world: World, sid: int) -> dict[str, Any]:
    r = world.call("bank_operator", "GET", f"/v1/signer-statements/{sid}")
    assert r.status_code == 200, r.text
    view: dict[str, Any] = r.json()
    return view


def _request(world: World, rid: int) -> dict[str, Any]:
    out: dict[str, Any] = world.call("miner", "GET", f"/v1/signing-requests/{rid}").json()
    return out


def test_an_operator_and_an_approver_sign_and_one_person_counts_once(
    world: World, regtest_node: RegtestNode, watcher: Watcher, bank_signer: SignerWorld
) -> None:
    """The 4 eyes are two enrolled people's signatures over the signer's statement: the
    old API approval is not a way in, one person signing twice is one signature, and the
    statement, once used, is used up."""
    f = funded_loan(world, regtest_node, watcher)
    req = request(world, "bank_operator", f.loan["id"], action="release")
    sid = req["signer_statement_id"]
    assert sid is not None
    # The API-level approval does not exist for a key the signer holds: the operator is
    # refused by role first, the approver is pointed at the statement.
    r = world.call("bank_operator", "POST", f"/v1/signing-requests/{req['id']}/approve")
    assert r.status_code == 403
    r = world.call("bank_approver", "POST", f"/v1/signing-requests/{req['id']}/approve")
    assert r.status_code == 409 and f"signer statement {sid}" in r.json()["message"], r.text
    assert r.json()["error"] == "approve_via_signer_statement"
    assert (
        upload(
            world, "miner", req["id"], sign(the_psbt(world, "miner", req["id"]), f.roots["miner"])
        ).status_code
        == 200
    )
    statement = _statement(world, sid)["statement"]
    before = bank_signer.bank_signatures()
    first = world.sign_statement(sid, "operator").json()
    assert first["state"] == "open" and first["signed_by"] == ["olga.operator"]
    # The operator's signature again (by any bank login) is refused: it counts once.
    for login in ("bank_operator", "bank_approver"):
        again = world.call(
            login,
            "POST",
            f"/v1/signer-statements/{sid}/endorsements",
            json=world.staff["operator"].endorse(statement),
        )
        assert again.status_code == 409 and "already signed" in again.json()["message"]
        assert again.json()["error"] == "already_endorsed"
    assert _statement(world, sid)["signed_by"] == ["olga.operator"]
    assert bank_signer.bank_signatures() == before  # one person: the signer was not called
    assert _request(world, req["id"])["signed_seats"] == ["miner"]

    done = world.sign_statement(sid, "approver").json()
    assert done["state"] == "done", done
    assert done["signed_by"] == ["olga.operator", "anton.approver"]
    assert bank_signer.bank_signatures() == before + 1
    assert _request(world, req["id"])["state"] == "broadcast"
    late = world.call(
        "bank_operator",
        "POST",
        f"/v1/signer-statements/{sid}/endorsements",
        json=world.staff["approver2"].endorse(statement),
    )
    assert late.status_code == 409  # done: nothing left to sign
    assert late.json()["error"] == "signer_statement_not_in_state"
    # The signer used the statement up: the same approvals, replayed to it, sign nothing.
    with pytest.raises(PolicyViolation) as replayed:
        bank_signer.client.sign(
            statement["loan_ref"],
            "release",
            the_psbt(world, "miner", req["id"]),
            nonce=statement["nonce"],
            approvals=bank_signer.approvals(statement),
        )
    assert replayed.value.check == "approval_replayed"
    assert bank_signer.bank_signatures() == before + 1
    with Session(world.engine) as s:  # no service-written approval row stands in for them
        assert s.exec(select(Approval).where(Approval.request_id == req["id"])).all() == []
    actions = audit_actions(world.engine, request_id=req["id"])
    assert actions.count("signer.statement_signed") == 2, actions
    for expected in (
        "signing_request.created",
        "signer.statement_opened",
        "signing_request.signed",
        "signer.signed",
        "signing_request.broadcast",
    ):
        assert expected in actions, (expected, actions)


def test_an_approval_does_not_cover_a_changed_psbt(
    world: World, regtest_node: RegtestNode, watcher: Watcher, bank_signer: SignerWorld
) -> None:
    """The operator signed the statement of transaction A; the stored PSBT was then swapped
    for B (same outputs, another locktime). The approver's signature completes the pair,
    and the signer refuses: B was never approved. The statement is dead, not retried."""
    f = funded_loan(world, regtest_node, watcher)
    req = request(world, "bank_operator", f.loan["id"], action="release")
    sid = req["signer_statement_id"]
    assert world.sign_statement(sid, "operator").json()["state"] == "open"
    with Session(world.engine) as s:
        row = s.get(SigningRequest, req["id"])
        assert row is not None
        changed = PSBT.from_string(row.psbt)
        changed.locktime = 1
        row.psbt = changed.to_string()
        s.add(row)
        s.commit()
    before = bank_signer.bank_signatures()
    outcome = world.sign_statement(sid, "approver").json()
    assert outcome["state"] == "refused", outcome
    assert "approval_other_txid" in outcome["outcome"]
    assert "a changed PSBT needs a new statement" in outcome["outcome"]
    assert bank_signer.bank_signatures() == before
    assert "signer.refused" in audit_actions(world.engine, request_id=req["id"])
    assert _request(world, req["id"])["signed_seats"] == []
    more = world.call(
        "bank_operator",
        "POST",
        f"/v1/signer-statements/{sid}/endorsements",
        json=world.staff["approver2"].endorse(outcome["statement"]),
    )
    assert more.status_code == 409  # a refused statement takes no more signatures
    assert more.json()["error"] == "signer_statement_not_in_state"


def test_the_daily_limit_stops_the_signer(
    engine: Engine,
    regtest_node: RegtestNode,
    watcher: Watcher,
    softhsm_token: SoftHsmToken,
    feed: PriceFeed,
    tmp_path: Path,
) -> None:
    """The limit is the signer's own setting: two people's signatures do not lift it."""
    with in_process_world(
        tmp_path / "signer", regtest_node, feed, softhsm_token, HSM_DAILY_LIMIT_SATS="60000000"
    ) as limited:
        world = build_world(
            engine, chain=regtest_node.rpc, signer=limited.client, staff=limited.staff
        )
        first = funded_loan(world, regtest_node, watcher)
        second = funded_loan(world, regtest_node, watcher)
        req1 = request(world, "bank_operator", first.loan["id"], action="release")
        req2 = request(world, "bank_operator", second.loan["id"], action="release")
        before = limited.bank_signatures()
        assert bank_sign(world, req1["id"]).json()["state"] == "done"  # 0.5 BTC of 0.6
        assert limited.bank_signatures() == before + 1
        refused = bank_sign(world, req2["id"]).json()
        assert refused["state"] == "refused", refused
        assert "velocity" in refused["outcome"] and "daily limit" in refused["outcome"]
        assert limited.bank_signatures() == before + 1
        assert "signer.refused" in audit_actions(world.engine, request_id=req2["id"])
        assert _request(world, req1["id"])["signed_seats"] == ["bank"]
        assert _request(world, req2["id"])["signed_seats"] == []


def test_custody_audit_verify_reports_the_first_broken_link(
    world: World, regtest_node: RegtestNode, watcher: Watcher, db_url: str
) -> None:
    f = funded_loan(world, regtest_node, watcher)
    req = request(world, "bank_operator", f.loan["id"], action="release")

    def verify() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "custody.cli", "audit", "verify"],
            env={"DATABASE_URL": db_url, "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=60,
        )

    ok = verify()
    assert ok.returncode == 0, ok.stderr
    assert '"ok": true' in ok.stdout
    # A link in the middle of the chain: the request's creation, with events after it.
    with Session(world.engine) as s:
        target = s.exec(
            select(AuditEvent.id).where(
                AuditEvent.request_id == req["id"],
                AuditEvent.action == "signing_request.created",
            )
        ).one()
        last = s.exec(select(AuditEvent.id).order_by(col(AuditEvent.id).desc())).first()
    assert target is not None and last is not None and target < last
    with world.engine.begin() as conn:
        conn.execute(
            text("UPDATE auditevent SET actor = 'someone else' WHERE id = :id"), {"id": target}
        )
    broken = verify()
    assert broken.returncode == 1
    assert f'"first_broken_id": {target}' in broken.stdout
