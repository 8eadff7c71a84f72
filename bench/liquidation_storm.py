"""Benchmark: a liquidation storm in the risk engine, decided by the bank's signer.

Target (issue 16, "Risk engine", section Speed): a price crash puts 1,000 active loans
over the liquidation threshold at once; all 1,000 liquidation requests are built, signed
by the bank's signer alone (its SoftHSM2 key, on its own valuation) and stored within
10 s (SQLite). The figure is also shown against the earlier 30 s target.

Since the signer decides alone (issue "the bank's signer decides alone") it trusts
nothing the service says: for every loan it reads the collateral from its OWN node,
prices it from its OWN feed, and checks every PSBT input on that node again before it
signs. So the coins must really exist on a node:

Set-up (not timed, each step's time printed): btcd on regtest (premined), a local
BTC/RUB feed, a fresh SoftHSM2 token, the signer built in this process (`build_core` on
`SignerSettings` pointing at the node and the feed; a generous daily limit; a small
address gap, `--gap`, default 2, for speed), two admins bootstrapped and an operator
and an approver enrolled by them; N loans made through the loans service with HD miner
and arbiter keys, each registered with the signer by a registration statement the
operator and the approver sign (`custody.signer.service.request_bank_key` / `endorse` /
`execute`: the signer makes the bank key in the token and the service stores it); each
loan's first address paid `COLLATERAL_SATS` on chain (`faucet.pay_many`, `--batch`
outputs per transaction, one block each), and the real `custody.watcher.service.Watcher`
run over those blocks, which records the deposits confirmed and makes the loans active.
(Each PSBT carries its funding transaction whole, so a bigger batch makes bigger PSBTs and
node answers: on 2026-12-04, 200 loans took 41 ms a loan with 5 outputs per transaction
and 51 ms with 200, in process.)

Timed: ONE `RiskEngine.run_once()` at the crash price, which the feed quotes to both
the service's engine (`HttpJsonPriceSource` inside a `MedianPriceSource`) and the
signer, with a freshly started signer. By default (`--signer serve`) that is `hsm serve`
in a process of its own, as production runs it (the set-up's registry and token, over
loopback HTTP), and the pass works on the service's default 3 loans at once for that
signer (`--concurrency`), so the signer's CPU and the service's overlap on the 2 cores;
`--signer in-process` builds it in this process instead (a new token session and
registry connection, as after a restart), one loan at a time. The run then checks N
liquidation requests exist, each signed by the bank alone, N `signer.signed` audit
events and N "signed" decisions in the signer's own log, verifies the bank's signatures
in a sample of PSBTs with embit, and reports the signatures the bank key made (the
signer's /health) and each process's CPU.

``python -m bench.liquidation_storm [--loans N] [--gap N] [--batch N] [--signer
serve|in-process] [--concurrency N] [--profile]`` runs it alone; ``--profile`` times the
pass under cProfile (this process only) and prints where it goes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from embit import bip32
from embit.ec import Signature
from embit.psbt import PSBT
from embit.transaction import SIGHASH
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, func, select

from bench import Figure
from bench.common import seat_contexts, timed
from custody.auth.context import Context
from custody.config import Settings
from custody.db.migrate import upgrade
from custody.db.models import (
    AuditEvent,
    CollateralAddress,
    Deposit,
    DepositState,
    KeyRole,
    Loan,
    LoanKey,
    LoanState,
    RequestState,
    SigningAction,
    SigningRequest,
)
from custody.db.session import make_engine, transaction
from custody.loans.schemas import HDKeyIn, LoanCreate, LoanTermsIn
from custody.loans.service import create_loan, register_key
from custody.risk.engine import RiskReport
from custody.risk.prices import HttpJsonPriceSource, MedianPriceSource
from custody.root import Root
from custody.screening import service as screening
from custody.signer import service as signer_service
from hsm.approvals import People
from hsm.backup import make_share_set
from hsm.client import BankSigner, HttpTransport, InProcessTransport
from hsm.core import SignerCore
from hsm.factory import build_core
from hsm.pkcs11_backend import HsmKeyInfo, Pkcs11Signer
from hsm.registry import Registry
from hsm.settings import SignerSettings
from pledge.keys import parse_hd_key
from pledge.network import NetworkName
from pledge.statements import iso
from regtest.faucet import COINBASE_MATURITY
from regtest.hsm_serve import serve_process
from regtest.node import RegtestNode
from regtest.people import Staff
from regtest.price_feed import PriceFeed
from regtest.softhsm import SoftHsmToken, create_token

SEED = 20240917
SEED_OFFICERS = ("bench-officer-a", "bench-officer-b", "bench-officer-c")
LOANS = 1_000
TARGET_SECONDS = 10.0  # issue 16: 1,000 loans in <= 10 s
OLD_TARGET_SECONDS = 30.0  # the target before issue 16 (stub chain, no signer of its own)
SPOT_CHECKS = 50
NETWORK: NetworkName = "regtest"
ADDRESS_GAP = 2  # the signer's default is 20; see --gap
FUNDING_BATCH = 200  # outputs per faucet transaction (~9 kvB); see --batch

PRINCIPAL_KOPECKS = 1_000_000_00  # 1,000,000 RUB
COLLATERAL_SATS = 50_000_000  # 0.5 BTC: 33% LTV at the normal price
NORMAL_PRICE = Decimal(6_000_000)
CRASH_PRICE = Decimal(2_100_000)  # 1M RUB / (0.5 BTC x 2.1M) = 95% >= the 90% threshold
COINBASE_SATS = 50 * 100_000_000  # regtest subsidy below height 150
MINER_RETURN = "bcrt1qw508d6qejxtdg4y5r3zarvary0c5xw7kygt080"
BANK_LIQUIDATION = "bcrt1qrp33g0q5c5txsp9arysrx4k6zdkfs4nce4xj0gdcccefvpysxf3qzf4jry"
_TPUB = bytes.fromhex("043587cf")


# -- the bank's people -----------------------------------------------------------------


@dataclass(frozen=True)
class BankPeople:
    admins: tuple[Staff, Staff]
    operator: Staff
    approver: Staff


def enrolment_ceremony(state_db: Path, signer: BankSigner) -> BankPeople:
    """Two admins bootstrapped into the empty signer, then an operator and an approver
    enrolled by statements both admins sign (`hsm enroll-bootstrap`, then the signer's
    `enroll` operation)."""
    staff = BankPeople(
        (Staff("ada.admin", "admin"), Staff("alan.admin", "admin")),
        Staff("olga.operator", "bank_operator"),
        Staff("anton.approver", "bank_approver"),
    )
    registry = Registry(state_db)
    try:
        People(registry).bootstrap(
            [(a.name, "ed25519", bytes.fromhex(a.public_hex)) for a in staff.admins],
            datetime.now(UTC),
        )
    finally:
        registry.close()
    for person in (staff.operator, staff.approver):
        statement = {
            "kind": "enroll",
            "name": person.name,
            "role": person.role,
            "algorithm": "ed25519",
            "public_key": person.public_hex,
            "expires_at": iso(datetime.now(UTC) + timedelta(hours=1)),
        }
        signer.enroll(statement, [a.endorse(statement) for a in staff.admins])
    return staff


# -- the signer ------------------------------------------------------------------------


class _TimedKeys:
    """The token, timing its key generation (set-up only; the storm uses a bare one)."""

    def __init__(self, hsm: Pkcs11Signer) -> None:
        self.hsm = hsm
        self.seconds = 0.0

    @property
    def name(self) -> str:
        return self.hsm.name

    @property
    def c_sign_calls(self) -> int:
        return self.hsm.c_sign_calls

    @c_sign_calls.setter
    def c_sign_calls(self, value: int) -> None:
        self.hsm.c_sign_calls = value

    def generate_loan_key(self, loan_ref: str) -> HsmKeyInfo:
        t0 = time.perf_counter()
        try:
            return self.hsm.generate_loan_key(loan_ref)
        finally:
            self.seconds += time.perf_counter() - t0

    def key_info(self, key_ref: str) -> HsmKeyInfo:
        return self.hsm.key_info(key_ref)

    def public_key(self, key_ref: str) -> bytes:
        return self.hsm.public_key(key_ref)

    def sign_digest(self, key_ref: str, digest: bytes) -> bytes:
        return self.hsm.sign_digest(key_ref, digest)

    def close(self) -> None:
        self.hsm.close()

    def __getattr__(self, name: str) -> Any:
        """The rest of the token (its AES key, random generator) as is: the bank seed."""
        return getattr(self.hsm, name)


def signer_settings(
    base: Path, node: RegtestNode, feed: PriceFeed, token: SoftHsmToken, loans: int, gap: int
) -> SignerSettings:
    return SignerSettings(
        network=NETWORK,
        module=token.module_path,
        token_label=token.label,
        pin=token.pin,
        state_db=base / "hsm-state.db",
        node_rpc_url=node.rpc_url,
        node_rpc_user=node.rpc_user,
        node_rpc_password=node.rpc_password,
        node_rpc_timeout=30.0,
        address_gap=gap,
        price_sources=[feed.source_config()],
        price_max_age_seconds=600,
        # The storm is not what the daily limit is for: room for every loan twice over.
        daily_limit_sats=2 * loans * COLLATERAL_SATS,
    )


@contextmanager
def open_signer(
    settings: SignerSettings, token: SoftHsmToken, *, timed_keys: bool = False
) -> Iterator[tuple[BankSigner, SignerCore, Pkcs11Signer, _TimedKeys | None]]:
    """The signer in this process, built from its own settings: its own token session,
    registry connection, node client and price source."""
    hsm = Pkcs11Signer(token.module_path, token.label, token.pin)
    keys = _TimedKeys(hsm) if timed_keys else None
    core = build_core(settings, hsm=keys if keys is not None else hsm)
    try:
        yield (
            BankSigner(InProcessTransport(core, max_body_bytes=settings.max_body_bytes)),
            core,
            hsm,
            keys,
        )
    finally:
        core.close()


def signer_env(settings: SignerSettings, token: SoftHsmToken) -> dict[str, str]:
    """`settings` as `hsm serve` reads them (HSM_*), and the token's SoftHSM2 config."""
    env = {"SOFTHSM2_CONF": str(token.conf_path)}
    dumped = settings.model_dump(mode="json")
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if value is None:
            continue
        if hasattr(value, "get_secret_value"):
            text = value.get_secret_value()
        elif isinstance(value, list | dict):
            text = json.dumps(dumped[name])
        else:
            text = str(dumped[name])
        env[f"HSM_{name.upper()}"] = text
    return env


