"""`custody serve` and `hsm serve` as OS processes under load (issue 16, "Processes as
processes"): SIGTERM lets the requests in flight finish and exits 0; SIGKILL in the middle
of writes loses nothing acknowledged, leaves no gap or duplicate, and a new process on
the same database (or registry and token) answers at once."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import Engine
from sqlmodel import select
from support.custody_serve import ServiceProcess, _start, _wait_ready, ready_lender
from support.signer_world import (
    bootstrap_admins,
    enroll_staff,
    new_people,
    seed_ceremony,
    signer_env,
)

from custody.audit.service import verify_chain
from custody.db.models import CollateralAddress
from custody.db.session import transaction
from hsm.approvals import People
from hsm.client import BankSigner, HttpTransport
from hsm.registry import Registry
from regtest.hsm_serve import serve_process
from regtest.node import RegtestNode
from regtest.price_feed import PriceFeed
from regtest.softhsm import create_token
from regtest.wait import wait_until

pytestmark = [pytest.mark.process]

# uvicorn, having shut down gracefully on SIGTERM, raises the signal again so the process
# ends "killed by SIGTERM", as a supervisor expects (systemd counts it a clean stop): a
# clean stop is that status after uvicorn's own last line, never a hang or a traceback.
CLEAN_SIGTERM = (0, -signal.SIGTERM)


def _stopped_cleanly(code: int, log: str) -> bool:
    return code in CLEAN_SIGTERM and "Finished server process" in log and "Traceback" not in log


def _hand_outs(
    server: ServiceProcess, headers: dict[str, str], loan_id: int, stop: threading.Event
) -> tuple[list[tuple[int, int | None]], threading.Lock, Callable[[], None]]:
    """A worker asking for new addresses until `stop` or the server goes away, and where
    it puts every answer (status, index)."""
    answers: list[tuple[int, int | None]] = []
    lock = threading.Lock()

    def worker() -> None:
        with httpx.Client(timeout=20, trust_env=False) as client:
            while not stop.is_set():
                try:
                    r = client.post(f"{server.url}/v1/loans/{loan_id}/addresses", headers=headers)
                except httpx.TransportError:
                    return  # the server is gone
                with lock:
                    answers.append((r.status_code, r.json().get("index") if r.is_success else None))

    return answers, lock, worker


def _stored_indexes(engine: Engine, loan_id: int) -> list[int]:
    with transaction(engine, write=False) as session:
        rows = session.exec(
            select(CollateralAddress.index).where(CollateralAddress.loan_id == loan_id)
        ).all()
        assert verify_chain(session).ok
    return sorted(rows)


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_custody_serve_stopped_under_writes_loses_nothing_it_acknowledged(
    db_url: str, engine: Engine, tmp_path: Path, how: str
) -> None:
    lender = ready_lender(engine)
    loan_id = lender.loan_ids[0]
    server = _start(db_url, tmp_path / "first", {})
    _wait_ready(server)
    stop = threading.Event()
    answers, lock, worker = _hand_outs(server, lender.headers("miner"), loan_id, stop)
    with ThreadPoolExecutor(8) as pool:
        for _ in range(8):
            pool.submit(worker)
        wait_until(lambda: len(answers) >= 40, timeout=60, message=server.log)
        if how == "sigterm":
            server.proc.send_signal(signal.SIGTERM)
            code = server.proc.wait(timeout=30)
        else:
            os.kill(server.proc.pid, signal.SIGKILL)
            code = server.proc.wait(timeout=10)
        stop.set()
    if how == "sigterm":
        assert _stopped_cleanly(code, server.log()), (code, server.log())
    else:
        assert code == -signal.SIGKILL
    with lock:
        statuses = {status for status, _ in answers}
        acknowledged = sorted(i for status, i in answers if status == 201 and i is not None)
    # Only 201s (never a 5xx on the way down); each index once.
    assert statuses == {201}, answers[-5:]
    assert len(acknowledged) == len(set(acknowledged))
    stored = _stored_indexes(engine, loan_id)
    # Contiguous from 0, every acknowledged address stored. SIGKILL may leave at most the
    # requests in flight committed but unanswered: stored, never acknowledged.
    assert stored == list(range(len(stored)))
    assert set(acknowledged) <= set(stored)
    assert len(stored) - 1 - len(acknowledged) <= (0 if how == "sigterm" else 8)

    again = _start(db_url, tmp_path / "again", {})
    try:
        _wait_ready(again)
        with httpx.Client(timeout=20, trust_env=False) as client:
            r = client.post(
                f"{again.url}/v1/loans/{loan_id}/addresses", headers=lender.headers("miner")
            )
        assert r.status_code == 201 and r.json()["index"] == len(stored), r.text
    finally:
        again.proc.terminate()
        assert _stopped_cleanly(again.proc.wait(timeout=30), again.log()), again.log()


def test_hsm_serve_killed_and_restarted_keeps_its_people_and_seed_and_stops_on_sigterm(
    tmp_path: Path, regtest_node: RegtestNode, feed: PriceFeed
) -> None:
    token = create_token(tmp_path / "softhsm", "hsm-proc", set_env=False)
    env = signer_env(tmp_path, regtest_node, feed, token)
    env["SOFTHSM2_CONF"] = str(token.conf_path)
    people = new_people()
    admins = [people["admin1"], people["admin2"]]
    bootstrap_admins(Path(env["HSM_STATE_DB"]), admins)
    seed_ceremony(tmp_path, env)
    for run in ("first", "second"):
        (tmp_path / run).mkdir()
    with serve_process(tmp_path / "first", env) as first:
        client = BankSigner(HttpTransport(first.url, first.token, timeout=30))
        try:
            before = client.health()
            enroll_staff(client, admins, [people["operator"], people["approver"]])
        finally:
            client.close()
        os.kill(first.proc.pid, signal.SIGKILL)
        first.proc.wait(timeout=10)
    registry = Registry(first.state_db)
    try:
        enrolled = {person.name for person in People(registry).active()}
    finally:
        registry.close()
    assert {people["operator"].name, people["approver"].name} <= enrolled

    with serve_process(tmp_path / "second", env) as second:
        client = BankSigner(HttpTransport(second.url, second.token, timeout=30))
        try:
            after = client.health()
        finally:
            client.close()
        assert after["seed_fingerprint"] == before["seed_fingerprint"]
        second.proc.send_signal(signal.SIGTERM)
        assert _stopped_cleanly(second.proc.wait(timeout=30), second.log()), second.log()
