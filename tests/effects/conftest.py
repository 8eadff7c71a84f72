"""Fixtures for the side-effect tests: the signing world (the bank's key with its signer,
in process, on a real SoftHSM2 token), as in tests/signing, and a second engine on the
test's database, standing for another process's connections."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy.engine import Engine
from support.signer_fixtures import bank_signer, feed, world

from custody.db.session import make_engine

__all__ = ["bank_signer", "feed", "other_engine", "world"]


@pytest.fixture
def other_engine(db_url: str, engine: Engine) -> Iterator[Engine]:
    """Another connection pool on the same (migrated) database: another process."""
    other = make_engine(db_url)
    yield other
    other.dispose()