@contextmanager
def serving_signer(
    settings: SignerSettings, token: SoftHsmToken, log_path: Path
) -> Iterator[tuple[BankSigner, int]]:
    """The signer as production runs it: `hsm serve` in a process of its own, on the same
    token, registry and settings the set-up used (closed by then), over loopback HTTP."""
    env = signer_env(settings, token)
    with serve_process(log_path.parent, env, log_path.name) as server:
        client = BankSigner(HttpTransport(server.url, server.token))
        try:
            yield client, server.proc.pid
        finally:
            client.close()


# -- set-up ------------------------------------------------------------------------------


def _hd_key(rng: random.Random) -> str:
    """A BIP-48 P2WSH account key with origin, as a hardware wallet exports it."""
    root = bip32.HDKey.from_seed(rng.randbytes(32))
    account = root.derive("m/48h/1h/0h/2h").to_public()
    return f"[{root.my_fingerprint.hex()}/48h/1h/0h/2h]{account.to_base58(_TPUB)}"


@dataclass
class SetUp:
    loans: int = 0
    node_seconds: float = 0.0
    signer_seconds: float = 0.0
    loans_seconds: float = 0.0
    register_seconds: float = 0.0
    keygen_seconds: float = 0.0
    funding_seconds: float = 0.0
    funding_txs: int = 0
    watcher_seconds: float = 0.0
    watcher_blocks: int = 0

    @property
    def seconds(self) -> float:
        return (
            self.node_seconds
            + self.signer_seconds
            + self.loans_seconds
            + self.funding_seconds
            + self.watcher_seconds
        )


