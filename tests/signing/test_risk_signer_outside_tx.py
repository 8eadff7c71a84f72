"""The risk engine calls the bank's signer with no database transaction open: a signer
held for seconds does not stop other writers, and an automatic liquidation the signer
never signed (it was down) is rebuilt on a later pass instead of hanging."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from support.lending import funded_loan
from support.signer_world import SignerWorld
from support.world import World, audit_actions

from custody.audit.service import record
from custody.db.session import transaction
from custody.risk.engine import RiskEngine
from custody.risk.prices import HttpJsonPriceSource, MedianPriceSource
from custody.signing.chain import FeePolicy
from custody.watcher.service import Watcher
from hsm.client import BankSigner
from hsm.signer import SignerUnavailable
from regtest.node import RegtestNode
from regtest.price_feed import PriceFeed

pytestmark = [pytest.mark.node, pytest.mark.hsm]

DEBT = 1_500_000_00  # 1.5M RUB on 0.5 BTC: liquidated below 3.33M RUB/BTC


class HeldSigner(BankSigner):
    """The real signer behind a gate the test opens: its valuation waits until told."""

    def __init__(self, real: BankSigner) -> None:
        super().__init__(real.transport)
        self.entered = threading.Event()
        self.release = threading.Event()
        self.fail_sign_once = False

    def valuation(self, loan_ref: str) -> dict[str, Any]:
        self.entered.set()
        assert self.release.wait(20), "the test never released the signer"
        return super().valuation(loan_ref)

    def sign(self, *args: Any, **kwargs: Any) -> Any:
        if self.fail_sign_once:
            self.fail_sign_once = False
            raise SignerUnavailable("the signer went away")
        return super().sign(*args, **kwargs)


def _engine(
    world: World, node: RegtestNode, signer: BankSigner, feed: PriceFeed, clock: Any = None
) -> RiskEngine:
    source = HttpJsonPriceSource("feed", feed.url, field_path="data.price", time_path="data.time")
    kwargs: dict[str, Any] = {} if clock is None else {"clock": clock}
    return RiskEngine(
        world.engine,
        network="regtest",
        prices=MedianPriceSource([source], max_age=timedelta(minutes=10), max_spread_bps=200),
        chain=node.rpc,
        signer=signer,
        fees=FeePolicy(),
        **kwargs,
    )


def test_other_writers_go_on_while_the_signer_is_held(
    world: World,
    regtest_node: RegtestNode,
    watcher: Watcher,
    bank_signer: SignerWorld,
    feed: PriceFeed,
) -> None:
    f = funded_loan(world, regtest_node, watcher, principal_kopecks=DEBT, interest_rate_bps=0)
    feed.set("3000000")  # 100 % LTV for both the engine and the signer
    held = HeldSigner(bank_signer.client)
    risk = _engine(world, regtest_node, held, feed)
    report: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: report.update(r=risk.run_once()))
    runner.start()
    try:
        assert held.entered.wait(20), "the engine never asked the signer"
        wrote = threading.Event()

        def write() -> None:  # another writer (the watcher, an API request) meanwhile
            with transaction(world.engine) as session:
                record(session, actor="test", action="test.write_while_signer_held")
            wrote.set()

        writer = threading.Thread(target=write)
        writer.start()
        writer.join(timeout=10)
        assert wrote.is_set(), "a write waited on the risk engine's open transaction"
    finally:
        held.release.set()
        runner.join(timeout=60)
    [rid] = report["r"].liquidations
    assert world.call("miner", "GET", f"/v1/signing-requests/{rid}").json()["signed_seats"] == [
        "bank"
    ]
    assert world.call("miner", "GET", f"/v1/loans/{f.loan['id']}").json()["state"] == (
        "liquidating"
    )


def test_an_unsigned_automatic_liquidation_is_rebuilt_later(
    world: World,
    regtest_node: RegtestNode,
    watcher: Watcher,
    bank_signer: SignerWorld,
    feed: PriceFeed,
) -> None:
    f = funded_loan(world, regtest_node, watcher, principal_kopecks=DEBT, interest_rate_bps=0)
    lid = f.loan["id"]
    feed.set("3000000")
    held = HeldSigner(bank_signer.client)
    held.release.set()
    held.fail_sign_once = True
    first = _engine(world, regtest_node, held, feed).run_once()
    assert first.liquidations == [] and lid in first.errors  # the signer went away
    [stuck] = world.call("bank_operator", "GET", f"/v1/loans/{lid}/signing-requests").json()
    assert stuck["state"] == "awaiting_signatures" and stuck["signed_seats"] == []
    # a later pass, past the grace period: the unsigned one is cancelled and rebuilt
    later = datetime.now(UTC) + timedelta(minutes=2)
    second = _engine(world, regtest_node, held, feed, clock=lambda: later).run_once()
    [rid] = second.liquidations
    assert rid != stuck["id"]
    requests = world.call("bank_operator", "GET", f"/v1/loans/{lid}/signing-requests").json()
    assert [r["state"] for r in requests] == ["cancelled", "awaiting_signatures"]
    assert requests[1]["signed_seats"] == ["bank"]
    assert "signing_request.cancelled" in audit_actions(world.engine, request_id=stuck["id"])


class HeldPrepare(BankSigner):
    """The real signer whose `prepare` waits until the test lets it go."""

    def __init__(self, real: BankSigner) -> None:
        super().__init__(real.transport)
        self.entered = threading.Event()
        self.release = threading.Event()

    def prepare(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        self.entered.set()
        assert self.release.wait(20), "the test never released the signer"
        return super().prepare(*args, **kwargs)


def test_a_request_waiting_on_the_signer_blocks_no_writer(
    world: World, regtest_node: RegtestNode, watcher: Watcher, bank_signer: SignerWorld
) -> None:
    """`POST .../signing-requests` asks the signer for its statement with no transaction
    open: while the signer is held, other writers (and other requests) go on."""
    f = funded_loan(world, regtest_node, watcher)
    held = HeldPrepare(bank_signer.client)
    app = world.client.app
    real = app.state.signer
    app.state.signer = held
    answer: dict[str, Any] = {}

    def create() -> None:
        r = world.call(
            "bank_operator",
            "POST",
            f"/v1/loans/{f.loan['id']}/signing-requests",
            json={"action": "release"},
        )
        answer.update(status=r.status_code, body=r.json())

    creator = threading.Thread(target=create)
    creator.start()
    try:
        assert held.entered.wait(20), "the request never reached the signer"
        party = world.call("admin", "POST", "/v1/parties", json={"name": "p-held", "kind": "miner"})
        assert party.status_code == 201, party.text  # a write while the signer is held
    finally:
        held.release.set()
        creator.join(timeout=60)
        app.state.signer = real
    assert answer["status"] == 201, answer
    assert answer["body"]["signer_statement_id"] is not None


def test_a_broadcast_waiting_on_the_node_blocks_no_writer(
    world: World, regtest_node: RegtestNode, watcher: Watcher, bank_signer: SignerWorld
) -> None:
    """The last signature is uploaded and the service broadcasts with no transaction
    open: while the node is slow to answer, other writers go on."""
    from support.lending import bank_sign, request, sign, the_psbt, upload

    f = funded_loan(world, regtest_node, watcher)
    req = request(world, "bank_operator", f.loan["id"], action="release")
    assert bank_sign(world, req["id"]).json()["state"] == "done"  # the bank first
    entered, release = threading.Event(), threading.Event()
    node = regtest_node.rpc

    class SlowNode:
        def __getattr__(self, name: str) -> Any:
            return getattr(node, name)

        def test_mempool_accept(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
            entered.set()
            assert release.wait(20), "the test never released the node"
            return node.test_mempool_accept(*args, **kwargs)

    app = world.client.app
    app.state.chain = SlowNode()
    answer: dict[str, Any] = {}
    signed = sign(the_psbt(world, "miner", req["id"]), f.roots["miner"])
    uploader = threading.Thread(
        target=lambda: answer.update(r=upload(world, "miner", req["id"], signed))
    )
    uploader.start()
    try:
        assert entered.wait(20), "the upload never reached the node"
        party = world.call("admin", "POST", "/v1/parties", json={"name": "p-slow", "kind": "miner"})
        assert party.status_code == 201, party.text
    finally:
        release.set()
        uploader.join(timeout=60)
        app.state.chain = node
    assert answer["r"].status_code == 200 and answer["r"].json()["state"] == "broadcast"


def test_an_xpub_bank_key_liquidation_is_built_after_the_loans_pass(
    world: World,
    regtest_node: RegtestNode,
    watcher: Watcher,
    bank_signer: SignerWorld,
    feed: PriceFeed,
) -> None:
    """The bank signs on its own device: the engine prices the liquidation with its own
    figures, builds it after the loan's pass committed, and nobody has signed it yet."""
    f = funded_loan(
        world, regtest_node, watcher, hsm_bank=False, principal_kopecks=DEBT, interest_rate_bps=0
    )
    feed.set("3000000")
    before = bank_signer.bank_signatures()
    report = _engine(world, regtest_node, bank_signer.client, feed).run_once()
    [rid] = report.liquidations
    req = world.call("bank_operator", "GET", f"/v1/signing-requests/{rid}").json()
    assert req["required_seats"] == ["bank", "arbiter"] and req["signed_seats"] == []
    assert req["signer_statement_id"] is None
    assert req["evidence"]["price_rub_per_btc"] == "3000000"
    assert bank_signer.bank_signatures() == before  # the signer holds no key of this loan
    assert world.call("miner", "GET", f"/v1/loans/{f.loan['id']}").json()["state"] == (
        "liquidating"
    )
