"""`/v1/metrics`: the health figures, the database's figures read at scrape time and the
request latency histogram, in Prometheus' text format, parsed by Prometheus' own parser
(the figures with a watcher and a node are checked in tests/watcher/test_stalls.py, the
histogram across real worker processes in tests/capacity/test_serve_metrics.py). And the
request id from the edge: echoed, and written into the audit events of its request."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select
from support.offline import funded_loan, offline_world
from support.world import World, build_world

from custody.audit.service import record
from custody.db.models import (
    AuditEvent,
    Deposit,
    DepositState,
    Outbox,
    PriceRecord,
    PriceState,
    RequestState,
    SigningAction,
    SigningRequest,
    Webhook,
)
from custody.db.session import transaction


def _samples(world: World) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    answer = world.call(None, "GET", "/v1/metrics")
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    }


def _value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_before_any_watcher_and_without_a_node(engine: Engine) -> None:
    samples = _samples(build_world(engine))
    names = {name for name, _ in samples}
    assert _value(samples, "custody_node_reachable") == 0
    assert not {n for n in names if n.startswith("custody_watcher_")}  # never ran
    assert _value(samples, "custody_outbox_backlog") == 0
    assert _value(samples, "custody_deposits", state="confirmed") == 0
    assert "custody_price_age_seconds" not in names  # no price was ever confirmed
    assert "custody_risk_paused" not in names  # the engine never said


def test_request_latency_is_labelled_by_route_template_and_status(engine: Engine) -> None:
    world = build_world(engine)
    template = "/v1/loans/{loan_id}"
    count = "custody_http_request_duration_seconds_count"
    before = _samples(world)
    for loan_id in (991, 992, 993):  # three ids, one label value
        assert world.call("admin", "GET", f"/v1/loans/{loan_id}").status_code == 404
    assert world.call(None, "GET", "/v1/loans/994").status_code == 401
    assert world.call(None, "GET", "/v1/no-such-path/5").status_code == 404
    after = _samples(world)

    def moved(**labels: str) -> float:
        return _value(after, count, **labels) - _value(before, count, **labels)

    assert moved(method="GET", route=template, status="404") == 3
    assert moved(method="GET", route=template, status="401") == 1
    assert moved(method="GET", route="<unmatched>", status="404") == 1
    assert not [labels for name, labels in after if name == count and "991" in str(labels)]


def test_the_database_figures_are_what_is_recorded(engine: Engine) -> None:
    world = offline_world(engine)
    loan_id = funded_loan(world)  # one confirmed deposit
    now = datetime.now(UTC)
    with transaction(engine) as session:
        address_id = session.exec(select(Deposit.address_id)).one()
        for n, state in enumerate(
            [DepositState.pending, DepositState.pending, DepositState.removed], start=1
        ):
            session.add(
                Deposit(
                    loan_id=loan_id,
                    address_id=address_id,
                    txid=f"{n:064x}",
                    vout=0,
                    amount_sats=1_000,
                    state=state,
                    required_confirmations=1,
                )
            )
        for n, (request_state, age) in enumerate(
            [
                (RequestState.awaiting_signatures, 600),
                (RequestState.ready, 60),
                (RequestState.confirmed, 6000),  # closed: not the oldest open one
            ]
        ):
            session.add(
                SigningRequest(
                    loan_id=loan_id,
                    action=SigningAction.release,
                    state=request_state,
                    slot=f"test:{n}",
                    psbt="-",
                    unsigned_txid=f"{n + 100:064x}",
                    required_seats="miner,bank",
                    inputs_json="[]",
                    outputs_json="[]",
                    evidence_json="{}",
                    fee_sats=500,
                    loan_state_before="active",
                    created_by="test",
                    created_at=now - timedelta(seconds=age),
                )
            )
        hook = Webhook(
            party_id=world.party_ids["bank"],
            url="https://hooks.example/x",
            secret="s" * 32,
            events="*",
        )
        session.add(hook)
        session.flush()
        assert hook.id is not None
        for n, (age, delivered, dead) in enumerate(
            [(300, False, False), (30, False, False), (900, True, False), (50, False, True)]
        ):
            session.add(
                Outbox(
                    event_id=f"event-{n}",
                    webhook_id=hook.id,
                    event_type="loan.state_changed",
                    payload="{}",
                    created_at=now - timedelta(seconds=age),
                    next_attempt_at=now,
                    delivered_at=now if delivered else None,
                    dead_at=now if dead else None,
                )
            )
        session.add(
            PriceRecord(
                price_rub_per_btc="6000000",
                source="manual",
                quoted_at=now - timedelta(seconds=120),
                state=PriceState.confirmed,
                proposed_by="test",
                confirmed_at=now,
            )
        )
        record(session, actor="risk_engine:auto", action="risk.paused", reason="no price")
    samples = _samples(world)
    assert _value(samples, "custody_deposits", state="confirmed") == 1
    assert _value(samples, "custody_deposits", state="pending") == 2
    assert _value(samples, "custody_deposits", state="removed") == 1
    assert _value(samples, "custody_deposits", state="spent") == 0
    assert _value(samples, "custody_signing_requests", state="awaiting_signatures") == 1
    assert _value(samples, "custody_signing_requests", state="ready") == 1
    assert _value(samples, "custody_signing_requests", state="confirmed") == 1
    assert 600 <= _value(samples, "custody_signing_request_oldest_open_age_seconds") < 700
    assert _value(samples, "custody_outbox_backlog") == 2
    assert 300 <= _value(samples, "custody_outbox_oldest_age_seconds") < 400
    assert _value(samples, "custody_outbox_dead") == 1
    assert 120 <= _value(samples, "custody_price_age_seconds") < 220
    assert _value(samples, "custody_risk_paused") == 1
    with transaction(engine) as session:
        record(session, actor="risk_engine:auto", action="risk.resumed", reason="price usable")
    assert _value(_samples(world), "custody_risk_paused") == 0


def test_the_request_id_is_echoed_and_written_into_the_audit_data(engine: Engine) -> None:
    world = build_world(engine)
    answer = world.client.post(
        "/v1/loans",
        json=world.loan_body(),
        headers={**world.h("bank_operator"), "X-Request-Id": "edge-7f3a.b:1"},
    )
    assert answer.status_code == 201, answer.text
    assert answer.headers["X-Request-Id"] == "edge-7f3a.b:1"
    with Session(engine) as s:
        events = s.exec(select(AuditEvent).where(AuditEvent.loan_id == answer.json()["id"])).all()
    assert events and all(json.loads(e.data)["request_id"] == "edge-7f3a.b:1" for e in events)


def test_an_unsafe_request_id_is_replaced(engine: Engine) -> None:
    world = build_world(engine)
    for unsafe in ("x" * 65, "two words", "<script>", b"a\xe9b"):
        answer = world.client.get("/v1/health", headers={"X-Request-Id": unsafe})
        echoed = answer.headers["X-Request-Id"]
        assert echoed not in (unsafe, "a\xe9b") and len(echoed) == 32 and echoed.isalnum()
    fresh = {world.call(None, "GET", "/v1/health").headers["X-Request-Id"] for _ in range(3)}
    assert len(fresh) == 3  # made per request
    with transaction(engine) as session:  # outside a request: no request id
        record(session, actor="test", action="test.outside")
    with Session(engine) as s:
        last = s.exec(select(AuditEvent).order_by(col(AuditEvent.id).desc())).first()
    assert last is not None and "request_id" not in json.loads(last.data)
