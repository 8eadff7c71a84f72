"""`custody watch` (the production entry point, a real subprocess) reconciles at start: a
request left ready by a crash after `sendrawtransaction` is found in the node's mempool
and recorded as broadcast, with no one asking. SQLite and PostgreSQL."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, select
from support.effects import CrashingNode
from support.lending import funded_loan, request, sign, the_psbt, upload
from support.watchers import watch_env
from support.world import World, build_world

from custody.db.models import AuditEvent, RequestState, SigningRequest
from custody.signer.reconcile import ACTOR
from custody.watcher.service import Watcher
from regtest.node import RegtestNode
from regtest.wait import wait_until

pytestmark = [pytest.mark.node]


def _env(db_url: str, node: RegtestNode) -> dict[str, str]:
    return watch_env(
        db_url, node, watch_poll_seconds="0.1", reconcile_seconds="0.2", reconcile_grace_seconds="0"
    )


def test_custody_watch_records_a_broadcast_lost_in_a_crash(
    db_url: str, engine: Engine, regtest_node: RegtestNode, watcher: Watcher, tmp_path: Path
) -> None:
    world: World = build_world(engine, chain=regtest_node.rpc)
    f = funded_loan(world, regtest_node, watcher, hsm_bank=False)
    rid = request(world, "bank_operator", f.loan["id"], action="release")["id"]
    signed = sign(the_psbt(world, "miner", rid), f.roots["miner"])
    assert upload(world, "miner", rid, signed).status_code == 200
    r = world.call("bank_approver", "POST", f"/v1/signing-requests/{rid}/approve")
    assert r.status_code == 200, r.text
    bank_signed = sign(the_psbt(world, "bank_operator", rid), f.roots["bank"])
    world.client.app.state.chain = CrashingNode(regtest_node.rpc, "after")
    assert upload(world, "bank_operator", rid, bank_signed).status_code == 500
    with Session(engine) as s:
        req = s.get(SigningRequest, rid)
        assert req is not None and req.state == RequestState.ready
        txid = req.unsigned_txid
    assert txid in regtest_node.rpc.get_raw_mempool()  # it reached the node
    watcher.release()  # the lease goes to `custody watch`

    log_path = tmp_path / "watch.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "custody.cli", "watch"],
            env=_env(db_url, regtest_node),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:

        def broadcast() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"custody watch exited:\n{log_path.read_text()}")
            with Session(engine) as s:
                row = s.get(SigningRequest, rid)
                return row is not None and row.state == RequestState.broadcast

        wait_until(broadcast, timeout=60, message=lambda: f"reconciled\n{log_path.read_text()}")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    with Session(engine) as s:
        found = s.exec(
            select(AuditEvent).where(
                AuditEvent.actor == ACTOR, AuditEvent.action == "reconcile.broadcast_unknown"
            )
        ).all()
    assert [(e.request_id, e.decision) for e in found] == [(rid, "found")]
