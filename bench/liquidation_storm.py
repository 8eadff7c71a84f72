"""Benchmark: a liquidation storm in the risk engine.

Target (issue "Risk engine", section Speed): a price crash puts 1,000 active loans
over the liquidation threshold at once; all 1,000 liquidation requests are built,
policy-checked, signed by the SoftHSM2 bank key and stored within 30 s (SQLite).

Set-up (not timed): a fresh migrated SQLite database and a fresh SoftHSM2 token;
1,000 loans made through the loans service, each with seeded miner and arbiter HD
keys and a bank key generated in the token (timed separately: it is set-up, not the
storm); each loan active with one confirmed deposit recorded as the watcher would.
No node: the collateral transactions are real embit transactions paying each
loan's script, served by an in-memory chain stub (only the bank signs, so the
request never reaches test_mempool_accept/send, and the stub refuses them).
Timed: ONE `RiskEngine.run_once()` at the crash price, with a freshly opened
signer (no public keys cached from key generation, as after a restart). The run
then checks 1,000 requests exist, all signed by the bank alone, and verifies the
bank's signatures in a sample of PSBTs with embit.

``python -m bench.liquidation_storm [--loans N] [--profile]`` runs it alone;
``--profile`` times the pass under cProfile and prints where it goes.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from embit import bip32
from embit.ec import PublicKey, Signature
from embit.psbt import PSBT
from embit.script import Script
from embit.transaction import SIGHASH, Transaction, TransactionInput, TransactionOutput
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, func, select

from bench import Figure
from bench.common import seat_contexts, timed
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
from custody.loans.service import create_loan, generate_bank_hsm_key, register_key
from custody.risk.engine import RiskEngine, RiskReport
from custody.risk.prices import ManualPriceSource, MedianPriceSource
from custody.signing.service import FeePolicy
from hsm.pkcs11_backend import HsmKeyInfo, Pkcs11Signer
from hsm.softhsm import SoftHsmToken, create_token
from pledge.network import NetworkName

SEED = 20240917
LOANS = 1_000
TARGET_SECONDS = 30.0
SPOT_CHECKS = 50
NETWORK: NetworkName = "regtest"

PRINCIPAL_KOPECKS = 1_000_000_00  # 1,000,000 RUB
COLLATERAL_SATS = 50_000_000  # 0.5 BTC: 33% LTV at the normal price
NORMAL_PRICE = Decimal(6_000_000)
CRASH_PRICE = Decimal(2_100_000)  # 1M RUB / (0.5 BTC x 2.1M) = 95% >= the 90% threshold
MINER_RETURN = "bcrt1qw508d6qejxtdg4y5r3zarvary0c5xw7kygt080"
BANK_LIQUIDATION = "bcrt1qrp33g0q5c5txsp9arysrx4k6zdkfs4nce4xj0gdcccefvpysxf3qzf4jry"
_TPUB = bytes.fromhex("043587cf")


# -- price and chain stubs -------------------------------------------------------------


def crash_prices(price: Decimal) -> MedianPriceSource:
    """The real price path: a desk price (manual source) behind the median."""
    desk = ManualPriceSource("bench-desk")
    desk.set(price, datetime.now(UTC), "bench")
    return MedianPriceSource([desk], max_age=timedelta(hours=1), max_spread_bps=200)


class StubChain:
    """Real transactions paying the loans' scripts, served as a node would. Broadcasting
    is never expected (only the bank signs): reaching it is a benchmark failure."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.txs: dict[str, bytes] = {}
        self.fetches = 0

    def pay(self, script_pubkey: bytes, amount: int) -> str:
        tx = Transaction(
            vin=[TransactionInput(self.rng.randbytes(32), 0)],
            vout=[TransactionOutput(amount, Script(script_pubkey))],
        )
        txid: str = tx.txid().hex()
        self.txs[txid] = tx.serialize()
        return txid

    def get_raw_transaction(self, txid: str, block_hash: str | None = None) -> bytes:
        self.fetches += 1
        return self.txs[txid]

    def estimate_fee_rate_sat_vb(self, conf_target: int) -> float | None:
        return None  # the fee policy's floor applies

    def test_mempool_accept(self, tx_hex: str, max_fee_rate_btc_kvb: float = 0.1) -> dict[str, Any]:
        raise AssertionError("a bank-only signature must not reach the mempool check")

    def send_raw_transaction(self, tx_hex: str) -> str:
        raise AssertionError("a bank-only signature must not be broadcast")


