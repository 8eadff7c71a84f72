"""Many ready loans at once, for scale and crash tests of the watcher.

The HTTP API costs four requests per loan; hundreds of loans that way would make
the test mostly about HTTP. Here the same domain services the routers call
(`create_loan`, `register_key`) run directly, all loans in one transaction, so the
rows, audit events and addresses are exactly what the API would have produced.
Keys are derived from a seed, so a seeded test gets the same addresses every run.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from embit import bip32
from sqlalchemy.engine import Engine
from sqlmodel import col, select
from support.kyc import approve_miner

from custody.auth.context import Context
from custody.auth.service import create_principal
from custody.db.models import CollateralAddress, KeyRole, Party, PartyKind, Principal, Role
from custody.db.session import transaction
from custody.loans.schemas import HDKeyIn, LoanCreate, LoanTermsIn
from custody.loans.service import create_loan, register_key
from pledge.network import NetworkName

MINER_RETURN = "bcrt1qw508d6qejxtdg4y5r3zarvary0c5xw7kygt080"
BANK_LIQUIDATION = "bcrt1qrp33g0q5c5txsp9arysrx4k6zdkfs4nce4xj0gdcccefvpysxf3qzf4jry"
_TPUB = bytes.fromhex("043587cf")


@dataclass(frozen=True)
class ReadyLoan:
    """A loan awaiting its deposit, with its first collateral address."""

    loan_id: int
    address: str
    script_pubkey_hex: str
    required_sats: int


def seeded_hd_key(seed: bytes, network_coin: int = 1) -> str:
    """A BIP-48 P2WSH account key with origin (what a hardware wallet exports),
    from a fixed seed: the same seed gives the same key and so the same addresses."""
    root = bip32.HDKey.from_seed(hashlib.sha256(seed).digest())
    path = f"m/48h/{network_coin}h/0h/2h"
    account = root.derive(path).to_public()
    return f"[{root.my_fingerprint.hex()}/48h/{network_coin}h/0h/2h]{account.to_base58(_TPUB)}"


def _principal(engine: Engine, tag: str, role: Role, kind: PartyKind) -> Principal:
    with transaction(engine) as session:
        party = Party(name=f"bulk-{tag}-{role.value}", kind=kind)
        session.add(party)
        session.flush()
        principal, _ = create_principal(
            session, name=f"bulk-{tag}-{role.value}", role=role, party_id=party.id, actor="test"
        )
        return principal


def create_ready_loans(
    engine: Engine,
    amounts: list[int],
    *,
    seed: str = "bulk",
    required_confirmations: int | None = None,
    network: NetworkName = "regtest",
) -> list[ReadyLoan]:
    """One ready loan per entry of `amounts` (its required collateral, in sats).

    Parties and principals are created fresh under the name prefix `bulk-<seed>`,
    so two calls with different seeds in one database do not collide.
    """
    operator = _principal(engine, seed, Role.bank_operator, PartyKind.bank)
    miner = _principal(engine, seed, Role.miner, PartyKind.miner)
    arbiter = _principal(engine, seed, Role.arbiter, PartyKind.arbiter)
    assert miner.party_id is not None and arbiter.party_id is not None
    with transaction(engine) as session:  # the miner through the compliance gate
        officer, _ = create_principal(
            session,
            name=f"bulk-{seed}-compliance",
            role=Role.compliance_officer,
            party_id=operator.party_id,
            actor="test",
        )
        approve_miner(session, miner.party_id, editor=operator, officer=officer, network=network)
    seats = (
        (KeyRole.miner, Context(miner, network)),
        (KeyRole.bank, Context(operator, network)),
        (KeyRole.arbiter, Context(arbiter, network)),
    )
    maturity = datetime.now(UTC) + timedelta(days=180)
    loan_ids: list[tuple[int, int]] = []
    with transaction(engine) as session:
        for i, required in enumerate(amounts):
            body = LoanCreate(
                miner_party_id=miner.party_id,
                arbiter_party_id=arbiter.party_id,
                terms=LoanTermsIn(
                    principal_kopecks=1_000_000_00,
                    interest_rate_bps=1_800,
                    maturity_at=maturity,
                    required_collateral_sats=required,
                    required_confirmations=required_confirmations,
                    miner_return_address=MINER_RETURN,
                    bank_liquidation_address=BANK_LIQUIDATION,
                ),
            )
            loan = create_loan(session, Context(operator, network), body)
            assert loan.id is not None
            for seat, ctx in seats:
                key = seeded_hd_key(f"{seed}/{i}/{seat.value}".encode())
                register_key(session, ctx, loan.id, seat, HDKeyIn(kind="hd", key=key))
            loan_ids.append((loan.id, required))
        ids = [loan_id for loan_id, _ in loan_ids]
        rows = session.exec(
            select(CollateralAddress).where(
                CollateralAddress.index == 0,
                CollateralAddress.change == False,  # noqa: E712 (SQL, not Python, equality)
                col(CollateralAddress.loan_id).in_(ids),
            )
        ).all()
        by_loan = {row.loan_id: row for row in rows}
        return [
            ReadyLoan(
                loan_id=loan_id,
                address=by_loan[loan_id].address,
                script_pubkey_hex=by_loan[loan_id].script_pubkey_hex,
                required_sats=required,
            )
            for loan_id, required in loan_ids
        ]
