"""Benchmark: the HTTP API under an open-loop load of a realistic request mix.

Target (issue 10): p99 <= 50 ms with no errors at 200 requests/s on this 2-core machine,
against real server processes: one `custody serve` on SQLite (two worker processes,
`WORKERS`), and two `custody serve` replicas (one worker each) on one PostgreSQL
database (requests alternate between them: a trivial client-side round robin).
Reported per rate: sent, ok, errors by kind, p50/p99/max latency, the client's own lag
and CPU, the servers' CPU; then the highest rate that holds the target, and whether 200
requests/s does.

The mix (`MIX`): miners reading their loans, the loans' deposits and addresses, and who
they are; miners asking for a new collateral address (a write: an address row, the loan's
next index and an audit event); bank staff listing loans and reading the latest price;
and (issue 16, `CONSOLE_MIX`, left out with `--no-console`) the web console's pages with
a session cookie: miners' dashboards and loan pages, the staff's dashboard and prices.

Open loop: at rate r, request i is due at start + i/r whatever the answers so far, and its
latency is measured from that due time, so a server that falls behind shows it as queueing
(no coordinated omission). An answer that is not the expected status, a failed connection
and no answer within `--timeout` (2 s) are errors; latencies are over every request sent,
a timed-out one counting as the time it was given up at. The client's lag (how late it
really started each request) is reported: if it is large, the client (see its CPU) or a
busy machine, not the server, is the limit (`--clients N` spreads the schedule over N
processes; `bench.http1` is a lean HTTP/1.1 client, as httpx costs ~5x the CPU per
request, `--http httpx` to compare). After each rate the servers get `SETTLE_SECONDS` to
finish what they still hold (until a health check answers within `SETTLE_FAST_MS`); if
they do not, they are restarted, so each rate is measured on its own and not on the
backlog of the one before.

Set-up (not timed): a fresh database (an SQLite file, or a database in a throwaway
PostgreSQL server from regtest.postgres), migrated and populated through custody's own
services: a bank, an arbiter and `--miners` miner parties with a principal each, `--loans`
loans with three HD keys each (so they await their deposit and hand out addresses), a
manual price. No node and no signer: nothing in this mix calls them. Each request kind is
sent once to every server before the ladder, which stops the benchmark if any answers
other than expected.

``python -m bench load [--backend sqlite|postgres|both] [--rates 25,50,100,200,400]
[--duration S] [--timeout S] [--clients N] [--http raw|httpx] [--loans N] [--miners N]``
runs it alone; `python -m bench` runs it with every other benchmark, at 5 s per rate.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import math
import multiprocessing
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from multiprocessing.connection import Connection
from pathlib import Path
from typing import IO, Literal

import httpx
from sqlalchemy.engine import Engine
from sqlmodel import Session, create_engine, func, select

from bench import Figure
from bench.http1 import Connections
from custody.auth.context import Context
from custody.auth.service import create_principal
from custody.config import Settings
from custody.console.endpoints import COOKIE as CONSOLE_COOKIE
from custody.console.service import hash_token, new_token
from custody.db.migrate import upgrade
from custody.db.models import (
    CollateralAddress,
    ConsoleSession,
    KeyRole,
    Party,
    PartyKind,
    Role,
)
from custody.db.session import make_engine, transaction
from custody.loans.schemas import HDKeyIn, LoanCreate, LoanTermsIn
from custody.loans.service import create_loan, register_key
from custody.risk.manual import FeedCheck, PricePolicy, confirm_price, propose_price
from pledge.network import NetworkName
from regtest.kyc import approve_miner
from regtest.postgres import PostgresServer
from regtest.testkeys import make_test_key_text
from regtest.wait import wait_until

Backend = Literal["sqlite", "postgres"]
Http = Literal["raw", "httpx"]
BACKENDS: tuple[Backend, ...] = ("sqlite", "postgres")
REPLICAS: dict[Backend, int] = {"sqlite": 1, "postgres": 2}
# Worker processes per replica (CUSTODY_API_WORKERS, unless set in the environment). One
# process is bound by its GIL near 150 requests/s on this mix, so 200 requests/s needs two
# processes: two workers of the one SQLite replica, one each for the PostgreSQL replicas
# (whose connection pools then stay within the server's 100 connections).
WORKERS: dict[Backend, int] = {"sqlite": 2, "postgres": 1}

RATES = (25, 50, 100, 200, 400)
DURATION = 10.0  # seconds per rate, `python -m bench load`
ALL_BENCH_DURATION = 5.0  # seconds per rate inside `python -m bench` (every benchmark)
TIMEOUT = 2.0
TARGET_RATE = 200
TARGET_P99_MS = 50.0
LOANS = 50
MINERS = 10
CLIENTS = 1
SEED = 20240610
NETWORK: NetworkName = "regtest"
START_MARGIN = 0.2  # seconds between planning a rate and its first request
SETTLE_SECONDS = 5.0  # at most this long for the servers to drain between rates, else
# they are restarted (what they still hold would be measured as the next rate's latency)
SETTLE_FAST_MS = 250.0  # a server is idle again when a health check answers this fast
# (a backlog delays it by seconds; a busy machine alone, by tens of milliseconds)
SERVER_START_TIMEOUT = 60.0

MINER_RETURN = "bcrt1qw508d6qejxtdg4y5r3zarvary0c5xw7kygt080"
BANK_LIQUIDATION = "bcrt1qrp33g0q5c5txsp9arysrx4k6zdkfs4nce4xj0gdcccefvpysxf3qzf4jry"
ROOT_DIR = Path(__file__).resolve().parent.parent  # `python -m custody.cli` runs from here


@dataclass(frozen=True)
class RequestKind:
    """One kind of request in the mix: who sends it, what it expects, how often."""

    name: str
    method: str
    path: str  # `{loan}` is one of the sender's loans
    who: Literal["miner", "staff"]
    expected: int
    weight: int


MIX: tuple[RequestKind, ...] = (
    RequestKind("loan", "GET", "/v1/loans/{loan}", "miner", 200, 25),
    RequestKind("deposits", "GET", "/v1/loans/{loan}/deposits", "miner", 200, 20),
    RequestKind("addresses", "GET", "/v1/loans/{loan}/addresses", "miner", 200, 20),
    RequestKind("new_address", "POST", "/v1/loans/{loan}/addresses", "miner", 201, 10),
    RequestKind("loans", "GET", "/v1/loans", "staff", 200, 10),
    RequestKind("price", "GET", "/v1/prices/latest", "staff", 200, 10),
    RequestKind("me", "GET", "/v1/me", "miner", 200, 5),
)

# The web console's pages (issue 16: "with the console's pages in the mix"), sent with a
# session cookie (a session row made in set-up, as a passkey sign-in would) instead of an
# API key: a miner's dashboard, loan page and its address's QR code, the staff's dashboard
# (with the system's status) and the prices page. `--no-console` leaves them out (issue 10's mix).
CONSOLE_MIX: tuple[RequestKind, ...] = (
    RequestKind("console_loans", "GET", "/console/loans", "miner", 200, 6),
    RequestKind("console_loan", "GET", "/console/loans/{loan}", "miner", 200, 8),
    # its QR code, an image of its own since the page stopped drawing them inline (a
    # browser keeps it: an address at an index never changes)
    RequestKind("console_qr", "GET", "/console/loans/{loan}/addresses/0/qr.svg", "miner", 200, 2),
    RequestKind("console_staff", "GET", "/console/loans", "staff", 200, 3),
    RequestKind("console_prices", "GET", "/console/prices", "staff", 200, 3),
)


# -- the data --------------------------------------------------------------------------


@dataclass(frozen=True)
class Population:
    """The API keys the mix sends with: bank staff, and each miner with its loans."""

    staff_key: str
    miners: tuple[tuple[str, tuple[int, ...]], ...]
    # console session cookies: the staff member's, and each miner's (by API key)
    staff_cookie: str = ""
    miner_cookies: dict[str, str] = field(default_factory=dict)

    def headers(self, kind: RequestKind, miner_key: str) -> dict[str, str]:
        """What authenticates `kind` for the staff member or the miner of `miner_key`:
        the API key, or for a console page the session cookie."""
        if kind.path.startswith("/console"):
            cookie = self.staff_cookie if kind.who == "staff" else self.miner_cookies[miner_key]
            return {"Cookie": f"{CONSOLE_COOKIE}={cookie}"}
        key = self.staff_key if kind.who == "staff" else miner_key
        return {"Authorization": f"Bearer {key}"}

    @property
    def loans(self) -> int:
        return sum(len(loans) for _, loans in self.miners)


def populate(engine: Engine, loans: int, miners: int, seed: int = SEED) -> Population:
    """Parties, principals, loans with three HD keys each and a manual price, made
    through custody's services (what the API would do, without its HTTP cost)."""
    rng = random.Random(seed)
    with transaction(engine) as session:
        bank = _party(session, "load-bank", PartyKind.bank)
        arbiter = _party(session, "load-arbiter", PartyKind.arbiter)
        staff, staff_key = create_principal(
            session, name="load-staff", role=Role.bank_operator, party_id=bank, actor="bench"
        )
        arbiter_principal, _ = create_principal(
            session, name="load-arbiter", role=Role.arbiter, party_id=arbiter, actor="bench"
        )
        miner_seats: list[tuple[Context, str]] = []
        for m in range(miners):
            party = _party(session, f"load-miner-{m}", PartyKind.miner)
            principal, key = create_principal(
                session, name=f"load-miner-{m}", role=Role.miner, party_id=party, actor="bench"
            )
            miner_seats.append((Context(principal=principal, network=NETWORK), key))
        approver, _ = create_principal(
            session, name="load-approver", role=Role.bank_approver, party_id=bank, actor="bench"
        )
        officer, _ = create_principal(
            session,
            name="load-compliance",
            role=Role.compliance_officer,
            party_id=bank,
            actor="bench",
        )
        for miner_ctx, _ in miner_seats:  # through the compliance gate
            approve_miner(
                session,
                miner_ctx.principal.party_id or 0,
                editor=staff,
                officer=officer,
                network=NETWORK,
            )
        staff_ctx = Context(principal=staff, network=NETWORK)
        arbiter_ctx = Context(principal=arbiter_principal, network=NETWORK)
        # A manual price takes two people: the staff member proposes, the approver confirms.
        policy = PricePolicy.from_settings(Settings())
        proposal = propose_price(
            session, staff_ctx, Decimal(6_000_000), None, policy=policy, feeds=FeedCheck(None)
        )
        confirm_price(
            session,
            Context(principal=approver, network=NETWORK),
            proposal.id or 0,
            policy=policy,
            feeds=FeedCheck(None),
        )
    owned: list[list[int]] = [[] for _ in range(miners)]
    maturity = datetime.now(UTC) + timedelta(days=180)
    for i in range(loans):
        miner_ctx, _ = miner_seats[i % miners]
        with transaction(engine) as session:
            loan = create_loan(
                session,
                staff_ctx,
                LoanCreate(
                    miner_party_id=miner_ctx.principal.party_id or 0,
                    arbiter_party_id=arbiter,
                    terms=LoanTermsIn(
                        principal_kopecks=1_000_000_00,
                        interest_rate_bps=1_800,
                        maturity_at=maturity,
                        required_collateral_sats=50_000_000,
                        miner_return_address=MINER_RETURN,
                        bank_liquidation_address=BANK_LIQUIDATION,
                    ),
                ),
            )
            assert loan.id is not None
            for seat, ctx in (
                (KeyRole.miner, miner_ctx),
                (KeyRole.bank, staff_ctx),
                (KeyRole.arbiter, arbiter_ctx),
            ):
                key = make_test_key_text(rng.randbytes(32), NETWORK)
                register_key(session, ctx, loan.id, seat, HDKeyIn(kind="hd", key=key))
            owned[i % miners].append(loan.id)
    with transaction(engine) as session:
        cookies = {}
        for ctx, key in [(staff_ctx, staff_key), *miner_seats]:
            assert ctx.principal.id is not None
            cookies[key] = new_token()
            session.add(
                ConsoleSession(principal_id=ctx.principal.id, token_hash=hash_token(cookies[key]))
            )
    return Population(
        staff_key=staff_key,
        miners=tuple((key, tuple(ids)) for (_, key), ids in zip(miner_seats, owned, strict=True)),
        staff_cookie=cookies[staff_key],
        miner_cookies={key: cookies[key] for _, key in miner_seats},
    )


