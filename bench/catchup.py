"""Benchmark: the deposit watcher catching up after downtime.

Target (issue 11, "Catch-up speed"): over 20 regtest blocks of 2,000+ transactions with
50 deposits each, fetched from the node and written to the database, the watcher
replays at least 50 blocks/s into SQLite. Reported too: the same into PostgreSQL, and
mainnet-size blocks (4,000 transactions, 1.5 MB+, 50 deposits each) on both.

Set-up (not timed): a btcd regtest node, a fresh migrated database with 200 loans made
through the loans service, then the blocks of real, node-validated traffic. Signing
tens of thousands of transactions with the faucet's key would dominate the run, so the
traffic spends P2WSH outputs whose witness script needs no signature (`OP_TRUE`, or for
mainnet-size blocks `<300 bytes> OP_DROP OP_TRUE`, the bytes a real signature and
script would take): such a spend is standard and built in microseconds. 50 transactions
per block also pay a loan's collateral address. Timed: `Watcher.step()` from the
first of those blocks, until the tip is applied and no deposit is pending screening or
settling (one read after each step: with the bank's lists empty, as here, each deposit is
screened as it is inserted, so one step does it all). The run then checks the watcher
recorded exactly the deposits that were made, all confirmed, and times the same blocks
fetched and scanned by the watcher's own parts with no database (the floor).

2026-12-04, an idle 2-core machine (load 1-2; figures swing with other load: compare
within one run), 5 runs each (blocks/s, median (min-max); CPU: this process, ms/block):

| 2,000-tx blocks into SQLite | a4a8f5e | now |
|---|---|---|
| blocks/s | 21.4 (20.5-22.5), 11 steps | 59.8 (57.0-64.0), 1 step |
| CPU per block | 39.4 | 14.0 |
| into PostgreSQL (fsync off) | - | 32.9 (27.4-34.2) |
| fetch + scan alone | 128.8 | 128.4 |
| 4,000-tx 1.6 MB blocks, SQLite / PostgreSQL | - | 15.2 / 13.7 (floor 21.2: btcd's hex) |

What moved it: a deposit the bank's lists alone decide is inserted already screened (not
pending, then read back, locked and updated by a second pass and its settle), a catch-up's
blocks the scanning child has ready go up to `blocks_per_commit` (4) to a transaction, each
settled at its own height, an event nobody subscribed to is not serialised, and the
scanning child no longer spends 20 ms building a TLS context before its first block (one
per process, `pledge.tls`; PostgreSQL and mainnet figures are from before that). The rest
is per deposit and per event: 3.2 audit events a deposit, hashed and chained, its rows'
INSERTs and SQLAlchemy's statement overhead. With real lists each deposit's funding inputs
are read from the node first, by the pass after the block (not timed here).

``python -m bench catchup [--shape standard|mainnet|both] [--backend sqlite|postgres|both]
[--blocks N] [--txs-per-block N] [--repeat N] [--profile]`` runs it alone; ``--repeat`` replays
the same chain into N fresh databases (medians and ranges); ``--profile`` times the first
SQLite step under cProfile and prints where it goes.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from embit import bip32
from embit.networks import NETWORKS
from embit.script import Script, Witness, p2wsh
from embit.transaction import Transaction, TransactionInput, TransactionOutput
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, func, select

from bench import Figure
from bench.common import seat_contexts, timed
from custody.chain.blocks import ScriptIndex, scan_block
from custody.chain.feed import BlockFeed
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
from custody.screening import service as screening
from custody.watcher.service import StepResult
from regtest.faucet import random_p2wpkh_address
from regtest.node import RegtestNode
from regtest.postgres import PostgresServer

SEED = 20240602
LOANS = 200
TARGET_BLOCKS_PER_S = 50.0

BROADCAST_THREADS = 4
FAN_OUT_CHUNK = 1_000  # outputs per faucet fan-out tx: ~43 kB, well under btcd's 100 kvB cap
COIN_SATS = 2_000_000  # value of each anyone-can-spend coin: fees and deposits for every round
DEPOSIT_SATS = 100_000
REQUIRED_COLLATERAL_SATS = 300_000  # three deposits make a loan active
FEE_SAT_PER_BYTE = 2  # on the full serialised size: >= 1 sat/vB whatever btcd measures
# btcd's default template caps (750 kB, 3 MWU) fit ~7,000 small txs; raise them to the
# consensus-safe maxima so 4,000 padded ones (1.6 MB, ~2.8 MWU) fit one block (btcd
# enforces only the weight when mining).
NODE_ARGS = ("--blockmaxsize=999000", "--blockmaxweight=3996000")

REGTEST = NETWORKS["regtest"]

Backend = Literal["sqlite", "postgres"]
BACKENDS: tuple[Backend, ...] = ("sqlite", "postgres")


@dataclass(frozen=True)
class Shape:
    """What the blocks look like. `padding` bytes are pushed and dropped by the witness
    script of every spend, standing in for the signatures and scripts of real inputs."""

    key: str
    blocks: int
    txs_per_block: int
    deposits_per_block: int
    padding: int


STANDARD = Shape("standard", blocks=20, txs_per_block=2_000, deposits_per_block=50, padding=0)
MAINNET = Shape("mainnet", blocks=10, txs_per_block=4_000, deposits_per_block=50, padding=300)
SHAPES = {s.key: s for s in (STANDARD, MAINNET)}


@dataclass(frozen=True)
class Anyone:
    """The anyone-can-spend P2WSH output the traffic generator pays itself."""

    witness_script: bytes

    @classmethod
    def padded(cls, padding: int) -> Anyone:
        if padding == 0:
            return cls(b"\x51")  # OP_TRUE: leaves exactly one true item, a clean stack
        if not 0x100 <= padding <= 520:
            raise ValueError("padding is pushed with OP_PUSHDATA2: 256..520 bytes")
        # OP_PUSHDATA2 <padding> OP_DROP OP_TRUE: still one true item, still minimal pushes.
        push = b"\x4d" + padding.to_bytes(2, "little") + bytes(padding)
        return cls(push + b"\x75\x51")

    @property
    def script_pubkey(self) -> Script:
        return p2wsh(Script(self.witness_script))

    @property
    def address(self) -> str:
        return str(self.script_pubkey.address(REGTEST))


@dataclass(frozen=True)
class Coin:
    """An unspent anyone-can-spend output the traffic generator owns."""

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


def _spend(anyone: Anyone, coin: Coin, outputs: Sequence[tuple[bytes, int]]) -> Transaction:
    """Spend a coin: no signature, the witness is the script itself; the change (last
    output) goes back to the same script for the next round."""
    vin = [
        TransactionInput(
            bytes.fromhex(coin.txid),
            coin.vout,
            sequence=0xFFFFFFFF,
            witness=Witness([anyone.witness_script]),
        )
    ]
    vout = [TransactionOutput(v, Script(spk)) for spk, v in outputs]
    change = TransactionOutput(0, anyone.script_pubkey)  # the value does not change the size
    tx = Transaction(version=2, vin=vin, vout=[*vout, change], locktime=0)
    change.value = coin.value - sum(v for _, v in outputs) - len(tx.serialize()) * FEE_SAT_PER_BYTE
    if change.value < 10_000:
        raise RuntimeError(f"coin {coin.txid}:{coin.vout} ran dry: raise COIN_SATS")
    return tx


def _broadcast(node: RegtestNode, txs_hex: list[str], threads: int) -> list[str]:
    """sendrawtransaction for every tx, `threads` clients in parallel (RPC latency
    dominates: btcd validates an anyone-can-spend input in microseconds)."""
    chunks = [txs_hex[i::threads] for i in range(threads)]

    def send(chunk: list[str]) -> list[str]:
        with NodeRpc(node.rpc_url, node.rpc_user, node.rpc_password) as rpc:
            return [rpc.send_raw_transaction(tx) for tx in chunk]

    with ThreadPoolExecutor(threads) as pool:
        return [txid for done in pool.map(send, chunks) for txid in done]


def _fan_out(node: RegtestNode, anyone: Anyone, count: int) -> list[Coin]:
    """`count` confirmed coins, paid by the faucet in a few large transactions."""
    coins: list[Coin] = []
    for start in range(0, count, FAN_OUT_CHUNK):
        n = min(FAN_OUT_CHUNK, count - start)
        txid = node.faucet.pay_many([(anyone.address, COIN_SATS)] * n)
        coins += [Coin(txid, vout, COIN_SATS) for vout in range(n)]
    node.mine(1)
    return coins


def make_chain(
    node: RegtestNode,
    scripts: dict[bytes, int],
    shape: Shape,
    *,
    threads: int = BROADCAST_THREADS,
    seed: int = SEED,
) -> Chain:
    """Mine `shape.blocks` blocks of `shape.txs_per_block` transactions each (plus the
    coinbase); `shape.deposits_per_block` of them also pay a collateral address."""
    rng = random.Random(seed + 1)
    anyone = Anyone.padded(shape.padding)
    node.mine(101)  # one mature coinbase for the faucet
    # Enough coinbases for the fan-out: 50 BTC each, less after regtest's halvings.
    node.mine(-(-shape.txs_per_block * COIN_SATS // 2_500_000_000) + 1)
    coins = _fan_out(node, anyone, shape.txs_per_block)
    loan_scripts = sorted(scripts)
    first = node.rpc.get_block_count() + 1
    chain = Chain(first, first, [], [], [], 0.0)
    for round_no in range(shape.blocks):
        paying = set(rng.sample(range(shape.txs_per_block), shape.deposits_per_block))
        txs: list[Transaction] = []
        paid: list[tuple[int, int]] = []  # (tx index, loan id)
        for i, coin in enumerate(coins):
            outputs: list[tuple[bytes, int]] = []
            if i in paying:
                at = (round_no * shape.deposits_per_block + len(paid)) % len(loan_scripts)
                spk = loan_scripts[at]
                outputs.append((spk, DEPOSIT_SATS))
                paid.append((i, scripts[spk]))
            txs.append(_spend(anyone, coin, outputs))
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
            f"catchup[{shape.key}]: block {round_no + 1}/{shape.blocks} at height {height}: "
            f"{len(block['tx'])} txs, {len(paid)} deposits, {int(block['size']) / 1e3:.0f} kB",
            flush=True,
        )
    return chain


# -- the measured catch-up ------------------------------------------------------------


@dataclass(frozen=True)
class CatchUp:
    seconds: float
    cpu_seconds: float  # of this whole process (every thread): steadier than wall time here
    blocks_applied: int
    height: int
    steps: int  # watcher steps until every deposit was screened and settled
    profile: str | None


MAX_STEPS = 100  # a catch-up that has not settled in this many steps is a failure


def catch_up(engine: Engine, node: RegtestNode, start_height: int, *, profile: bool) -> CatchUp:
    """`step()` from `start_height` until the tip is applied and every deposit's screening
    decided (a deposit counts only once screened clear); only the steps are timed."""
    settings = Settings(network="regtest", watch_start_height=start_height, confirmations_small=1)
    watcher = Root.assemble(settings, engine=engine, node=node.rpc).watcher()
    watcher.acquire()

    def settled() -> bool:
        """Every deposit screened and every decision that lets one count settled: what a
        further step would find (one read, where a step asks the node too)."""
        with transaction(engine, write=False) as session:
            return not screening.pending_deposits(session, 1) and not screening.any_to_settle(
                session
            )

    def until_screened() -> tuple[StepResult, int]:
        first = last = watcher.step()
        steps = 1
        while not settled() and steps < MAX_STEPS:
            last = watcher.step()
            first.blocks_applied += last.blocks_applied
            steps += 1
        first.height = last.height
        return first, steps

    try:
        cpu0 = time.process_time()
        (result, steps), seconds, report = timed(until_screened, profile=profile)
        cpu_seconds = time.process_time() - cpu0
    finally:
        watcher.release()
    return CatchUp(seconds, cpu_seconds, result.blocks_applied, result.height, steps, report)


def fetch_and_scan(node: RegtestNode, chain: Chain, scripts: dict[bytes, int]) -> float:
    """The same blocks fetched and scanned by the watcher's own parts (its feed, its
    script index), no database: the floor under the watcher's time, so a miss can be
    split into "node/parse" and "database"."""
    index = ScriptIndex(scripts, capacity=len(scripts))
    t0 = time.perf_counter()
    with BlockFeed(node.rpc, chain.first_height, chain.tip_height) as feed:
        for _, raw in feed:
            scan_block(raw, index, set())
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


@dataclass(frozen=True)
class Replay:
    """One catch-up of a chain into one database, and what it recorded."""

    backend: Backend
    result: CatchUp
    correct: bool
    detail: str
    audit_events: int
    active_loans: int


def replay(
    engine: Engine, backend: Backend, node: RegtestNode, chain: Chain, *, profile: bool
) -> Replay:
    audit_before = _audit_events(engine)
    result = catch_up(engine, node, chain.first_height, profile=profile)
    correct, detail = check_deposits(engine, chain)
    audit_events = _audit_events(engine) - audit_before
    return Replay(backend, result, correct, detail, audit_events, _active_loans(engine))


def _fresh_engine(backend: Backend, tmp: Path, pg: PostgresServer | None, name: str) -> Engine:
    if backend == "sqlite":
        return make_engine(f"sqlite:///{tmp / f'{name}.db'}")
    assert pg is not None
    return make_engine(pg.create_database(name))


def _loaded_engines(
    backends: Sequence[Backend], tmp: Path, pg: PostgresServer | None, name: str, loans: int
) -> tuple[dict[Backend, Engine], dict[bytes, int]]:
    """A fresh migrated database per backend, each with the same loans (the same seed)."""
    engines: dict[Backend, Engine] = {}
    scripts: dict[bytes, int] = {}
    try:
        for backend in backends:
            engine = engines[backend] = _fresh_engine(backend, tmp, pg, name)
            upgrade(engine)
            made = make_loans(engine, loans)
            if scripts and made != scripts:
                raise RuntimeError("the databases' loans differ: same seed, other scripts")
            scripts = made
    except BaseException:
        for engine in engines.values():
            engine.dispose()
        raise
    return engines, scripts


def run_shape(
    shape: Shape,
    backends: Sequence[Backend],
    pg: PostgresServer | None,
    *,
    loans: int = LOANS,
    threads: int = BROADCAST_THREADS,
    profile: bool = False,
    repeat: int = 1,
) -> list[Figure]:
    """One chain of `shape` on a fresh node, replayed `repeat` times into a fresh database
    per backend (each with the same loans: made from the same seed). Repeats share the
    chain, so a figure's spread is the machine's noise, not the traffic's."""
    with (
        tempfile.TemporaryDirectory(prefix="bench-catchup-") as tmp,
        RegtestNode(name=f"bench-catchup-{shape.key}", extra_args=NODE_ARGS) as node,
    ):
        t0 = time.perf_counter()
        name = f"bench_catchup_{shape.key}"
        engines, scripts = _loaded_engines(backends, Path(tmp), pg, name, loans)
        print(
            f"catchup[{shape.key}]: {len(scripts)} loans with collateral addresses in "
            f"{', '.join(engines)} in {time.perf_counter() - t0:.1f} s; btcd at {node.rpc_url}",
            flush=True,
        )
        replays: list[Replay] = []
        floors: list[float] = []
        try:
            chain = make_chain(node, scripts, shape, threads=threads)
            n_txs = sum(chain.tx_counts)
            print(
                f"catchup[{shape.key}]: {shape.blocks} blocks, {n_txs:,} txs broadcast+mined "
                f"({n_txs / chain.broadcast_s:,.0f} tx/s over RPC)",
                flush=True,
            )
            for round_no in range(repeat):
                if round_no:
                    for engine in engines.values():
                        engine.dispose()
                    engines, _ = _loaded_engines(
                        backends, Path(tmp), pg, f"{name}_{round_no}", loans
                    )
                first = round_no == 0
                replays += [
                    replay(
                        engine,
                        backend,
                        node,
                        chain,
                        profile=first and profile and backend == "sqlite",
                    )
                    for backend, engine in engines.items()
                ]
                floors.append(fetch_and_scan(node, chain, scripts))
        finally:
            for engine in engines.values():
                engine.dispose()
    return report(shape, chain, replays, floors)


