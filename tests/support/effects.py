"""Other writers, timed, for tests that hold the node or the signer: while one call is in
flight, each of these must commit in well under the hold."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import Engine
from support.world import World

from custody.audit.service import record
from custody.chain.watcher import Watcher
from custody.db.session import transaction
from regtest.node import RegtestNode

HOLD_SECONDS = 6.0  # how long the node or the signer is held
WRITE_BOUND_SECONDS = 2.5  # each other write commits within this, well below the hold


@dataclass
class Timings:
    seconds: dict[str, float] = field(default_factory=dict)

    def timed(self, name: str, write: Callable[[], Any]) -> None:
        started = time.monotonic()
        write()
        self.seconds[name] = time.monotonic() - started

    def assert_bounded(self) -> None:
        slow = {k: round(v, 2) for k, v in self.seconds.items() if v > WRITE_BOUND_SECONDS}
        assert not slow, f"writes waited on the held call: {slow} (all: {self.seconds})"


def write_meanwhile(
    world: World,
    loan_id: int,
    other_engine: Engine,
    *,
    watcher: Watcher | None = None,
    node: RegtestNode | None = None,
) -> Timings:
    """An address handed out and a price set through the API, an audit event on another
    engine (another process's connection), and, given a watcher, a block with a deposit
    for `loan_id` applied by it."""
    times = Timings()

    def address() -> str:
        r = world.call("miner", "POST", f"/v1/loans/{loan_id}/addresses")
        assert r.status_code == 201, r.text
        return str(r.json()["address"])

    def price() -> None:
        r = world.call("bank_operator", "POST", "/v1/prices", json={"price_rub_per_btc": "7000000"})
        assert r.status_code == 201, r.text

    def audit() -> None:
        with transaction(other_engine) as session:
            record(session, actor="test", action="test.write_meanwhile")

    paid_to: list[str] = []
    times.timed("api: new address", lambda: paid_to.append(address()))
    times.timed("api: price set", price)
    times.timed("another engine: audit event", audit)
    if watcher is not None:
        assert node is not None
        node.faucet.pay(paid_to[0], 1_000_000)
        node.mine(1)

        def step() -> None:
            result = watcher.step()
            assert result.blocks_applied >= 1, result

        times.timed("watcher: a block applied", step)
    return times