def make_loans(
    engine: Engine,
    signer: BankSigner,
    staff: BankPeople,
    chain: Any,
    count: int,
    setup: SetUp,
    seed: int = SEED,
    *,
    bank_key: str = "hd",
) -> dict[KeyRole, Context]:
    """`count` loans through the loans service (HD miner/arbiter keys), each registered
    with the bank's signer by a statement the operator and the approver signed."""
    t0 = time.perf_counter()
    rng = random.Random(seed)
    maturity = datetime.now(UTC) + timedelta(days=180)
    with transaction(engine) as session:
        ctx = seat_contexts(session, "storm", NETWORK)
    for _ in range(count):
        with transaction(engine) as session:
            body = LoanCreate(
                miner_party_id=ctx[KeyRole.miner].principal.party_id or 0,
                arbiter_party_id=ctx[KeyRole.arbiter].principal.party_id or 0,
                terms=LoanTermsIn(
                    principal_kopecks=PRINCIPAL_KOPECKS,
                    interest_rate_bps=1_800,
                    maturity_at=maturity,
                    required_collateral_sats=COLLATERAL_SATS,
                    required_confirmations=1,
                    miner_return_address=MINER_RETURN,
                    bank_liquidation_address=BANK_LIQUIDATION,
                ),
            )
            loan = create_loan(session, ctx[KeyRole.bank], body)
            assert loan.id is not None
            for seat in (KeyRole.miner, KeyRole.arbiter):
                register_key(
                    session, ctx[seat], loan.id, seat, HDKeyIn(kind="hd", key=_hd_key(rng))
                )
            st = signer_service.request_bank_key(session, ctx[KeyRole.bank], loan.id, kind=bank_key)
            assert st.id is not None
            statement = signer_service.statement_view(session, st)["statement"]
            ready = False
            for person in (staff.operator, staff.approver):
                endorsement = person.endorse(statement)
                _, ready = signer_service.endorse(
                    session,
                    ctx[KeyRole.bank],
                    st.id,
                    endorsement["person"],
                    endorsement["signature"],
                )
            assert ready
            statement_id = st.id
        t1 = time.perf_counter()
        outcome = signer_service.execute(engine, statement_id, signer, ctx[KeyRole.bank], chain)
        setup.register_seconds += time.perf_counter() - t1
        if outcome.get("state") != "done":
            raise RuntimeError(f"the signer did not register loan {loan.id}: {outcome}")
    setup.loans_seconds = time.perf_counter() - t0
    return ctx


def fund_loans(engine: Engine, node: RegtestNode, batch: int, setup: SetUp) -> int:
    """Pay each loan's first address on chain, `batch` outputs per transaction, one
    block per transaction; returns the height of the first funding block."""
    t0 = time.perf_counter()
    with Session(engine) as session:
        addresses = list(
            session.exec(
                select(CollateralAddress.address)
                .where(CollateralAddress.index == 0, col(CollateralAddress.change).is_(False))
                .order_by(col(CollateralAddress.loan_id))
            ).all()
        )
    first = node.rpc.get_block_count() + 1
    for start in range(0, len(addresses), batch):
        node.faucet.pay_many([(a, COLLATERAL_SATS) for a in addresses[start : start + batch]])
        node.mine(1)
        setup.funding_txs += 1
    setup.funding_seconds = time.perf_counter() - t0
    return first


