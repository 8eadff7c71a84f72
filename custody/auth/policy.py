"""Who may see and do what. One place, so the endpoint x role tests check one set of rules.

Miners and arbiters see only loans they are a party to; a loan they may not see
answers 404, not 403, so its existence is not revealed.
"""

from __future__ import annotations

from sqlalchemy.sql.elements import ColumnElement
from sqlmodel import col, false, true

from custody.db.models import KeyRole, Loan, Principal, Role
from custody.errors import LoanNotFound, RoleNotAllowed, SeatNotYours

BANK_STAFF = frozenset({Role.bank_operator, Role.bank_approver})
READ_ALL = frozenset(
    {
        Role.bank_operator,
        Role.bank_approver,
        Role.compliance_officer,
        Role.auditor,
        Role.admin,
        Role.risk_engine,
    }
)


def require_role(principal: Principal, *roles: Role) -> None:
    if principal.role not in roles:
        allowed = ", ".join(sorted(r.value for r in roles))
        raise RoleNotAllowed(f"role {principal.role} may not do this (allowed: {allowed})")


def can_view_loan(principal: Principal, loan: Loan) -> bool:
    if principal.role in READ_ALL:
        return principal.role not in BANK_STAFF or loan.bank_party_id == principal.party_id
    if principal.role == Role.miner:
        return loan.miner_party_id == principal.party_id
    if principal.role == Role.arbiter:
        return loan.arbiter_party_id == principal.party_id
    return False


def visible_loans_clause(principal: Principal) -> ColumnElement[bool]:
    """The SQL twin of can_view_loan, for listings."""
    if principal.role in BANK_STAFF:
        return col(Loan.bank_party_id) == principal.party_id
    if principal.role in READ_ALL:
        return true()
    if principal.role == Role.miner:
        return col(Loan.miner_party_id) == principal.party_id
    if principal.role == Role.arbiter:
        return col(Loan.arbiter_party_id) == principal.party_id
    return false()


def ensure_can_view(principal: Principal, loan: Loan | None) -> Loan:
    """The loan, if it exists and the caller may see it; else the one 404 that a loan
    that does not exist gets (same body: no id in it)."""
    if loan is None or not can_view_loan(principal, loan):
        raise LoanNotFound()
    return loan


def seat_for(principal: Principal, loan: Loan, seat: KeyRole) -> None:
    """May this principal register the key of `seat` on this (visible) loan?"""
    expected = {
        KeyRole.miner: (Role.miner, loan.miner_party_id),
        KeyRole.bank: (Role.bank_operator, loan.bank_party_id),
        KeyRole.arbiter: (Role.arbiter, loan.arbiter_party_id),
    }[seat]
    if principal.role != expected[0] or principal.party_id != expected[1]:
        raise SeatNotYours(
            f"only the loan's {seat.value} seat ({expected[0].value}) registers this key"
        )
