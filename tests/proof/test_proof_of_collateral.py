"""Proof of collateral against a real btcd: built from the ledger the watcher keeps, checked
by the kernel's verifier against the node, and refused when an outpoint was spent since,
an amount was changed in the file, a loan was left out of the tree or a header swapped."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from support.databases import copy_sqlite
from support.lending import COLLATERAL, funded_loan, sign
from support.spend import spend_outside_the_service
from support.world import World, build_world
from typer.testing import CliRunner

from custody.cli import app as cli
from custody.config import Settings, get_settings
from custody.db.session import make_engine
from custody.proof.node import NodeChainView
from custody.root import Root
from custody.watcher.service import Watcher
from pledge import proof
from pledge.descriptors import parse_collateral_descriptor
from regtest.faucet import random_p2wpkh_address
from regtest.node import RegtestNode


@pytest.fixture
def world(engine: Engine, regtest_node: RegtestNode) -> World:
    return build_world(engine, chain=regtest_node.rpc)


def _proof(world: World, who: str, **query: int) -> dict[str, Any]:
    r = world.call(who, "GET", "/v1/proofs/collateral", params=query)
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


def _failures(doc: dict[str, Any], node: RegtestNode, **kw: Any) -> list[str]:
    verdict = proof.verify_document(doc, NodeChainView(node.rpc), **kw)
    assert not verdict.unknown
    return verdict.failures


def test_a_built_proof_verifies_and_a_tampered_one_does_not(
    world: World, regtest_node: RegtestNode, watcher: Watcher
) -> None:
    first = funded_loan(world, regtest_node, watcher, hsm_bank=False)
    second = funded_loan(world, regtest_node, watcher, hsm_bank=False)
    regtest_node.mine(1)  # a header above the last deposit's block
    watcher.step()
    doc = _proof(world, "auditor")
    assert doc["scope"] == "book" and doc["height"] == regtest_node.rpc.get_block_count()
    assert doc["block_hash"] == regtest_node.rpc.get_best_block_hash()
    assert [e["loan_id"] for e in doc["loans"]] == [first.loan["id"], second.loan["id"]]
    assert doc["tree"]["total_sats"] == 2 * COLLATERAL and doc["tree"]["leaves"] == 2
    for entry, funded in zip(doc["loans"], (first, second), strict=True):
        [out] = entry["outpoints"]
        assert (out["txid"], out["vout"]) == funded.deposit
        unspent = regtest_node.rpc.get_tx_out(*funded.deposit)
        assert unspent is not None and unspent["value_sat"] == out["amount_sats"]
    verdict = proof.verify_document(doc, NodeChainView(regtest_node.rpc))
    assert verdict.ok, verdict.failures
    assert verdict.total_sats == 2 * COLLATERAL

    # An amount changed in the file: the output says otherwise, the leaf and the sums too.
    richer = copy.deepcopy(doc)
    richer["loans"][0]["outpoints"][0]["amount_sats"] += 1
    richer["loans"][0]["amount_sats"] += 1
    failures = _failures(richer, regtest_node)
    assert any("the output's amount is the one listed" in f for f in failures)
    assert any("inclusion path" in f for f in failures)

    # A loan left out: the remaining leaves no longer give the root or the total...
    fewer = copy.deepcopy(doc)
    del fewer["loans"][1]
    failures = _failures(fewer, regtest_node)
    assert "the loans' leaves give the tree's root" in failures
    assert "the loans' amounts add up to the tree's total" in failures
    # ...and a book rebuilt without it (a consistent document) fails that miner's check
    # of its own loan: its leaf is not under the published root.
    rows = [(e["loan_id"], e["descriptor"], e["outpoints"]) for e in doc["loans"][:1]]
    h = doc["headers"]
    without = proof.assemble(
        network="regtest",
        height=doc["height"],
        block_hash=doc["block_hash"],
        headers_from=h["from_height"],
        headers=[bytes.fromhex(x) for x in h["hex"]],
        book=rows,
    )
    assert not _failures(without, regtest_node)  # consistent in itself...
    mine = _proof(world, "miner", loan_id=second.loan["id"])
    assert mine["scope"] == "loan" and [e["loan_id"] for e in mine["loans"]] == [second.loan["id"]]
    assert not _failures(mine, regtest_node, leaf_of=second.loan["id"])
    assert mine["tree"] == doc["tree"]  # the same tree: one deterministic build at H
    spliced = copy.deepcopy(mine)
    spliced["tree"] = without["tree"]  # the miner's own leaf and path, the published root
    assert any(
        "inclusion path leads to the tree's root" in f
        for f in _failures(spliced, regtest_node, leaf_of=second.loan["id"])
    )

    # A header swapped for another block's: the chain breaks and the node disagrees.
    swapped = copy.deepcopy(doc)
    other = regtest_node.rpc.call("getblockheader", regtest_node.rpc.get_block_hash(1), False)
    swapped["headers"]["hex"][0] = other
    failures = _failures(swapped, regtest_node)
    assert "header 1 does not link to the header before it" in failures
    assert any("are not the node's blocks" in f for f in failures)
    assert any("the proof's block is the header at height" in f for f in failures)


def test_a_proof_fails_once_an_outpoint_is_spent_and_holds_as_of_its_height(
    world: World, regtest_node: RegtestNode, watcher: Watcher
) -> None:
    funded = funded_loan(world, regtest_node, watcher, hsm_bank=False)
    before = _proof(world, "compliance_officer")
    assert not _failures(before, regtest_node)
    descriptor = parse_collateral_descriptor(funded.loan["descriptor"], "regtest")
    raw = spend_outside_the_service(
        descriptor,
        0,
        [funded.roots["miner"], funded.roots["arbiter"]],
        funded.deposit,
        COLLATERAL,
        random_p2wpkh_address(),
    )
    regtest_node.rpc.send_raw_transaction(raw)
    regtest_node.mine(1)
    watcher.step()

    outpoint = f"{funded.deposit[0]}:{funded.deposit[1]}"
    assert f"loan {funded.loan['id']}: {outpoint}: spent since height {before['height']}" in (
        _failures(before, regtest_node)
    )
    assert not _failures(before, regtest_node, as_of_height=True)  # true of that height
    # Built again at that height from the ledger: the same document; at the tip, no coins.
    assert _proof(world, "admin", height=before["height"]) == before
    after = _proof(world, "auditor")
    assert after["loans"] == [] and after["tree"]["total_sats"] == 0
    assert not _failures(after, regtest_node)
    # The old document moved to the new height claims a coin the node has seen spent.
    stale = copy.deepcopy(before)
    stale["height"], stale["block_hash"] = after["height"], after["block_hash"]
    stale["headers"]["hex"] = [*before["headers"]["hex"], after["headers"]["hex"][-1]]
    for entry in stale["loans"]:
        salt = proof.loan_salt(entry["descriptor"], stale["height"])
        node = proof.leaf(entry["loan_id"], entry["descriptor"], entry["amount_sats"], salt)
        entry["inclusion"] = {"leaf": node.hash.hex(), "path": []}
        stale["tree"]["root"] = node.hash.hex()
    assert _failures(stale, regtest_node) == [
        f"loan {funded.loan['id']}: {outpoint}: unspent at height {after['height']}"
    ]


def test_the_command_line_builds_and_verifies(
    sqlite_template: Path,
    regtest_node: RegtestNode,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On SQLite only: the commands read the ledger as the API does, on either backend."""
    db_url = f"sqlite:///{tmp_path / 'custody.db'}"
    copy_sqlite(sqlite_template, tmp_path / "custody.db")
    engine = make_engine(db_url)
    world = build_world(engine, chain=regtest_node.rpc)
    settings = Settings(
        network="regtest", watch_start_height=regtest_node.rpc.get_block_count() + 1
    )
    watcher = Root.assemble(settings, engine=engine, node=regtest_node.rpc).watcher()
    watcher.acquire()
    funded = funded_loan(world, regtest_node, watcher, hsm_bank=False)
    for name, value in {
        "CUSTODY_DATABASE_URL": db_url,
        "CUSTODY_NETWORK": "regtest",
        "CUSTODY_NODE_RPC_URL": regtest_node.rpc_url,
        "CUSTODY_NODE_RPC_USER": regtest_node.rpc_user,
        "CUSTODY_NODE_RPC_PASSWORD": regtest_node.rpc_password,
    }.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    out = tmp_path / "proof.json"
    runner = CliRunner()
    try:
        built = runner.invoke(cli, ["proof", "build", "--out", str(out)])
        assert built.exit_code == 0, built.output
        good = runner.invoke(cli, ["proof", "verify", str(out)])
        assert good.exit_code == 0, good.output
        leaf = runner.invoke(cli, ["proof", "verify", str(out), "--leaf", str(funded.loan["id"])])
        assert leaf.exit_code == 0, leaf.output
        # The control proof: the PSBT (the bank's key is a device's here, so unsigned), two
        # devices sign it, attach, and verify for the auditor's challenge.
        lid, challenge = str(funded.loan["id"]), "audit 2026-12-02"
        psbt_file = tmp_path / "control.psbt"
        made = runner.invoke(
            cli,
            ["proof", "control", "--loan", lid, "--challenge", challenge, "--out", str(psbt_file)],
        )
        assert made.exit_code == 0, made.output
        unsigned = psbt_file.read_text().strip()
        psbt_file.write_text(sign(sign(unsigned, funded.roots["miner"]), funded.roots["bank"]))
        attach = ["proof", "attach", str(out), "--loan", lid, "--challenge", challenge]
        assert runner.invoke(cli, [*attach, "--psbt", str(psbt_file)]).exit_code == 0
        required = runner.invoke(cli, ["proof", "verify", str(out), "--challenge", challenge])
        assert required.exit_code == 0, required.output
        fresh = runner.invoke(cli, ["proof", "verify", str(out), "--challenge", "a fresh one"])
        assert fresh.exit_code == 1, fresh.output
        psbt_file.write_text(unsigned)
        refused = runner.invoke(cli, [*attach, "--psbt", str(psbt_file)])
        assert refused.exit_code == 1 and "0 valid signature(s)" in refused.output

        doc = json.loads(out.read_text())
        doc["tree"]["total_sats"] += 1
        out.write_text(json.dumps(doc))
        bad = runner.invoke(cli, ["proof", "verify", str(out)])
        assert bad.exit_code == 1, bad.output
        assert "the loans' amounts add up to the tree's total" in bad.output
    finally:
        get_settings.cache_clear()
        watcher.release()
        engine.dispose()


