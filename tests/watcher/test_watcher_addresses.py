"""The watched addresses: every handed-out address is watched, however the hand-outs'
commits interleave with the watcher's loads, and a reorg does not read them all again."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, select
from support.bulk import create_ready_loans

from custody.auth.context import Context
from custody.db.models import Deposit, Principal
from custody.db.session import make_engine, transaction
from custody.loans.service import new_address
from custody.watcher import repository
from custody.watcher.service import Watcher, WatcherConfig
from regtest.node import RegtestNode


@pytest.fixture
def pg_engine(postgres_database: Callable[..., str], postgres_template: str) -> Iterator[Engine]:
    """PostgreSQL only: SQLite's writers queue (BEGIN IMMEDIATE), so there hand-outs commit
    in id order and no later id can show before an earlier one."""
    engine = make_engine(postgres_database(template=postgres_template))
    yield engine
    engine.dispose()


def _operator(engine: Engine, seed: str) -> Context:
    with Session(engine) as session:
        who = session.exec(select(Principal).where(Principal.name == f"bulk-{seed}-bank_operator"))
        return Context(principal=who.one(), network="regtest")


def test_an_address_whose_id_commits_after_a_later_one_is_still_watched(
    pg_engine: Engine, regtest_node: RegtestNode
) -> None:
    """Two hand-outs overlap: the first takes id N at its INSERT, the second id N+1 and
    commits first, and the watcher loads in between. Reading `id > last seen` alone it
    would never see N; paid and mined, that deposit would go unrecorded for good."""
    first, second = create_ready_loans(pg_engine, [100_000, 100_000], seed="late")
    ctx = _operator(pg_engine, "late")
    watcher = Watcher(
        pg_engine,
        regtest_node.rpc,
        config=WatcherConfig(start_height=regtest_node.rpc.get_block_count() + 1),
    )
    watcher.acquire()
    try:
        watcher.step()
        with Session(pg_engine) as slow:
            late = new_address(slow, ctx, first.loan_id)  # INSERTed: id N taken, not committed
            late_id, late_address, late_script = late.id, late.address, late.script_pubkey_hex
            with transaction(pg_engine) as quick:
                early = new_address(quick, ctx, second.loan_id)
                early_id = early.id
            assert late_id is not None and early_id is not None and early_id > late_id

            watcher.step()  # sees N+1 committed, N not yet
            assert bytes.fromhex(late_script) not in watcher._watched.scripts
            slow.commit()

        txid, vout = regtest_node.faucet.pay(late_address, 100_000)
        regtest_node.mine(1)
        watcher.step()

        assert bytes.fromhex(late_script) in watcher._watched.scripts
        assert late_id not in watcher._address_gaps
        with Session(pg_engine) as session:
            dep = session.exec(select(Deposit).where(Deposit.txid == txid)).one()
        assert (dep.vout, dep.address_id, dep.loan_id) == (vout, late_id, first.loan_id)
    finally:
        watcher.release()


def test_a_reorg_reloads_the_outpoints_not_the_addresses(
    engine: Engine, regtest_node: RegtestNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Addresses never change with the chain: after a reorg only the outpoints are read
    again, so a watcher of a million addresses does not spend seconds per reorg."""
    [loan] = create_ready_loans(engine, [100_000], seed="reorg-reload")
    watcher = Watcher(
        engine,
        regtest_node.rpc,
        config=WatcherConfig(start_height=regtest_node.rpc.get_block_count() + 1),
    )
    watcher.acquire()
    try:
        regtest_node.faucet.pay(loan.address, 100_000)
        regtest_node.mine(1)
        watcher.step()
        read_after: list[int] = []
        real = repository.addresses_after

        def counting(session: Session, address_id: int, limit: int) -> list[tuple[int, str]]:
            read_after.append(address_id)
            return real(session, address_id, limit)

        monkeypatch.setattr(repository, "addresses_after", counting)
        regtest_node.reorg(1)  # the deposit's block is replaced by a longer branch
        result = watcher.step()

        assert result.blocks_rolled_back == 1
        assert read_after and min(read_after) == watcher._watched.last_address_id > 0
        assert bytes.fromhex(loan.script_pubkey_hex) in watcher._watched.scripts
    finally:
        watcher.release()