def _party(session: Session, name: str, kind: PartyKind) -> int:
    party = Party(name=name, kind=kind)
    session.add(party)
    session.flush()
    assert party.id is not None
    return party.id


def address_count(url: str) -> int:
    """Addresses in the database, read on an engine of its own without custody's SQLite
    BEGIN IMMEDIATE, so a server that still holds the write lock does not block it."""
    engine = create_engine(url)
    try:
        with Session(engine) as session:
            return int(session.exec(select(func.count()).select_from(CollateralAddress)).one())
    finally:
        engine.dispose()


# -- the servers -----------------------------------------------------------------------


# The last line of a logged traceback: `package.module.SomeError: message`.
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Timeout|Exit)\b.*")


def _workers(backend: Backend) -> int:
    return int(os.environ.get("CUSTODY_API_WORKERS", WORKERS[backend]))


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


SERVER_KNOBS = frozenset(
    {
        "CUSTODY_API_WORKERS",
        "CUSTODY_API_THREADS",
        "CUSTODY_DB_POOL_SIZE",
        "CUSTODY_DB_MAX_OVERFLOW",
    }
)


class ServerProcess:
    """One `custody serve` process on a free loopback port, its output in a log file."""

    def __init__(
        self,
        database_url: str,
        log_path: Path,
        workers: int = 1,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.database_url = database_url
        self.extra_env = dict(extra_env or {})  # e.g. the node's CUSTODY_NODE_RPC_*
        self.log_path = log_path
        self.workers = workers
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def launch(self) -> None:
        """Start the process on a free port (`wait_ready` waits for it to answer)."""
        self.port = _free_loopback_port()
        self._launch()

    def wait_ready(self, attempts: int = 3) -> None:
        """Wait until `/v1/health` answers; a lost port race is relaunched on another."""
        for attempt in range(attempts):
            try:
                wait_until(
                    self._healthy,
                    SERVER_START_TIMEOUT,
                    interval=self._pause_or_fail,
                    message=lambda: f"custody serve on {self.url}",
                )
                return
            except RuntimeError:
                lost_race = "address already in use" in self.log_tail().lower()
                self.stop()
                if not lost_race or attempt == attempts - 1:
                    raise
                self.launch()

    def _launch(self) -> None:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "DATABASE_URL": self.database_url,
            "CUSTODY_NETWORK": NETWORK,
            "CUSTODY_API_HOST": "127.0.0.1",
            "CUSTODY_API_PORT": str(self.port),
            "CUSTODY_API_WORKERS": str(self.workers),
        }
        # the server's capacity knobs, to try them: CUSTODY_API_WORKERS=2 python -m bench load
        env.update({k: v for k, v in os.environ.items() if k in SERVER_KNOBS})
        env.update(self.extra_env)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop())
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "custody.cli", "serve"],
            cwd=ROOT_DIR,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def _healthy(self) -> bool:
        try:
            response = httpx.get(f"{self.url}/v1/health", timeout=1.0, trust_env=False)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    def _pause_or_fail(self) -> None:
        """Between polls, wait on the process: if it exits, say why at once."""
        assert self._proc is not None
        try:
            code = self._proc.wait(timeout=0.05)
        except subprocess.TimeoutExpired:
            return
        raise RuntimeError(f"custody serve exited with code {code}:\n{self.log_tail()}")

    def cpu_seconds(self) -> float:
        """User + system CPU time the process and its living children (uvicorn's worker
        processes with `CUSTODY_API_WORKERS`) have used so far (from /proc)."""
        return sum(_cpu_seconds(pid) for pid in _process_tree(self.pid))

    def log_errors(self) -> Counter[str]:
        """The exceptions the server logged (each traceback's last line, shortened)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return Counter()
        found: Counter[str] = Counter()
        for line in text.splitlines():
            match = _EXCEPTION_LINE.match(line)
            if match:
                found[match.group(0)[:120]] += 1
        return found

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def terminate(self) -> None:
        """Ask it to stop (SIGTERM: uvicorn finishes its requests, then exits)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within `grace` seconds (it waits for
        the requests it holds, and a stuck one can take 30 s)."""
        if self._proc is not None:
            self.terminate()
            try:
                self._proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None


def _process_tree(pid: int) -> list[int]:
    """`pid` and its descendants, from /proc/<pid>/task/*/children."""
    found = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            found += _process_tree(int(child))
    return found


def _cpu_seconds(pid: int) -> float:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def restart(
    servers: Sequence[ServerProcess], population: Population, mix: Sequence[RequestKind] = MIX
) -> int:
    """Drop what the servers still hold (SIGTERM to all, SIGKILL after 1 s), start them
    again on new ports and warm them up (the addresses that handed out)."""
    for server in servers:
        server.terminate()
    for server in servers:
        server.stop(grace=1.0)
    start_all(servers)
    return warm_up(population, servers, mix)


def start_all(servers: Sequence[ServerProcess]) -> None:
    """Launch every server, then wait for each (they import and migrate side by side)."""
    for server in servers:
        server.launch()
    for server in servers:
        server.wait_ready()


@contextmanager
def serving(backend: Backend, base: Path, stack: ExitStack) -> Iterator[str]:
    """A fresh database for `backend` (its URL); its server, if any, stops on exit."""
    if backend == "sqlite":
        yield f"sqlite:///{base / 'custody.db'}"
        return
    pg = PostgresServer()  # its own temp dir: the cluster's user must reach it
    stack.callback(pg.stop)
    pg.start()
    yield pg.create_database("bench_load")


# -- the load --------------------------------------------------------------------------


@dataclass(frozen=True)
class Planned:
    """One request of the schedule: due `index / rate` seconds after the start."""

    index: int
    kind: str
    method: str
    port: int  # of the server on 127.0.0.1 it goes to
    path: str
    headers: dict[str, str]
    expected: int


@dataclass(frozen=True)
class Outcome:
    kind: str
    latency: float  # seconds from the due time to the answer (or to giving up)
    lag: float  # seconds from the due time to when the client really started it
    error: str | None


def plan(
    population: Population,
    ports: Sequence[int],
    count: int,
    rng: random.Random,
    mix: Sequence[RequestKind] = MIX,
) -> list[Planned]:
    """`count` requests drawn from the mix, alternating between the servers."""
    weights = [k.weight for k in mix]
    planned: list[Planned] = []
    for index, kind in enumerate(rng.choices(mix, weights=weights, k=count)):
        miner_key, loans = rng.choice(population.miners)
        headers = population.headers(kind, miner_key)
        path = kind.path.format(loan=rng.choice(loans))
        port = ports[index % len(ports)]
        planned.append(Planned(index, kind.name, kind.method, port, path, headers, kind.expected))
    return planned


async def _drive(
    requests: Sequence[Planned], rate: float, start: float, timeout: float, http: Http
) -> list[Outcome]:
    """Send each request at its due time (`start` on the monotonic clock + index / rate)
    without waiting for earlier answers; wait at most `timeout` for each answer."""
    loop = asyncio.get_running_loop()
    connections = Connections()
    client = (
        httpx.AsyncClient(
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
            timeout=httpx.Timeout(None),
            trust_env=False,
        )
        if http == "httpx"
        else None
    )

    async def status_of(p: Planned) -> int:
        if client is None:
            return await connections.request("127.0.0.1", p.port, p.method, p.path, p.headers)
        url = f"http://127.0.0.1:{p.port}{p.path}"
        return (await client.request(p.method, url, headers=p.headers)).status_code

    async def one(p: Planned, due: float) -> Outcome:
        began = loop.time()
        error: str | None = None
        try:
            status = await asyncio.wait_for(status_of(p), timeout)
            if status != p.expected:
                error = f"HTTP {status}"
        except TimeoutError:
            error = "timeout"
        except (OSError, asyncio.IncompleteReadError, ValueError, httpx.HTTPError) as exc:
            error = type(exc).__name__
        return Outcome(p.kind, loop.time() - due, began - due, error)

    try:
        tasks: list[asyncio.Task[Outcome]] = []
        for p in requests:
            due = start + p.index / rate
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(p, due)))
        return list(await asyncio.gather(*tasks))
    finally:
        connections.close()
        if client is not None:
            await client.aclose()


@dataclass(frozen=True)
class ClientConfig:
    """How the load is sent: per-request timeout, client processes, HTTP client."""

    timeout: float = TIMEOUT
    processes: int = CLIENTS
    http: Http = "raw"


@contextmanager
def _without_gc_pauses() -> Iterator[None]:
    """The client's own garbage collector off while it sends: this process holds all of
    custody's imports, and a full collection over them paused the client ~100 ms, which
    the open loop then measured as server latency (lag max). Its few garbage cycles
    wait until the rate is done."""
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.unfreeze()


def _client_process(
    conn: Connection, requests: list[Planned], rate: float, client: ClientConfig
) -> None:
    """A client process: say it is ready, take the start time, send its share, answer
    with the outcomes and the CPU time it used."""
    conn.send("ready")
    start: float = conn.recv()
    cpu = time.process_time()
    with _without_gc_pauses():
        outcomes = asyncio.run(_drive(requests, rate, start, client.timeout, client.http))
    conn.send((outcomes, time.process_time() - cpu))
    conn.close()


def send_schedule(
    requests: list[Planned], rate: float, client: ClientConfig
) -> tuple[list[Outcome], float]:
    """Run the schedule in this process (one client process) or split it over
    `client.processes` started together on one monotonic clock; (outcomes, their CPU s)."""
    clients = client.processes
    if clients == 1:
        cpu = time.process_time()
        start = time.monotonic() + START_MARGIN
        with _without_gc_pauses():
            mine = asyncio.run(_drive(requests, rate, start, client.timeout, client.http))
        return mine, time.process_time() - cpu
    ctx = multiprocessing.get_context("fork")
    pipes: list[Connection] = []
    procs: list[multiprocessing.process.BaseProcess] = []
    try:
        for k in range(clients):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_client_process, args=(child, requests[k::clients], rate, client)
            )
            proc.start()
            child.close()
            pipes.append(parent)
            procs.append(proc)
        for pipe in pipes:
            if pipe.recv() != "ready":
                raise RuntimeError("a client process did not start")
        start = time.monotonic() + START_MARGIN
        for pipe in pipes:
            pipe.send(start)
        outcomes: list[Outcome] = []
        cpu_total = 0.0
        for pipe in pipes:
            part, cpu_part = pipe.recv()
            outcomes += part
            cpu_total += cpu_part
        return outcomes, cpu_total
    finally:
        for started in procs:
            started.join(timeout=10)
            if started.is_alive():
                started.kill()
                started.join()


def settle(servers: Sequence[ServerProcess], deadline_s: float = SETTLE_SECONDS) -> float | None:
    """Wait until every server answers a health check fast again (what it held from the
    last rate is done): how long that took, or None if it did not within `deadline_s`."""
    t0 = time.monotonic()

    def idle() -> bool:
        for server in servers:
            began = time.monotonic()
            try:
                response = httpx.get(f"{server.url}/v1/health", timeout=2.0, trust_env=False)
            except httpx.HTTPError:
                return False
            if response.status_code != 200 or (time.monotonic() - began) * 1e3 > SETTLE_FAST_MS:
                return False
        return True

    try:
        wait_until(idle, deadline_s, interval=0.1, message="the servers to drain")
    except TimeoutError:
        return None
    return time.monotonic() - t0


def warm_up(
    population: Population, servers: Sequence[ServerProcess], mix: Sequence[RequestKind] = MIX
) -> int:
    """Every request kind once to every server; stop here if any answers unexpectedly.
    How many addresses it handed out."""
    made = 0
    miner_key, loans = population.miners[0]
    with httpx.Client(timeout=30.0, trust_env=False) as client:
        for server in servers:
            for kind in mix:
                path = kind.path.format(loan=loans[0])
                response = client.request(
                    kind.method, server.url + path, headers=population.headers(kind, miner_key)
                )
                if response.status_code != kind.expected:
                    raise RuntimeError(
                        f"load: warm-up {kind.method} {path} answered {response.status_code}, "
                        f"expected {kind.expected}: {response.text[:300]}"
                    )
                if kind.name == "new_address":
                    made += 1
    return made


# -- the figures -----------------------------------------------------------------------


def machine_busy() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine so far, from /proc/stat."""
    try:
        ticks = [int(t) for t in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return 0, 0
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    total = sum(ticks[:8])  # guest time is already counted in user
    return total - idle, total


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (`q` in [0, 1]) of `values`; 0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


@dataclass
class RateResult:
    rate: int
    duration: float
    outcomes: list[Outcome]
    wall_seconds: float  # from the first due time until the last answer
    server_cpu: float  # cores busy, summed over the server processes
    client_cpu: float  # cores busy in the client process(es)
    machine_cpu: float  # cores busy on the whole machine (PostgreSQL, other users too)
    settle_seconds: float | None = 0.0  # None: the servers did not drain in time

    @property
    def sent(self) -> int:
        return len(self.outcomes)

    @property
    def errors(self) -> Counter[str]:
        return Counter(o.error for o in self.outcomes if o.error is not None)

    @property
    def ok(self) -> int:
        return sum(1 for o in self.outcomes if o.error is None)

    def latency_ms(self, q: float, kind: str | None = None) -> float:
        return 1e3 * percentile(
            [o.latency for o in self.outcomes if kind is None or o.kind == kind], q
        )

    @property
    def p50_ms(self) -> float:
        return self.latency_ms(0.50)

    @property
    def p99_ms(self) -> float:
        return self.latency_ms(0.99)

    @property
    def max_ms(self) -> float:
        return self.latency_ms(1.0)

    def count(self, kind: str) -> int:
        return sum(1 for o in self.outcomes if o.kind == kind)

    def lag_ms(self, q: float) -> float:
        return 1e3 * percentile([o.lag for o in self.outcomes], q)

    @property
    def holds(self) -> bool:
        return self.sent > 0 and not self.errors and self.p99_ms <= TARGET_P99_MS


@dataclass
class BackendReport:
    backend: Backend
    replicas: int
    loans: int
    miners: int
    client: ClientConfig
    setup_seconds: float = 0.0
    rows: list[RateResult] = field(default_factory=list)
    addresses_before: int = 0
    addresses_after: int = 0
    warm_up_addresses: int = 0  # handed out by warm-ups after restarts, not by the load
    server_errors: Counter[str] = field(default_factory=Counter)
    restarts: int = 0  # times the servers did not drain after a rate and were restarted

    @property
    def highest_rate_held(self) -> int:
        """The highest rate such that it and every lower rate in the ladder held."""
        best = 0
        for row in sorted(self.rows, key=lambda r: r.rate):
            if not row.holds:
                break
            best = row.rate
        return best

    def row(self, rate: int) -> RateResult | None:
        return next((r for r in self.rows if r.rate == rate), None)

    @property
    def addresses_made(self) -> int:
        """Addresses the load added to the database (a timed-out request may have too)."""
        return self.addresses_after - self.addresses_before - self.warm_up_addresses

    def new_addresses_ok(self) -> int:
        return sum(
            1 for r in self.rows for o in r.outcomes if o.kind == "new_address" and o.error is None
        )

    def table(self) -> str:
        tag = f"load[{self.backend}]"
        head = (
            f"{tag} {'rate':>5} {'sent':>6} {'ok':>6} {'errors':>6} {'p50 ms':>8} "
            f"{'p99 ms':>8} {'max ms':>8} {'lag p99':>8} {'lag max':>8} {'srv CPU':>7} "
            f"{'cli CPU':>7} {'all CPU':>7} {'drain s':>7}  errors by kind"
        )
        lines = [head]
        for r in self.rows:
            kinds = ", ".join(f"{k} {n}" for k, n in sorted(r.errors.items())) or "-"
            drain = "no" if r.settle_seconds is None else f"{r.settle_seconds:.1f}"
            lines.append(
                f"{tag} {r.rate:>5} {r.sent:>6} {r.ok:>6} {sum(r.errors.values()):>6} "
                f"{r.p50_ms:>8.1f} {r.p99_ms:>8.1f} {r.max_ms:>8.1f} {r.lag_ms(0.99):>8.1f} "
                f"{r.lag_ms(1.0):>8.1f} {r.server_cpu:>7.2f} {r.client_cpu:>7.2f} "
                f"{r.machine_cpu:>7.2f} {drain:>7}  {kinds}"
            )
        names = [k.name for k in (*MIX, *CONSOLE_MIX) if any(r.count(k.name) for r in self.rows)]
        width = max((len(n) for n in names), default=11)
        head = " ".join(f"{n:>{width}}" for n in names)
        lines.append(f"{tag} p99 ms by request: {'rate':>5} {head}")
        for r in self.rows:
            lines.append(
                f"{tag} p99 ms by request: {r.rate:>5} "
                + " ".join(
                    f"{r.latency_ms(0.99, n):>{width}.1f}" if r.count(n) else f"{'-':>{width}}"
                    for n in names
                )
            )
        return "\n".join(lines)

    def verdict(self) -> list[str]:
        tag = f"load[{self.backend}]"
        ladder = ", ".join(str(r.rate) for r in self.rows)
        best = self.highest_rate_held
        lines = [
            f"{tag}: highest rate with p99 <= {TARGET_P99_MS:g} ms and no errors: "
            + (f"{best} rps" if best else "none")
            + f" (ladder {ladder} rps, {self.rows[0].duration:g} s each)"
        ]
        target = self.row(TARGET_RATE)
        if target is None:
            lines.append(f"{tag}: target {TARGET_RATE} rps: not measured (not in --rates)")
        else:
            lines.append(
                f"{tag}: target p99 <= {TARGET_P99_MS:g} ms with no errors at {TARGET_RATE} rps:"
                f" {'HOLDS' if target.holds else 'FAILS'} (p99 {target.p99_ms:.1f} ms, "
                f"{sum(target.errors.values())} errors of {target.sent})"
            )
        return lines

    def figures(self) -> list[Figure]:
        prefix = f"load.{self.backend}"
        figures = [
            Figure(
                f"{prefix}.highest_rate_held",
                float(self.highest_rate_held),
                "rps",
                f"info (p99 <= {TARGET_P99_MS:g} ms, no errors, {self.replicas} server(s))",
                True,
            )
        ]
        target = self.row(TARGET_RATE)
        if target is not None:
            figures += [
                Figure(
                    f"{prefix}.p99_ms_at_{TARGET_RATE}rps",
                    target.p99_ms,
                    "ms",
                    f"<= {TARGET_P99_MS:g} (issue 10)",
                    target.p99_ms <= TARGET_P99_MS,
                ),
                Figure(
                    f"{prefix}.errors_at_{TARGET_RATE}rps",
                    float(sum(target.errors.values())),
                    "requests",
                    f"== 0 of {target.sent} (issue 10)",
                    not target.errors,
                ),
            ]
        return figures


# -- the run ---------------------------------------------------------------------------


def measure_backend(
    backend: Backend,
    rates: Sequence[int],
    duration: float,
    *,
    client: ClientConfig | None = None,
    loans: int = LOANS,
    miners: int = MINERS,
    seed: int = SEED,
    console: bool = True,
) -> BackendReport:
    """Database, data, servers; then each rate of the ladder in turn; everything stopped
    at the end, whatever happened. `console`: the console's pages in the mix."""
    client = client or ClientConfig()
    mix = (*MIX, *CONSOLE_MIX) if console else MIX
    share = 100 / sum(k.weight for k in mix)
    report = BackendReport(backend, REPLICAS[backend], loans, miners, client)
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix=f"bench-load-{backend}-") as tmp, ExitStack() as stack:
        base = Path(tmp)
        t0 = time.perf_counter()
        with serving(backend, base, stack) as url:
            engine = make_engine(url)
            stack.callback(engine.dispose)
            upgrade(engine)
            population = populate(engine, loans, miners, seed)
            engine.dispose()  # the servers alone use the database while they are measured
            servers = [
                ServerProcess(url, base / f"serve-{i}.log", _workers(backend))
                for i in range(REPLICAS[backend])
            ]
            for server in servers:
                stack.callback(server.stop)
            start_all(servers)
            warm_up(population, servers, mix)
            report.addresses_before = address_count(url)
            report.setup_seconds = time.perf_counter() - t0
            print(
                f"load[{backend}]: set-up {report.setup_seconds:.1f} s: {len(servers)} "
                f"`custody serve` replica(s) of {_workers(backend)} worker process(es) each "
                f"on {backend} (pids "
                f"{', '.join(str(s.pid) for s in servers)}), {population.loans} loans of "
                f"{miners} miners, mix "
                + ", ".join(f"{k.name} {k.weight * share:.0f}%" for k in mix)
                + f"; {client.processes} client process(es) ({client.http} HTTP), timeout "
                f"{client.timeout:g} s; load average "
                f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs",
                flush=True,
            )
            for step, rate in enumerate(rates, 1):
                count = max(1, round(rate * duration))
                requests = plan(population, [s.port for s in servers], count, rng, mix)
                cpu0 = sum(s.cpu_seconds() for s in servers)
                busy0 = machine_busy()
                t1 = time.monotonic()
                outcomes, client_cpu = send_schedule(requests, rate, client)
                wall = time.monotonic() - t1 - START_MARGIN
                server_cpu = sum(s.cpu_seconds() for s in servers) - cpu0
                busy1 = machine_busy()
                cores = (os.cpu_count() or 1) * (busy1[0] - busy0[0]) / max(busy1[1] - busy0[1], 1)
                row = RateResult(
                    rate, duration, outcomes, wall, server_cpu / wall, client_cpu / wall, cores
                )
                report.rows.append(row)
                print(
                    f"load[{backend}]: {rate} rps: {row.sent} sent, {row.ok} ok, "
                    f"{sum(row.errors.values())} errors, p50 {row.p50_ms:.1f} ms, p99 "
                    f"{row.p99_ms:.1f} ms",
                    end="",
                    flush=True,
                )
                row.settle_seconds = settle(servers)
                if row.settle_seconds is not None:
                    print(f"; drained in {row.settle_seconds:.1f} s", flush=True)
                    continue
                if step == len(rates):  # the last rate: nothing left to measure
                    print(f"; NOT drained after {SETTLE_SECONDS:g} s", flush=True)
                    break
                print(
                    f"; NOT drained after {SETTLE_SECONDS:g} s: servers restarted",
                    end="",
                    flush=True,
                )
                t2 = time.monotonic()
                report.warm_up_addresses += restart(servers, population, mix)
                report.restarts += 1
                print(f" ({time.monotonic() - t2:.1f} s)", flush=True)
            report.addresses_after = address_count(url)
            for server in servers:
                report.server_errors.update(server.log_errors())
    return report


def run(
    rates: Sequence[int] = RATES,
    duration: float = ALL_BENCH_DURATION,
    *,
    backends: Sequence[Backend] = BACKENDS,
    client: ClientConfig | None = None,
    loans: int = LOANS,
    miners: int = MINERS,
    console: bool = True,
) -> list[Figure]:
    """Every backend's ladder, its tables and verdicts printed; the figures."""
    figures: list[Figure] = []
    for backend in backends:
        report = measure_backend(
            backend,
            rates,
            duration,
            client=client,
            loans=loans,
            miners=miners,
            console=console,
        )
        print_report(report)
        figures += report.figures()
    return figures


def print_report(report: BackendReport) -> None:
    print(report.table())
    print(
        f"load[{report.backend}]: latency from each request's due time, over every request "
        f"sent (a timeout counts as {report.client.timeout:g} s); lag = how late the client "
        f"started it; CPU in cores busy (srv: the custody servers, cli: the client, all: "
        f"the whole machine, with PostgreSQL and anyone else); drain = until a health check "
        f"answers in <= {SETTLE_FAST_MS:g} ms ('no': not in {SETTLE_SECONDS:g} s, so the "
        f"servers were restarted before the next rate); new addresses in the database "
        f"{report.addresses_made} ({report.new_addresses_ok()} "
        f"answered 201)"
    )
    logged = sum(report.server_errors.values())
    print(f"load[{report.backend}]: the servers logged {logged} exceptions{':' if logged else ''}")
    for text, n in report.server_errors.most_common(5):
        print(f"load[{report.backend}]:   {n} x {text}")
    for line in report.verdict():
        print(line)


def _rates(text: str) -> list[int]:
    try:
        rates = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of rates: {text}") from exc
    if not rates or any(r < 1 for r in rates):
        raise argparse.ArgumentTypeError("rates must be >= 1 request/s")
    return rates


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench load", description=__doc__)
    parser.add_argument("--backend", choices=("sqlite", "postgres", "both"), default="both")
    parser.add_argument(
        "--rates", type=_rates, default=list(RATES), help="requests/s, e.g. 25,50,100,200,400"
    )
    parser.add_argument("--duration", type=float, default=DURATION, help="seconds per rate")
    parser.add_argument("--timeout", type=float, default=TIMEOUT, help="seconds per request")
    parser.add_argument("--clients", type=int, default=CLIENTS, help="client processes")
    parser.add_argument(
        "--http", choices=("raw", "httpx"), default="raw", help="HTTP client (see bench.http1)"
    )
    parser.add_argument("--loans", type=int, default=LOANS)
    parser.add_argument("--miners", type=int, default=MINERS)
    parser.add_argument(
        "--no-console",
        action="store_true",
        help="leave the console's pages out of the mix (issue 10's API-only mix)",
    )
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.timeout <= 0:
        parser.error("--duration and --timeout must be > 0")
    if args.clients < 1 or args.miners < 1 or args.loans < args.miners:
        parser.error("need >= 1 client, >= 1 miner and at least one loan per miner")
    backends: tuple[Backend, ...] = BACKENDS if args.backend == "both" else (args.backend,)
    figures = run(
        args.rates,
        args.duration,
        backends=backends,
        client=ClientConfig(args.timeout, args.clients, args.http),
        loans=args.loans,
        miners=args.miners,
        console=not args.no_console,
    )
    for figure in figures:
        print(figure.line())
    return 0 if all(f.passed for f in figures) else 1


if __name__ == "__main__":
    sys.exit(main())