def _spread(values: Sequence[float]) -> str:
    """Median and range of repeated figures, to say how noisy they were."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return f"{ordered[0]:.1f}"
    return f"median {statistics.median(ordered):.1f} (min {ordered[0]:.1f}, max {ordered[-1]:.1f})"


def report(
    shape: Shape, chain: Chain, replays: Sequence[Replay], floors: Sequence[float]
) -> list[Figure]:
    """Print what each replay measured; the figures (medians over the repeats), held to
    the target where it applies."""
    key = f"catchup.{shape.key}"
    per_block = [c - 1 for c in chain.tx_counts]  # without the coinbase
    mb = sum(chain.block_bytes) / 1e6
    blocks = len(chain.tx_counts)
    floor_s = statistics.median(floors)
    print(
        f"{key}: txs per block (without coinbase) min {min(per_block):,} avg "
        f"{sum(per_block) / blocks:,.0f}; blocks avg {mb / blocks * 1e3:,.0f} kB, "
        f"{mb:.2f} MB in all ({2 * mb:.2f} MB as RPC hex)"
    )
    print(
        f"{key}: the same blocks fetched and scanned by the watcher's feed and index, no "
        f"database: {_spread([blocks / f for f in floors])} blocks/s over {len(floors)} run(s)"
    )
    figures = [
        Figure(f"{key}.txs_per_block_min", float(min(per_block)), "txs", "info", True),
        Figure(f"{key}.block_kb_avg", mb / blocks * 1e3, "kB", "info", True),
        Figure(f"{key}.fetch_scan_only_blocks_per_s", blocks / floor_s, "blocks/s", "info", True),
    ]
    if shape.key == MAINNET.key:
        mainnet = min(per_block) >= MAINNET.txs_per_block and min(chain.block_bytes) >= 1_500_000
        figures.append(
            Figure(
                f"{key}.mainnet_size", float(mainnet), "bool", ">= 4,000 txs, >= 1.5 MB", mainnet
            )
        )
    backends = list(dict.fromkeys(done.backend for done in replays))
    for backend in backends:
        name = f"{key}.{backend}"
        mine = [done for done in replays if done.backend == backend]
        rates: list[float] = []
        cpus: list[float] = []
        for done in mine:
            result = done.result
            rate = result.blocks_applied / result.seconds
            cpu = result.cpu_seconds / max(result.blocks_applied, 1) * 1e3
            if result.profile is None:
                rates.append(rate)
                cpus.append(cpu)
            db_s = max(result.seconds - floor_s, 0.0)
            print(
                f"{name}: replayed {result.blocks_applied} blocks (to height {result.height}), "
                f"every deposit screened and settled, in {result.steps} step(s), "
                f"{result.seconds:.2f} s = {rate:.1f} blocks/s, "
                f"{sum(per_block) / result.seconds:,.0f} tx/s, {mb / result.seconds:.1f} MB/s; "
                f"beyond the floor {db_s:.2f} s "
                f"({db_s / max(len(chain.deposits), 1) * 1e3:.2f} ms per deposit); this "
                f"process's CPU {cpu:.1f} ms per block"
                + (" (under cProfile)" if result.profile is not None else "")
            )
            print(
                f"{name}: deposits found: {done.detail}; {done.audit_events:,} audit events "
                f"written; {done.active_loans} loans active"
            )
            if result.profile is not None:
                print(f"{name}: profile of the step (cProfile: timings above are inflated)")
                print(result.profile)
        profiled = not rates  # every run was under cProfile: report those
        if profiled:
            rates = [d.result.blocks_applied / d.result.seconds for d in mine]
        if cpus:
            print(
                f"{name}: over {len(rates)} run(s): {_spread(rates)} blocks/s; CPU "
                f"{_spread(cpus)} ms per block"
            )
        rate = statistics.median(rates)
        complete = all(
            d.result.blocks_applied == blocks and d.result.height == chain.tip_height for d in mine
        )
        correct = all(d.correct for d in mine)
        held = shape.key == STANDARD.key and backend == "sqlite"
        big_enough = blocks >= STANDARD.blocks and min(per_block) >= STANDARD.txs_per_block
        target = f">= {TARGET_BLOCKS_PER_S:g}" if held else "info"
        figures += [
            Figure(f"{name}.deposits_exact", float(correct), "bool", "== made", correct),
            Figure(
                f"{name}.blocks_replayed",
                float(mine[0].result.blocks_applied),
                "blocks",
                f"== {blocks}",
                complete,
            ),
            Figure(
                f"{name}.seconds",
                statistics.median(d.result.seconds for d in mine),
                "s",
                "info",
                True,
            ),
            Figure(
                f"{name}.blocks_per_s",
                rate,
                "blocks/s",
                target + (" (under cProfile)" if profiled else ""),
                not held or (rate >= TARGET_BLOCKS_PER_S and big_enough),
            ),
        ]
    return figures


def run(
    shapes: Sequence[Shape] = (STANDARD, MAINNET),
    backends: Sequence[Backend] = BACKENDS,
    *,
    loans: int = LOANS,
    threads: int = BROADCAST_THREADS,
    profile: bool = False,
    repeat: int = 1,
) -> list[Figure]:
    """Each shape's chain on its own node, replayed `repeat` times into each backend."""
    started = time.perf_counter()
    figures: list[Figure] = []
    with ExitStack() as stack:
        pg = stack.enter_context(PostgresServer()) if "postgres" in backends else None
        for shape in shapes:
            figures += run_shape(
                shape, backends, pg, loans=loans, threads=threads, profile=profile, repeat=repeat
            )
    print(f"catchup: whole benchmark {time.perf_counter() - started:.0f} s")
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench catchup", description=__doc__)
    parser.add_argument("--shape", choices=(*SHAPES, "both"), default="both")
    parser.add_argument("--backend", choices=(*BACKENDS, "both"), default="both")
    parser.add_argument("--blocks", type=int, help="instead of the shape's")
    parser.add_argument("--txs-per-block", type=int, help="instead of the shape's")
    parser.add_argument("--deposits-per-block", type=int, help="instead of the shape's")
    parser.add_argument("--loans", type=int, default=LOANS)
    parser.add_argument("--threads", type=int, default=BROADCAST_THREADS)
    parser.add_argument("--profile", action="store_true", help="time the step under cProfile")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="replays of the same chain, each into fresh databases (figures: the medians)",
    )
    args = parser.parse_args(argv)
    shapes = list(SHAPES.values()) if args.shape == "both" else [SHAPES[args.shape]]
    changes = {
        name: value
        for name, value in (
            ("blocks", args.blocks),
            ("txs_per_block", args.txs_per_block),
            ("deposits_per_block", args.deposits_per_block),
        )
        if value is not None
    }
    shapes = [replace(shape, **changes) for shape in shapes]
    if (
        any(s.blocks < 1 or s.txs_per_block < s.deposits_per_block for s in shapes)
        or args.loans < 1
        or args.repeat < 1
    ):
        parser.error("need >= 1 block, >= 1 loan and no more deposits than txs per block")
    backends: list[Backend] = list(BACKENDS) if args.backend == "both" else [args.backend]
    figures = run(
        shapes,
        backends,
        loans=args.loans,
        threads=args.threads,
        profile=args.profile,
        repeat=args.repeat,
    )
    for figure in figures:
        print(figure.line())
    return 0 if all(f.passed for f in figures) else 1


if __name__ == "__main__":
    sys.exit(main())
