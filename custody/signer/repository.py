"""The signer domain's queries: signer statements and the signatures people gave them, the rows
a statement is about, and what the reconciler looks for (intents whose outcome is unknown).
Queries only: which rows count as unknown, and what is done with them, is decided in
`service.py` and `reconcile.py`."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import or_
from sqlmodel import Session, col, select

from custody.db.models import (
    Principal,
    RequestState,
    SignerEndorsement,
    SignerStatement,
    SigningRequest,
    StatementState,
)


def statement_by_id(session: Session, statement_id: int) -> SignerStatement | None:
    return session.get(SignerStatement, statement_id)


def request_by_id(
    session: Session, request_id: int, *, for_update: bool = False
) -> SigningRequest | None:
    """The signing request; `for_update` locks its row (PostgreSQL) for a re-checked write."""
    if for_update:
        return session.get(SigningRequest, request_id, with_for_update=True)
    return session.get(SigningRequest, request_id)


def open_statement_of_loan(session: Session, loan_id: int, kind: str) -> SignerStatement | None:
    """An open statement of this kind about the loan, if any."""
    return session.exec(
        select(SignerStatement).where(
            SignerStatement.loan_id == loan_id,
            SignerStatement.kind == kind,
            SignerStatement.state == StatementState.open,
        )
    ).first()


def done_statements_of_loan_except(
    session: Session, loan_id: int | None, kind: str, statement_id: int
) -> list[SignerStatement]:
    """The loan's done statements of this kind, but for `statement_id`."""
    return list(
        session.exec(
            select(SignerStatement).where(
                SignerStatement.loan_id == loan_id,
                SignerStatement.kind == kind,
                SignerStatement.state == StatementState.done,
                col(SignerStatement.id) != statement_id,
            )
        ).all()
    )


def endorsements(session: Session, statement_id: int) -> list[SignerEndorsement]:
    """The statement's signatures, in the order they were first given."""
    return list(
        session.exec(
            select(SignerEndorsement)
            .where(SignerEndorsement.statement_id == statement_id)
            .order_by(col(SignerEndorsement.id))
        ).all()
    )


def endorsers(session: Session, statement_id: int | None) -> list[str]:
    """Who signed the statement, in the order they first signed."""
    return list(
        session.exec(
            select(SignerEndorsement.person)
            .where(SignerEndorsement.statement_id == statement_id)
            .order_by(col(SignerEndorsement.id))
        ).all()
    )


def endorsement_by(session: Session, statement_id: int, person: str) -> SignerEndorsement | None:
    return session.exec(
        select(SignerEndorsement).where(
            SignerEndorsement.statement_id == statement_id, SignerEndorsement.person == person
        )
    ).first()


def endorsement_count(session: Session, statement_id: int) -> int:
    return len(
        session.exec(
            select(SignerEndorsement.id).where(SignerEndorsement.statement_id == statement_id)
        ).all()
    )


def open_statements_with_outcome_unknown(
    session: Session, updated_before: datetime, *, taken: str, unreachable: str
) -> list[SignerStatement]:
    """Open statements last touched before `updated_before` that hold the signer's answer,
    or whose outcome is `taken` or starts with `unreachable` (the markers of
    `custody.signer.service`)."""
    return list(
        session.exec(
            select(SignerStatement).where(
                SignerStatement.state == StatementState.open,
                col(SignerStatement.updated_at) < updated_before,
                or_(
                    col(SignerStatement.result).is_not(None),
                    col(SignerStatement.outcome) == taken,
                    col(SignerStatement.outcome).startswith(unreachable),
                ),
            )
        ).all()
    )


def requests_in_state_updated_before(
    session: Session, state: RequestState, updated_before: datetime
) -> list[SigningRequest]:
    return list(
        session.exec(
            select(SigningRequest).where(
                SigningRequest.state == state,
                col(SigningRequest.updated_at) < updated_before,
            )
        ).all()
    )


def principal_named(session: Session, role: str, name: str) -> Principal | None:
    return session.exec(
        select(Principal).where(Principal.name == name, Principal.role == role)
    ).first()


def done_statements_of_kinds(session: Session, kinds: tuple[str, ...]) -> list[SignerStatement]:
    """Statements of these kinds the signer acted on, in the order it did."""
    return list(
        session.exec(
            select(SignerStatement)
            .where(
                col(SignerStatement.kind).in_(kinds),
                SignerStatement.state == StatementState.done,
            )
            .order_by(col(SignerStatement.updated_at), col(SignerStatement.id))
        ).all()
    )