def test_a_deposit_held_by_screening_is_left_out_until_cleared(
    world: World, regtest_node: RegtestNode, watcher: Watcher
) -> None:
    """A deposit AML screening holds is no collateral: no proof lists it until a
    compliance officer clears it."""
    kept = funded_loan(world, regtest_node, watcher, hsm_bank=False)
    faucet = regtest_node.faucet
    r = world.call(
        "compliance_officer",
        "POST",
        "/v1/screening-lists",
        json={"kind": "address", "value": faucet.address, "action": "block", "note": "list"},
    )
    assert r.status_code == 201, r.text
    held = world.keyed_loan(required_collateral_sats=COLLATERAL)
    txid, _ = faucet.pay(held["collateral_address"], COLLATERAL)
    regtest_node.mine(1)
    watcher.step()
    doc = _proof(world, "auditor")
    assert [e["loan_id"] for e in doc["loans"]] == [kept.loan["id"]]
    assert doc["tree"]["total_sats"] == COLLATERAL

    blocked = world.call("compliance_officer", "GET", "/v1/screening-decisions?result=block")
    [decision] = [d for d in blocked.json() if d["txid"] == txid]
    path = f"/v1/screening-decisions/{decision['id']}/resolution"
    cleared = world.call(
        "compliance_officer", "POST", path, json={"outcome": "clear", "reason": "ok"}
    )
    assert cleared.status_code == 200, cleared.text
    watcher.step()
    doc = _proof(world, "auditor")
    assert [e["loan_id"] for e in doc["loans"]] == [kept.loan["id"], held["id"]]
    assert doc["tree"]["total_sats"] == 2 * COLLATERAL
    assert proof.verify_document(doc, NodeChainView(regtest_node.rpc)).ok
