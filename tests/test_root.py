"""The composition root as each process uses it: `custody watch --once` and
`custody risk --once` run as real processes from nothing but their environment."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from custody.config import Settings
from custody.root import Root
from custody.signing.chain import FeePolicy
from regtest.node import RegtestNode


def _run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "custody.cli", *args],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.node
def test_watch_and_risk_run_from_their_environment(
    tmp_path: Path, regtest_node: RegtestNode
) -> None:
    env = {
        "DATABASE_URL": f"sqlite:///{tmp_path / 'c.db'}",
        "CUSTODY_NETWORK": "regtest",
        "CUSTODY_NODE_RPC_URL": regtest_node.rpc_url,
        "CUSTODY_NODE_RPC_USER": regtest_node.rpc_user,
        "CUSTODY_NODE_RPC_PASSWORD": regtest_node.rpc_password,
    }
    watched = _run("watch", "--once", env=env)
    assert watched.returncode == 0, watched.stderr
    step = json.loads(watched.stdout.strip().splitlines()[-1])
    # first start: the cursor begins at the node's tip, nothing to apply yet
    assert step["height"] >= regtest_node.rpc.get_block_count() - 1
    assert step["blocks_rolled_back"] == 0
    risk = _run("risk", "--once", env=env)
    assert risk.returncode == 0, risk.stderr
    report = json.loads(risk.stdout.strip().splitlines()[-1])
    assert report["loans"] == 0 and report["paused"]  # no price set yet: paused, says why
    assert regtest_node.rpc_password not in watched.stdout + watched.stderr + risk.stderr


@pytest.mark.unit
def test_the_root_builds_each_part_once(tmp_path: Path) -> None:
    root = Root(Settings(database_url=f"sqlite:///{tmp_path / 'r.db'}"))
    try:
        assert root.engine is root.engine
        assert root.fees == FeePolicy.from_settings(root.settings)
        assert root.signer is None  # nothing configured: HSM keys answer 503, never a guess
    finally:
        root.close()


@pytest.mark.unit
@pytest.mark.parametrize("where", ["service", "signer"])
def test_no_in_process_signer_on_mainnet(where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """On mainnet the token's PIN and the unsealed bank seed never live in the service's
    process: only `hsm serve` (CUSTODY_HSM_URL) is accepted."""
    from custody.signer.factory import signer_from_settings
    from hsm.signer import SignerUnavailable

    monkeypatch.setenv("HSM_PIN", "1234")
    monkeypatch.setenv("HSM_NETWORK", "mainnet" if where == "signer" else "regtest")
    network = "mainnet" if where == "service" else "regtest"
    with pytest.raises(SignerUnavailable, match="hsm serve"):
        signer_from_settings(Settings(network=network, database_url="sqlite://"))
    served = signer_from_settings(
        Settings(
            network=network,
            database_url="sqlite://",
            hsm_url="http://127.0.0.1:8790",
            hsm_serve_token="t" * 32,
        )
    )
    assert served is not None and served.name.startswith("hsm-serve:")
    served.close()


@pytest.mark.unit
def test_a_risk_pass_works_on_several_loans_at_once_only_with_the_signer_apart() -> None:
    """In process the signer's CPU and the engine's share one GIL: more loans at once only
    contend for it; with `hsm serve` they overlap. A setting says otherwise; 0 is refused."""
    assert Settings(network="regtest").risk_pass_concurrency == 1
    served = Settings(network="regtest", hsm_url="http://127.0.0.1:9")
    assert served.risk_pass_concurrency == 3
    assert Settings(network="regtest", risk_concurrency=6).risk_pass_concurrency == 6
    with pytest.raises(ValueError, match="risk_concurrency"):
        Settings(network="regtest", risk_concurrency=0)
