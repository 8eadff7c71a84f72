"""Cancelling a request: close it, put the loan back, and kill its signer statement after commit."""

from __future__ import annotations

from sqlalchemy.engine import Engine
from sqlmodel import Session

from custody.audit.service import record
from custody.auth.context import Context
from custody.auth.policy import require_role
from custody.db.models import (
    LoanState,
    RequestState,
    SigningAction,
    SigningRequest,
    utcnow,
)
from custody.db.session import transaction
from custody.errors import SigningRequestNotInState
from custody.loans import repository as loans_repository
from custody.loans.service import change_state
from custody.signing.repository import get_request, transaction_statement_of
from custody.signing.rules import WHO_REQUESTS
from hsm.client import BankSigner
from hsm.signer import PolicyViolation
from pledge.errors import UpstreamUnavailable


def cancel(session: Session, ctx: Context, request_id: int) -> tuple[SigningRequest, str | None]:
    """Cancel an unbroadcast request; returns it with the nonce of the signer's statement
    to kill, which the caller tells the signer once this transaction has committed
    (`kill_statement`). Until then, or if the signer cannot be told, the statement is dead
    here (cancelled) and expires there on its own."""
    req = get_request(session, ctx, request_id)
    require_role(ctx.principal, *WHO_REQUESTS[SigningAction(req.action)])
    if req.state not in (RequestState.awaiting_signatures, RequestState.ready):
        raise SigningRequestNotInState(
            f"signing request {request_id} is {req.state}: only an unbroadcast request can be "
            "cancelled (a broadcast one can only be replaced by a fee bump)"
        )
    close_cancelled(session, ctx, req, reason=f"{req.action} cancelled")
    return req, _cancel_statement(session, req)


def _cancel_statement(session: Session, req: SigningRequest) -> str | None:
    from custody.db.models import StatementState

    st = transaction_statement_of(session, req.id or 0)
    if st is None or st.state != StatementState.open:
        return None
    st.state, st.updated_at = StatementState.cancelled, utcnow()
    session.add(st)
    return st.nonce


def kill_statement(
    engine: Engine, ctx: Context, req: SigningRequest, nonce: str, signer: BankSigner | None
) -> None:
    """Tell the signer a cancelled request's statement is dead (no transaction open)."""
    if signer is None:
        return
    try:
        signer.cancel(nonce)
    except (PolicyViolation, UpstreamUnavailable) as exc:
        with transaction(engine) as session:
            record(
                session,
                actor=ctx.actor,
                action="signer.cancel_failed",
                loan_id=req.loan_id,
                request_id=req.id,
                reason=str(exc),
            )


def cancel_unsigned(session: Session, ctx: Context, req: SigningRequest, *, reason: str) -> None:
    """Cancel an automatic request nobody will sign as it is (the risk engine's reconcile)."""
    close_cancelled(session, ctx, req, reason=reason)


def close_cancelled(session: Session, ctx: Context, req: SigningRequest, *, reason: str) -> None:
    req.state, req.open_key, req.updated_at = RequestState.cancelled, None, utcnow()
    session.add(req)
    record(
        session,
        actor=ctx.actor,
        action="signing_request.cancelled",
        loan_id=req.loan_id,
        request_id=req.id,
        reason=reason,
    )
    loan = loans_repository.loan(session, req.loan_id)
    assert loan is not None
    if req.replaces_id is None and str(loan.state) != req.loan_state_before:
        change_state(
            session,
            ctx.actor,
            loan,
            LoanState(req.loan_state_before),
            reason=reason,
        )
