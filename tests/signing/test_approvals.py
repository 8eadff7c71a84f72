"""4-eyes approvals and the signer's daily limit, with the bank's key in SoftHSM2."""

from __future__ import annotations

import subprocess
import sys

from embit.psbt import PSBT
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlmodel import Session, select
from support.lending import bank_sign, funded_loan, request, sign, the_psbt, upload
from support.world import World, audit_actions, build_world

from custody.chain.watcher import Watcher
from custody.db.models import Approval, SigningRequest
from hsm.pkcs11_backend import Pkcs11Signer
from regtest.node import RegtestNode


def test_only_a_bank_approver_approves_and_approving_twice_counts_once(
    world: World, regtest_node: RegtestNode, watcher: Watcher
) -> None:
    f = funded_loan(world, regtest_node, watcher)
    req = request(world, "bank_operator", f.loan["id"], action="release")
    # The operator who asked cannot also approve: the role rules it out first.
    r = world.call("bank_operator", "POST", f"/v1/signing-requests/{req['id']}/approve")
    assert r.status_code == 403
    assert (
        upload(
            world, "miner", req["id"], sign(the_psbt(world, "miner", req["id"]), f.roots["miner"])
        ).status_code
        == 200
    )
    r = bank_sign(world, req["id"])
    assert r.status_code == 200 and r.json()["state"] == "broadcast", r.text
    again = bank_sign(world, req["id"])
    assert again.status_code == 409  # broadcast: nothing left to approve
    with Session(world.engine) as s:
        rows = s.exec(select(Approval).where(Approval.request_id == req["id"])).all()
    assert [(a.principal, a.unsigned_txid) for a in rows] == [
        ("bank_approver:user-bank_approver", req["unsigned_txid"])
    ]
    actions = audit_actions(world.engine, request_id=req["id"])
    for expected in (
        "signing_request.created",
        "signing_request.signed",
        "signing_request.approved",
        "signer.signed",
        "signing_request.broadcast",
    ):
        assert expected in actions, (expected, actions)


def test_an_approval_does_not_cover_a_changed_psbt(
    world: World, regtest_node: RegtestNode, watcher: Watcher
) -> None:
    """The approver approved transaction A; the stored PSBT was swapped for B (same
    outputs, another locktime). The signer refuses: B was never approved."""
    f = funded_loan(world, regtest_node, watcher)
    req = request(world, "bank_operator", f.loan["id"], action="release")
    with Session(world.engine) as s:
        row = s.get(SigningRequest, req["id"])
        assert row is not None
        changed = PSBT.from_string(row.psbt)
        changed.locktime = 1
        row.psbt = changed.to_string()
        s.add(row)
        s.commit()
    r = bank_sign(world, req["id"])
    assert r.status_code == 422, r.text
    assert r.json()["check"] == "approvals" and "new approval" in r.json()["message"]
    assert "signer.refused" in audit_actions(world.engine, request_id=req["id"])
    assert (
        world.call("miner", "GET", f"/v1/signing-requests/{req['id']}").json()["signed_seats"] == []
    )


def test_the_daily_limit_stops_the_signer(
    engine: Engine, regtest_node: RegtestNode, watcher: Watcher, pkcs11_signer: Pkcs11Signer
) -> None:
    world = build_world(
        engine, chain=regtest_node.rpc, hsm=pkcs11_signer, hsm_daily_limit_sats=60_000_000
    )
    first = funded_loan(world, regtest_node, watcher)
    second = funded_loan(world, regtest_node, watcher)
    req1 = request(world, "bank_operator", first.loan["id"], action="release")
    req2 = request(world, "bank_operator", second.loan["id"], action="release")
    assert bank_sign(world, req1["id"]).status_code == 200  # 0.5 BTC of 0.6
    r = bank_sign(world, req2["id"])
    assert r.status_code == 422 and r.json()["check"] == "velocity", r.text
    assert "daily limit" in r.json()["message"]
    assert "signer.refused" in audit_actions(world.engine, request_id=req2["id"])


def test_custody_audit_verify_reports_the_first_broken_link(
    world: World, regtest_node: RegtestNode, watcher: Watcher, db_url: str
) -> None:
    f = funded_loan(world, regtest_node, watcher)
    request(world, "bank_operator", f.loan["id"], action="release")

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
    with world.engine.begin() as conn:
        conn.execute(text("UPDATE auditevent SET actor = 'someone else' WHERE id = 5"))
    broken = verify()
    assert broken.returncode == 1
    assert '"first_broken_id": 5' in broken.stdout
