"""Database rows -> response bodies. Only public material crosses this line."""

from __future__ import annotations

from collections.abc import Sequence

from sqlmodel import Session

from custody.db.models import CollateralAddress, DepositState, Loan, LoanKey
from custody.loans import repository
from custody.loans.repository import KeyColumns
from custody.loans.schemas import (
    AddressOut,
    CollateralOut,
    DepositOut,
    KeyOut,
    LoanOut,
    TermsOut,
)


def key_out(key: LoanKey | KeyColumns) -> KeyOut:
    return KeyOut(
        role=key.role,
        kind=key.kind,
        party_id=key.party_id,
        descriptor_key=key.descriptor_key,
        fingerprint=key.fingerprint,
        origin_path=key.origin_path,
        xpub=key.xpub,
        public_key=key.public_key_hex,
        hsm_key_label=key.hsm_key_label,
        hsm_local=key.hsm_local,
        hsm_never_extractable=key.hsm_never_extractable,
    )


def loan_out(session: Session, loan: Loan) -> LoanOut:
    return loans_out(session, [loan])[0]


def loans_out(session: Session, loans: Sequence[Loan]) -> list[LoanOut]:
    """Loans as the API shows them, in three queries whatever their number: the keys,
    the first addresses and the deposit sums of all of them at once (a page of the loan
    list once cost three queries per loan)."""
    ids = [loan.id for loan in loans if loan.id is not None]
    if not ids:
        return []
    keys = repository.keys_of_loans(session, ids)
    first_addresses = repository.first_addresses(session, ids)
    sums = repository.deposit_sums(session, ids)
    return [
        _loan_out(
            loan,
            keys.get(loan.id, []),
            first_addresses.get(loan.id),
            _collateral(
                loan,
                confirmed=sums.get((loan.id, DepositState.confirmed), 0),
                pending=sums.get((loan.id, DepositState.pending), 0),
            ),
        )
        for loan in loans
        if loan.id is not None
    ]


def _loan_out(
    loan: Loan,
    keys: Sequence[LoanKey | KeyColumns],
    collateral_address: str | None,
    collateral: CollateralOut,
) -> LoanOut:
    assert loan.id is not None
    return LoanOut(
        id=loan.id,
        state=loan.state,
        miner_party_id=loan.miner_party_id,
        bank_party_id=loan.bank_party_id,
        arbiter_party_id=loan.arbiter_party_id,
        terms=TermsOut(
            principal_kopecks=loan.principal_kopecks,
            interest_rate_bps=loan.interest_rate_bps,
            maturity_at=loan.maturity_at,
            required_collateral_sats=loan.required_collateral_sats,
            target_ltv_bps=loan.target_ltv_bps,
            price_rub_per_btc=loan.price_rub_per_btc,
            price_source=loan.price_source,
            margin_call_ltv_bps=loan.margin_call_ltv_bps,
            liquidation_ltv_bps=loan.liquidation_ltv_bps,
            cure_window_hours=loan.cure_window_hours,
            required_confirmations=loan.required_confirmations,
            miner_return_address=loan.miner_return_address,
            bank_liquidation_address=loan.bank_liquidation_address,
        ),
        keys=[key_out(k) for k in keys],
        descriptor=loan.descriptor,
        collateral_address=collateral_address,
        collateral=collateral,
        created_at=loan.created_at,
    )


def address_out(row: CollateralAddress) -> AddressOut:
    return AddressOut(index=row.index, change=row.change, address=row.address)


def _collateral(loan: Loan, *, confirmed: int, pending: int) -> CollateralOut:
    return CollateralOut(
        confirmed_sats=confirmed,
        pending_sats=pending,
        excess_sats=max(0, confirmed - loan.required_collateral_sats),
        required_sats=loan.required_collateral_sats,
    )


def deposits_out(session: Session, loan_id: int) -> list[DepositOut]:
    height = repository.chain_height(session)
    rows = repository.deposits_of_loan(session, loan_id)
    return [
        DepositOut(
            txid=d.txid,
            vout=d.vout,
            amount_sats=d.amount_sats,
            state=d.state,
            confirmations=0 if d.block_height is None else max(0, height - d.block_height + 1),
            required_confirmations=d.required_confirmations,
            block_height=d.block_height,
            excess_sats=d.excess_sats,
            spent_txid=d.spent_txid,
        )
        for d in rows
    ]
