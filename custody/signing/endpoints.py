"""Signing request endpoints: build, read, sign, broadcast, cancel, bump, approve. Routes that call
the node or the signer do so between short transactions of their own."""

from __future__ import annotations

import base64
import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import ValidationError

from custody.api.deps import (
    ChainDep,
    ContextDep,
    FeesDep,
    LoanId,
    RawBodyDep,
    SessionDep,
    SignerDep,
    SigningRequestId,
)
from custody.api.errors import BODY_ERRORS, errors_for, require_media_type
from custody.chain.rpc import RpcError
from custody.db.models import SigningAction, SigningRequest
from custody.db.session import transaction
from custody.errors import (
    AddressAlreadyIssued,
    AddressLimitReached,
    ApproveViaSignerStatement,
    BadSignature,
    BankApprovalRequired,
    BankDoesNotSign,
    CollateralChanged,
    FeeAboveCap,
    FeeBumpTooSmall,
    FeeRateOutOfRange,
    KeysIncomplete,
    LoanNotFound,
    LoanNotInState,
    MalformedBody,
    NodeNotConfigured,
    NodeUnavailable,
    NoNewSignature,
    PayoutAddressBlocked,
    PayoutAddressUnderReview,
    PricedBySigner,
    PsbtMismatch,
    RequestAlreadyOpen,
    RequestRefusedBySigner,
    RoleNotAllowed,
    SelfApproval,
    SignerNotConfigured,
    SigningRequestNotFound,
    SigningRequestNotInState,
    SingleAddressDescriptor,
)
from custody.screening.service import Screener, ScreeningConfig
from custody.signing import approvals, broadcast, building, cancel, repository, signatures
from custody.signing.psbt import CannotFinalize
from custody.signing.schemas import (
    FeeBump,
    PsbtOut,
    SignatureUpload,
    SigningRequestCreate,
    SigningRequestOut,
)
from hsm.signer import PolicyViolation, SignerError, SignerUnavailable
from pledge.errors import (
    CollateralBelowFee,
    FullLiquidationNeeded,
    InvalidInput,
    NoConfirmedCollateral,
    NotAuthenticated,
    NothingToSell,
)

router = APIRouter(prefix="/v1")

_READ = (NotAuthenticated, InvalidInput, SigningRequestNotFound)
# Finalizing a request at quorum and having the node check and send it.
_BROADCAST = (NodeNotConfigured, CannotFinalize, NodeUnavailable, RpcError)
# Building a transaction: the node's inputs and fee, the kernel's amounts, and when the
# bank's signer holds the bank key, its valuation and its statement.
_BUILD = (
    NotAuthenticated,
    InvalidInput,
    RoleNotAllowed,
    KeysIncomplete,
    PricedBySigner,
    FeeRateOutOfRange,
    FeeAboveCap,
    CollateralBelowFee,
    NothingToSell,
    FullLiquidationNeeded,
    NodeNotConfigured,
    NodeUnavailable,
    RpcError,
    SignerNotConfigured,
    SignerUnavailable,
    SignerError,
    PolicyViolation,
)


@router.post(
    "/loans/{loan_id}/signing-requests",
    status_code=201,
    tags=["signing"],
    responses=errors_for(
        *_BUILD,
        LoanNotFound,
        RequestAlreadyOpen,
        LoanNotInState,
        NoConfirmedCollateral,
        CollateralChanged,
        SingleAddressDescriptor,
        AddressLimitReached,
        AddressAlreadyIssued,
        RequestRefusedBySigner,
        PayoutAddressBlocked,
        PayoutAddressUnderReview,
        *BODY_ERRORS,
    ),
)
def create_signing_request(
    loan_id: LoanId,
    body: SigningRequestCreate,
    request: Request,
    ctx: ContextDep,
    chain: ChainDep,
    fees: FeesDep,
    signer: SignerDep,
) -> SigningRequestOut:
    """Build the PSBT (and, when the bank's signer holds the key, have it issue the
    statement to sign); the node and the signer are called with no transaction open."""
    params = building.RequestParams(
        action=SigningAction(body.action),
        fee_rate_sat_vb=body.fee_rate_sat_vb,
        price_rub_per_btc=body.price_rub_per_btc,
        price_source=body.price_source,
        target_ltv_bps=body.target_ltv_bps,
    )
    screener = Screener(ScreeningConfig.from_settings(request.app.state.settings))
    out = building.Callouts(chain, fees, signer, screener)
    req = building.open_request(request.app.state.engine, ctx, loan_id, params, out)
    return request_out(_unless_refused(req))


