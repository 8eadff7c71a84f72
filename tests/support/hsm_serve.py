"""`hsm serve` as a real subprocess for tests: its own SoftHSM2 conf and token, a free
loopback port, waited for by /health, terminated and reaped afterwards, and checked
never to log its PIN or token."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from hsm.registry import Registry
from hsm.remote import RemoteSigner
from hsm.softhsm import create_token
from regtest.wait import wait_until

MAX_FEE = 20_000  # the server's fee cap in tests


@dataclass
class Server:
    url: str
    token: str
    state_db: Path
    proc: subprocess.Popen[bytes]
    log_path: Path

    def client(self, token: str | None = None) -> RemoteSigner:
        return RemoteSigner(self.url, token or self.token, timeout=20)

    def registry(self) -> Registry:
        return Registry(self.state_db)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _serve_env(base: Path, **extra: str) -> dict[str, str]:
    """The child's environment: ITS OWN SoftHSM2 conf and token (one conf per process)."""
    token = create_token(base / "softhsm", "hsm-serve", set_env=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HSM_", "SOFTHSM2_CONF"))}
    env.update(
        SOFTHSM2_CONF=str(token.conf_path),
        HSM_MODULE=token.module_path,
        HSM_TOKEN_LABEL=token.label,
        HSM_PIN=token.pin.get_secret_value(),
        HSM_SERVE_TOKEN=secrets.token_urlsafe(32),
        HSM_STATE_DB=str(base / "hsm-state.db"),
        HSM_MAX_FEE_SATS=str(MAX_FEE),
        **extra,
    )
    return env


def _run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hsm.cli", "serve", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@contextmanager
def _start(base: Path, **extra: str) -> Iterator[Server]:
    """Start `hsm serve` on a free loopback port; wait for /health; kill and reap after."""
    base.mkdir(parents=True, exist_ok=True)
    env = _serve_env(base, **extra)
    port = _free_port()
    log_path = base / "serve.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hsm.cli", "serve", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = Server(
        f"http://127.0.0.1:{port}",
        env["HSM_SERVE_TOKEN"],
        Path(env["HSM_STATE_DB"]),
        proc,
        log_path,
    )
    try:

        def answers() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"hsm serve exited ({proc.returncode}):\n{server.log()}")
            try:
                return httpx.get(
                    f"{server.url}/health",
                    headers={"Authorization": f"Bearer {server.token}"},
                    timeout=2,
                ).is_success
            except httpx.TransportError:
                return False

        wait_until(answers, timeout=30, message=lambda: f"hsm serve /health\n{server.log()}")
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    # the secrets never reach the server's own log
    assert env["HSM_SERVE_TOKEN"] not in server.log()
    assert env["HSM_PIN"] not in server.log()
