"""The service's own commands (`custody notify`, `custody risk`, ...) as OS processes on a
test's database: started with only the environment given here, stopped with SIGTERM or
killed with SIGKILL, their output kept in a file the failure message shows."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from custody.db.models import WorkerHeartbeat


@dataclass
class CommandProcess:
    args: tuple[str, ...]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> CommandProcess:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", *self.args],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM, and its exit code once it stopped (a hang fails the test)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            self.kill()
            raise AssertionError(
                f"{self.args} ignored SIGTERM for {timeout}s:\n{self.log()}"
            ) from exc

    def kill(self) -> None:
        """SIGKILL: no finally block, no clean-up but the database's own."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def custody_command(
    base: Path, db_url: str, command: str, *args: str, **settings: str
) -> CommandProcess:
    """`custody <command>` on `db_url` (regtest), with `settings` as CUSTODY_* variables
    and nothing of this process's own CUSTODY_/HSM_ environment."""
    base.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CUSTODY_", "HSM_"))}
    env.update(
        {
            "DATABASE_URL": db_url,
            "CUSTODY_NETWORK": "regtest",
            **{f"CUSTODY_{k.upper()}": v for k, v in settings.items()},
        }
    )
    log_path = base / f"{command}.log"
    return CommandProcess(("custody.cli", command, *args), env, log_path)


def heartbeats(engine: Engine, kind: str) -> list[WorkerHeartbeat]:
    with Session(engine) as session:
        statement = select(WorkerHeartbeat).where(col(WorkerHeartbeat.kind) == kind)
        return list(session.exec(statement).all())