class _TimedKeys:
    """The loans service's key generator, timing the HSM's part of it."""

    def __init__(self, signer: Pkcs11Signer) -> None:
        self.signer = signer
        self.seconds = 0.0

    def generate_loan_key(
        self,
        loan_ref: str,
        *,
        network: str,
        miner_return_address: str,
        bank_liquidation_address: str,
    ) -> HsmKeyInfo:
        t0 = time.perf_counter()
        try:
            return self.signer.generate_loan_key(loan_ref)
        finally:
            self.seconds += time.perf_counter() - t0


# -- set-up ------------------------------------------------------------------------------


def _hd_key(rng: random.Random) -> str:
    """A BIP-48 P2WSH account key with origin, as a hardware wallet exports it."""
    root = bip32.HDKey.from_seed(rng.randbytes(32))
    account = root.derive("m/48h/1h/0h/2h").to_public()
    return f"[{root.my_fingerprint.hex()}/48h/1h/0h/2h]{account.to_base58(_TPUB)}"


@dataclass(frozen=True)
class SetUp:
    loans: int
    seconds: float
    keygen_seconds: float


def make_loans(
    engine: Engine, keys: _TimedKeys, chain: StubChain, count: int, seed: int = SEED
) -> SetUp:
    """`count` active loans (HD miner/arbiter keys, HSM bank key), each with one
    confirmed deposit of COLLATERAL_SATS, made through the loans service."""
    t0 = time.perf_counter()
    rng = random.Random(seed)
    maturity = datetime.now(UTC) + timedelta(days=180)
    with transaction(engine) as session:
        ctx = seat_contexts(session, "storm", NETWORK)
        for _ in range(count):
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
            generate_bank_hsm_key(session, ctx[KeyRole.bank], loan.id, keys)
        addresses = session.exec(
            select(CollateralAddress).where(CollateralAddress.index == 0)
        ).all()
        for addr in addresses:
            txid = chain.pay(bytes.fromhex(addr.script_pubkey_hex), COLLATERAL_SATS)
            session.add(
                Deposit(
                    loan_id=addr.loan_id,
                    address_id=addr.id or 0,
                    txid=txid,
                    vout=0,
                    amount_sats=COLLATERAL_SATS,
                    state=DepositState.confirmed,
                    block_height=1,
                    block_hash="00" * 32,
                    required_confirmations=1,
                )
            )
        for loan in session.exec(select(Loan)).all():
            loan.state = LoanState.active
            session.add(loan)
    return SetUp(len(addresses), time.perf_counter() - t0, keys.seconds)


# -- the measured pass and its checks ------------------------------------------------------


@dataclass(frozen=True)
class Storm:
    seconds: float
    report: RiskReport
    profile: str | None


def storm(
    engine: Engine, token: SoftHsmToken, chain: StubChain, count: int, *, profile: bool
) -> Storm:
    """One risk pass at the crash price with a freshly opened signer; only the pass is timed."""
    signer = Pkcs11Signer(token.module_path, token.label, token.pin)
    try:
        risk = RiskEngine(
            engine,
            network=NETWORK,
            prices=crash_prices(CRASH_PRICE),
            chain=chain,
            signer=signer,
            fees=FeePolicy(),
            daily_limit_sats=2 * count * COLLATERAL_SATS,  # the storm is not what it limits
        )
        report, seconds, text = timed(risk.run_once, profile=profile, top=45)
    finally:
        signer.close()
    return Storm(seconds, report, text)


@dataclass(frozen=True)
class Checked:
    requests: int
    bank_signed: int
    liquidating: int
    signed_events: int
    spot_checked: int
    spot_ok: int
    spot_detail: str


def _bank_signature_ok(psbt_b64: str, bank_pub: bytes) -> bool:
    """Every input carries a bank signature that verifies against its BIP-143 sighash."""
    psbt = PSBT.from_string(psbt_b64)
    pub = PublicKey.parse(bank_pub)
    tx = psbt.tx
    for i, inp in enumerate(psbt.inputs):
        sig = inp.partial_sigs.get(pub)
        if sig is None or sig[-1] != SIGHASH.ALL or inp.witness_utxo is None:
            return False
        digest = tx.sighash_segwit(i, inp.witness_script, inp.witness_utxo.value, SIGHASH.ALL)
        if not pub.verify(Signature.parse(sig[:-1]), digest):
            return False
    return bool(psbt.inputs)


