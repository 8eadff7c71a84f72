"""pytest fixtures for tests that need a real regtest node.

Register with ``pytest_plugins = ["regtest.pytest_plugin"]`` in the top-level
``tests/conftest.py``.

One node per xdist worker (session scope inside each worker process): btcd fails
two concurrent ``generate`` calls, and tests on one worker run one at a time.
Tests share the node, so they must not assume a height or an empty mempool:
read the tip, make your own payments, mine your own blocks.

If any test of the session failed (or ``REGTEST_KEEP_DATADIR=1``), the node's
datadir is kept and its path reported as a warning at the end of the run.
A missing btcd makes the fixture error, so node tests fail (never skip).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from typing import Protocol

import pytest

from regtest.faucet import COINBASE_MATURITY, Faucet
from regtest.node import RegtestNode

__all__ = ["Fund", "RegtestDatadirKept", "faucet", "regtest_fund", "regtest_node"]

PREMINE_BLOCKS = COINBASE_MATURITY + 10


class Fund(Protocol):
    def __call__(self, address: str, sats: int, confirmations: int = 1) -> tuple[str, int]: ...


class RegtestDatadirKept(UserWarning):
    """Carries the path of a kept datadir to the end-of-run summary (also under xdist)."""


@pytest.fixture(scope="session")
def regtest_node(request: pytest.FixtureRequest) -> Iterator[RegtestNode]:
    """A started btcd with ``PREMINE_BLOCKS`` blocks: the faucet can pay at once."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    node = RegtestNode(name=worker)
    node.start()
    try:
        node.mine(PREMINE_BLOCKS)
        yield node
    finally:
        keep = request.session.testsfailed > 0 or os.environ.get("REGTEST_KEEP_DATADIR") == "1"
        node.stop(keep_datadir=keep)
        if keep:
            warnings.warn(
                RegtestDatadirKept(
                    f"regtest node datadir kept ({worker}): {node.basedir} (log: {node.log_path})"
                ),
                stacklevel=1,
            )


@pytest.fixture
def faucet(regtest_node: RegtestNode) -> Faucet:
    return regtest_node.faucet


@pytest.fixture
def regtest_fund(regtest_node: RegtestNode) -> Fund:
    """``fund(address, sats, confirmations=1) -> (txid, vout)``: pay, then mine."""

    def fund(address: str, sats: int, confirmations: int = 1) -> tuple[str, int]:
        outpoint = regtest_node.faucet.pay(address, sats)
        if confirmations > 0:
            regtest_node.mine(confirmations)
        return outpoint

    return fund