def _unless_refused(req: SigningRequest) -> SigningRequest:
    """A request the bank's signer refused is kept, cancelled, with its audit row; the
    answer is the refusal (422), for a new request and a fee bump alike."""
    if req.reject_reason and req.state == "cancelled":
        refusal = repository.evidence(req).get("signer_refusal", {})
        raise RequestRefusedBySigner(
            str(refusal.get("check")),
            str(refusal.get("reason")),
            message=req.reject_reason,
            request_id=req.id or 0,
        )
    return req


@router.get(
    "/loans/{loan_id}/signing-requests",
    tags=["signing"],
    responses=errors_for(NotAuthenticated, InvalidInput, LoanNotFound),
)
def list_signing_requests(
    loan_id: LoanId, session: SessionDep, ctx: ContextDep
) -> list[SigningRequestOut]:
    return [request_out(r) for r in repository.list_requests(session, ctx, loan_id)]


@router.get("/signing-requests/{request_id}", tags=["signing"], responses=errors_for(*_READ))
def get_signing_request(
    request_id: SigningRequestId, session: SessionDep, ctx: ContextDep
) -> SigningRequestOut:
    return request_out(repository.get_request(session, ctx, request_id))


@router.get("/signing-requests/{request_id}/psbt", tags=["signing"], responses=errors_for(*_READ))
def get_psbt(request_id: SigningRequestId, session: SessionDep, ctx: ContextDep) -> PsbtOut:
    """The PSBT with every signature collected so far (base64)."""
    req = repository.get_request(session, ctx, request_id)
    return PsbtOut(psbt=req.psbt, unsigned_txid=req.unsigned_txid)


@router.get(
    "/signing-requests/{request_id}/psbt.bin",
    tags=["signing"],
    response_class=Response,
    responses={
        200: {
            "description": "The PSBT file (BIP-174 binary, attachment)",
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
        },
        **errors_for(*_READ),
    },
)
def get_psbt_file(request_id: SigningRequestId, session: SessionDep, ctx: ContextDep) -> Response:
    """The same PSBT as a binary .psbt file, for air-gapped devices (SD card)."""
    req = repository.get_request(session, ctx, request_id)
    return Response(
        base64.b64decode(req.psbt),
        media_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="request-{request_id}.psbt"'},
    )


