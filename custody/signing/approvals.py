"""The bank's signature: an approver's 4-eyes decision for an xpub bank key, and the automatic
signature of the bank's signer for a liquidation."""

from __future__ import annotations

from dataclasses import dataclass

from sqlmodel import Session

from custody.audit.service import record
from custody.auth.context import Context
from custody.auth.policy import require_role
from custody.db.models import (
    Approval,
    KeyRole,
    RequestState,
    Role,
    SigningRequest,
)
from custody.errors import (
    ApproveViaSignerStatement,
    BankDoesNotSign,
    SelfApproval,
    SigningRequestNotFound,
    SigningRequestNotInState,
)
from custody.loans import repository as loans_repository
from custody.signing.building import refused_request
from custody.signing.repository import (
    approval_by,
    get_request,
    request_by_id,
    transaction_statement_of,
)
from custody.signing.signatures import add_signatures
from custody.signing.statements import bank_hsm_key
from hsm.client import Signed
from hsm.signer import PolicyViolation


@dataclass(frozen=True)
class HsmDecision:
    """What the bank's signer decided. A refusal is recorded and answered, not raised,
    so its audit event commits with the request."""

    request: SigningRequest
    refused: str | None = None
    check: str | None = None


def approve(session: Session, ctx: Context, request_id: int) -> HsmDecision:
    """A bank approver signs off on this exact transaction (4-eyes: the requester cannot),
    for a loan whose bank key is an xpub the bank signs with on its own device. When the
    bank's signer holds the key, its approvals are signatures over its statement instead."""

    req = get_request(session, ctx, request_id)
    require_role(ctx.principal, Role.bank_approver)
    loan = loans_repository.loan(session, req.loan_id)
    assert loan is not None
    if loan.bank_party_id != ctx.principal.party_id:
        raise SigningRequestNotFound()
    if req.state not in (RequestState.awaiting_signatures, RequestState.ready):
        raise SigningRequestNotInState(
            f"signing request {request_id} is {req.state}: nothing to approve"
        )
    if KeyRole.bank.value not in req.required_seats.split(","):
        raise BankDoesNotSign(f"a {req.action} is not signed by the bank")
    if bank_hsm_key(session, loan.id or 0) is not None:
        st = transaction_statement_of(session, request_id)
        where = f"signer statement {st.id}" if st is not None else "its signer statement"
        raise ApproveViaSignerStatement(
            "the bank's signer holds this loan's key: approve by signing "
            f"{where} (`custody approve {request_id} --key FILE`)"
        )
    if ctx.actor == req.created_by:
        raise SelfApproval("the requester cannot approve their own request (4-eyes)")
    already = approval_by(session, req.id, req.unsigned_txid, ctx.actor)
    if already is None:
        session.add(
            Approval(
                request_id=req.id or 0,
                unsigned_txid=req.unsigned_txid,
                principal_id=ctx.principal.id or 0,
                principal=ctx.actor,
                role=str(ctx.principal.role),
            )
        )
        record(
            session,
            actor=ctx.actor,
            action="signing_request.approved",
            loan_id=loan.id,
            request_id=req.id,
            decision="approved",
            data={"unsigned_txid": req.unsigned_txid},
        )
    return HsmDecision(req)


def record_automatic_signature(
    session: Session,
    ctx: Context,
    request_id: int,
    outcome: Signed | PolicyViolation,
) -> HsmDecision:
    """What the bank's signer did with an automatic liquidation, asked outside any
    transaction: its signatures taken like any upload (at quorum the caller broadcasts
    after commit), or its refusal recorded (and the request cancelled, so the next risk
    pass starts again from fresh figures)."""
    req = request_by_id(session, request_id)
    assert req is not None
    if isinstance(outcome, PolicyViolation):
        refused_request(session, ctx, req, outcome)
        return HsmDecision(req, refused=outcome.reason, check=outcome.check)
    record(
        session,
        actor=ctx.actor,
        action="signer.signed",
        loan_id=req.loan_id,
        request_id=req.id,
        decision="signed",
        reason=outcome.authorized,
        data={"automatic": True, "fee_sats": outcome.report.get("fee_sats")},
    )
    return HsmDecision(add_signatures(session, ctx, request_id, outcome.psbt, via="hsm"))
