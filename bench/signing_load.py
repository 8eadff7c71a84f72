"""Benchmark: the signing path under load, against a real `custody serve` (issue 16).

Target: 100 concurrent approvals and signature uploads without errors (p50/p99 printed).

Set-up (not timed, each step's time printed): btcd on regtest, an SQLite file migrated
and populated through custody's services: a bank (an operator and an approver with API
keys), a miner and an arbiter, `--loans` loans with three HD keys whose private roots
this benchmark holds (the bank signs with its own device: an xpub bank key, so a release
needs a bank approver's approval before the bank's signature), each loan's first address
paid on chain and the real Watcher run over those blocks (loans active). Then one `custody
serve` (`--workers`, default 2) pointed at the node.

Timed, each phase all at once (every request released together from its own task, so
`--loans` requests are in flight; latency from the release):

1. `create`: the operator opens a release request on every loan (the service reads the
   deposits' transactions and a fee estimate from the node with no transaction open);
2. `approve+miner`: the approver approves every request and the miner uploads its signed
   PSBT of every request, 2 x `--loans` requests interleaved (the PSBTs were fetched and
   signed between phases, untimed);
3. `bank+broadcast`: the bank uploads its signature of every request: quorum, so each
   upload checks the transaction with the node (`testmempoolaccept`) and broadcasts it.

Then it checks every request is `broadcast`, every loan `releasing`, every transaction
in the node's mempool, and the audit chain verifies. An answer other than expected (201,
200, 200, 200), a failed connection or no answer within `--timeout` is an error.

``python -m bench signing_load [--loans N] [--workers N] [--timeout S]`` runs it alone.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from embit import bip32
from embit.networks import NETWORKS
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, func, select

from bench import Figure
from bench.liquidation_storm import SetUp, fund_loans, watch
from bench.load import ServerProcess, percentile
from custody.audit.service import verify_chain
from custody.auth.context import Context
from custody.auth.service import create_principal
from custody.db.migrate import upgrade
from custody.db.models import KeyRole, Loan, LoanState, Party, PartyKind, Role
from custody.db.session import make_engine, transaction
from custody.loans.schemas import HDKeyIn, LoanCreate, LoanTermsIn
from custody.loans.service import create_loan, register_key
from pledge.network import NetworkName
from regtest.faucet import COINBASE_MATURITY
from regtest.kyc import approve_miner
from regtest.node import RegtestNode
from regtest.software_signer import SoftwareHDSigner

LOANS = 100
WORKERS = 2
TIMEOUT = 30.0  # seconds per request: a phase of 200 requests on 2 busy cores queues
NETWORK: NetworkName = "regtest"
COLLATERAL_SATS = 10_000_000
COINBASE_SATS = 50 * 100_000_000
FUNDING_BATCH = 100
MINER_RETURN = "bcrt1qw508d6qejxtdg4y5r3zarvary0c5xw7kygt080"
BANK_LIQUIDATION = "bcrt1qrp33g0q5c5txsp9arysrx4k6zdkfs4nce4xj0gdcccefvpysxf3qzf4jry"
SEATS = (KeyRole.miner, KeyRole.bank, KeyRole.arbiter)
_TPUB = bytes.fromhex("043587cf")


@dataclass(frozen=True)
class People:
    """The API keys of who acts in the timed phases, and the seats' signing roots."""

    operator: str
    approver: str
    miner: str
    roots: dict[tuple[int, KeyRole], bip32.HDKey]

    def headers(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {getattr(self, who)}"}


def _root(seed: str) -> bip32.HDKey:
    return bip32.HDKey.from_seed(
        hashlib.sha256(seed.encode()).digest(), version=NETWORKS["regtest"]["xprv"]
    )


def _account_key(root: bip32.HDKey) -> str:
    """The BIP-48 P2WSH account key with origin, as a hardware wallet exports it."""
    account = root.derive("m/48h/1h/0h/2h").to_public()
    return f"[{root.my_fingerprint.hex()}/48h/1h/0h/2h]{account.to_base58(_TPUB)}"


def populate(engine: Engine, count: int, prefix: str = "signing") -> People:
    """A bank with an operator and an approver, a miner, an arbiter and `count` loans with
    three HD keys this benchmark can sign with."""
    roots: dict[tuple[int, KeyRole], bip32.HDKey] = {}
    with transaction(engine) as session:
        parties: dict[PartyKind, int] = {}
        for kind in (PartyKind.bank, PartyKind.miner, PartyKind.arbiter):
            party = Party(name=f"{prefix}-{kind.value}", kind=kind)
            session.add(party)
            session.flush()
            assert party.id is not None
            parties[kind] = party.id
        keys: dict[str, str] = {}
        principals: dict[str, Any] = {}
        for name, role, kind in (
            ("operator", Role.bank_operator, PartyKind.bank),
            ("approver", Role.bank_approver, PartyKind.bank),
            ("miner", Role.miner, PartyKind.miner),
            ("arbiter", Role.arbiter, PartyKind.arbiter),
        ):
            principals[name], keys[name] = create_principal(
                session, name=f"{prefix}-{name}", role=role, party_id=parties[kind], actor="bench"
            )
        officer, _ = create_principal(
            session,
            name=f"{prefix}-compliance",
            role=Role.compliance_officer,
            party_id=parties[PartyKind.bank],
            actor="bench",
        )
        # The miner through the compliance gate, or its loans never leave draft.
        approve_miner(
            session,
            parties[PartyKind.miner],
            editor=principals["operator"],
            officer=officer,
            network=NETWORK,
        )
        ctx = {
            KeyRole.bank: Context(principal=principals["operator"], network=NETWORK),
            KeyRole.miner: Context(principal=principals["miner"], network=NETWORK),
            KeyRole.arbiter: Context(principal=principals["arbiter"], network=NETWORK),
        }
        maturity = datetime.now(UTC) + timedelta(days=180)
        for i in range(count):
            loan = create_loan(
                session,
                ctx[KeyRole.bank],
                LoanCreate(
                    miner_party_id=parties[PartyKind.miner],
                    arbiter_party_id=parties[PartyKind.arbiter],
                    terms=LoanTermsIn(
                        principal_kopecks=100_000_00,
                        interest_rate_bps=1_800,
                        maturity_at=maturity,
                        required_collateral_sats=COLLATERAL_SATS,
                        required_confirmations=1,
                        miner_return_address=MINER_RETURN,
                        bank_liquidation_address=BANK_LIQUIDATION,
                    ),
                ),
            )
            assert loan.id is not None
            for seat in SEATS:
                root = _root(f"{prefix}/{i}/{seat.value}")
                roots[(loan.id, seat)] = root
                register_key(
                    session, ctx[seat], loan.id, seat, HDKeyIn(kind="hd", key=_account_key(root))
                )
    return People(keys["operator"], keys["approver"], keys["miner"], roots)


# -- the timed phases --------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One request of a phase: who sends it, where, what it expects."""

    label: str
    who: str
    path: str
    body: dict[str, Any]
    expected: int


@dataclass
class Phase:
    name: str
    sent: int = 0
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    seconds: float = 0.0
    answers: list[httpx.Response | None] = field(default_factory=list)

    @property
    def p50_ms(self) -> float:
        return percentile(self.latencies_ms, 0.50)

    @property
    def p99_ms(self) -> float:
        return percentile(self.latencies_ms, 0.99)

    def line(self) -> str:
        errors = ", ".join(f"{k} x{n}" for k, n in self.errors.most_common()) or "none"
        return (
            f"signing_load: {self.name:<15} {self.sent:4d} at once: {self.ok:4d} ok, errors: "
            f"{errors}; p50 {self.p50_ms:7.1f} ms, p99 {self.p99_ms:7.1f} ms, max "
            f"{max(self.latencies_ms, default=0.0):7.1f} ms; all answered in {self.seconds:.2f} s"
        )


async def _send_all(
    name: str, url: str, people: People, calls: list[Call], timeout: float
) -> Phase:
    """Every call at once, each from its own task, released together."""
    phase = Phase(name, sent=len(calls))
    limits = httpx.Limits(max_connections=len(calls) + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(
        base_url=url, timeout=timeout, limits=limits, trust_env=False
    ) as client:
        go = asyncio.Event()

        async def one(call: Call) -> tuple[httpx.Response | None, float, str | None]:
            await go.wait()
            t0 = time.perf_counter()
            try:
                answer = await client.post(
                    call.path, json=call.body, headers=people.headers(call.who)
                )
            except httpx.TimeoutException:
                return None, time.perf_counter() - t0, f"{call.label}: timeout"
            except httpx.HTTPError as exc:
                return None, time.perf_counter() - t0, f"{call.label}: {type(exc).__name__}"
            took = time.perf_counter() - t0
            if answer.status_code != call.expected:
                try:
                    code = str(answer.json().get("error"))
                except ValueError:
                    code = "not JSON"
                return answer, took, f"{call.label}: {answer.status_code} {code}"
            return answer, took, None

        tasks = [asyncio.create_task(one(c)) for c in calls]
        await asyncio.sleep(0.05)  # every task is waiting on the event
        t0 = time.perf_counter()
        go.set()
        results = await asyncio.gather(*tasks)
        phase.seconds = time.perf_counter() - t0
    for answer, took, error in results:
        phase.answers.append(answer)
        phase.latencies_ms.append(took * 1e3)
        if error is None:
            phase.ok += 1
        else:
            phase.errors[error] += 1
    return phase


def _signed(psbt_b64: str, root: bip32.HDKey) -> str:
    return SoftwareHDSigner(root, NETWORK).sign_psbt(psbt_b64)


def _psbts(url: str, people: People, request_ids: Sequence[int]) -> dict[int, str]:
    with httpx.Client(base_url=url, timeout=30, trust_env=False) as client:
        out: dict[int, str] = {}
        for rid in request_ids:
            r = client.get(f"/v1/signing-requests/{rid}/psbt", headers=people.headers("miner"))
            r.raise_for_status()
            out[rid] = str(r.json()["psbt"])
        return out


@dataclass(frozen=True)
class Checked:
    broadcast: int
    releasing: int
    in_mempool: int
    chain_ok: bool


def _check(engine: Engine, node: RegtestNode, txids: Sequence[str]) -> Checked:
    from custody.db.models import SigningRequest

    with Session(engine) as session:
        broadcast = int(
            session.exec(
                select(func.count())
                .select_from(SigningRequest)
                .where(col(SigningRequest.state) == "broadcast")
            ).one()
        )
        releasing = int(
            session.exec(
                select(func.count()).select_from(Loan).where(col(Loan.state) == LoanState.releasing)
            ).one()
        )
        chain = verify_chain(session)
    mempool = set(node.rpc.call("getrawmempool"))
    return Checked(broadcast, releasing, sum(1 for t in txids if t in mempool), chain.ok)


def run(loans: int = LOANS, *, workers: int = WORKERS, timeout: float = TIMEOUT) -> list[Figure]:
    started = time.perf_counter()
    phases: list[Phase] = []
    with tempfile.TemporaryDirectory(prefix="bench-signing-") as tmp:
        base = Path(tmp)
        t0 = time.perf_counter()
        node = RegtestNode(name="bench-signing")
        node.start()
        server: ServerProcess | None = None
        try:
            node.mine(COINBASE_MATURITY + loans * COLLATERAL_SATS // COINBASE_SATS + 2)
            db_url = f"sqlite:///{base / 'custody.db'}"
            engine = make_engine(db_url)
            upgrade(engine)
            people = populate(engine, loans)
            setup = SetUp(loans=loans)
            start_height = fund_loans(engine, node, FUNDING_BATCH, setup)
            watch(engine, node, start_height, setup)
            with Session(engine) as session:
                loan_ids = list(
                    session.exec(
                        select(Loan.id)
                        .where(col(Loan.state) == LoanState.active)
                        .order_by(col(Loan.id))
                    ).all()
                )
            if len(loan_ids) != loans:
                raise RuntimeError(f"set-up: {len(loan_ids)} active loans of {loans}")
            server = ServerProcess(
                db_url,
                base / "serve.log",
                workers=workers,
                extra_env={
                    "CUSTODY_NODE_RPC_URL": node.rpc_url,
                    "CUSTODY_NODE_RPC_USER": node.rpc_user,
                    "CUSTODY_NODE_RPC_PASSWORD": node.rpc_password,
                },
            )
            server.launch()
            server.wait_ready()
            print(
                f"signing_load: set-up: btcd, {loans} loans made, funded and watched active, "
                f"custody serve ({workers} workers) on SQLite: {time.perf_counter() - t0:.1f} s;"
                f" load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs",
                flush=True,
            )
            url = server.url
            create = asyncio.run(
                _send_all(
                    "create",
                    url,
                    people,
                    [
                        Call(
                            "create",
                            "operator",
                            f"/v1/loans/{lid}/signing-requests",
                            {"action": "release"},
                            201,
                        )
                        for lid in loan_ids
                    ],
                    timeout,
                )
            )
            phases.append(create)
            by_loan = {
                int(a.json()["loan_id"]): int(a.json()["id"])
                for a in create.answers
                if a is not None and a.status_code == 201
            }
            psbts = _psbts(url, people, list(by_loan.values()))
            miner_signed = {
                rid: _signed(psbts[rid], people.roots[(lid, KeyRole.miner)])
                for lid, rid in by_loan.items()
            }
            bank_signed = {
                rid: _signed(psbts[rid], people.roots[(lid, KeyRole.bank)])
                for lid, rid in by_loan.items()
            }
            second: list[Call] = []
            for rid in by_loan.values():
                second.append(
                    Call("approve", "approver", f"/v1/signing-requests/{rid}/approve", {}, 200)
                )
                second.append(
                    Call(
                        "miner upload",
                        "miner",
                        f"/v1/signing-requests/{rid}/signatures",
                        {"psbt": miner_signed[rid]},
                        200,
                    )
                )
            phases.append(asyncio.run(_send_all("approve+miner", url, people, second, timeout)))
            third = [
                Call(
                    "bank upload",
                    "operator",
                    f"/v1/signing-requests/{rid}/signatures",
                    {"psbt": bank_signed[rid]},
                    200,
                )
                for rid in by_loan.values()
            ]
            last = asyncio.run(_send_all("bank+broadcast", url, people, third, timeout))
            phases.append(last)
            txids = [
                str(a.json()["unsigned_txid"])
                for a in last.answers
                if a is not None and a.is_success
            ]
            checked = _check(engine, node, txids)
            server_errors = server.log_errors()
            engine.dispose()
        finally:
            if server is not None:
                server.stop()
            node.stop()
    for phase in phases:
        print(phase.line())
    print(
        f"signing_load: {checked.broadcast} requests broadcast, {checked.releasing} loans "
        f"releasing, {checked.in_mempool} of the {len(txids)} transactions in the node's "
        f"mempool, audit chain {'verifies' if checked.chain_ok else 'BROKEN'}; server log: "
        f"{dict(server_errors) or 'no exceptions'}"
    )
    print(f"signing_load: whole benchmark {time.perf_counter() - started:.0f} s")
    errors = sum(sum(p.errors.values()) for p in phases)
    correct = (
        errors == 0
        and checked.broadcast == loans
        and checked.releasing == loans
        and checked.in_mempool == loans
        and checked.chain_ok
        and not server_errors
    )
    big_enough = loans >= LOANS
    figures = [
        Figure(
            "signing_load.errors",
            float(errors),
            "errors",
            f"== 0 over {sum(p.sent for p in phases)} requests, {loans} released and "
            f"broadcast (>= {LOANS} at once)",
            correct and big_enough,
        )
    ]
    for phase in phases:
        key = phase.name.replace("+", "_")
        figures.append(Figure(f"signing_load.{key}.p50_ms", phase.p50_ms, "ms", "info", True))
        figures.append(Figure(f"signing_load.{key}.p99_ms", phase.p99_ms, "ms", "info", True))
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench signing_load", description=__doc__)
    parser.add_argument("--loans", type=int, default=LOANS)
    parser.add_argument("--workers", type=int, default=WORKERS)
    parser.add_argument("--timeout", type=float, default=TIMEOUT)
    args = parser.parse_args(argv)
    if not 1 <= args.loans <= 1000 or not 1 <= args.workers <= 8 or args.timeout <= 0:
        parser.error("--loans in [1, 1000], --workers in [1, 8], --timeout > 0")
    figures = run(args.loans, workers=args.workers, timeout=args.timeout)
    for figure in figures:
        print(figure.line())
    return 0 if all(f.passed for f in figures) else 1


if __name__ == "__main__":
    sys.exit(main())
