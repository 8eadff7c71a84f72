"""Every process as an operator sees it (issue 16): `custody watch | risk | notify
--metrics-port` and `custody serve` started as OS processes against a real btcd, `hsm
serve` with its own SoftHSM2 token; their metrics scraped over loopback. The watcher's
height follows mined blocks; the signer's /metrics needs its token and counts a refusal
by its rule; a request id sent to the API reaches the audit event's data and the
signer's decision line; every metric the sample alert rules and dashboard name
(ops/prometheus/alerts.yml, ops/grafana/custody.json) is one a process exports."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from embit.psbt import PSBT
from embit.script import address_to_scriptpubkey
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.engine import Engine
from sqlmodel import Session, select
from support.custody_serve import custody_serve
from support.lending import bank_sign, funded_loan, request
from support.signer_world import SignerWorld, free_port, serve_world
from support.watchers import watch_env
from support.world import World, build_world

from custody.db.models import AuditEvent, PriceRecord, PriceState, SigningRequest
from custody.watcher.service import Watcher
from regtest.faucet import random_p2wpkh_address
from regtest.node import RegtestNode
from regtest.price_feed import PriceFeed
from regtest.wait import wait_until

pytestmark = [pytest.mark.node, pytest.mark.hsm]

ROOT = Path(__file__).resolve().parents[2]
Samples = dict[str, list[tuple[dict[str, str], float]]]


@pytest.fixture
def served(tmp_path: Path, regtest_node: RegtestNode, feed: PriceFeed) -> Iterator[SignerWorld]:
    with serve_world(tmp_path / "hsm-serve", regtest_node, feed) as sw:
        yield sw


def _parse(text: str) -> Samples:
    """Sample name -> its (labels, value) pairs; a family with no sample yet (a labelled
    counter nobody incremented) is listed by its name with none."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        out.setdefault(family.name, [])
        if family.type == "counter":
            out.setdefault(f"{family.name}_total", [])
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return out


def _scrape(url: str, **kw: Any) -> Samples:
    answer = httpx.get(url, timeout=10, **kw)
    assert answer.status_code == 200, answer.text
    return _parse(answer.text)


def _value(samples: Samples, name: str, **labels: str) -> float:
    return sum(
        v for got, v in samples.get(name, []) if all(got.get(k) == x for k, x in labels.items())
    )


