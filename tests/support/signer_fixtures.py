"""Fixtures for tests of the signing paths (tests/signing, tests/effects import them into
their conftest): a world whose bank key is made and used by the bank's signer (in process, a
real SoftHSM2 token, its own registry, node connection and price feed), talking to a real
btcd."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine
from support.signer_world import SignerWorld, in_process_world
from support.world import World, build_world

from regtest.node import RegtestNode
from regtest.price_feed import PriceFeed, price_feed
from regtest.softhsm import SoftHsmToken


@pytest.fixture
def feed() -> Iterator[PriceFeed]:
    with price_feed("8000000") as f:
        yield f


@pytest.fixture
def bank_signer(
    tmp_path: Path, regtest_node: RegtestNode, softhsm_token: SoftHsmToken, feed: PriceFeed
) -> Iterator[SignerWorld]:
    with in_process_world(tmp_path / "signer", regtest_node, feed, softhsm_token) as sw:
        yield sw


@pytest.fixture
def world(engine: Engine, regtest_node: RegtestNode, bank_signer: SignerWorld) -> World:
    """The bank's key lives with the bank's signer unless a test says otherwise."""
    return build_world(
        engine, chain=regtest_node.rpc, signer=bank_signer.client, staff=bank_signer.staff
    )