# The upload reads its body itself (JSON or the binary file), so FastAPI cannot describe
# it: the document says what it takes, so that clients and fuzzers can call it.
_SIGNATURE_UPLOAD: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": 'The signed PSBT: JSON `{"psbt": base64}`, or the binary .psbt file.',
        "content": {
            "application/json": {"schema": SignatureUpload.model_json_schema()},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
_UPLOAD_TYPES = ("application/json", "application/octet-stream")


@router.post(
    "/signing-requests/{request_id}/signatures",
    tags=["signing"],
    openapi_extra=_SIGNATURE_UPLOAD,
    responses=errors_for(
        *_READ,
        *BODY_ERRORS,
        RoleNotAllowed,
        SigningRequestNotInState,
        KeysIncomplete,
        PsbtMismatch,
        BadSignature,
        NoNewSignature,
        BankApprovalRequired,
        *_BROADCAST,
    ),
)
def upload_signatures(
    request_id: SigningRequestId,
    request: Request,
    raw: RawBodyDep,
    ctx: ContextDep,
    chain: ChainDep,
) -> SigningRequestOut:
    """A signed PSBT: JSON {"psbt": base64}, or the binary file (application/octet-stream).
    Only new, verified signatures are kept; anything wrong refuses the whole upload. At
    quorum the transaction is broadcast after the signatures are committed."""
    kind = require_media_type(request.headers.get("content-type"), *_UPLOAD_TYPES)
    data: bytes | str = raw
    if kind == "application/json":
        try:
            data = SignatureUpload.model_validate_json(raw).psbt
        except ValidationError as exc:
            if any(e["type"] == "json_invalid" for e in exc.errors()):
                raise MalformedBody("the request body is not valid JSON") from exc
            raise InvalidInput('body must be {"psbt": "<base64>"}', field="psbt") from exc
    engine = request.app.state.engine
    with transaction(engine) as session:
        req = signatures.add_signatures(session, ctx, request_id, data)
        ready = req.state == "ready"
    if ready:
        broadcast.broadcast_ready(engine, ctx.actor, request_id, chain)
    with transaction(engine) as session:
        return request_out(repository.get_request(session, ctx, request_id))


@router.post(
    "/signing-requests/{request_id}/broadcast",
    tags=["signing"],
    responses=errors_for(*_READ, RoleNotAllowed, SigningRequestNotInState, *_BROADCAST),
)
def retry_broadcast(
    request_id: SigningRequestId, request: Request, ctx: ContextDep, chain: ChainDep
) -> SigningRequestOut:
    """Broadcast a ready request again (the node refused it, or could not be reached)."""
    engine = request.app.state.engine
    with transaction(engine) as session:
        broadcast.check_ready(session, ctx, request_id)
    broadcast.broadcast_ready(engine, ctx.actor, request_id, chain)
    with transaction(engine) as session:
        return request_out(repository.get_request(session, ctx, request_id))


@router.post(
    "/signing-requests/{request_id}/cancel",
    tags=["signing"],
    responses=errors_for(*_READ, RoleNotAllowed, SigningRequestNotInState),
)
def cancel_signing_request(
    request_id: SigningRequestId, request: Request, ctx: ContextDep, signer: SignerDep
) -> SigningRequestOut:
    """Cancel it; its statement's approvals die with it (the signer is told after commit)."""
    engine = request.app.state.engine
    with transaction(engine) as session:
        req, nonce = cancel.cancel(session, ctx, request_id)
        out = request_out(req)
    if nonce is not None:
        cancel.kill_statement(engine, ctx, req, nonce, signer)
    return out


@router.post(
    "/signing-requests/{request_id}/bump",
    status_code=201,
    tags=["signing"],
    responses=errors_for(
        *_BUILD,
        SigningRequestNotFound,
        SigningRequestNotInState,
        FeeBumpTooSmall,
        RequestAlreadyOpen,
        RequestRefusedBySigner,
        *BODY_ERRORS,
    ),
)
def bump_fee(
    request_id: SigningRequestId,
    body: FeeBump,
    request: Request,
    ctx: ContextDep,
    chain: ChainDep,
    fees: FeesDep,
    signer: SignerDep,
) -> SigningRequestOut:
    """Replace a stuck broadcast request by one paying more (RBF); it must be signed again.
    The signer is asked for its valuation and statement with no transaction open."""
    engine = request.app.state.engine
    req = _unless_refused(
        building.open_bump(
            engine, ctx, request_id, body.fee_rate_sat_vb, building.Callouts(chain, fees, signer)
        )
    )
    with transaction(engine) as session:
        return request_out(repository.get_request(session, ctx, req.id or 0))


@router.post(
    "/signing-requests/{request_id}/approve",
    tags=["signing"],
    responses=errors_for(
        *_READ,
        RoleNotAllowed,
        SigningRequestNotInState,
        BankDoesNotSign,
        ApproveViaSignerStatement,
        SelfApproval,
    ),
)
def approve(
    request_id: SigningRequestId, session: SessionDep, ctx: ContextDep
) -> SigningRequestOut:
    """A bank approver signs off on this exact transaction when the bank signs with its
    own device (an xpub key). When the bank's signer holds the key, approvals are
    signatures over its statement (`POST /v1/signer-statements/{id}/endorsements`)."""
    return request_out(approvals.approve(session, ctx, request_id).request)


def request_out(req: SigningRequest) -> SigningRequestOut:
    assert req.id is not None
    ev = json.loads(req.evidence_json)
    return SigningRequestOut(
        id=req.id,
        loan_id=req.loan_id,
        action=req.action,
        state=req.state,
        unsigned_txid=req.unsigned_txid,
        required_seats=req.required_seats.split(","),
        signed_seats=[s for s in req.signed_seats.split(",") if s],
        outputs=json.loads(req.outputs_json),
        fee_sats=req.fee_sats,
        evidence=ev,
        replaces_id=req.replaces_id,
        mined_height=req.mined_height,
        reject_reason=req.reject_reason,
        created_at=req.created_at,
        signer_statement_id=ev.get("signer_statement_id"),
    )
