"""Endpoints for the bank's signer: statements that register a loan's bank key, repayments and
people, and the endorsements that take them to the signer (called with no transaction open)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Request

from custody.api.deps import (
    ContextDep,
    LoanId,
    SessionDep,
    SignerDep,
    SignerStatementId,
    SigningRequestId,
)
from custody.api.errors import BODY_ERRORS, errors_for
from custody.chain.rpc import RpcError
from custody.db.session import transaction
from custody.errors import (
    AddressAlreadyIssued,
    AlreadyEndorsed,
    BadSignature,
    BankKeyNotInSigner,
    BankKeyRequestOpen,
    CompliancePending,
    KeyInTwoSeats,
    KeyOfAnotherParty,
    KeySeatTaken,
    KeySetReused,
    KeysIncomplete,
    LoanNotFound,
    LoanNotInState,
    NoNewSignature,
    PsbtMismatch,
    RoleNotAllowed,
    SeatNotYours,
    SignerDescriptorMismatch,
    SignerNotConfigured,
    SignerStatementNotFound,
    SignerStatementNotInState,
    SignerStatementUnsigned,
    SigningRequestNotFound,
    SigningRequestNotInState,
)
from custody.signer import service as signer_statements
from custody.signer.schemas import (
    ApprovalChallengeOut,
    BankKeyIn,
    EndorsementIn,
    EnrolmentIn,
    RepaymentIn,
)
from custody.signing.psbt import CannotFinalize
from pledge.errors import InvalidInput, NotAuthenticated

router = APIRouter(prefix="/v1")

# A signed statement taken to the bank's signer, and what applying its answer may meet:
# the loan's bank key stored (as any key), or its signatures added to the request.
_TO_THE_SIGNER = (
    NotAuthenticated,
    InvalidInput,
    SignerStatementNotFound,
    RoleNotAllowed,
    SignerStatementNotInState,
    SignerNotConfigured,
    LoanNotInState,
    KeySeatTaken,
    KeyInTwoSeats,
    KeyOfAnotherParty,
    KeySetReused,
    AddressAlreadyIssued,
    SignerDescriptorMismatch,
    CompliancePending,
    KeysIncomplete,
    SigningRequestNotInState,
    PsbtMismatch,
    BadSignature,
    NoNewSignature,
    CannotFinalize,
    RpcError,
)


@router.post(
    "/loans/{loan_id}/keys/bank/hsm",
    status_code=201,
    tags=["keys"],
    responses=errors_for(
        NotAuthenticated,
        InvalidInput,
        LoanNotFound,
        SeatNotYours,
        LoanNotInState,
        KeySeatTaken,
        KeysIncomplete,
        BankKeyRequestOpen,
        CompliancePending,
        *BODY_ERRORS,
    ),
)
def request_bank_key(
    loan_id: LoanId, session: SessionDep, ctx: ContextDep, body: BankKeyIn | None = None
) -> dict[str, Any]:
    """Open the statement that registers this loan with the bank's signer; once a bank
    operator and an approver have signed it, the signer makes the bank key (by default an
    HD account of the seed its HSM seals; `{"kind": "fixed"}` for a key that never leaves
    the token) and builds the descriptor (the miner's and the arbiter's keys come first)."""
    kind = (body or BankKeyIn()).kind
    st = signer_statements.request_bank_key(session, ctx, loan_id, kind=kind)
    return signer_statements.statement_view(session, st)


@router.post(
    "/loans/{loan_id}/repayments",
    status_code=201,
    tags=["keys"],
    responses=errors_for(
        NotAuthenticated,
        InvalidInput,
        LoanNotFound,
        RoleNotAllowed,
        BankKeyNotInSigner,
        *BODY_ERRORS,
    ),
)
def record_repayment(
    loan_id: LoanId, body: RepaymentIn, session: SessionDep, ctx: ContextDep
) -> dict[str, Any]:
    """Open the statement of a repayment; the bank's signer records it once signed."""
    st = signer_statements.request_repayment(
        session,
        ctx,
        loan_id,
        amount_kopecks=body.amount_kopecks,
        paid_at=body.paid_at,
        repayment_id=body.repayment_id,
    )
    return signer_statements.statement_view(session, st)


