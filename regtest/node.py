"""A regtest node for tests and the demo, after Bitcoin Core's functional-test ``TestNode``.

``RegtestNode`` starts btcd (or Bitcoin Core's bitcoind when env ``BITCOIND`` names
a binary) on free loopback ports with a throw-away datadir/HOME/logdir, waits until
RPC answers, and stops it cleanly. The datadir is deleted on a clean stop and kept
(path in the error/log) when asked or when the ``with`` block raised, so a failed
test leaves its chain behind for inspection.

The node never talks to the network: no listening, no DNS seeds, no peers.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Literal

from custody.chain.rpc import NodeRpc, RpcError, RpcUnavailable
from regtest.faucet import Faucet, random_p2wpkh_address
from regtest.wait import WaitTimeout, wait_until

__all__ = [
    "BTCD_VERSION",
    "NodeStartError",
    "RegtestNode",
    "WaitTimeout",
    "find_btcd",
    "wait_until",
]

BTCD_VERSION = "v0.26.0"
REPO_ROOT = Path(__file__).resolve().parent.parent
RPC_USER = "regtest"


class NodeStartError(RuntimeError):
    """The node binary is missing, or the node did not come up."""


def free_port() -> int:
    """A port nothing listens on right now (the OS picks; tiny race until the node binds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def find_btcd() -> str:
    """``$BTCD``, else ``<repo>/.cache/btcd/v0.26.0/bin/btcd``, else ``btcd`` on PATH."""
    env = os.environ.get("BTCD")
    if env:
        if not os.access(env, os.X_OK):
            raise NodeStartError(f"BTCD={env} is not an executable file")
        return str(Path(env).resolve())  # btcd runs with its own cwd
    cached = REPO_ROOT / ".cache" / "btcd" / BTCD_VERSION / "bin" / "btcd"
    if os.access(cached, os.X_OK):
        return str(cached)
    on_path = shutil.which("btcd")
    if on_path:
        return on_path
    raise NodeStartError(
        "btcd not found: set BTCD=/path/to/btcd or run `GOBIN=$PWD/.cache/btcd/"
        f"{BTCD_VERSION}/bin go install github.com/btcsuite/btcd@{BTCD_VERSION}`"
    )


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class RegtestNode:
    """One regtest node process with its RPC client (``rpc``) and faucet (``faucet``).

    ``name`` goes into the datadir name (e.g. the xdist worker id) so kept datadirs
    can be told apart.
    """

    def __init__(
        self,
        *,
        name: str = "node",
        keep_datadir: bool = False,
        extra_args: tuple[str, ...] = (),
        start_timeout: float = 60.0,
    ) -> None:
        bitcoind = os.environ.get("BITCOIND")
        self.implementation: Literal["btcd", "bitcoind"] = "bitcoind" if bitcoind else "btcd"
        self.binary = bitcoind if bitcoind else find_btcd()
        self.name = name
        self.keep_datadir = keep_datadir
        self.extra_args = extra_args
        self.start_timeout = start_timeout
        self.faucet = Faucet()
        self._password = secrets.token_hex(16)
        self.basedir: Path | None = None
        self.rpc_port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._rpc: NodeRpc | None = None
        self._after_invalidate = False

    def __repr__(self) -> str:
        return f"RegtestNode({self.implementation}, port={self.rpc_port}, dir={self.basedir})"

    # -- lifecycle -----------------------------------------------------------------

    @property
    def rpc(self) -> NodeRpc:
        if self._rpc is None:
            raise NodeStartError("node is not started")
        return self._rpc

    @property
    def rpc_url(self) -> str:
        return f"http://127.0.0.1:{self.rpc_port}"

    @property
    def rpc_user(self) -> str:
        return RPC_USER

    @property
    def rpc_password(self) -> str:
        """For other components under test that need to reach this node."""
        return self._password

    @property
    def log_path(self) -> Path:
        assert self.basedir is not None
        return self.basedir / "stdout.log"

    def _command(self, datadir: Path, logdir: Path) -> list[str]:
        if self.implementation == "btcd":
            return [
                self.binary,
                "--regtest",
                "--notls",
                f"--rpcuser={RPC_USER}",
                f"--rpcpass={self._password}",
                f"--rpclisten=127.0.0.1:{self.rpc_port}",
                "--nolisten",
                "--nodnsseed",
                "--nocfilters",
                "--nostalldetect",
                f"--miningaddr={self.faucet.address}",
                "--txindex",
                "--addrindex",
                "--rejectnonstd",
                "--limitfreerelay=0",
                f"--datadir={datadir}",
                f"--logdir={logdir}",
                # An empty config file: never pick up ~/.btcd/btcd.conf.
                f"--configfile={datadir / 'btcd.conf'}",
                *self.extra_args,
            ]
        return [
            self.binary,
            "-regtest",
            f"-datadir={datadir}",
            f"-rpcuser={RPC_USER}",
            f"-rpcpassword={self._password}",
            f"-rpcport={self.rpc_port}",
            "-rpcbind=127.0.0.1",
            "-rpcallowip=127.0.0.1",
            "-server=1",
            "-listen=0",
            "-dnsseed=0",
            "-fixedseeds=0",
            "-connect=0",
            "-disablewallet=1",
            "-txindex=1",
            "-acceptnonstdtxn=0",
            "-printtoconsole=1",
            *self.extra_args,
        ]

    def start(self) -> RegtestNode:
        """Start the process and wait until RPC answers (``NodeStartError`` with the log tail)."""
        if self.process is not None:
            raise NodeStartError("node already started")
        self.basedir = Path(tempfile.mkdtemp(prefix=f"regtest-{self.implementation}-{self.name}-"))
        datadir, logdir, home = (self.basedir / d for d in ("data", "logs", "home"))
        for d in (datadir, logdir, home):
            d.mkdir()
        (datadir / "btcd.conf").touch()
        self.rpc_port = free_port()
        env = {**os.environ, "HOME": str(home)}
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self._command(datadir, logdir),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self.basedir,
            )
        self._rpc = NodeRpc(
            self.rpc_url,
            RPC_USER,
            self._password,
            timeout=30.0,
            mining_address=self.faucet.address,
        )
        self.faucet.attach(self._rpc)
        try:
            wait_until(
                self._rpc_ready,
                timeout=self.start_timeout,
                message=lambda: f"{self.implementation} RPC on {self.rpc_url}",
            )
        except Exception as exc:
            tail = _tail(self.log_path)
            self._terminate()
            self.keep_datadir = True
            raise NodeStartError(
                f"{self.implementation} did not start ({exc}); datadir kept at {self.basedir}; "
                f"log tail:\n{tail}"
            ) from exc
        return self

    def _rpc_ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise NodeStartError(f"process exited with code {self.process.returncode}")
        try:
            self.rpc.get_block_count()
        except (RpcUnavailable, RpcError):
            return False  # not listening yet / Core warming up (-28)
        return True

    def _terminate(self, timeout: float = 30.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout)
        self.process = None

    def stop(self, *, keep_datadir: bool | None = None, timeout: float = 30.0) -> None:
        """RPC ``stop``, wait for the process (kill after ``timeout``), then delete the
        datadir unless it is to be kept."""
        if self.process is not None:
            with contextlib.suppress(RpcUnavailable, RpcError):
                self.rpc.call("stop")  # failing means it is already going down
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._terminate(timeout)
            self.process = None
        if self._rpc is not None:
            self._rpc.close()
            self._rpc = None
        keep = self.keep_datadir if keep_datadir is None else keep_datadir
        if self.basedir is not None and not keep:
            shutil.rmtree(self.basedir, ignore_errors=True)

    def __enter__(self) -> RegtestNode:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop(keep_datadir=True if exc_type is not None else None)

    # -- chain helpers ---------------------------------------------------------------

    def mine(self, n: int = 1) -> list[str]:
        """Mine ``n`` blocks to the faucet (mempool txs included); returns their hashes."""
        if self._after_invalidate and self.implementation == "bitcoind" and n > 0:
            # Core's first block after invalidateblock can be byte-identical to the one
            # invalidated (same second, same txs, no random extranonce) and be refused
            # as known-invalid; paying another address makes it differ. btcd randomises
            # its extranonce, so this is Core only.
            first = self.rpc.generate_to_address(1, random_p2wpkh_address())
            self._after_invalidate = False
            return first + self.mine(n - 1)
        self._after_invalidate = False
        return self.rpc.generate_to_address(n, self.faucet.address)

    def wait_until(
        self,
        predicate: Callable[[], object],
        timeout: float = 30.0,
        interval: float = 0.05,
        message: str | Callable[[], str] = "condition",
    ) -> None:
        wait_until(predicate, timeout=timeout, interval=interval, message=message)

    def wait_for_height(self, height: int, timeout: float = 30.0) -> None:
        self.wait_until(
            lambda: self.rpc.get_block_count() >= height,
            timeout=timeout,
            message=lambda: f"height {height} (at {self.rpc.get_block_count()})",
        )

    def invalidate(self, depth: int) -> list[str]:
        """Disconnect the top ``depth`` blocks (``invalidateblock`` at tip-depth+1).

        Returns the orphaned hashes, lowest first. Their transactions (not the
        coinbases) go back to the mempool: inspect it before mining again.
        """
        if depth < 1:
            raise ValueError("depth must be >= 1")
        tip = self.rpc.get_block_count()
        if depth > tip:
            raise ValueError(f"cannot orphan {depth} blocks at height {tip}")
        orphaned = [self.rpc.get_block_hash(h) for h in range(tip - depth + 1, tip + 1)]
        self.rpc.invalidate_block(orphaned[0])
        self._after_invalidate = True
        self.wait_until(
            lambda: self.rpc.get_block_count() == tip - depth,
            message=f"tip to drop to {tip - depth} after invalidateblock",
        )
        return orphaned

    def reorg(self, depth: int) -> list[str]:
        """Replace the top ``depth`` blocks by ``depth + 1`` new ones (a longer branch).

        Transactions of the orphaned blocks return to the mempool and are mined again
        in the new branch (btcd's ``generate`` takes the whole mempool); to make one
        disappear instead, ``invalidate`` then ``faucet.double_spend`` it, then ``mine``.
        Returns the new branch's hashes.
        """
        self.invalidate(depth)
        return self.mine(depth + 1)
