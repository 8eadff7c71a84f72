"""Fixtures for signing tests: a world whose bank key lives in a real SoftHSM2 token,
talking to a real btcd, and a watcher following it."""

from __future__ import annotations

import pytest
from sqlalchemy.engine import Engine
from support.world import World, build_world

from hsm.pkcs11_backend import Pkcs11Signer
from regtest.node import RegtestNode


@pytest.fixture
def world(engine: Engine, regtest_node: RegtestNode, pkcs11_signer: Pkcs11Signer) -> World:
    """The bank's key lives in a real SoftHSM2 token unless a test says otherwise."""
    return build_world(engine, chain=regtest_node.rpc, hsm=pkcs11_signer)