@router.post(
    "/signer-people",
    status_code=201,
    tags=["signing"],
    responses=errors_for(NotAuthenticated, RoleNotAllowed, InvalidInput, *BODY_ERRORS),
)
def enrol_person(body: EnrolmentIn, session: SessionDep, ctx: ContextDep) -> dict[str, Any]:
    """Open the statement that enrols a person (and their approval key) in the bank's
    signer; two admins enrolled in the signer sign it."""
    st = signer_statements.request_enrolment(
        session,
        ctx,
        name=body.name,
        role=body.role,
        algorithm=body.algorithm,
        # hex keys are kept lower case; a passkey's base64url key exactly as sent
        public_key=body.public_key if body.algorithm == "webauthn" else body.public_key.lower(),
        passkey=(
            {"credential_id": body.credential_id, "rp_id": body.rp_id, "origins": body.origins}
            if body.algorithm == "webauthn"
            else None
        ),
    )
    return signer_statements.statement_view(session, st)


@router.post(
    "/signer-people/{name}/removal",
    status_code=201,
    tags=["signing"],
    responses=errors_for(NotAuthenticated, RoleNotAllowed, InvalidInput),
)
def remove_person(
    name: Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[a-z0-9._@-]+$")],
    session: SessionDep,
    ctx: ContextDep,
) -> dict[str, Any]:
    """Open the statement that removes a person from the bank's signer (two other
    enrolled admins sign it); nothing changes until the signer has checked them."""
    st = signer_statements.request_removal(session, ctx, name=name)
    return signer_statements.statement_view(session, st)


@router.get(
    "/signer-statements/{statement_id}",
    tags=["signing"],
    responses=errors_for(NotAuthenticated, InvalidInput, SignerStatementNotFound),
)
def get_signer_statement(
    statement_id: SignerStatementId, session: SessionDep, ctx: ContextDep
) -> dict[str, Any]:
    """A statement for the bank's signer: its exact bytes to sign and who signed so far."""
    st = signer_statements.get_statement(session, ctx, statement_id)
    return signer_statements.statement_view(session, st)


@router.post(
    "/signer-statements/{statement_id}/retry",
    tags=["signing"],
    responses=errors_for(*_TO_THE_SIGNER, SignerStatementUnsigned),
)
def retry_signer_statement(
    statement_id: SignerStatementId, request: Request, ctx: ContextDep, signer: SignerDep
) -> dict[str, Any]:
    """Take a signed statement to the bank's signer again after its call failed or was lost."""
    engine = request.app.state.engine
    with transaction(engine) as session:
        signer_statements.ready_to_retry(session, ctx, statement_id)
    signer_statements.execute(
        engine, statement_id, signer, ctx, getattr(request.app.state, "chain", None)
    )
    with transaction(engine) as session:
        st = signer_statements.get_statement(session, ctx, statement_id)
        return signer_statements.statement_view(session, st)


@router.post(
    "/signer-statements/{statement_id}/endorsements",
    tags=["signing"],
    responses=errors_for(*_TO_THE_SIGNER, AlreadyEndorsed, *BODY_ERRORS),
)
def endorse_signer_statement(
    statement_id: SignerStatementId,
    body: EndorsementIn,
    request: Request,
    ctx: ContextDep,
    signer: SignerDep,
) -> dict[str, Any]:
    """One enrolled person's signature, or their passkey's WebAuthn assertion over the
    statement's digest (`challenge`). With two, the statement goes to the bank's signer,
    which checks them itself; no database transaction is open while it is called."""
    engine = request.app.state.engine
    chain = getattr(request.app.state, "chain", None)
    with transaction(engine) as session:
        stored = signer_statements.stored_endorsement(
            body.signature, body.webauthn.model_dump() if body.webauthn is not None else None
        )
        st, ready = signer_statements.endorse(session, ctx, statement_id, body.person, stored)
    if ready:
        signer_statements.execute(engine, statement_id, signer, ctx, chain)
    with transaction(engine) as session:
        st = signer_statements.get_statement(session, ctx, statement_id)
        return signer_statements.statement_view(session, st)


@router.get(
    "/signing-requests/{request_id}/approval",
    tags=["signing"],
    response_model=ApprovalChallengeOut,
    responses=errors_for(
        NotAuthenticated,
        InvalidInput,
        SigningRequestNotFound,
        RoleNotAllowed,
        SigningRequestNotInState,
        SignerStatementNotInState,
    ),
)
def approval_challenge(
    request_id: SigningRequestId, session: SessionDep, ctx: ContextDep
) -> dict[str, Any]:
    """What an approver's passkey signs for this request: the bank's signer's statement,
    its canonical bytes and the WebAuthn challenge (base64url of its SHA-256), and the
    passkeys enrolled through this service that may still sign it (`allowCredentials`;
    the signer checks the assertion against its own enrolment, not this list). The
    assertion goes to `POST /v1/signer-statements/{statement_id}/endorsements`."""
    return signer_statements.approval_challenge(session, ctx, request_id)
