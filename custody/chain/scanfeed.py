"""Blocks fetched and scanned in a child process, for a long catch-up.

Fetching (the node's reply, JSON, hex) and scanning a block are pure CPU in this process;
under the GIL a thread cannot overlap them with the watcher's database writes, a process
can. The child is forked with the watcher's watched sets (copy-on-write: a million
scripts are not copied, only read) and scans the blocks in height order, keeping its own
copy of the watched outpoints exactly as the watcher keeps its own after applying each
block: a block's watched outputs are added, its spends discarded. So a spend in N+1 of
an output paid in N is found, as when the watcher scans itself (the watched scripts do
not change during a step's blocks). What comes back per block is its `BlockScan`, the
few matches, not the block.

The child touches no database, holds its own node client (`NodeRpc.copy`), logs nothing
(a lock another thread of the parent held at the fork would never be released in it) and
leaves by `os._exit`, running none of the inherited clean-ups. Closing the feed (also by
`break`) ends it. An error of the node comes out in place of the block it failed on; a
child that dies comes out as `ScannerDied`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing
import os
import pickle
import signal
from collections.abc import Iterator
from dataclasses import replace
from multiprocessing.connection import Connection
from types import TracebackType
from typing import Any

from custody.chain.blocks import BlockScan, ScriptIndex, outpoint_key, scan_block
from custody.chain.feed import HASH_BATCH
from custody.chain.rpc import NodeRpc, RpcUnavailable

__all__ = ["ScanFeed", "ScannerDied", "can_fork"]

_PR_SET_PDEATHSIG = 1  # prctl(2)
# Seconds between looks at whether a silent child is still alive.
_POLL_SECONDS = 1.0


class ScannerDied(RpcUnavailable):
    """The scanning process ended without handing over its blocks (killed, out of memory)."""


def can_fork() -> bool:
    """Whether this platform starts processes by fork (the watched sets are inherited,
    not sent)."""
    return "fork" in multiprocessing.get_all_start_methods()


class ScanFeed:
    """`(height, BlockScan)` for `first`..`last`, fetched and scanned by a forked child.

    `outpoints` is copied by the fork: the caller goes on updating its own set as it
    applies the blocks, the child its copy, the same way."""

    def __init__(
        self,
        rpc: NodeRpc,
        first: int,
        last: int,
        scripts: ScriptIndex,
        outpoints: set[bytes],
    ) -> None:
        self.first, self.last = first, last
        self._rpc, self._scripts, self._outpoints = rpc, scripts, outpoints
        self._process: multiprocessing.process.BaseProcess | None = None
        self._reader: Connection | None = None

    def __enter__(self) -> ScanFeed:
        context = multiprocessing.get_context("fork")
        reader, writer = context.Pipe(duplex=False)
        process = context.Process(
            target=_scan_in_child,
            args=(
                os.getpid(),
                self._rpc,
                self.first,
                self.last,
                self._scripts,
                self._outpoints,
                writer,
            ),
            name="block-scan",
            daemon=True,
        )
        process.start()
        writer.close()  # the child's end: EOF here once the child is gone
        self._process, self._reader = process, reader
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        process, self._process = self._process, None
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()  # a child blocked on a full pipe gets EPIPE and leaves
        if process is not None:
            if process.is_alive():
                process.terminate()
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()
            process.close()

    def ready(self) -> bool:
        """Whether the next block's scan (or the end, or an error) is here already: taking
        it does not wait on the child or the node."""
        return self._reader is not None and self._reader.poll(0)

    def __iter__(self) -> Iterator[tuple[int, BlockScan]]:
        assert self._reader is not None and self._process is not None, "enter the feed first"
        reader, process = self._reader, self._process
        while True:
            while not reader.poll(_POLL_SECONDS):
                if not process.is_alive() and not reader.poll(0):
                    raise ScannerDied(f"the block scanner ended (exit code {process.exitcode})")
            try:
                kind, item = pickle.loads(reader.recv_bytes())
            except EOFError:
                process.join(timeout=10)
                raise ScannerDied(
                    f"the block scanner ended (exit code {process.exitcode})"
                ) from None
            if kind == "done":
                return
            if kind == "error":
                assert isinstance(item, BaseException)
                raise item
            height, scan = item
            yield height, scan


def _send(writer: Connection, kind: str, item: Any) -> None:
    try:
        blob = pickle.dumps((kind, item))
    except Exception:  # an error that does not pickle: its text does
        blob = pickle.dumps(("error", RpcUnavailable(f"block scanner: {item!r}")))
    writer.send_bytes(blob)


def _die_with(parent: int) -> None:
    """Linux: be killed when the parent dies (a SIGKILLed watcher leaves no scanner
    fetching on); elsewhere the closed pipe ends the child at its next block."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before the request took effect
        os._exit(1)


def _scan_in_child(
    parent: int,
    rpc: NodeRpc,
    first: int,
    last: int,
    scripts: ScriptIndex,
    outpoints: set[bytes],
    writer: Connection,
) -> None:
    """The child's whole life: fetch, scan, hand over, in height order; then leave."""
    code = 0
    try:
        _die_with(parent)
        for item in _scans(rpc, first, last, scripts, outpoints):
            _send(writer, *item)
    except OSError:  # the parent closed the feed: nobody to tell
        code = 1
    finally:
        try:
            writer.close()
        finally:
            os._exit(code)


def _scans(
    rpc: NodeRpc, first: int, last: int, scripts: ScriptIndex, outpoints: set[bytes]
) -> Iterator[tuple[str, Any]]:
    """("block", (height, scan)) per block, then ("done", None); or ("error", exc) for
    the first failure, in its place."""
    try:
        node = rpc.copy()
        try:
            height = first
            while height <= last:
                heights = range(height, min(last, height + HASH_BATCH - 1) + 1)
                for at, block_hash in zip(heights, node.get_block_hashes(heights), strict=True):
                    scan = scan_block(node.get_block_raw(block_hash), scripts, outpoints)
                    # What the watcher does to its own set once it applied the block.
                    outpoints.update(outpoint_key(o.txid, o.vout) for o in scan.outputs)
                    outpoints.difference_update(s.outpoint for s in scan.spends)
                    yield "block", (at, replace(scan, transactions=()))
                height = heights[-1] + 1
        finally:
            node.close()
    except Exception as exc:
        yield "error", exc
        return
    yield "done", None
