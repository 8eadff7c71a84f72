"""The verifier's questions to a node (`pledge.proof.ChainView`), and nothing else: block
hashes of the active chain and whether an outpoint was unspent at a height.

Neither btcd nor Core answers "was this unspent at H" directly. `gettxout` (mempool left
out) says whether it is unspent at the tip, so at H too for an output mined at or below
H (the Merkle proof and the headers compared with the node's say it was). If it is spent
now, the blocks above H are read for the spending input: found there, it was unspent at
H; not found, it was spent at or before H. Past `max_scan` blocks above H the answer is
"cannot tell" (a node with an address index, such as btcd's `--addrindex`
`searchrawtransactions`, would answer that too; not used, so any node will do)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from custody.chain.blocks import outpoint_key, scan_block
from custody.chain.rpc import NodeRpc

MAX_SCAN: Final = 2_016
BATCH: Final = 2_000


class NodeChainView:
    def __init__(self, rpc: NodeRpc, *, max_scan: int = MAX_SCAN) -> None:
        self.rpc = rpc
        self.max_scan = max_scan
        self._tip: int | None = None

    def tip_height(self) -> int:
        if self._tip is None:
            self._tip = self.rpc.get_block_count()
        return self._tip

    def block_hashes(self, heights: Sequence[int]) -> list[str]:
        hashes: list[str] = []
        for start in range(0, len(heights), BATCH):
            hashes += self.rpc.get_block_hashes(heights[start : start + BATCH])
        return hashes

    def outpoint_state(self, txid: str, vout: int, height: int) -> str | None:
        if self.rpc.get_tx_out(txid, vout, include_mempool=False) is not None:
            return "unspent"
        tip = self.tip_height()
        if height >= tip:
            return "spent"
        if tip - height > self.max_scan:
            return None
        key = {outpoint_key(txid, vout)}
        for block_hash in self.rpc.get_block_hashes(list(range(height + 1, tip + 1))):
            if scan_block(self.rpc.get_block_raw(block_hash), (), key).spends:
                return "spent_after"
        return "spent"
