"""Benchmark: the deposit watcher catching up after downtime.

Target (issue "Deposit watcher", section Speed): over at least 20 regtest blocks
of 2,000+ transactions each, fetched over RPC and written to the database, the
watcher replays at least 20 blocks/s.

Set-up (not timed): a btcd regtest node, a fresh migrated SQLite database with
200 loans made through the loans service, then 20 blocks of real, node-validated
traffic. Signing 40,000 transactions with the faucet's key would dominate the
run, so the traffic spends P2WSH outputs whose witness script is just
``OP_TRUE``: such a spend needs no signature (witness = [script]) and is still
standard, so each transaction is built in microseconds. About 50 transactions
per block also pay a loan's collateral address. Timed: one ``Watcher.step()``
from the first of those blocks to the tip (RPC fetch + scan + DB writes). The
run then checks the watcher recorded exactly the deposits that were made.

``python -m bench.catchup [--blocks N] [--txs-per-block N] [--profile]`` runs it
alone; ``--profile`` times the step under cProfile and prints where it goes.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from embit import bip32
from embit.networks import NETWORKS
from embit.script import Script, Witness, p2wsh
from embit.transaction import Transaction, TransactionInput, TransactionOutput
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, func, select

from bench import Figure
from bench.common import seat_contexts, timed
from custody.chain.blocks import scan_block
from custody.chain.rpc import NodeRpc
from custody.config import Settings
from custody.db.migrate import upgrade
from custody.db.models import (
    AuditEvent,
    CollateralAddress,
    Deposit,
    DepositState,
    KeyRole,
    Loan,
    LoanState,
)
from custody.db.session import make_engine, transaction
from custody.loans.schemas import HDKeyIn, LoanCreate, LoanTermsIn
from custody.loans.service import create_loan, register_key
from custody.root import Root
from regtest.faucet import random_p2wpkh_address
from regtest.node import RegtestNode

SEED = 20240602
BLOCKS = 20
TXS_PER_BLOCK = 2_000
LOANS = 200
DEPOSITS_PER_BLOCK = 50
TARGET_BLOCKS_PER_S = 20.0

BROADCAST_THREADS = 4
FAN_OUT_CHUNK = 1_000  # outputs per faucet fan-out tx: ~43 kB, well under btcd's 100 kvB cap
COIN_SATS = 2_000_000  # value of each OP_TRUE coin: fees and deposits for every round
DEPOSIT_SATS = 100_000
REQUIRED_COLLATERAL_SATS = 300_000  # three deposits make a loan active
FEE_SAT_PER_BYTE = 2  # on the full serialised size: >= 1 sat/vB whatever btcd measures
# btcd's default template caps (750 kB, 3 MWU) fit ~7,000 of these txs; raise them to
# the consensus-safe maxima so a larger --txs-per-block still fits one block.
NODE_ARGS = ("--blockmaxsize=999000", "--blockmaxweight=3996000")

REGTEST = NETWORKS["regtest"]
ANYONE_WITNESS_SCRIPT = b"\x51"  # OP_TRUE: leaves exactly one true item, a clean stack
ANYONE_SPK = p2wsh(Script(ANYONE_WITNESS_SCRIPT))
ANYONE_ADDRESS = str(ANYONE_SPK.address(REGTEST))


@dataclass(frozen=True)
class Coin:
    """An unspent OP_TRUE output the traffic generator owns."""

    txid: str
    vout: int
    value: int


@dataclass(frozen=True)
class MadeDeposit:
    txid: str
    vout: int
    amount: int
    loan_id: int
    height: int


@dataclass
class Chain:
    """What the set-up put on the chain, for the checks after the catch-up."""

    first_height: int
    tip_height: int
    tx_counts: list[int]
    block_bytes: list[int]
    deposits: list[MadeDeposit]
    broadcast_s: float


# -- loans --------------------------------------------------------------------------


def _hd_key(rng: random.Random) -> str:
    """A BIP-48 P2WSH account key with origin, as a hardware wallet exports it."""
    root = bip32.HDKey.from_seed(rng.randbytes(32))
    account = root.derive("m/48h/1h/0h/2h").to_public()
    tpub = account.to_base58(version=bytes.fromhex("043587cf"))
    return f"[{root.my_fingerprint.hex()}/48h/1h/0h/2h]{tpub}"


def make_loans(engine: Engine, count: int, seed: int = SEED) -> dict[bytes, int]:
    """`count` loans with all three keys and their first collateral address, made
    through the loans service in one transaction; returns script_pubkey -> loan id."""
    rng = random.Random(seed)
    maturity = datetime.now(UTC) + timedelta(days=180)
    with transaction(engine) as session:
        ctx = seat_contexts(session, "bench", "regtest")
        for _ in range(count):
            body = LoanCreate(
                miner_party_id=ctx[KeyRole.miner].principal.party_id or 0,
                arbiter_party_id=ctx[KeyRole.arbiter].principal.party_id or 0,
                terms=LoanTermsIn(
                    principal_kopecks=1_000_000_00,
                    interest_rate_bps=1_800,
                    maturity_at=maturity,
                    required_collateral_sats=REQUIRED_COLLATERAL_SATS,
                    required_confirmations=1,
                    miner_return_address=random_p2wpkh_address(),
                    bank_liquidation_address=random_p2wpkh_address(),
                ),
            )
            loan = create_loan(session, ctx[KeyRole.bank], body)
            assert loan.id is not None
            for seat in (KeyRole.miner, KeyRole.bank, KeyRole.arbiter):
                key = HDKeyIn(kind="hd", key=_hd_key(rng))
                register_key(session, ctx[seat], loan.id, seat, key)
        rows = session.exec(
            select(CollateralAddress.script_pubkey_hex, CollateralAddress.loan_id)
        ).all()
    return {bytes.fromhex(spk): loan_id for spk, loan_id in rows}


# -- traffic ------------------------------------------------------------------------


def _spend(coin: Coin, outputs: Sequence[tuple[bytes, int]]) -> Transaction:
    """Spend an OP_TRUE coin: no signature, the witness is the script itself; the
    change (last output) goes back to OP_TRUE for the next round."""
    vin = [
        TransactionInput(
            bytes.fromhex(coin.txid),
            coin.vout,
            sequence=0xFFFFFFFF,
            witness=Witness([ANYONE_WITNESS_SCRIPT]),
        )
    ]
    vout = [TransactionOutput(v, Script(spk)) for spk, v in outputs]
    change = TransactionOutput(0, ANYONE_SPK)  # the value does not change the size
    tx = Transaction(version=2, vin=vin, vout=[*vout, change], locktime=0)
    change.value = coin.value - sum(v for _, v in outputs) - len(tx.serialize()) * FEE_SAT_PER_BYTE
    if change.value < 10_000:
        raise RuntimeError(f"coin {coin.txid}:{coin.vout} ran dry: raise COIN_SATS")
    return tx


def _broadcast(node: RegtestNode, txs_hex: list[str], threads: int) -> list[str]:
    """sendrawtransaction for every tx, `threads` clients in parallel (RPC latency
    dominates: btcd validates an OP_TRUE spend in microseconds)."""
    chunks = [txs_hex[i::threads] for i in range(threads)]

    def send(chunk: list[str]) -> list[str]:
        with NodeRpc(node.rpc_url, node.rpc_user, node.rpc_password) as rpc:
            return [rpc.send_raw_transaction(tx) for tx in chunk]

    with ThreadPoolExecutor(threads) as pool:
        return [txid for done in pool.map(send, chunks) for txid in done]


def _fan_out(node: RegtestNode, count: int) -> list[Coin]:
    """`count` confirmed OP_TRUE coins, paid by the faucet in a few large transactions."""
    coins: list[Coin] = []
    for start in range(0, count, FAN_OUT_CHUNK):
        n = min(FAN_OUT_CHUNK, count - start)
        txid = node.faucet.pay_many([(ANYONE_ADDRESS, COIN_SATS)] * n)
        coins += [Coin(txid, vout, COIN_SATS) for vout in range(n)]
    node.mine(1)
    return coins


def make_chain(
    node: RegtestNode,
    scripts: dict[bytes, int],
    *,
    blocks: int,
    txs_per_block: int,
    deposits_per_block: int,
    threads: int = BROADCAST_THREADS,
    seed: int = SEED,
) -> Chain:
    """Mine `blocks` blocks of `txs_per_block` transactions each (plus the coinbase);
    `deposits_per_block` of them also pay a collateral address."""
    rng = random.Random(seed + 1)
    node.mine(101)  # one mature coinbase for the faucet
    # Enough coinbases for the fan-out: 50 BTC each, less after regtest's halvings.
    node.mine(-(-txs_per_block * COIN_SATS // 2_500_000_000) + 1)
    coins = _fan_out(node, txs_per_block)
    loan_scripts = sorted(scripts)
    first = node.rpc.get_block_count() + 1
    chain = Chain(first, first, [], [], [], 0.0)
    for round_no in range(blocks):
        paying = set(rng.sample(range(txs_per_block), deposits_per_block))
        txs: list[Transaction] = []
        paid: list[tuple[int, int]] = []  # (tx index, loan id)
        for i, coin in enumerate(coins):
            outputs: list[tuple[bytes, int]] = []
            if i in paying:
                spk = loan_scripts[(round_no * deposits_per_block + len(paid)) % len(loan_scripts)]
                outputs.append((spk, DEPOSIT_SATS))
                paid.append((i, scripts[spk]))
            txs.append(_spend(coin, outputs))
        txids = [tx.txid().hex() for tx in txs]
        t0 = time.perf_counter()
        sent = _broadcast(node, [tx.serialize().hex() for tx in txs], threads)
        chain.broadcast_s += time.perf_counter() - t0
        if sorted(sent) != sorted(txids):
            raise RuntimeError("the node reported other txids than the ones built")
        [block_hash] = node.mine(1)
        block = node.rpc.call("getblock", block_hash, 1)
        height = int(block["height"])
        missing = set(txids) - set(block["tx"])
        if missing:
            raise RuntimeError(
                f"block {height} left out {len(missing)} of {len(txids)} txs: "
                "raise --blockmaxsize/--blockmaxweight"
            )
        chain.tx_counts.append(len(block["tx"]))
        chain.block_bytes.append(int(block["size"]))
        chain.deposits += [
            MadeDeposit(txids[i], 0, DEPOSIT_SATS, loan_id, height) for i, loan_id in paid
        ]
        coins = [
            Coin(txid, len(tx.vout) - 1, tx.vout[-1].value)
            for txid, tx in zip(txids, txs, strict=True)
        ]
        chain.tip_height = height
        print(
            f"catchup: block {round_no + 1}/{blocks} at height {height}: "
            f"{len(block['tx'])} txs, {len(paid)} deposits, {int(block['size']) / 1e3:.0f} kB",
            flush=True,
        )
    return chain


# -- the measured catch-up ------------------------------------------------------------


@dataclass(frozen=True)
class CatchUp:
    seconds: float
    blocks_applied: int
    height: int
    profile: str | None


def catch_up(engine: Engine, node: RegtestNode, start_height: int, *, profile: bool) -> CatchUp:
    """One `step()` from `start_height` to the tip; only the step is timed."""
    settings = Settings(network="regtest", watch_start_height=start_height, confirmations_small=1)
    watcher = Root.assemble(settings, engine=engine, node=node.rpc).watcher()
    watcher.acquire()
    try:
        result, seconds, report = timed(watcher.step, profile=profile)
    finally:
        watcher.release()
    return CatchUp(seconds, result.blocks_applied, result.height, report)


def fetch_and_scan(node: RegtestNode, chain: Chain, scripts: dict[bytes, int]) -> float:
    """The same blocks fetched over RPC and scanned, no database: the floor under the
    watcher's time, so a miss can be split into "node/parse" and "database"."""
    t0 = time.perf_counter()
    for height in range(chain.first_height, chain.tip_height + 1):
        raw = node.rpc.get_block_raw(node.rpc.get_block_hash(height))
        scan_block(raw, scripts, set())
    return time.perf_counter() - t0


