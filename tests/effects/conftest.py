"""Fixtures for the side-effect tests: the signing world (the bank's key with its signer,
in process, on a real SoftHSM2 token), as in tests/signing, and a second engine on the
test's database, standing for another process's connections."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine
from support.signer_world import SignerWorld, in_process_world
from support.world import World, build_world

from custody.db.session import make_engine
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
    return build_world(
        engine, chain=regtest_node.rpc, signer=bank_signer.client, staff=bank_signer.staff
    )


@pytest.fixture
def other_engine(db_url: str, engine: Engine) -> Iterator[Engine]:
    """Another connection pool on the same (migrated) database: another process."""
    other = make_engine(db_url)
    yield other
    other.dispose()
