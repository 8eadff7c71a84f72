"""No database transaction is open while the bank's signer is asked: a real `hsm serve`
(its own process and SoftHSM2 token) reached through a loopback proxy that holds its
answers for seconds while it signs a release, and meanwhile the watcher, the API and
another engine keep committing. SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.engine import Engine
from support.effects import HOLD_SECONDS, write_meanwhile
from support.lending import bank_sign, funded_loan, request, sign, the_psbt, upload
from support.signer_world import SignerWorld, serve_world
from support.world import World, build_world

from custody.watcher.service import Watcher
from hsm.client import BankSigner, HttpTransport
from regtest.node import RegtestNode
from regtest.price_feed import PriceFeed
from regtest.slow_proxy import SlowProxy

pytestmark = [pytest.mark.node, pytest.mark.hsm]


@pytest.fixture
def served(tmp_path: Path, regtest_node: RegtestNode, feed: PriceFeed) -> Iterator[SignerWorld]:
    with serve_world(tmp_path / "hsm-serve", regtest_node, feed) as sw:
        yield sw


@pytest.fixture
def signer_proxy(served: SignerWorld) -> Iterator[SlowProxy]:
    assert served.serve_url is not None
    port = httpx.URL(served.serve_url).port
    assert port is not None
    with SlowProxy("127.0.0.1", port) as proxy:
        yield proxy


@pytest.fixture
def slow_world(
    engine: Engine, regtest_node: RegtestNode, served: SignerWorld, signer_proxy: SlowProxy
) -> Iterator[World]:
    assert served.serve_token is not None
    client = BankSigner(HttpTransport(signer_proxy.url, served.serve_token, timeout=60))
    try:
        yield build_world(engine, chain=regtest_node.rpc, signer=client, staff=served.staff)
    finally:
        client.close()


def test_a_signature_held_by_the_signer_blocks_no_writer(
    slow_world: World,
    other_engine: Engine,
    regtest_node: RegtestNode,
    watcher: Watcher,
    served: SignerWorld,
    signer_proxy: SlowProxy,
) -> None:
    world = slow_world
    f = funded_loan(world, regtest_node, watcher)  # the bank key made through the proxy
    other = world.funded_ready_loan()
    req = request(world, "bank_operator", f.loan["id"], action="release")
    rid = req["id"]
    signed = sign(the_psbt(world, "miner", rid), f.roots["miner"])
    assert upload(world, "miner", rid, signed).status_code == 200
    before = served.bank_signatures()

    signer_proxy.hold(HOLD_SECONDS)
    answer: dict[str, Any] = {}

    def approve() -> None:
        try:
            answer["view"] = bank_sign(world, rid).json()
        except BaseException as exc:  # shown by the main thread
            answer["error"] = exc

    started = time.monotonic()
    approver = threading.Thread(target=approve)
    approver.start()
    try:
        signer_proxy.wait_for_waiting(1)  # the signer has answered; the answer waits
        times = write_meanwhile(
            world, other["id"], other_engine, watcher=watcher, node=regtest_node
        )
        in_flight = approver.is_alive()
    finally:
        approver.join(timeout=60)
    held_for = time.monotonic() - started
    assert "error" not in answer, answer.get("error")
    times.assert_bounded()
    assert in_flight, f"the writes ended only after the signer answered ({times.seconds})"
    assert held_for >= HOLD_SECONDS - 0.5
    assert answer["view"]["state"] == "done", answer["view"]
    signer_proxy.release()
    assert served.bank_signatures() == before + 1
    assert world.call("miner", "GET", f"/v1/signing-requests/{rid}").json()["state"] == "broadcast"
