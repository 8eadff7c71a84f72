"""A watcher that cannot move shows it (issue 11): `/v1/health` reads the node's tip at
request time and shows the watcher's height, last successful step, last error and a
`stalled` flag; the watcher raises `watcher.stalled` once (an audit alert and the banks'
webhook) and `watcher.recovered` once it moves again. The node is made unreachable by
holding its answers behind a loopback proxy (a real btcd behind it). SQLite and
PostgreSQL."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, func, select
from support.bulk import create_ready_loans
from support.watchers import RunningWatcher
from support.world import World, build_world

from custody.chain.rpc import NodeRpc
from custody.db.models import AuditEvent, Deposit, Outbox
from custody.db.session import make_engine, pools, transaction
from custody.netpolicy import UrlPolicy
from custody.notify.outbox import register_webhook
from custody.watcher.service import Watcher, WatcherConfig
from regtest.node import RegtestNode, free_port
from regtest.slow_proxy import SlowProxy
from regtest.wait import wait_until

pytestmark = [pytest.mark.node]

SECRET = "s" * 16 + "-the-bank-webhook-secret-0123456"
POLL = 0.05
STALL_POLLS = 4


@pytest.fixture
def proxy(regtest_node: RegtestNode) -> Iterator[SlowProxy]:
    with SlowProxy("127.0.0.1", regtest_node.rpc_port) as p:
        yield p


def _rpc(node: RegtestNode, url: str, timeout: float) -> NodeRpc:
    return NodeRpc(url, node.rpc_user, node.rpc_password, timeout=timeout)


def _health(world: World) -> dict[str, Any]:
    answer = world.call(None, "GET", "/v1/health")
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def _metrics(world: World) -> dict[str, float]:
    """`/v1/metrics`, parsed by Prometheus' own parser: sample name -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    answer = world.call(None, "GET", "/v1/metrics")
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    }


def _count(engine: Engine, action: str) -> int:
    with Session(engine) as s:
        return s.exec(
            select(func.count()).select_from(AuditEvent).where(col(AuditEvent.action) == action)
        ).one()


def _queued(engine: Engine, event_type: str) -> int:
    with Session(engine) as s:
        return s.exec(
            select(func.count()).select_from(Outbox).where(col(Outbox.event_type) == event_type)
        ).one()