def check_deposits(engine: Engine, chain: Chain) -> tuple[bool, str]:
    """Did the watcher record exactly the deposits made, each confirmed in its block?"""
    with Session(engine) as session:
        rows = session.exec(select(Deposit)).all()
    found = {(d.txid, d.vout, d.amount_sats, d.loan_id, d.block_height) for d in rows}
    made = {(d.txid, d.vout, d.amount, d.loan_id, d.height) for d in chain.deposits}
    unconfirmed = sum(1 for d in rows if d.state != DepositState.confirmed)
    if found == made and len(rows) == len(made) and unconfirmed == 0:
        return True, f"exactly the {len(made)} deposits made, all confirmed"
    return False, (
        f"made {len(made)}, found {len(rows)}: {len(made - found)} missed, "
        f"{len(found - made)} unexpected, {unconfirmed} not confirmed"
    )


def _audit_events(engine: Engine) -> int:
    with Session(engine) as session:
        return int(session.exec(select(func.count()).select_from(AuditEvent)).one())


def _active_loans(engine: Engine) -> int:
    with Session(engine) as session:
        return len(session.exec(select(Loan.id).where(col(Loan.state) == LoanState.active)).all())


def run(
    blocks: int = BLOCKS,
    txs_per_block: int = TXS_PER_BLOCK,
    *,
    loans: int = LOANS,
    deposits_per_block: int = DEPOSITS_PER_BLOCK,
    threads: int = BROADCAST_THREADS,
    profile: bool = False,
) -> list[Figure]:
    """Build the chain and the database, time the catch-up, check what it recorded."""
    started = time.perf_counter()
    with (
        tempfile.TemporaryDirectory(prefix="bench-catchup-") as tmp,
        RegtestNode(name="bench-catchup", extra_args=NODE_ARGS) as node,
    ):
        engine = make_engine(f"sqlite:///{Path(tmp) / 'custody.db'}")
        upgrade(engine)
        t0 = time.perf_counter()
        scripts = make_loans(engine, loans)
        print(
            f"catchup: {len(scripts)} loans with collateral addresses in "
            f"{time.perf_counter() - t0:.1f} s; btcd at {node.rpc_url}",
            flush=True,
        )
        chain = make_chain(
            node,
            scripts,
            blocks=blocks,
            txs_per_block=txs_per_block,
            deposits_per_block=deposits_per_block,
            threads=threads,
        )
        n_txs = sum(chain.tx_counts)
        print(
            f"catchup: {blocks} blocks, {n_txs:,} txs broadcast+mined "
            f"({n_txs / chain.broadcast_s:,.0f} tx/s over RPC); set-up took "
            f"{time.perf_counter() - started:.0f} s",
            flush=True,
        )
        audit_before = _audit_events(engine)
        result = catch_up(engine, node, chain.first_height, profile=profile)
        correct, detail = check_deposits(engine, chain)
        floor_s = fetch_and_scan(node, chain, scripts)
        audit_events = _audit_events(engine) - audit_before
        active = _active_loans(engine)
        engine.dispose()

    per_block = [c - 1 for c in chain.tx_counts]  # without the coinbase
    mb = sum(chain.block_bytes) / 1e6
    rate = result.blocks_applied / result.seconds
    complete = result.blocks_applied == blocks and result.height == chain.tip_height
    big_enough = blocks >= BLOCKS and min(per_block) >= TXS_PER_BLOCK
    print(
        f"catchup: replayed {result.blocks_applied} blocks (to height {result.height}) in "
        f"{result.seconds:.2f} s = {rate:.1f} blocks/s, "
        f"{sum(per_block) / result.seconds:,.0f} tx/s, {mb / result.seconds:.1f} MB/s"
    )
    print(
        f"catchup: txs per block (without coinbase) min {min(per_block):,} "
        f"avg {sum(per_block) / len(per_block):,.0f}, total {sum(per_block):,}; "
        f"{mb:.2f} MB of blocks fetched ({2 * mb:.2f} MB as RPC hex)"
    )
    print(
        f"catchup: the same blocks fetched and scanned without the database: {floor_s:.2f} s "
        f"= {blocks / floor_s:.1f} blocks/s, so the database share of the step is "
        f"{max(result.seconds - floor_s, 0.0):.2f} s "
        f"({max(result.seconds - floor_s, 0.0) / max(len(chain.deposits), 1) * 1e3:.2f} ms "
        "per deposit)"
    )
    print(
        f"catchup: deposits found: {detail}; {audit_events:,} audit events written; "
        f"{active} of {loans} loans active"
    )
    if result.profile is not None:
        print("catchup: profile of the step (cProfile: timings above are inflated)")
        print(result.profile)
    print(f"catchup: whole benchmark {time.perf_counter() - started:.0f} s")
    return [
        Figure("catchup.deposits_exact", float(correct), "bool", "== deposits made", correct),
        Figure(
            "catchup.blocks_replayed",
            float(result.blocks_applied),
            "blocks",
            f"== {blocks} (>= {BLOCKS} of >= {TXS_PER_BLOCK:,} txs)",
            complete and big_enough,
        ),
        Figure("catchup.txs_per_block_min", float(min(per_block)), "txs", "info", True),
        Figure("catchup.txs_per_block_avg", sum(per_block) / len(per_block), "txs", "info", True),
        Figure("catchup.mb_fetched", mb, "MB", "info (raw bytes; RPC hex is 2x)", True),
        Figure("catchup.seconds", result.seconds, "s", "info", True),
        Figure("catchup.fetch_scan_only_blocks_per_s", blocks / floor_s, "blocks/s", "info", True),
        Figure(
            "catchup.blocks_per_s",
            rate,
            "blocks/s",
            f">= {TARGET_BLOCKS_PER_S:g}" + (" (under cProfile)" if profile else ""),
            rate >= TARGET_BLOCKS_PER_S,
        ),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.catchup", description=__doc__)
    parser.add_argument("--blocks", type=int, default=BLOCKS)
    parser.add_argument("--txs-per-block", type=int, default=TXS_PER_BLOCK)
    parser.add_argument("--loans", type=int, default=LOANS)
    parser.add_argument("--deposits-per-block", type=int, default=DEPOSITS_PER_BLOCK)
    parser.add_argument("--threads", type=int, default=BROADCAST_THREADS)
    parser.add_argument("--profile", action="store_true", help="time the step under cProfile")
    args = parser.parse_args(argv)
    if args.blocks < 1 or args.txs_per_block < args.deposits_per_block or args.loans < 1:
        parser.error("need >= 1 block, >= 1 loan and no more deposits than txs per block")
    figures = run(
        args.blocks,
        args.txs_per_block,
        loans=args.loans,
        deposits_per_block=args.deposits_per_block,
        threads=args.threads,
        profile=args.profile,
    )
    for figure in figures:
        print(figure.line())
    return 0 if all(f.passed for f in figures) else 1


if __name__ == "__main__":
    sys.exit(main())
