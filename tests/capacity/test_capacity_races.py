"""Races across replicas under load (issue 16, "Concurrency across replicas"): two real
`custody serve` processes on one database (SQLite file, PostgreSQL), the load
generator's open-loop mix (bench/load.py) running against both the whole time, and
meanwhile 20 release requests for one loan released at once (exactly one 201, the rest
the named 409 `request_already_open`, one request stored) and 20 new-address requests
for another (distinct, contiguous indexes)."""

from __future__ import annotations

import random
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
from sqlalchemy.engine import Engine
from sqlmodel import col, select
from support.custody_serve import custody_replicas

from bench import load, signing_load
from bench.liquidation_storm import SetUp, watch
from custody.audit.service import verify_chain
from custody.db.models import (
    AuditEvent,
    CollateralAddress,
    Loan,
    LoanState,
    SigningRequest,
)
from custody.db.session import transaction
from regtest.node import RegtestNode

pytestmark = [pytest.mark.process]  # starts custody serve as OS processes

T = TypeVar("T")

RACERS = 20
LOAD_RATE = 40.0  # requests/s of the mix, alternating between the replicas
LOAD_SECONDS = 6.0


def concurrently(count: int, call: Callable[[int], T]) -> list[T]:
    """`call(0..count-1)`, all released at once from their own threads."""
    start = threading.Barrier(count)

    def one(i: int) -> T:
        start.wait(timeout=30)
        return call(i)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def _fund_first_address(engine: Engine, node: RegtestNode, loan_id: int) -> None:
    """Pay the loan's address 0 and let the real watcher make it active."""
    with transaction(engine, write=False) as session:
        address = session.exec(
            select(CollateralAddress.address).where(
                CollateralAddress.loan_id == loan_id, CollateralAddress.index == 0
            )
        ).one()
    height = node.rpc.get_block_count() + 1
    node.faucet.pay(address, signing_load.COLLATERAL_SATS)
    node.mine(1)
    watch(engine, node, height, SetUp())


def test_twenty_releases_and_hand_outs_at_once_across_replicas_under_load(
    db_url: str, engine: Engine, regtest_node: RegtestNode, tmp_path: Path
) -> None:
    people = signing_load.populate(engine, 2, prefix="race")
    with transaction(engine, write=False) as session:
        released, handed = sorted(i for i in session.exec(select(Loan.id)).all() if i)
    _fund_first_address(engine, regtest_node, released)
    population = load.populate(engine, loans=6, miners=3)
    node_env = {
        "node_rpc_url": regtest_node.rpc_url,
        "node_rpc_user": regtest_node.rpc_user,
        "node_rpc_password": regtest_node.rpc_password,
    }

    with (
        custody_replicas(db_url, tmp_path, 2, **node_env) as replicas,
        httpx.Client(timeout=30, limits=httpx.Limits(max_connections=100)) as client,
    ):
        ports = [int(r.url.rsplit(":", 1)[1]) for r in replicas]
        schedule = load.plan(population, ports, int(LOAD_RATE * LOAD_SECONDS), random.Random(16))
        background: list[list[load.Outcome]] = []
        loader = threading.Thread(
            target=lambda: background.append(
                load.send_schedule(schedule, LOAD_RATE, load.ClientConfig(timeout=10.0))[0]
            )
        )
        loader.start()
        try:

            def race(i: int) -> httpx.Response:
                server = replicas[i % 2].url
                if i < RACERS:
                    return client.post(
                        f"{server}/v1/loans/{released}/signing-requests",
                        json={"action": "release"},
                        headers=people.headers("operator"),
                    )
                return client.post(
                    f"{server}/v1/loans/{handed}/addresses", headers=people.headers("miner")
                )

            answers = concurrently(2 * RACERS, race)
        finally:
            loader.join(timeout=60)
        assert not loader.is_alive()

    releases, hand_outs = answers[:RACERS], answers[RACERS:]
    assert Counter(a.status_code for a in releases) == {201: 1, 409: RACERS - 1}, [
        a.text for a in releases
    ]
    refused = [a.json() for a in releases if a.status_code == 409]
    assert {r["error"] for r in refused} == {"request_already_open"}, refused
    assert Counter(a.status_code for a in hand_outs) == {201: RACERS}, [a.text for a in hand_outs]
    assert sorted(a.json()["index"] for a in hand_outs) == list(range(1, RACERS + 1))
    assert len({a.json()["address"] for a in hand_outs}) == RACERS

    # The load ran throughout, against both replicas, and nothing of it failed.
    (outcomes,) = background
    assert len(outcomes) == len(schedule)
    assert Counter(o.error for o in outcomes if o.error) == Counter()

    with transaction(engine, write=False) as session:
        requests = session.exec(
            select(SigningRequest).where(SigningRequest.loan_id == released)
        ).all()
        loan = session.get(Loan, released)
        opened = session.exec(
            select(AuditEvent).where(
                AuditEvent.loan_id == released, AuditEvent.action == "signing_request.created"
            )
        ).all()
        indexes = session.exec(
            select(CollateralAddress.index).where(
                CollateralAddress.loan_id == handed, col(CollateralAddress.change).is_(False)
            )
        ).all()
        chain = verify_chain(session)
    created = next(a.json() for a in releases if a.status_code == 201)
    assert [r.id for r in requests] == [created["id"]]
    assert loan is not None and loan.state == LoanState.releasing
    assert len(opened) == 1
    assert sorted(indexes) == list(range(RACERS + 1))
    assert chain.ok, chain