def watch(engine: Engine, node: RegtestNode, start_height: int, setup: SetUp) -> None:
    """The real deposit watcher over the funding blocks: deposits confirmed, loans active."""
    t0 = time.perf_counter()
    settings = Settings(network="regtest", watch_start_height=start_height)
    watcher = Root.assemble(settings, engine=engine, node=node.rpc).watcher()
    watcher.acquire()
    try:
        result = watcher.step()
        blocks = result.blocks_applied
        # The watcher screens `PENDING_PER_STEP` deposits a step: step until all are decided.
        for _ in range(setup.loans // screening.PENDING_PER_STEP + 1):
            deposits, active = _confirmed_deposits(engine)
            if deposits >= setup.loans and active >= setup.loans:
                break
            watcher.step()
    finally:
        watcher.release()
    setup.watcher_blocks = blocks
    setup.watcher_seconds = time.perf_counter() - t0


# -- the measured pass and its checks ------------------------------------------------------


# The signer registry's methods that commit (each its own IMMEDIATE transaction).
REGISTRY_WRITES = (
    "save_valuation",
    "set_call_seen",
    "note_index",
    "record_usage",
    "log_decision",
)


class Clock:
    """Wall time and calls per named part of the pass, from thin wrappers put on the
    objects' methods (microseconds of overhead per call: the pass is not distorted)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.remote = False  # the signer is `hsm serve`: only its calls are seen from here
        self.concurrency = 1  # loans at once: their calls' times overlap

    def wrap(self, obj: Any, method: str, name: str) -> None:
        inner = getattr(obj, method)

        def timed_call(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
                self.calls[name] = self.calls.get(name, 0) + 1

        setattr(obj, method, timed_call)

    def wrap_op(self, transport: InProcessTransport | HttpTransport) -> None:
        """The signer's operations, by name (`valuation`, `sign`)."""
        inner = transport.call

        def timed_call(op: str, payload: Any) -> dict[str, Any]:
            t0 = time.perf_counter()
            try:
                return inner(op, payload)
            finally:
                name = f"signer.{op}"
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
                self.calls[name] = self.calls.get(name, 0) + 1

        transport.call = timed_call  # type: ignore[method-assign]

    def s(self, name: str) -> float:
        return self.seconds.get(name, 0.0)

    def n(self, name: str) -> int:
        return self.calls.get(name, 0)

    def lines(self, total: float, loans: int) -> list[str]:
        def row(label: str, seconds: float, calls: int | None = None, depth: int = 0) -> str:
            per = f", {seconds / loans * 1e3:6.1f} ms/loan" if loans else ""
            many = f"  [{calls} calls, {seconds / calls * 1e3:.2f} ms each]" if calls else ""
            return f"  {'  ' * depth}{label:<{46 - 2 * depth}} {seconds:7.2f} s{per}{many}"

        signer_total = self.s("signer.valuation") + self.s("signer.sign")
        node_rpcs = self.s("signer.node.rpc")
        service_chain = self.s("service.chain.rpc")
        if self.remote or self.concurrency > 1:
            where = "hsm serve, over HTTP" if self.remote else "in this process"
            out = [
                row("the whole pass", total),
                row(
                    f"the signer ({where}): valuation",
                    self.s("signer.valuation"),
                    self.n("signer.valuation"),
                    1,
                ),
                row(
                    "the signer: sign (automatic)", self.s("signer.sign"), self.n("signer.sign"), 1
                ),
                row(
                    "the service: its node (prev tx, fee)",
                    service_chain,
                    self.n("service.chain.rpc"),
                    1,
                ),
            ]
            if self.concurrency > 1:
                out.append(
                    f"  ({self.concurrency} loans at once: the calls' times overlap, so they "
                    "add up to more than the pass; see the CPU line above)"
                )
            else:
                out.append(
                    row(
                        "the service: everything else",
                        total - signer_total - service_chain,
                        None,
                        1,
                    )
                )
            return out
        out = [
            row("the whole pass", total),
            row("the signer: valuation", self.s("signer.valuation"), self.n("signer.valuation"), 1),
            row(
                "its price fix (HTTP feed)",
                self.s("signer.price.fix"),
                self.n("signer.price.fix"),
                2,
            ),
            row("the signer: sign (automatic)", self.s("signer.sign"), self.n("signer.sign"), 1),
            row("C_Sign in the token", self.s("signer.hsm.sign"), self.n("signer.hsm.sign"), 2),
            row("the signer's node (HTTP round trips)", node_rpcs, self.n("signer.node.rpc"), 1),
            row(
                "coin scans (valuation; sign if the tip moved)",
                self.s("signer.node.unspent_at_tip"),
                self.n("signer.node.unspent_at_tip"),
                2,
            ),
            row(
                "gettxout batches (in scans, input checks)",
                self.s("signer.node._tx_outs"),
                self.n("signer.node._tx_outs"),
                2,
            ),
            row(
                "its registry commits (sqlite, WAL)",
                self.s("signer.registry.write"),
                self.n("signer.registry.write"),
                1,
            ),
            row(
                "the signer, the rest (PSBT, policy, JSON)",
                signer_total
                - node_rpcs
                - self.s("signer.price.fix")
                - self.s("signer.hsm.sign")
                - self.s("signer.registry.write"),
                None,
                1,
            ),
            row(
                "the service: its node (prev tx, fee)",
                service_chain,
                self.n("service.chain.rpc"),
                1,
            ),
            row("the service: everything else", total - signer_total - service_chain, None, 1),
        ]
        return out


@dataclass(frozen=True)
class Storm:
    seconds: float
    report: RiskReport
    profile: str | None
    c_sign_calls: int
    feed_requests: int
    clock: Clock
    # CPU seconds of the pass: this process (the engine, the in-process signer and the
    # SoftHSM2 library) and btcd. Much less sensitive than wall time to a busy machine:
    # on 2 cores shared with other work the wall time also holds the waits for a core.
    cpu_seconds: float = 0.0
    node_cpu_seconds: float = 0.0
    signer_cpu_seconds: float | None = None  # `hsm serve`'s, when it runs apart


def service_prices(feed: PriceFeed) -> MedianPriceSource:
    """The service's real price path: the feed over HTTP behind the median."""
    source = HttpJsonPriceSource("feed", feed.url, "data.price", time_path="data.time")
    return MedianPriceSource([source], max_age=timedelta(minutes=10), max_spread_bps=200)


def storm(
    engine: Engine,
    settings: SignerSettings,
    token: SoftHsmToken,
    node: RegtestNode,
    feed: PriceFeed,
    *,
    profile: bool,
    serve_log: Path | None = None,
    concurrency: int | None = None,
) -> Storm:
    """One risk pass at the crash price with a freshly built signer; only the pass is timed.
    `serve_log`: the signer is `hsm serve` in a process of its own (its output there), as
    in production; None: in this process. `concurrency`: loans at once (the service's
    default for that signer when None)."""
    feed.set(str(CRASH_PRICE))
    clock = Clock()
    with ExitStack() as stack:
        if serve_log is None:
            signer, core, hsm, _ = stack.enter_context(open_signer(settings, token))
            assert isinstance(signer.transport, InProcessTransport)
            clock.wrap_op(signer.transport)
            clock.wrap(core.prices, "fix", "signer.price.fix")
            clock.wrap(hsm, "sign_digest", "signer.hsm.sign")
            if core.seed is not None:
                clock.wrap(core.seed, "sign_digests", "signer.seed.sign")
            # HTTP round trips: a single call or a JSON-RPC batch of them.
            clock.wrap(core.node, "_post", "signer.node.rpc")
            for method in ("unspent_at_tip", "_tx_outs"):
                clock.wrap(core.node, method, f"signer.node.{method}")
            for method in REGISTRY_WRITES:
                clock.wrap(core.registry, method, "signer.registry.write")
            service_settings = Settings(network=NETWORK, risk_concurrency=concurrency)
            signer_pid = None
        else:
            signer, signer_pid = stack.enter_context(serving_signer(settings, token, serve_log))
            clock.remote = True
            assert isinstance(signer.transport, HttpTransport)
            clock.wrap_op(signer.transport)
            # As `custody risk` is configured next to an `hsm serve`.
            service_settings = Settings(
                network=NETWORK,
                hsm_url="http://127.0.0.1:9",  # only read for the default concurrency
                risk_concurrency=concurrency,
            )
        clock.wrap(node.rpc, "call", "service.chain.rpc")
        parts = Root.assemble(
            service_settings,
            engine=engine,
            node=node.rpc,
            signer=signer,
            prices=service_prices(feed),
        )
        risk = parts.risk_engine()
        clock.concurrency = risk.concurrency
        signed_before = int(signer.health()["signatures"])
        before = feed.requests
        cpu, node_cpu = time.process_time(), _node_cpu_seconds(node)
        signer_cpu = _cpu_seconds(signer_pid)
        report, seconds, text = timed(risk.run_once, profile=profile, top=50)
        cpu, node_cpu = time.process_time() - cpu, _node_cpu_seconds(node) - node_cpu
        signer_cpu = _cpu_seconds(signer_pid) - signer_cpu
        signatures = int(signer.health()["signatures"]) - signed_before
        return Storm(
            seconds,
            report,
            text,
            signatures,
            feed.requests - before,
            clock,
            cpu,
            node_cpu,
            signer_cpu if signer_pid is not None else None,
        )


def _cpu_seconds(pid: int | None) -> float:
    """User + system CPU a process has used so far (from /proc; 0 where it cannot be read)."""
    if pid is None:
        return 0.0
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _node_cpu_seconds(node: RegtestNode) -> float:
    """User + system CPU btcd has used so far."""
    return _cpu_seconds(node.process.pid if node.process is not None else None)


@dataclass(frozen=True)
class Checked:
    requests: int
    bank_signed: int
    liquidating: int
    signed_events: int
    refused_events: int
    disagreements: int
    signer_signed: int
    signer_refused: int
    spot_checked: int
    spot_ok: int
    spot_detail: str


def _bank_pubs(key: LoanKey) -> set[bytes]:
    """The bank's key, or the children of its HD account a collateral address can use."""
    if key.public_key_hex:
        return {bytes.fromhex(key.public_key_hex)}
    hd = parse_hd_key(
        f"[{key.fingerprint}{(key.origin_path or 'm')[1:]}]{key.xpub}", NETWORK, field="key"
    )
    return {hd.public_key(change, i) for change in (0, 1) for i in range(ADDRESS_GAP + 1)}


def _bank_signature_ok(psbt_b64: str, bank_pubs: set[bytes]) -> bool:
    """Every input carries a bank signature that verifies against its BIP-143 sighash."""
    psbt = PSBT.from_string(psbt_b64)
    tx = psbt.tx
    for i, inp in enumerate(psbt.inputs):
        pub, sig = next(
            ((p, sig) for p, sig in inp.partial_sigs.items() if p.sec() in bank_pubs),
            (None, None),
        )
        if pub is None:
            return False
        if sig is None or sig[-1] != SIGHASH.ALL or inp.witness_utxo is None:
            return False
        digest = tx.sighash_segwit(i, inp.witness_script, inp.witness_utxo.value, SIGHASH.ALL)
        if not pub.verify(Signature.parse(sig[:-1]), digest):
            return False
    return bool(psbt.inputs)


def _count_audit(session: Session, action: str) -> int:
    return int(
        session.exec(
            select(func.count()).select_from(AuditEvent).where(col(AuditEvent.action) == action)
        ).one()
    )


def check(engine: Engine, state_db: Path, spot_checks: int, seed: int = SEED) -> Checked:
    with Session(engine) as session:
        reqs = session.exec(select(SigningRequest).order_by(col(SigningRequest.id))).all()
        bank_signed = sum(
            1
            for r in reqs
            if r.signed_seats == KeyRole.bank.value
            and r.action == SigningAction.liquidation
            and r.state == RequestState.awaiting_signatures
        )
        liquidating = int(
            session.exec(
                select(func.count())
                .select_from(Loan)
                .where(col(Loan.state) == LoanState.liquidating)
            ).one()
        )
        signed_events = _count_audit(session, "signer.signed")
        refused_events = _count_audit(session, "signer.refused")
        disagreements = _count_audit(session, "risk.signer_disagrees")
        bank_pubs = {
            k.loan_id: _bank_pubs(k)
            for k in session.exec(select(LoanKey).where(LoanKey.role == KeyRole.bank)).all()
        }
    registry = Registry(state_db)
    try:
        decided = {
            str(r["decision"]): int(r["n"])
            for r in registry.read_all(
                "SELECT decision, count(*) AS n FROM decisions GROUP BY decision", ()
            )
        }
    finally:
        registry.close()
    sample = random.Random(seed + 1).sample(list(reqs), min(spot_checks, len(reqs)))
    bad = [r.id for r in sample if not _bank_signature_ok(r.psbt, bank_pubs[r.loan_id])]
    detail = "all verify" if not bad else f"bad: requests {bad[:10]}"
    return Checked(
        len(reqs),
        bank_signed,
        liquidating,
        signed_events,
        refused_events,
        disagreements,
        decided.get("signed", 0),
        decided.get("refused", 0),
        len(sample),
        len(sample) - len(bad),
        detail,
    )


def _confirmed_deposits(engine: Engine) -> tuple[int, int]:
    with Session(engine) as session:
        deposits = int(
            session.exec(
                select(func.count())
                .select_from(Deposit)
                .where(col(Deposit.state) == DepositState.confirmed)
            ).one()
        )
        active = int(
            session.exec(
                select(func.count()).select_from(Loan).where(col(Loan.state) == LoanState.active)
            ).one()
        )
    return deposits, active


def run(
    loans: int = LOANS,
    *,
    profile: bool = False,
    spot_checks: int = SPOT_CHECKS,
    gap: int = ADDRESS_GAP,
    batch: int = FUNDING_BATCH,
    bank_key: str = "hd",
    signer_mode: str = "serve",
    concurrency: int | None = None,
) -> list[Figure]:
    """Build the node, the signer and the loans, time the storm, check what it stored.
    `bank_key`: "hd" (the default bank key: accounts of the sealed seed, one unseal and
    child derivation per signature) or "fixed" (a key per loan in the token, one C_Sign).
    `signer_mode`: "serve" (`hsm serve` in a process of its own, as in production) or
    "in-process"; `concurrency`: loans a pass works on at once (default: the service's
    for that signer, 3 and 1)."""
    started = time.perf_counter()
    setup = SetUp(loans=loans)
    with tempfile.TemporaryDirectory(prefix="bench-storm-") as tmp:
        base = Path(tmp)
        t0 = time.perf_counter()
        node = RegtestNode(name="bench-storm")
        node.start()
        feed = PriceFeed(str(NORMAL_PRICE)).start()
        try:
            # Mature coinbases for every loan's collateral, and some to spare for fees.
            coinbases = loans * COLLATERAL_SATS // COINBASE_SATS + 2
            node.mine(COINBASE_MATURITY + coinbases)
            setup.node_seconds = time.perf_counter() - t0

            t0 = time.perf_counter()
            token = create_token(base / "softhsm", "bench-storm")
            settings = signer_settings(base, node, feed, token, loans, gap)
            engine = make_engine(f"sqlite:///{base / 'custody.db'}")
            upgrade(engine)
            with open_signer(settings, token, timed_keys=True) as (signer, core, _, keys):
                staff = enrolment_ceremony(settings.state_db, signer)
                if bank_key == "hd":
                    assert core.seed is not None
                    core.seed.create()
                    make_share_set(core.seed, core.registry, SEED_OFFICERS, 2, base / "shares")
                setup.signer_seconds = time.perf_counter() - t0
                make_loans(engine, signer, staff, node.rpc, loans, setup, bank_key=bank_key)
                assert keys is not None
                setup.keygen_seconds = keys.seconds
            print(
                f"liquidation_storm: set-up: btcd regtest + {COINBASE_MATURITY + coinbases} "
                f"blocks {setup.node_seconds:.1f} s; token, signer, 2 admins + 2 staff "
                f"enrolled {setup.signer_seconds:.1f} s; {loans} loans through the loans "
                f"service {setup.loans_seconds:.1f} s, of which {setup.register_seconds:.1f} s "
                f"registering them with the signer by signed statements ({bank_key} bank "
                "keys), of which "
                + (
                    f"{setup.keygen_seconds:.1f} s generating the bank keys in SoftHSM2 "
                    f"({loans / max(setup.keygen_seconds, 1e-9):.0f} keys/s)"
                    if bank_key == "fixed"
                    else "the bank keys: accounts of the seed sealed by SoftHSM2"
                ),
                flush=True,
            )
            start_height = fund_loans(engine, node, batch, setup)
            watch(engine, node, start_height, setup)
            deposits, active = _confirmed_deposits(engine)
            print(
                f"liquidation_storm: set-up: funded on chain in {setup.funding_txs} faucet "
                f"transactions of <= {batch} outputs (one block each) {setup.funding_seconds:.1f}"
                f" s; the real Watcher over {setup.watcher_blocks} blocks "
                f"{setup.watcher_seconds:.1f} s: {deposits} deposits confirmed, {active} loans "
                f"active; whole set-up {setup.seconds:.1f} s",
                flush=True,
            )
            if deposits != loans or active != loans:
                raise RuntimeError(f"set-up: {deposits} confirmed deposits, {active} active loans")
            print(
                f"liquidation_storm: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} "
                f"CPUs before the pass; signer: "
                f"{'hsm serve (its own process)' if signer_mode == 'serve' else 'in process'}, "
                "its own node client and price feed, "
                f"HSM_ADDRESS_GAP={gap} ({2 * (gap + 1)} scripts scanned per loan per look"
                f"{'' if gap == 20 else '; the default 20 scans 42'}), "
                f"HSM_DAILY_LIMIT_SATS={settings.daily_limit_sats}",
                flush=True,
            )
            result = storm(
                engine,
                settings,
                token,
                node,
                feed,
                profile=profile,
                serve_log=base / "hsm-serve.log" if signer_mode == "serve" else None,
                concurrency=concurrency,
            )
            checked = check(engine, settings.state_db, spot_checks)
            engine.dispose()
        finally:
            feed.stop()
            node.stop()

    report = result.report
    rate = len(report.liquidations) / result.seconds
    print(
        f"liquidation_storm: one risk pass over {report.loans} loans at {report.price}: "
        f"{len(report.liquidations)} liquidations in {result.seconds:.2f} s = {rate:.1f} loans/s "
        f"({result.seconds / max(len(report.liquidations), 1) * 1e3:.1f} ms per loan); "
        f"{len(report.errors)} errors; {result.c_sign_calls} bank signatures "
        f"({'the sealed seed' if bank_key == 'hd' else 'C_Sign calls in the token'}); "
        f"{result.feed_requests} price feed requests"
    )
    n = max(len(report.liquidations), 1)
    print(
        f"liquidation_storm: CPU of the pass: this process {result.cpu_seconds:.2f} s "
        f"({result.cpu_seconds / n * 1e3:.1f} ms per loan), btcd {result.node_cpu_seconds:.2f} s "
        f"({result.node_cpu_seconds / n * 1e3:.1f} ms per loan)"
        + (
            f", hsm serve {result.signer_cpu_seconds:.2f} s "
            f"({result.signer_cpu_seconds / n * 1e3:.1f} ms per loan)"
            if result.signer_cpu_seconds is not None
            else " (the signer's included)"
        )
        + f"; wall {result.seconds:.2f} s, {result.clock.concurrency} loan(s) at once, "
        f"load average {os.getloadavg()[0]:.1f} after"
    )
    print(
        "liquidation_storm: where the pass's wall time goes (timing wrappers on the calls"
        + ("; this pass ran under cProfile, so all of it is inflated):" if profile else "):")
    )
    for line in result.clock.lines(result.seconds, len(report.liquidations)):
        print(line)
    for loan_id, error in list(report.errors.items())[:5]:
        print(f"liquidation_storm: loan {loan_id}: {error}")
    print(
        f"liquidation_storm: {checked.requests} signing requests, {checked.bank_signed} "
        f"liquidations awaiting the arbiter with signed_seats == 'bank', "
        f"{checked.liquidating} loans liquidating, {checked.signed_events} signer.signed "
        f"audit events, {checked.refused_events} signer.refused, {checked.disagreements} "
        f"risk.signer_disagrees; the signer's own log: {checked.signer_signed} signed, "
        f"{checked.signer_refused} refused; bank signatures in {checked.spot_checked} sampled "
        f"PSBTs: {checked.spot_detail}"
    )
    if result.profile is not None:
        print("liquidation_storm: profile of the pass (cProfile: timings above are inflated)")
        print(result.profile)
    print(f"liquidation_storm: whole benchmark {time.perf_counter() - started:.0f} s")
    correct = (
        not report.errors
        and len(report.liquidations) == loans
        and checked.requests == loans
        and checked.bank_signed == loans
        and checked.liquidating == loans
        and checked.signed_events == loans
        and checked.signer_signed == loans
        and checked.refused_events == 0
        and checked.disagreements == 0
        and result.c_sign_calls == loans  # one input per loan, one bank signature each
        and checked.spot_ok == checked.spot_checked > 0
    )
    big_enough = loans >= LOANS
    note = " (under cProfile)" if profile else ""
    note += f" (HSM_ADDRESS_GAP={gap}, {bank_key} bank keys, signer {signer_mode}"
    note += f", {result.clock.concurrency} loan(s) at once)"
    return [
        Figure("liquidation_storm.setup_seconds", setup.seconds, "s", "info", True),
        Figure(
            "liquidation_storm.keygen_seconds", setup.keygen_seconds, "s", "info (set-up)", True
        ),
        Figure(
            "liquidation_storm.requests_signed_and_stored",
            float(checked.bank_signed),
            "requests",
            f"== {loans} loans (>= {LOANS}), bank-signed alone, {loans} signatures, no errors",
            correct and big_enough,
        ),
        Figure("liquidation_storm.loans_per_s", rate, "loans/s", "info", True),
        Figure(
            "liquidation_storm.cpu_ms_per_loan",
            result.cpu_seconds / max(len(report.liquidations), 1) * 1e3,
            "ms",
            "info (this process's CPU; the figure least moved by a busy machine)",
            True,
        ),
        Figure(
            "liquidation_storm.seconds",
            result.seconds,
            "s",
            f"<= {TARGET_SECONDS:g} (issue 16)" + note,
            result.seconds <= TARGET_SECONDS,
        ),
        Figure(
            "liquidation_storm.seconds_vs_old_target",
            result.seconds,
            "s",
            f"<= {OLD_TARGET_SECONDS:g} (the target before issue 16)" + note,
            result.seconds <= OLD_TARGET_SECONDS,
        ),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.liquidation_storm", description=__doc__)
    parser.add_argument("--loans", type=int, default=LOANS)
    parser.add_argument("--spot-checks", type=int, default=SPOT_CHECKS)
    parser.add_argument(
        "--gap", type=int, default=ADDRESS_GAP, help="the signer's HSM_ADDRESS_GAP (default 2)"
    )
    parser.add_argument(
        "--batch", type=int, default=FUNDING_BATCH, help="loans funded per faucet transaction"
    )
    parser.add_argument("--profile", action="store_true", help="time the pass under cProfile")
    parser.add_argument(
        "--bank-key",
        choices=("hd", "fixed"),
        default="hd",
        help="the kind of bank key the signer makes (default hd, as the service's default)",
    )
    parser.add_argument(
        "--signer",
        choices=("serve", "in-process"),
        default="serve",
        help="the bank's signer as `hsm serve` in its own process (default, as in production) "
        "or in the benchmark's process",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="loans the pass works on at once (default: the service's, 3 with hsm serve, 1 "
        "in process)",
    )
    args = parser.parse_args(argv)
    if args.loans < 1 or args.spot_checks < 1:
        parser.error("need >= 1 loan and >= 1 spot check")
    if not 1 <= args.gap <= 1000 or not 1 <= args.batch <= 1000:
        parser.error("--gap and --batch must be in [1, 1000]")
    if args.concurrency is not None and not 1 <= args.concurrency <= 16:
        parser.error("--concurrency must be in [1, 16]")
    figures = run(
        args.loans,
        profile=args.profile,
        spot_checks=args.spot_checks,
        gap=args.gap,
        batch=args.batch,
        bank_key=args.bank_key,
        signer_mode=args.signer,
        concurrency=args.concurrency,
    )
    for figure in figures:
        print(figure.line())
    return 0 if all(f.passed for f in figures) else 1


if __name__ == "__main__":
    sys.exit(main())
