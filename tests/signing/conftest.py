"""Fixtures for signing tests: a world whose bank key lives in a real SoftHSM2 token,
talking to a real btcd, and a watcher following it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy.engine import Engine
from support.world import World, build_world

from custody.chain.watcher import Watcher, WatcherConfig
from hsm.pkcs11_backend import Pkcs11Signer
from regtest.node import RegtestNode


@pytest.fixture
def world(engine: Engine, regtest_node: RegtestNode, pkcs11_signer: Pkcs11Signer) -> World:
    """The bank's key lives in a real SoftHSM2 token unless a test says otherwise."""
    return build_world(engine, chain=regtest_node.rpc, hsm=pkcs11_signer)


@pytest.fixture
def watcher(engine: Engine, regtest_node: RegtestNode) -> Iterator[Watcher]:
    w = Watcher(
        engine,
        regtest_node.rpc,
        config=WatcherConfig(start_height=regtest_node.rpc.get_block_count() + 1),
    )
    w.acquire()
    yield w
    w.release()
