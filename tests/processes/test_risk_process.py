"""`custody risk` as an OS process against a real `hsm serve`, btcd and price feed (issue
16, "Processes as processes"): a crash of the price makes it liquidate every loan, each
liquidation decided and signed by the bank's signer; it shows in `/v1/health`, stops
cleanly on SIGTERM, and SIGKILLed mid-pass, the next one finishes the work with exactly
one live liquidation per loan."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select
from support.lending import funded_loan
from support.processes import CommandProcess, custody_command, heartbeats
from support.signer_world import SignerWorld, serve_world
from support.world import World, build_world

from custody.audit.service import verify_chain
from custody.db.models import Loan, LoanState, RequestState, SigningAction, SigningRequest
from custody.watcher.service import Watcher
from regtest.node import RegtestNode
from regtest.price_feed import PriceFeed
from regtest.wait import wait_until

pytestmark = [pytest.mark.process]

DEBT = 1_500_000_00  # kopecks, no interest: 50% LTV on 0.5 BTC at 6M RUB/BTC
CRASH = "2000000"  # 150%: past every threshold


@pytest.fixture
def served(tmp_path: Path, regtest_node: RegtestNode, feed: PriceFeed) -> Iterator[SignerWorld]:
    feed.set("6000000")
    with serve_world(tmp_path / "hsm-serve", regtest_node, feed) as sw:
        yield sw


@pytest.fixture
def remote_world(engine: Engine, regtest_node: RegtestNode, served: SignerWorld) -> World:
    return build_world(engine, chain=regtest_node.rpc, signer=served.client, staff=served.staff)


def _risk(
    base: Path, db_url: str, node: RegtestNode, served: SignerWorld, feed: PriceFeed
) -> CommandProcess:
    assert served.serve_url is not None and served.serve_token is not None
    return custody_command(
        base,
        db_url,
        "risk",
        hsm_url=served.serve_url,
        hsm_serve_token=served.serve_token,
        node_rpc_url=node.rpc_url,
        node_rpc_user=node.rpc_user,
        node_rpc_password=node.rpc_password,
        price_sources=json.dumps([feed.source_config()]),
        risk_poll_seconds="0.2",
        risk_unsigned_grace_seconds="2",
    )


def _loans(world: World, node: RegtestNode, watcher: Watcher, n: int) -> list[int]:
    return [
        funded_loan(world, node, watcher, principal_kopecks=DEBT, interest_rate_bps=0).loan["id"]
        for _ in range(n)
    ]


def _liquidations(engine: Engine) -> list[SigningRequest]:
    with Session(engine) as s:
        statement = select(SigningRequest).where(
            col(SigningRequest.action) == SigningAction.liquidation
        )
        return list(s.exec(statement).all())


def _live(engine: Engine) -> dict[int, list[SigningRequest]]:
    live: dict[int, list[SigningRequest]] = {}
    for req in _liquidations(engine):
        if req.state != RequestState.cancelled:
            live.setdefault(req.loan_id, []).append(req)
    return live


def _all_signed(engine: Engine, loans: list[int]) -> bool:
    live = _live(engine)
    return set(live) == set(loans) and all(
        len(reqs) == 1 and "bank" in reqs[0].signed_seats.split(",") for reqs in live.values()
    )


def _states(engine: Engine, loans: list[int]) -> set[str]:
    with Session(engine) as s:
        return {str(s.get(Loan, lid).state) for lid in loans}  # type: ignore[union-attr]


def _health(world: World) -> dict[str, Any]:
    answer = world.call(None, "GET", "/v1/health")
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def test_risk_process_liquidates_with_the_signer_and_stops_on_sigterm(
    tmp_path: Path,
    db_url: str,
    engine: Engine,
    remote_world: World,
    regtest_node: RegtestNode,
    watcher: Watcher,
    served: SignerWorld,
    feed: PriceFeed,
) -> None:
    loans = _loans(remote_world, regtest_node, watcher, 2)
    risk = _risk(tmp_path / "risk", db_url, regtest_node, served, feed).start()
    try:
        wait_until(lambda: len(heartbeats(engine, "risk")) == 1, timeout=60, message=risk.log)
        wait_until(lambda: heartbeats(engine, "risk")[0].passes >= 2, timeout=60, message=risk.log)
        assert _liquidations(engine) == []  # 50% LTV: nothing to do
        (shown,) = _health(remote_world)["workers"]["risk"]
        assert shown["alive"] is True and shown["last_error"] is None

        feed.set(CRASH)
        wait_until(lambda: _all_signed(engine, loans), timeout=90, message=risk.log)
        assert _states(engine, loans) == {LoanState.liquidating.value}
        signed = {d.txid for d in served.registry().decisions() if d.decision == "signed"}
        assert {reqs[0].unsigned_txid for reqs in _live(engine).values()} <= signed
    finally:
        code = risk.terminate()
    assert code == 0, risk.log()
    (row,) = heartbeats(engine, "risk")
    assert row.stopped_at is not None
    assert _health(remote_world)["workers"]["risk"] == []
    assert _all_signed(engine, loans)  # nothing more happened on the way out


def test_risk_process_killed_mid_pass_the_next_one_finishes_with_one_liquidation_a_loan(
    tmp_path: Path,
    db_url: str,
    engine: Engine,
    remote_world: World,
    regtest_node: RegtestNode,
    watcher: Watcher,
    served: SignerWorld,
    feed: PriceFeed,
) -> None:
    loans = _loans(remote_world, regtest_node, watcher, 4)
    feed.set(CRASH)
    first = _risk(tmp_path / "first", db_url, regtest_node, served, feed).start()
    try:
        wait_until(lambda: len(_liquidations(engine)) >= 1, timeout=90, message=first.log)
    finally:
        first.kill()  # in the middle of its pass: some loans done, maybe one half done
    done_by_first = len(_live(engine))
    assert done_by_first >= 1

    second = _risk(tmp_path / "second", db_url, regtest_node, served, feed).start()
    try:
        wait_until(lambda: _all_signed(engine, loans), timeout=120, message=second.log)
    finally:
        assert second.terminate() == 0, second.log()
    live = _live(engine)
    cancelled = len(_liquidations(engine)) - len(loans)
    print(
        f"\n[{engine.dialect.name}] the first pass left {done_by_first} of {len(loans)}; "
        f"{cancelled} unsigned request(s) cancelled and rebuilt"
    )
    assert sorted(live) == sorted(loans)
    assert all(len(reqs) == 1 for reqs in live.values())  # never two for one loan
    assert _states(engine, loans) == {LoanState.liquidating.value}
    with Session(engine) as s:
        assert verify_chain(s).ok
    kinds = {(row.holder, row.stopped_at is None) for row in heartbeats(engine, "risk")}
    assert len(kinds) == 2 and sum(1 for _, running in kinds if running) == 1  # the dead one
