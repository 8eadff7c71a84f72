"""Signer worlds for the signer's tests: one per test module and transport (starting
`hsm serve` and enrolling people costs seconds; each test makes its own loans)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from support.signer_world import SignerWorld, in_process_world, serve_world

from regtest.node import RegtestNode
from regtest.price_feed import PriceFeed, price_feed
from regtest.softhsm import SoftHsmToken


@pytest.fixture(scope="module")
def module_feed() -> Iterator[PriceFeed]:
    with price_feed("8000000") as feed:
        yield feed


@pytest.fixture(
    scope="module",
    params=["in-process", "hsm-serve", "in-process-hd", "hsm-serve-hd"],
)
def signer_world(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    regtest_node: RegtestNode,
    softhsm_token: SoftHsmToken,
    module_feed: PriceFeed,
) -> Iterator[SignerWorld]:
    """Each transport with each kind of bank key: the `-hd` worlds register every loan with
    an HD bank key (an account of the sealed seed), the others with a statement that does
    not say (a fixed key in the token, as before the choice existed), so every attack and
    limit below is tried on both kinds (issue 13: the signer treats them the same)."""
    base = tmp_path_factory.mktemp(f"signer-{request.param}")
    if request.param.startswith("in-process"):
        with in_process_world(base, regtest_node, module_feed, softhsm_token) as world:
            world.bank_key = "hd" if request.param.endswith("-hd") else None
            yield world
    else:
        with serve_world(base, regtest_node, module_feed) as world:
            world.bank_key = "hd" if request.param.endswith("-hd") else None
            yield world


@pytest.fixture
def world(signer_world: SignerWorld, module_feed: PriceFeed) -> Iterator[SignerWorld]:
    """The module's world with the feed reset to its default price after each test."""
    yield signer_world
    module_feed.set("8000000")
