"""`hsm serve` as a process: who may talk to it, where it listens, what it refuses to
start with, and how an HSM that went away is reported. (What it signs and refuses is
the attack corpus's job, run against both transports.)"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from support.signer_world import signer_env

from hsm.client import BankSigner, HttpTransport
from hsm.signer import SignerBusy, SignerUnavailable
from regtest.hsm_serve import ServeProcess, serve_process
from regtest.node import RegtestNode
from regtest.price_feed import PriceFeed, price_feed
from regtest.softhsm import create_token

pytestmark = [pytest.mark.node, pytest.mark.hsm]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def feed() -> Iterator[PriceFeed]:
    with price_feed() as f:
        yield f


@pytest.fixture(scope="module")
def env(
    tmp_path_factory: pytest.TempPathFactory, regtest_node: RegtestNode, feed: PriceFeed
) -> dict[str, str]:
    base = tmp_path_factory.mktemp("serve")
    token = create_token(base / "softhsm", "hsm-serve", set_env=False)
    out = signer_env(base, regtest_node, feed, token)
    out["SOFTHSM2_CONF"] = str(token.conf_path)
    return out


@pytest.fixture(scope="module")
def server(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    with serve_process(tmp_path_factory.mktemp("serve-run"), env) as s:
        yield s


def _run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hsm.cli", "serve", *args],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_every_request_needs_the_bearer_token(server: ServeProcess) -> None:
    for headers in ({}, {"Authorization": "Bearer " + "x" * 43}, {"Authorization": server.token}):
        for method, path in (("GET", "/health"), ("POST", "/v1/sign"), ("GET", "/nowhere")):
            r = httpx.request(
                method, server.url + path, headers=headers, content=b"{not json", timeout=5
            )
            assert r.status_code == 401, (method, path, headers)
            assert r.headers["www-authenticate"] == "Bearer"
            assert server.token not in r.text
    with BankSigner(HttpTransport(server.url, server.token)) as good:
        health = good.health()
    assert health["status"] == "ok" and health["network"] == "regtest"
    with (
        BankSigner(HttpTransport(server.url, "y" * 40)) as wrong,
        pytest.raises(SignerUnavailable, match="refused our credentials"),
    ):
        wrong.health()


def test_unknown_paths_and_methods_are_plain_4xx(server: ServeProcess) -> None:
    auth = {"Authorization": f"Bearer {server.token}"}
    assert httpx.get(server.url + "/v1/sign", headers=auth).status_code == 405
    assert httpx.get(server.url + "/nowhere", headers=auth).status_code == 404
    r = httpx.post(server.url + "/v1/no_such_op", headers=auth, content=b"{}")
    assert r.status_code == 422 and r.json()["check"] == "unknown_operation"


def test_the_transport_only_talks_loopback_or_https_and_reports_a_dead_signer() -> None:
    for bad in ("http://10.0.0.1:8790", "http://example.com", "ftp://127.0.0.1"):
        with pytest.raises(ValueError, match="loopback"):
            HttpTransport(bad, "t" * 40)
    HttpTransport("https://signer.bank.internal", "t" * 40).close()
    dead = BankSigner(HttpTransport(f"http://127.0.0.1:{_free_port()}", "t" * 40, timeout=2))
    with dead, pytest.raises(SignerUnavailable, match="cannot reach"):
        dead.health()


def test_serve_listens_on_loopback_only_and_needs_a_strong_token(env: dict[str, str]) -> None:
    wide = _run_cli({**env, "HSM_SERVE_TOKEN": "t" * 40}, "--host", "0.0.0.0")
    assert wide.returncode == 2 and "127.0.0.1 only" in wide.stderr
    short = _run_cli({**env, "HSM_SERVE_TOKEN": "too-short"}, "--port", str(_free_port()))
    assert short.returncode == 2 and "at least 32" in short.stderr
    none = _run_cli(env, "--port", str(_free_port()))
    assert none.returncode == 2 and "HSM_SERVE_TOKEN is required" in none.stderr
    wrong_pin = _run_cli(
        {**env, "HSM_SERVE_TOKEN": "t" * 40, "HSM_PIN": "wrong-pin-4821"},
        "--port",
        str(_free_port()),
    )
    assert wrong_pin.returncode == 2 and "cannot start the signer" in wrong_pin.stderr
    assert "wrong-pin-4821" not in wrong_pin.stderr + wrong_pin.stdout
    bad_limit = _run_cli(
        {**env, "HSM_SERVE_TOKEN": "t" * 40, "HSM_DAILY_LIMIT_SATS": "-5"},
        "--port",
        str(_free_port()),
    )
    assert bad_limit.returncode == 2 and "HSM_DAILY_LIMIT_SATS" in bad_limit.stderr


class _GoneToken:
    """Stands in for a token that went away (SoftHSM cannot be unplugged on demand)."""

    name = "pkcs11:gone"
    c_sign_calls = 0

    def __init__(self, error: Exception) -> None:
        self.error = error

    def generate_loan_key(self, loan_ref: str) -> object:
        raise self.error

    def key_info(self, key_ref: str) -> object:
        raise self.error

    def public_key(self, key_ref: str) -> bytes:
        raise self.error

    def sign_digest(self, key_ref: str, digest: bytes) -> bytes:
        raise self.error


@pytest.mark.parametrize(
    "error",
    [SignerUnavailable("PKCS#11 key generation failed: TokenNotPresent"), SignerBusy("busy")],
)
def test_an_unavailable_or_busy_hsm_is_a_503(
    tmp_path: Path, regtest_node: RegtestNode, feed: PriceFeed, error: Exception
) -> None:
    from starlette.testclient import TestClient
    from support.signer_world import SignerWorld, bootstrap_admins, enroll_staff, new_people

    from hsm.client import InProcessTransport
    from hsm.factory import build_core
    from hsm.server import create_signer_app
    from hsm.settings import SignerSettings

    settings = SignerSettings(
        state_db=tmp_path / "s.db",
        node_rpc_url=regtest_node.rpc_url,
        node_rpc_user=regtest_node.rpc_user,
        node_rpc_password=regtest_node.rpc_password,
        price_sources=[feed.source_config()],
    )
    people = new_people()
    admins = [people["admin1"], people["admin2"]]
    bootstrap_admins(settings.state_db, admins)
    core = build_core(settings, hsm=_GoneToken(error))
    client = BankSigner(InProcessTransport(core))
    enroll_staff(client, admins, [people["operator"], people["approver"]])
    world = SignerWorld(
        "in-process", client, regtest_node, feed, people, lambda: 0, lambda: core.registry
    )
    statement, _, _ = world.registration()
    token = "s" * 40
    with TestClient(create_signer_app(core, token)) as http:
        r = http.post(
            "/v1/register_loan",
            headers={"Authorization": f"Bearer {token}"},
            json={"statement": statement, "approvals": world.approvals(statement)},
        )
    assert r.status_code == 503, r.text
    assert r.json()["error"] == error.code  # type: ignore[attr-defined]
    assert token not in r.text
    assert core.registry.loan(statement["loan_ref"]) is None  # nothing recorded
    [last] = [d for d in core.registry.decisions() if d.check == "unavailable"]
    assert last.decision == "refused"
    with pytest.raises(ValueError, match="at least 32"):
        create_signer_app(core, "x")
    core.close()
