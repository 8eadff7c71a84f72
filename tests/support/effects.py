"""Other writers, timed, for tests that hold the node or the signer (while one call is in
flight, each must commit in well under the hold), and call-outs that crash the service."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import Engine
from support.world import World

from custody.audit.service import record
from custody.db.session import transaction
from custody.watcher.service import Watcher
from hsm.client import BankSigner
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


# -- crashes -----------------------------------------------------------------------------


class Crash(Exception):
    """The service's process dies here."""


def _crash_around(call: Callable[[], Any], when: str) -> Any:
    if when == "before":
        raise Crash("before the call")
    call()
    raise Crash("after the call: its answer is lost")


class CrashingSigner(BankSigner):
    """The real signer; `op` crashes the service once, before or after reaching it."""

    def __init__(self, real: BankSigner, op: str, when: str) -> None:
        super().__init__(real.transport)
        self.op, self.when, self.crashed = op, when, False

    def _once(self, op: str, call: Callable[[], Any]) -> Any:
        if op != self.op or self.crashed:
            return call()
        self.crashed = True
        return _crash_around(call, self.when)

    def prepare(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self._once("prepare", lambda: BankSigner.prepare(self, *args, **kwargs))  # type: ignore[no-any-return]

    def sign(self, *args: Any, **kwargs: Any) -> Any:
        return self._once("sign", lambda: BankSigner.sign(self, *args, **kwargs))

    def register_loan(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self._once(  # type: ignore[no-any-return]
            "register_loan", lambda: BankSigner.register_loan(self, *args, **kwargs)
        )

    def record_repayment(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self._once(  # type: ignore[no-any-return]
            "record_repayment", lambda: BankSigner.record_repayment(self, *args, **kwargs)
        )


class CrashingNode:
    """The real node; the broadcast crashes the service once: before the node is asked
    (`before`), or after `sendrawtransaction` reached it (`after`)."""

    def __init__(self, real: Any, when: str) -> None:
        self.real, self.when = real, when

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def test_mempool_accept(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if self.when == "before":
            raise Crash("before the broadcast")
        result: dict[str, Any] = self.real.test_mempool_accept(*args, **kwargs)
        return result

    def send_raw_transaction(self, tx_hex: str) -> str:
        return str(_crash_around(lambda: self.real.send_raw_transaction(tx_hex), "after"))
