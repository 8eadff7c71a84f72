"""`hsm serve` as a process of its own, for the tests and the benchmarks: on a free
loopback port, from an environment of HSM_* settings (this process's own HSM_* and
SOFTHSM2_CONF left out), waited for on /health with its bearer token, stopped with
SIGTERM (SIGKILL after 15 s); and none of the environment's secrets in its log."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from regtest.node import free_port
from regtest.wait import wait_until

_SECRETS = ("HSM_SERVE_TOKEN", "HSM_PIN", "HSM_NODE_RPC_PASSWORD")


@dataclass
class ServeProcess:
    """A running `hsm serve`: where it listens, its bearer token, its log and registry."""

    url: str
    token: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    state_db: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def serve_process(
    base: Path, env_extra: dict[str, str], log_name: str = "serve.log"
) -> Iterator[ServeProcess]:
    """`hsm serve` on a free loopback port, its output in `base / log_name`, waited for on
    /health, terminated after."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HSM_", "SOFTHSM2_CONF"))}
    env.update(env_extra)
    env["HSM_SERVE_TOKEN"] = env.get("HSM_SERVE_TOKEN") or secrets.token_urlsafe(32)
    port = free_port()
    log_path = base / log_name
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hsm.cli", "serve", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = ServeProcess(
        f"http://127.0.0.1:{port}",
        env["HSM_SERVE_TOKEN"],
        proc,
        log_path,
        Path(env["HSM_STATE_DB"]),
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

        wait_until(answers, timeout=60, message=lambda: f"hsm serve /health\n{server.log()}")
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    for name in _SECRETS:
        if env.get(name) and env[name] in server.log():
            raise AssertionError(f"{name} reached hsm serve's log")
