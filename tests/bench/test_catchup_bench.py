"""The catch-up benchmark (`python -m bench catchup`) on a small chain against a real
btcd, so its own checks keep working: it once timed one step and reported 900 of 1,000
deposits as not confirmed for weeks, and nobody read the line. No timed assertion: the
figures are the bench's; what is held here is that the replay is exact."""

from __future__ import annotations

import pytest

from bench import catchup

pytestmark = [pytest.mark.node]  # the bench starts its own btcd

SMALL = catchup.Shape("small", blocks=10, txs_per_block=30, deposits_per_block=5, padding=0)


def test_the_catch_up_bench_replays_exactly_the_deposits_made() -> None:
    # 10 blocks: more than the watcher's `scan_process_blocks`, so the scanning child and
    # the batches of blocks a transaction are what is replayed.
    figures = {f.name: f for f in catchup.run_shape(SMALL, ["sqlite"], None, loans=8)}

    exact = figures["catchup.small.sqlite.deposits_exact"]
    assert exact.passed and exact.value == 1.0
    replayed = figures["catchup.small.sqlite.blocks_replayed"]
    assert replayed.passed and replayed.value == SMALL.blocks
    assert figures["catchup.small.txs_per_block_min"].value >= SMALL.txs_per_block
    assert figures["catchup.small.sqlite.blocks_per_s"].value > 0
