"""Blocks fetched ahead of the watcher, so the node serializes the next blocks while the
watcher scans and writes this one.

One background thread asks the node for the hashes of up to `HASH_BATCH` heights at a
time (one batched request) and then for each block (REST or RPC, `NodeRpc.get_block_raw`),
keeping at most `depth` blocks waiting. Blocks come out in height order; an error of the
node comes out in place of the block it failed on. No database is touched here: the
caller's transactions never wait on the node, only on blocks already fetched.

Hashes read ahead may go stale if the chain reorganizes meanwhile; the watcher checks
each block's parent against its cursor and rolls back what a reorg orphaned, exactly as
when the reorg comes just after a block was applied.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from types import TracebackType

from custody.chain.rpc import NodeRpc

__all__ = ["BlockFeed"]

HASH_BATCH = 32
DEFAULT_DEPTH = 4

_DONE = object()


class BlockFeed:
    """`(height, raw block)` for `first`..`last`, fetched ahead by one thread.

    Use as a context manager: leaving it (also by `break`) stops the thread after the
    request it is in."""

    def __init__(self, rpc: NodeRpc, first: int, last: int, *, depth: int = DEFAULT_DEPTH) -> None:
        if depth < 1:
            raise ValueError("depth must be at least 1")
        self.rpc = rpc
        self.first, self.last = first, last
        self._ready: queue.Queue[object] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fetch, name="block-fetch", daemon=True)

    def __enter__(self) -> BlockFeed:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        # Make room, so a thread blocked on a full queue sees the stop.
        while True:
            try:
                self._ready.get_nowait()
            except queue.Empty:
                break
        if self._thread.is_alive():
            self._thread.join()

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        while True:
            item = self._ready.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, tuple)
            yield item

    def _put(self, item: object) -> bool:
        """Hand `item` over; False once the feed is closed."""
        if self._stop.is_set():
            return False
        self._ready.put(item)
        return not self._stop.is_set()

    def _fetch(self) -> None:
        height = self.first
        try:
            while height <= self.last:
                heights = range(height, min(self.last, height + HASH_BATCH - 1) + 1)
                for at, block_hash in zip(heights, self.rpc.get_block_hashes(heights), strict=True):
                    if not self._put((at, self.rpc.get_block_raw(block_hash))):
                        return
                height = heights[-1] + 1
        except Exception as exc:  # the node's error reaches the caller in order
            self._put(exc)
            return
        self._put(_DONE)