@contextmanager
def _process(command: str, env: dict[str, str], log: Path, port: int) -> Iterator[str]:
    """`custody <command> --metrics-port <port>`; its metrics URL once it answers."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "custody.cli", command, "--metrics-port", str(port)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/metrics"

    def answers() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"custody {command} exited:\n{log.read_text()}")
        try:
            return httpx.get(url, timeout=2).is_success
        except httpx.TransportError:
            return False

    try:
        wait_until(answers, timeout=60, message=lambda: f"custody {command}\n{log.read_text()}")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _named_metrics(expression: str) -> set[str]:
    return set(re.findall(r"\b((?:custody|hsm)_[a-z0-9_]+)\b", expression))


def test_every_process_exports_what_the_alerts_and_dashboard_use(
    db_url: str, engine: Engine, regtest_node: RegtestNode, served: SignerWorld, tmp_path: Path
) -> None:
    env = watch_env(db_url, regtest_node, watch_poll_seconds="0.2", risk_poll_seconds="0.5")
    hsm_metrics = f"{served.serve_url}/metrics"
    token = {"Authorization": f"Bearer {served.serve_token}"}
    # one refusal, so the signer's labelled counter has a sample
    refused = httpx.post(f"{served.serve_url}/v1/no_such_op", content=b"{}", headers=token)
    assert refused.status_code == 422
    with ExitStack() as stack:
        watch = stack.enter_context(_process("watch", env, tmp_path / "watch.log", free_port()))
        risk = stack.enter_context(_process("risk", env, tmp_path / "risk.log", free_port()))
        notify = stack.enter_context(_process("notify", env, tmp_path / "notify.log", free_port()))
        node = {
            "node_rpc_url": regtest_node.rpc_url,
            "node_rpc_user": regtest_node.rpc_user,
            "node_rpc_password": regtest_node.rpc_password,
        }
        api = stack.enter_context(custody_serve(db_url, tmp_path / "serve", **node))

        # The watcher's height follows the chain.
        wait_until(lambda: _value(_scrape(watch), "custody_watch_height") > 0, timeout=30)
        start = _value(_scrape(watch), "custody_watch_height")
        regtest_node.mine(3)
        wait_until(
            lambda: _value(_scrape(watch), "custody_watch_height") == start + 3,
            timeout=30,
            message=lambda: f"watch height {_scrape(watch).get('custody_watch_height')}",
        )
        watched = _scrape(watch)
        assert _value(watched, "custody_watch_node_tip_height") == start + 3
        assert _value(watched, "custody_watch_blocks_applied_total") >= 3
        assert _value(watched, "custody_watch_steps_total", result="ok") > 0
        assert _value(_scrape(f"{api.url}/v1/metrics"), "custody_watcher_height") >= start

        # The risk engine has no price: it passes, paused.
        wait_until(lambda: _value(_scrape(risk), "custody_risk_passes_total") >= 2, timeout=30)
        assessed = _scrape(risk)
        assert _value(assessed, "custody_risk_paused") == 1
        assert _value(assessed, "custody_risk_last_pass_timestamp_seconds") > 0

        with Session(engine) as s:  # a confirmed manual price: its age is exported
            now = datetime.now(UTC)
            s.add(
                PriceRecord(
                    price_rub_per_btc="8000000",
                    source="manual",
                    quoted_at=now,
                    state=PriceState.confirmed,
                    proposed_by="test",
                    confirmed_at=now,
                )
            )
            s.commit()
        exported: set[str] = set()
        for url in (watch, risk, notify, f"{api.url}/v1/metrics"):
            exported |= set(_scrape(url))
        exported |= set(_scrape(hsm_metrics, headers=token))

    alerts = yaml.safe_load((ROOT / "ops/prometheus/alerts.yml").read_text())
    rules = [rule for group in alerts["groups"] for rule in group["rules"]]
    assert len(rules) >= 10
    missing = {
        rule["alert"]: sorted(_named_metrics(rule["expr"]) - exported)
        for rule in rules
        if _named_metrics(rule["expr"]) - exported or not _named_metrics(rule["expr"])
    }
    assert not missing, f"alert rules naming metrics no process exports: {missing}"
    dashboard = json.loads((ROOT / "ops/grafana/custody.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            unknown = _named_metrics(target["expr"]) - exported
            assert not unknown, f"panel {panel['title']!r} names {sorted(unknown)}"


@pytest.fixture
def remote_world(engine: Engine, regtest_node: RegtestNode, served: SignerWorld) -> World:
    return build_world(engine, chain=regtest_node.rpc, signer=served.client, staff=served.staff)


def test_the_signers_metrics_need_its_token_and_count_refusals_by_rule(
    remote_world: World, regtest_node: RegtestNode, watcher: Watcher, served: SignerWorld
) -> None:
    world = remote_world
    url = f"{served.serve_url}/metrics"
    token = {"Authorization": f"Bearer {served.serve_token}"}
    assert httpx.get(url, timeout=10).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer " + "x" * 43}).status_code == 401
    rule = {"op": "sign", "result": "refused", "rule": "approval_other_txid"}
    before = _scrape(url, headers=token)

    f = funded_loan(world, regtest_node, watcher)
    req = request(world, "bank_operator", f.loan["id"], action="release")
    with Session(world.engine) as s:  # the service's own record is rewritten
        row = s.get(SigningRequest, req["id"])
        assert row is not None
        evil = PSBT.from_string(row.psbt)
        evil.outputs[0].script_pubkey = address_to_scriptpubkey(random_p2wpkh_address())
        row.psbt = evil.to_string()
        s.add(row)
        s.commit()
    request_id = "edge-test.refusal-0001"
    world.client.headers["X-Request-Id"] = request_id
    try:
        outcome = bank_sign(world, req["id"]).json()
    finally:
        del world.client.headers["X-Request-Id"]
    assert outcome["state"] == "refused", outcome

    after = _scrape(url, headers=token)
    name = "hsm_signer_decisions_total"
    assert _value(after, name, **rule) - _value(before, name, **rule) == 1
    assert _value(after, name, op="sign", result="signed") == _value(
        before, name, op="sign", result="signed"
    )
    assert _value(after, "hsm_c_sign_calls_total") == _value(before, "hsm_c_sign_calls_total")
    assert "hsm_seed_signatures_total" in after

    # The request id: in the audit data of what that request wrote, and on the signer's
    # decision line (the log is one JSON object per line).
    with Session(world.engine) as s:
        events = s.exec(select(AuditEvent).where(AuditEvent.request_id == req["id"])).all()
    refusal = [e for e in events if e.action == "signer.refused"]
    assert refusal and json.loads(refusal[0].data)["request_id"] == request_id
    assert served.serve_log is not None
    log = served.serve_log.read_text()
    not_json = [line for line in log.splitlines() if line.strip() and not line.startswith("{")]
    assert not not_json, "hsm serve log lines that are not JSON:\n" + "\n".join(not_json)
    lines = [json.loads(line) for line in log.splitlines() if line.strip()]
    assert all({"event", "level", "timestamp"} <= set(line) for line in lines)
    decisions = [
        line
        for line in lines
        if line.get("event") == "signer.decision" and line.get("request_id") == request_id
    ]
    assert decisions and decisions[0]["decision"] == "refused", lines[-5:]
    assert decisions[0]["check"] == "approval_other_txid"
