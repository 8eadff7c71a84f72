"""Five hundred loans paid in five blocks of a hundred outputs each: the watcher finds
every deposit, once, with its amount and block, and activates every loan.

Loans are made through the domain services in one transaction (tests/support/bulk.py);
the HTTP path is covered elsewhere and would make this test about HTTP.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter

from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select
from support.bulk import create_ready_loans

from custody.db.models import AuditEvent, Deposit, DepositState, Loan, LoanState
from custody.watcher.service import ACTOR, Watcher
from regtest.node import RegtestNode

LOANS = 500
PER_TX = 100
SEED = 500


def test_many_loans_all_found(engine: Engine, regtest_node: RegtestNode, watcher: Watcher) -> None:
    rng = random.Random(SEED)
    rpc = regtest_node.rpc
    t0 = time.monotonic()
    loans = create_ready_loans(
        engine, [rng.randrange(50_000, 500_000) for _ in range(LOANS)], seed="scale"
    )
    t_loans = time.monotonic() - t0
    assert len({loan.address for loan in loans}) == LOANS
    required = {loan.loan_id: loan.required_sats for loan in loans}

    # Pay slightly more than required (so excess is exercised), in a shuffled order.
    order = loans[:]
    rng.shuffle(order)
    amounts = {loan.loan_id: loan.required_sats + rng.randrange(0, 5_000) for loan in loans}
    expected: dict[int, tuple[str, int]] = {}
    t1 = time.monotonic()
    for i in range(0, LOANS, PER_TX):
        chunk = order[i : i + PER_TX]
        txid = regtest_node.faucet.pay_many([(c.address, amounts[c.loan_id]) for c in chunk])
        expected.update({c.loan_id: (txid, vout) for vout, c in enumerate(chunk)})
        if i // PER_TX in (0, 2):
            assert watcher.step().mempool_deposits == len(chunk)  # seen before it is mined
        regtest_node.mine(1)
        if i // PER_TX in (1, 3):
            watcher.step()  # otherwise the next step applies two blocks at once
    result = watcher.step()
    t_watch = time.monotonic() - t1
    assert result.height == rpc.get_block_count()

    blocks = {
        txid: int(
            rpc.get_block_header(rpc.call("getrawtransaction", txid, 1)["blockhash"])["height"]
        )
        for txid, _ in set(expected.values())
    }
    assert len(blocks) == LOANS // PER_TX and len(set(blocks.values())) == LOANS // PER_TX

    with Session(engine) as s:
        deposits = s.exec(select(Deposit)).all()
        states = dict(s.exec(select(Loan.id, Loan.state)).all())
        seen = Counter(
            (json.loads(data)["txid"], json.loads(data)["vout"])
            for data in s.exec(
                select(AuditEvent.data).where(
                    AuditEvent.actor == ACTOR, AuditEvent.action == "deposit.seen"
                )
            ).all()
        )
        activated = s.exec(
            select(AuditEvent.loan_id).where(
                AuditEvent.actor == ACTOR, col(AuditEvent.action) == "loan.state_changed"
            )
        ).all()

    per_loan = Counter(d.loan_id for d in deposits)
    assert len(deposits) == LOANS and set(per_loan.values()) == {1}
    for dep in deposits:
        txid, vout = expected[dep.loan_id]
        assert (dep.txid, dep.vout, dep.amount_sats) == (txid, vout, amounts[dep.loan_id])
        assert (dep.state, dep.block_height) == (DepositState.confirmed, blocks[txid])
        assert dep.excess_sats == amounts[dep.loan_id] - required[dep.loan_id]
    assert set(seen.values()) == {1} and len(seen) == LOANS
    # One state change per loan (awaiting_deposit -> active), no flapping.
    assert Counter(activated) == Counter(list(required))
    assert all(states[loan.loan_id] == LoanState.active for loan in loans)
    print(
        f"\n[{engine.dialect.name}] {LOANS} loans made in {t_loans:.1f}s; "
        f"paid and watched in {t_watch:.1f}s"
    )
