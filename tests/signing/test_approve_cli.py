"""`custody keygen` and `custody approve` as an approver runs them on their own machine:
real processes against the real API (uvicorn on loopback), the key file never leaving the
machine, and a refusal to sign a statement that does not say what the PSBT does."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlmodel import Session
from support.lending import funded_loan, request, sign, the_psbt, upload
from support.served import served
from support.signer_world import SignerWorld
from support.world import World

from custody.db.models import SignerStatement
from custody.watcher.service import Watcher
from pledge.statements import iso
from regtest.node import RegtestNode, free_port

pytestmark = [pytest.mark.node, pytest.mark.hsm]


@pytest.fixture
def api_url(world: World) -> Iterator[str]:
    with served(world.client.app, free_port()) as url:
        yield url


def _custody(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "custody.cli", *args],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _enroll(bank_signer: SignerWorld, name: str, role: str, public_hex: str) -> None:
    statement = {
        "kind": "enroll",
        "name": name,
        "role": role,
        "algorithm": "ed25519",
        "public_key": public_hex,
        "expires_at": iso(datetime.now(UTC) + timedelta(hours=1)),
    }
    admins = [bank_signer.staff["admin1"], bank_signer.staff["admin2"]]
    bank_signer.client.enroll(statement, [a.endorse(statement) for a in admins])


def _keygen(tmp_path: Path, name: str) -> tuple[Path, str]:
    path = tmp_path / f"{name}.pem"
    out = _custody("keygen", "--out", str(path), env={})
    assert out.returncode == 0, out.stderr
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    public = out.stdout.strip().rsplit(" ", 1)[-1]
    assert len(bytes.fromhex(public)) == 32
    assert public not in path.read_text()  # the file holds the private key (PEM), not this
    again = _custody("keygen", "--out", str(path), env={})
    assert again.returncode == 2 and "refusing to overwrite" in again.stderr
    return path, public


def test_two_approvers_sign_on_their_own_machines(
    world: World,
    regtest_node: RegtestNode,
    watcher: Watcher,
    bank_signer: SignerWorld,
    api_url: str,
    tmp_path: Path,
) -> None:
    op_key, op_pub = _keygen(tmp_path, "vera")
    ap_key, ap_pub = _keygen(tmp_path, "pavel")
    _enroll(bank_signer, "vera.operator", "bank_operator", op_pub)
    _enroll(bank_signer, "pavel.approver", "bank_approver", ap_pub)
    f = funded_loan(world, regtest_node, watcher)
    req = request(world, "bank_operator", f.loan["id"], action="release")
    psbt = the_psbt(world, "miner", req["id"])
    assert upload(world, "miner", req["id"], sign(psbt, f.roots["miner"])).status_code == 200

    env = {"CUSTODY_API_URL": api_url, "CUSTODY_API_KEY": world.api_keys["bank_operator"]}
    first = _custody(
        "approve", str(req["id"]), "--key", str(op_key), "--as", "vera.operator", "--yes", env=env
    )
    assert first.returncode == 0, first.stderr
    assert "release" in first.stdout and "miner_return" in first.stdout
    assert req["unsigned_txid"] in first.stdout
    assert "is open" in first.stdout
    second = _custody(
        "approve",
        str(req["id"]),
        "--key",
        str(ap_key),
        "--as",
        "pavel.approver",
        "--yes",
        env={**env, "CUSTODY_API_KEY": world.api_keys["bank_approver"]},
    )
    assert second.returncode == 0, second.stderr
    assert "is done" in second.stdout
    assert world.call("miner", "GET", f"/v1/signing-requests/{req['id']}").json()["state"] == (
        "broadcast"
    )


def test_approve_refuses_a_statement_that_differs_from_the_psbt(
    world: World,
    regtest_node: RegtestNode,
    watcher: Watcher,
    bank_signer: SignerWorld,
    api_url: str,
    tmp_path: Path,
) -> None:
    """The service (in an attacker's hands) shows a statement with a lower fee than the
    PSBT pays: the approver's tool decodes the PSBT itself and signs nothing."""
    key, public = _keygen(tmp_path, "vera")
    _enroll(bank_signer, "vera.operator", "bank_operator", public)
    f = funded_loan(world, regtest_node, watcher)
    req = request(world, "bank_operator", f.loan["id"], action="release")
    with Session(world.engine) as s:
        st = s.get(SignerStatement, req["signer_statement_id"])
        assert st is not None
        body = json.loads(st.body)
        body["fee_sats"] = body["fee_sats"] - 1
        st.body = json.dumps(body)
        s.add(st)
        s.commit()
    env = {"CUSTODY_API_URL": api_url, "CUSTODY_API_KEY": world.api_keys["bank_operator"]}
    out = _custody(
        "approve", str(req["id"]), "--key", str(key), "--as", "vera.operator", "--yes", env=env
    )
    assert out.returncode == 2
    assert "does not match" in out.stderr and "fee" in out.stderr
    sid = req["signer_statement_id"]
    view = world.call("bank_operator", "GET", f"/v1/signer-statements/{sid}").json()
    assert view["signed_by"] == []
