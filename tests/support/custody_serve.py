"""`custody serve` as real processes on one database, and a small populated service to
load them with: what the capacity tests need where threads, pools and locks matter
(an in-process TestClient has none of uvicorn's concurrency)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from sqlalchemy.engine import Engine
from support.bulk import create_ready_loans
from support.signer_world import free_port

from custody.auth.service import create_principal
from custody.db.models import Loan, Party, PartyKind, Role
from custody.db.session import transaction
from regtest.wait import wait_until


@dataclass(frozen=True)
class ServiceProcess:
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def _start(db_url: str, base: Path, env_extra: dict[str, str]) -> ServiceProcess:
    base.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CUSTODY_", "HSM_"))}
    env.update(
        {
            "DATABASE_URL": db_url,
            "CUSTODY_NETWORK": "regtest",
            "CUSTODY_API_PORT": str(port),
            **{f"CUSTODY_{k.upper()}": v for k, v in env_extra.items()},
        }
    )
    log_path = base / f"serve-{port}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "custody.cli", "serve"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return ServiceProcess(f"http://127.0.0.1:{port}", proc, log_path)


def _wait_ready(server: ServiceProcess) -> None:
    def answers() -> bool:
        if server.proc.poll() is not None:
            raise AssertionError(
                f"custody serve exited ({server.proc.returncode}):\n{server.log()}"
            )
        try:
            return httpx.get(f"{server.url}/v1/health", timeout=2).is_success
        except httpx.TransportError:
            return False

    wait_until(answers, timeout=60, message=lambda: f"custody serve /v1/health\n{server.log()}")


def _stop(server: ServiceProcess) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait(timeout=10)


@contextmanager
def custody_replicas(
    db_url: str, base: Path, count: int, **env_extra: str
) -> Iterator[list[ServiceProcess]]:
    """`count` replicas of `custody serve` on one database, each on a free loopback
    port, started at the same instant (so their start-up migrations run concurrently),
    waited for on /v1/health, stopped after. `env_extra` are CUSTODY_* settings without
    the prefix, in lower case (`db_pool_size="5"`)."""
    servers: list[ServiceProcess] = []
    try:
        for i in range(count):
            servers.append(_start(db_url, base / f"replica-{i}", env_extra))
        for server in servers:
            _wait_ready(server)
        yield servers
    finally:
        for server in servers:
            _stop(server)


@contextmanager
def custody_serve(db_url: str, base: Path, **env_extra: str) -> Iterator[ServiceProcess]:
    """One `custody serve` (see `custody_replicas`)."""
    with custody_replicas(db_url, base, 1, **env_extra) as (server,):
        yield server


@dataclass(frozen=True)
class Lender:
    """A bank operator and a miner with API keys, and loans ready for deposits."""

    operator_key: str
    miner_key: str
    loan_ids: list[int]

    def headers(self, who: str = "operator") -> dict[str, str]:
        key = self.operator_key if who == "operator" else self.miner_key
        return {"Authorization": f"Bearer {key}"}


def ready_lender(engine: Engine, loans: int = 1, *, seed: str = "capacity") -> Lender:
    """`loans` loans with three keys and their first address, visible to one bank
    operator and one miner whose API keys are returned."""
    ready = create_ready_loans(engine, [50_000_000] * loans, seed=seed)
    with transaction(engine) as session:
        loan = session.get(Loan, ready[0].loan_id)
        assert loan is not None
        bank = session.get(Party, loan.bank_party_id)
        assert bank is not None and bank.kind == PartyKind.bank
        _, operator_key = create_principal(
            session,
            name=f"{seed}-operator",
            role=Role.bank_operator,
            party_id=loan.bank_party_id,
            actor="test",
        )
        _, miner_key = create_principal(
            session,
            name=f"{seed}-miner",
            role=Role.miner,
            party_id=loan.miner_party_id,
            actor="test",
        )
    return Lender(operator_key, miner_key, [r.loan_id for r in ready])