def check(engine: Engine, spot_checks: int, seed: int = SEED) -> Checked:
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
        signed_events = int(
            session.exec(
                select(func.count())
                .select_from(AuditEvent)
                .where(col(AuditEvent.action) == "signer.signed")
            ).one()
        )
        bank_pubs = {
            k.loan_id: bytes.fromhex(k.public_key_hex or "")
            for k in session.exec(select(LoanKey).where(LoanKey.role == KeyRole.bank)).all()
        }
    sample = random.Random(seed + 1).sample(list(reqs), min(spot_checks, len(reqs)))
    bad = [r.id for r in sample if not _bank_signature_ok(r.psbt, bank_pubs[r.loan_id])]
    detail = "all verify" if not bad else f"bad: requests {bad[:10]}"
    return Checked(
        len(reqs),
        bank_signed,
        liquidating,
        signed_events,
        len(sample),
        len(sample) - len(bad),
        detail,
    )


def run(
    loans: int = LOANS, *, profile: bool = False, spot_checks: int = SPOT_CHECKS
) -> list[Figure]:
    """Build the loans and the token, time the storm, check what it stored."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-storm-") as tmp:
        token = create_token(Path(tmp) / "softhsm", "bench-storm")
        engine = make_engine(f"sqlite:///{Path(tmp) / 'custody.db'}")
        upgrade(engine)
        chain = StubChain(random.Random(SEED + 2))
        keygen_signer = Pkcs11Signer(token.module_path, token.label, token.pin)
        try:
            setup = make_loans(engine, _TimedKeys(keygen_signer), chain, loans)
        finally:
            keygen_signer.close()
        print(
            f"liquidation_storm: {setup.loans} active loans in {setup.seconds:.1f} s, of which "
            f"{setup.keygen_seconds:.1f} s generating {setup.loans} bank keys in SoftHSM2 "
            f"({setup.loans / max(setup.keygen_seconds, 1e-9):.0f} keys/s)",
            flush=True,
        )
        result = storm(engine, token, chain, loans, profile=profile)
        checked = check(engine, spot_checks)
        engine.dispose()

    report = result.report
    rate = len(report.liquidations) / result.seconds
    print(
        f"liquidation_storm: one risk pass over {report.loans} loans at {report.price}: "
        f"{len(report.liquidations)} liquidations in {result.seconds:.2f} s = {rate:.1f} loans/s "
        f"({result.seconds / max(len(report.liquidations), 1) * 1e3:.1f} ms per loan); "
        f"{len(report.errors)} errors, {chain.fetches} prev-tx fetches"
    )
    for loan_id, error in list(report.errors.items())[:5]:
        print(f"liquidation_storm: loan {loan_id}: {error}")
    print(
        f"liquidation_storm: {checked.requests} signing requests, {checked.bank_signed} "
        f"liquidations awaiting the arbiter with signed_seats == 'bank', "
        f"{checked.liquidating} loans liquidating, {checked.signed_events} signer.signed events; "
        f"bank signatures in {checked.spot_checked} sampled PSBTs: {checked.spot_detail}"
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
        and checked.spot_ok == checked.spot_checked > 0
    )
    big_enough = loans >= LOANS
    return [
        Figure("liquidation_storm.setup_seconds", setup.seconds, "s", "info", True),
        Figure(
            "liquidation_storm.keygen_seconds", setup.keygen_seconds, "s", "info (set-up)", True
        ),
        Figure(
            "liquidation_storm.requests_signed_and_stored",
            float(checked.bank_signed),
            "requests",
            f"== {loans} loans (>= {LOANS}), bank-signed, no errors",
            correct and big_enough,
        ),
        Figure("liquidation_storm.loans_per_s", rate, "loans/s", "info", True),
        Figure(
            "liquidation_storm.seconds",
            result.seconds,
            "s",
            f"<= {TARGET_SECONDS:g}" + (" (under cProfile)" if profile else ""),
            result.seconds <= TARGET_SECONDS,
        ),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.liquidation_storm", description=__doc__)
    parser.add_argument("--loans", type=int, default=LOANS)
    parser.add_argument("--spot-checks", type=int, default=SPOT_CHECKS)
    parser.add_argument("--profile", action="store_true", help="time the pass under cProfile")
    args = parser.parse_args(argv)
    if args.loans < 1 or args.spot_checks < 1:
        parser.error("need >= 1 loan and >= 1 spot check")
    figures = run(args.loans, profile=args.profile, spot_checks=args.spot_checks)
    for figure in figures:
        print(figure.line())
    return 0 if all(f.passed for f in figures) else 1


if __name__ == "__main__":
    sys.exit(main())
