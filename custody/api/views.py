"""Database rows -> response bodies. Only public material crosses this line."""

from __future__ import annotations

from sqlmodel import Session

from custody.db.models import CollateralAddress, Loan, LoanKey, Party, Principal
from custody.loans.schemas import AddressOut, KeyOut, LoanOut, PartyOut, PrincipalOut, TermsOut
from custody.loans.service import first_address, loan_keys


def key_out(key: LoanKey) -> KeyOut:
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
        keys=[key_out(k) for k in loan_keys(session, loan.id)],
        descriptor=loan.descriptor,
        collateral_address=first_address(session, loan.id),
        created_at=loan.created_at,
    )


def address_out(row: CollateralAddress) -> AddressOut:
    return AddressOut(index=row.index, change=row.change, address=row.address)


def party_out(party: Party) -> PartyOut:
    assert party.id is not None
    return PartyOut(id=party.id, name=party.name, kind=party.kind)


def principal_out(p: Principal) -> PrincipalOut:
    assert p.id is not None
    return PrincipalOut(
        id=p.id, name=p.name, role=p.role, party_id=p.party_id, key_prefix=p.key_prefix
    )
