"""Schemathesis over the whole OpenAPI, against a real `custody serve` on SQLite and on
PostgreSQL, once per kind of caller (the admin, a bank operator, a miner, an arbiter, nobody;
on PostgreSQL the first three).

Every operation, every phase (the schema's examples, its coverage of edges and bad
values, random valid and invalid data, stateful sequences along the links Schemathesis
finds; the arbiter and nobody skip the coverage phase, see PHASES), every check
Schemathesis has: no 5xx, every status, content type, header and body as the OpenAPI
declares, bad data refused, good data not refused but for the API's own
reasons (tests/fuzz/schemathesis.toml), authentication not ignored. Plus our own check
(tests/fuzz/st_hooks.py): the database is read before every request and compared after
every 4xx; a refused request changes nothing.

The seed is fixed, so CI runs the same requests every time; `FUZZ_SEED` and
`FUZZ_MAX_EXAMPLES` explore further by hand.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine
from support.custody_serve import custody_serve
from support.lending import funded_loan, request
from support.signer_fixtures import feed
from support.signer_world import SignerWorld, serve_world
from support.world import World, build_world

from custody.db.session import transaction
from custody.netpolicy import UrlPolicy
from custody.notify.outbox import register_webhook
from custody.watcher.service import Watcher
from regtest.node import RegtestNode
from regtest.price_feed import PriceFeed

# `hsm serve` makes its SoftHSM2 token itself, without the fixture that marks a test `hsm`.
pytestmark = [pytest.mark.node, pytest.mark.hsm]
__all__ = ["feed"]  # the price feed fixture the signer reads

HERE = Path(__file__).parent
SEED = os.environ.get("FUZZ_SEED", "20261201")
MAX_EXAMPLES = os.environ.get("FUZZ_MAX_EXAMPLES", "8")
LOCAL = UrlPolicy.for_network("regtest")
# The bank's admin and operator (every staff route), a miner and an arbiter (the parties'
# routes, and refusals of the staff's), nobody (every route's 401). The approver's and the
# auditor's rights are the authorization matrix's (tests/api/test_authorization.py).
CALLERS = ("admin", "bank_operator", "miner", "arbiter", None)
ALL_PHASES = "examples,coverage,fuzzing,stateful"
# The coverage phase (every edge and bad value of every field, about two thirds of a caller's
# run) tries the validation of bodies and parameters. It is the same for every caller with a
# key (a miner's bad body on a staff route is a 422 before its 403), and the admin's, the
# operator's and the miner's runs try it on every route; nobody gets no further than the key
# check (401). So the arbiter and nobody run the examples, random and stateful phases only.
PHASES = {
    "admin": ALL_PHASES,
    "bank_operator": ALL_PHASES,
    "miner": ALL_PHASES,
    "arbiter": "examples,fuzzing,stateful",
    None: "examples,fuzzing,stateful",
}
# On PostgreSQL the callers whose routes write the most: what differs there is how the
# database takes writes (locks, constraints, the read-only reader pool), not who may call
# what. The arbiter's routes are a subset of the miner's kind, and nobody's is a 401
# everywhere, which SQLite's run covers. (Both on both took ~16 of the suite's CPU-minutes.)
CALLERS_ON = {"sqlite": CALLERS, "postgresql": ("admin", "bank_operator", "miner")}


def _populate(world: World, node: RegtestNode, watcher: Watcher) -> dict[str, list[int]]:
    """Something of every kind for the ids in paths to find: loans in each early state, an
    active loan (its bank key in the signer's HSM) with an open signing request, an open
    signer statement, a proposed price, a webhook per party."""
    draft = world.create_loan()
    keyed = world.keyed_loan()
    funded = funded_loan(world, node, watcher, hsm_bank=True)
    req = request(world, "bank_operator", funded.loan["id"], action="release")
    half_keyed = world.create_loan()["id"]
    for seat in ("miner", "arbiter"):
        assert world.register(half_keyed, seat).status_code == 200
    statement = world.call("bank_operator", "POST", f"/v1/loans/{half_keyed}/keys/bank/hsm")
    assert statement.status_code == 201, statement.text
    price = world.call("bank_operator", "POST", "/v1/prices", json={"price_rub_per_btc": "6e6"})
    assert price.status_code == 201, price.text
    me = world.call("bank_operator", "GET", "/v1/me").json()
    with transaction(world.engine) as session:
        hooks = [
            register_webhook(
                session, pid, f"http://127.0.0.1:9/{name}", "s" * 40, "*", urls=LOCAL
            ).id
            for name, pid in world.party_ids.items()
        ]
    return {
        "loan_id": [draft["id"], keyed["id"], funded.loan["id"]],
        "request_id": [req["id"]],
        "statement_id": [statement.json()["id"]],
        "price_id": [price.json()["id"]],
        "principal_id": [me["id"]],
        "party_id": list(world.party_ids.values()),
        "webhook_id": [h for h in hooks if h is not None],
    }


# Hypothesis giving up on drawing enough strings for a pattern (the webhook secret's: 32+
# printable characters, no control ones) says nothing of the server; the operation is still
# called by the other phases and the examples that were drawn.
GENERATOR_LIMITS = ("Too many generated examples are filtered out",)


def _failures(report_dir: Path) -> tuple[list[str], int]:
    """The run's failures and errors, and how many were the generator's limits only."""
    out: list[str] = []
    limits = 0
    for xml in report_dir.rglob("*.xml"):
        for case in ET.parse(xml).getroot().iter("testcase"):
            for bad in [*case.iter("failure"), *case.iter("error")]:
                text = (bad.get("message") or "") + "\n" + (bad.text or "")
                if any(limit in text for limit in GENERATOR_LIMITS):
                    limits += 1
                    continue
                out.append(f"{case.get('name')}: {text.strip()[:1500]}")
    return out, limits


@pytest.fixture
def signer(tmp_path: Path, regtest_node: RegtestNode, feed: PriceFeed) -> Iterator[SignerWorld]:
    """The bank's signer as in production: `hsm serve` with its own SoftHSM2 token."""
    with serve_world(tmp_path / "hsm", regtest_node, feed) as world:
        yield world


@pytest.mark.parametrize("db_url", ["sqlite", "postgres"], indirect=True)
def test_schemathesis_finds_no_server_error_no_mismatch_and_no_change_on_refusal(
    db_url: str,
    engine: Engine,
    regtest_node: RegtestNode,
    watcher: Watcher,
    signer: SignerWorld,
    tmp_path: Path,
) -> None:
    world = build_world(engine, chain=regtest_node.rpc, signer=signer.client, staff=signer.staff)
    ids = _populate(world, regtest_node, watcher)
    watcher.release()  # its lease renewals would be changes nobody asked for
    assert signer.serve_url is not None and signer.serve_token is not None
    parts = {
        "node_rpc_url": regtest_node.rpc_url,
        "node_rpc_user": regtest_node.rpc_user,
        "node_rpc_password": regtest_node.rpc_password,
        "hsm_url": signer.serve_url,
        "hsm_serve_token": signer.serve_token,
    }
    failures: list[str] = []
    outputs: list[str] = []
    with custody_serve(db_url, tmp_path / "serve", **parts) as server:
        for who in CALLERS_ON[engine.dialect.name]:
            reports = tmp_path / "reports" / (who or "anonymous")
            auth = [] if who is None else ["-H", f"Authorization: Bearer {world.api_keys[who]}"]
            env = {
                **os.environ,
                "SCHEMATHESIS_HOOKS": "st_hooks",
                "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent)]),
                "FUZZ_IDS": json.dumps(ids),
                "FUZZ_DB_URL": db_url,
            }
            run = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "schemathesis.cli",
                    "--config-file",
                    str(HERE / "schemathesis.toml"),
                    "run",
                    f"{server.url}/v1/openapi.json",
                    *auth,
                    "--checks",
                    "all",
                    "--phases",
                    PHASES[who],
                    "--max-examples",
                    MAX_EXAMPLES,
                    "--seed",
                    SEED,
                    "--workers",
                    "1",  # one request at a time: the database check needs it
                    "--max-redirects",
                    "0",
                    "--request-timeout",
                    "20",
                    "--report",
                    "junit",
                    "--report-dir",
                    str(reports),
                    "--no-color",
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
            )
            outputs.append(
                f"--- {who or 'anonymous'} (exit {run.returncode})\n{run.stdout[-4000:]}"
            )
            found, generator_limits = _failures(reports)
            failures += [f"[{who or 'anonymous'}] {f}" for f in found]
            if run.returncode != 0 and not found and not generator_limits:
                failures.append(
                    f"[{who or 'anonymous'}] st exited {run.returncode}: {run.stderr[-3000:]}"
                )
    (tmp_path / "failures.txt").write_text("\n\n".join(failures) + "\n\n" + "\n".join(outputs))
    assert not failures, (
        f"all in {tmp_path / 'failures.txt'}\n"
        + "\n\n".join(failures[:40])
        + "\n\n"
        + "\n".join(outputs)[-20000:]
    )