def test_a_stalled_watcher_shows_in_health_and_alerts_once_then_recovers(
    engine: Engine, regtest_node: RegtestNode, proxy: SlowProxy
) -> None:
    node_rpc = _rpc(regtest_node, proxy.url, timeout=0.3)
    world = build_world(
        engine,
        chain=node_rpc,
        watch_poll_seconds=POLL,
        watch_stall_polls=STALL_POLLS,
        health_node_timeout_seconds=0.3,
    )
    with transaction(engine) as session:  # the bank hears of stalls
        register_webhook(
            session,
            world.party_ids["bank"],
            "http://127.0.0.1:9/hooks",
            SECRET,
            ["watcher.stalled", "watcher.recovered"],
            urls=UrlPolicy.for_network("regtest"),
        )
    [loan] = create_ready_loans(engine, [1_000_000], seed="stalls")
    watcher = Watcher(
        engine,
        node_rpc,
        config=WatcherConfig(
            start_height=regtest_node.rpc.get_block_count() + 1, stall_steps=STALL_POLLS
        ),
    )
    running = RunningWatcher(watcher, poll_seconds=POLL)
    try:
        tip = regtest_node.rpc.get_block_count()

        def watching() -> bool:
            body = _health(world)
            w = body["watcher"]
            return (
                w is not None
                and w["height"] == tip
                and not w["stalled"]
                and body["node"] == {"reachable": True, "tip_height": tip}
            )

        def metrics_say_watching() -> bool:
            """The same, scraped. Asked until it holds: the quiet limit is 4 polls (0.2 s),
            so on a busy machine a scrape can fall in a gap between two steps."""
            seen = _metrics(world)
            return (
                seen.get("custody_watcher_height") == tip
                and seen.get("custody_node_tip_height") == tip
                and seen.get("custody_watcher_stalled") == 0
                and seen.get("custody_node_reachable") == 1
            )

        wait_until(watching, timeout=30, message=lambda: str(_health(world)))
        wait_until(metrics_say_watching, timeout=30, message=lambda: str(_metrics(world)))

        proxy.hold()  # the node stops answering: every step times out
        held_at = time.monotonic()

        def stalled() -> bool:
            return bool(_health(world)["watcher"]["stalled"])

        def says_stalled() -> bool:
            """The watcher's own verdict: its steps failed STALL_POLLS times in a row (the
            flag alone shows sooner, once the last success is older than those polls)."""
            w = _health(world)["watcher"]
            return bool(w["stalled"] and w["stalled_since"])

        wait_until(stalled, timeout=20, message=lambda: str(_health(world)))
        shown_after = time.monotonic() - held_at
        wait_until(says_stalled, timeout=20, message=lambda: str(_health(world)))
        body = _health(world)
        assert body["node"]["reachable"] is False and "timed out" in body["node"]["error"]
        w = body["watcher"]
        assert w["last_error"]["kind"] == "RpcUnavailable", w
        assert "timed out" in w["last_error"]["message"]
        assert w["last_step_at"] < w["last_error"]["at"]
        assert w["height"] == tip
        seen = _metrics(world)
        assert seen["custody_watcher_stalled"] == 1 and seen["custody_node_reachable"] == 0
        assert "custody_node_tip_height" not in seen
        assert seen["custody_watcher_failed_steps"] >= STALL_POLLS

        # It keeps failing, and alerts once.
        failed = w["failed_steps"]
        wait_until(
            lambda: _health(world)["watcher"]["failed_steps"] >= failed + STALL_POLLS,
            timeout=20,
        )
        assert _count(engine, "watcher.stalled") == 1
        assert _queued(engine, "watcher.stalled") == 1
        assert _count(engine, "watcher.recovered") == 0

        proxy.release()  # the node answers again: the watcher moves
        paid_txid, _ = regtest_node.faucet.pay(loan.address, 1_000_000)
        regtest_node.mine(1)

        def deposit_state() -> str:
            with Session(engine) as s:
                return str(s.exec(select(Deposit).where(Deposit.txid == paid_txid)).one().state)

        def recovered() -> bool:
            w = _health(world)["watcher"]
            return not w["stalled"] and w["height"] == tip + 1 and w["failed_steps"] == 0

        wait_until(recovered, timeout=30, message=lambda: str(_health(world)))
        # Its deposit is screened with its block (the bank's lists, nothing called out)
        # and counts as confirmed once screening has cleared it.
        wait_until(lambda: deposit_state() == "confirmed", timeout=30, message=deposit_state)
        assert (_count(engine, "watcher.stalled"), _count(engine, "watcher.recovered")) == (1, 1)
        assert _queued(engine, "watcher.recovered") == 1
        with Session(engine) as s:
            alert = s.exec(select(AuditEvent).where(AuditEvent.action == "watcher.stalled")).one()
        assert alert.decision == "alert" and "RpcUnavailable" in alert.data
    finally:
        assert running.close() is None

    # A watcher that is gone (nothing left to record its failures) shows stalled too.
    wait_until(stalled, timeout=10, message=lambda: str(_health(world)))
    print(
        f"\n[{engine.dialect.name}] stalled shown {shown_after:.1f}s after the node stopped "
        f"answering (poll {POLL}s, {STALL_POLLS} polls)"
    )


def test_health_asks_the_node_with_no_transaction_open(
    db_url: str, engine: Engine, regtest_node: RegtestNode, proxy: SlowProxy, watcher: Watcher
) -> None:
    """The watcher's rows are read and their transaction closed before the node is asked:
    while the node's answer is held, the API holds no database connection at all."""
    regtest_node.mine(1)
    watcher.step()
    api_engine = make_engine(db_url)  # the API process's own pool
    try:
        world = build_world(
            api_engine,
            chain=_rpc(regtest_node, proxy.url, timeout=30),
            health_node_timeout_seconds=10,
        )
        proxy.hold()
        answers: list[dict[str, Any]] = []
        asking = threading.Thread(target=lambda: answers.append(_health(world)))
        asking.start()
        proxy.wait_for_waiting(1)  # the node answered; health waits for it
        checked_out = sum(pool.checkedout() for pool in pools(api_engine))  # type: ignore[attr-defined]
        proxy.release()
        asking.join(timeout=30)
    finally:
        api_engine.dispose()
    assert checked_out == 0, "health held a database connection while it asked the node"
    [body] = answers
    tip = regtest_node.rpc.get_block_count()
    assert body["node"] == {"reachable": True, "tip_height": tip}
    assert body["watcher"]["height"] == tip and body["watcher"]["lag_blocks"] == 0


def test_health_answers_when_the_node_is_unreachable(
    engine: Engine, regtest_node: RegtestNode, watcher: Watcher
) -> None:
    watcher.step()
    world = build_world(
        engine, chain=_rpc(regtest_node, f"http://127.0.0.1:{free_port()}", timeout=30)
    )
    started = time.monotonic()
    body = _health(world)
    assert time.monotonic() - started < 5
    assert body["node"]["reachable"] is False and "unreachable" in body["node"]["error"]
    assert body["watcher"]["height"] == regtest_node.rpc.get_block_count()
    assert body["watcher"]["last_error"] is None and body["watcher"]["stalled"] is False
