"""HTTP endpoints under /v1. Thin: parse, call the domain service, render."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Path, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from custody.api.deps import (
    ChainDep,
    ContextDep,
    FeesDep,
    PrincipalDep,
    RawBodyDep,
    SessionDep,
    SettingsDep,
    SignerDep,
)
from custody.api.views import (
    address_out,
    deposits_out,
    loan_out,
    loans_out,
    party_out,
    principal_out,
    request_out,
)
from custody.audit.service import verify_chain
from custody.auth.policy import require_role
from custody.auth.service import authenticate, create_principal
from custody.bitcoin import exports
from custody.db.models import ChainCursor, KeyRole, PartyKind, Principal, Role, SigningAction
from custody.db.session import transaction
from custody.loans import service as loans
from custody.loans.schemas import (
    AddressOut,
    DepositOut,
    EndorsementIn,
    EnrolmentIn,
    FeeBump,
    KeyIn,
    LoanCreate,
    LoanOut,
    PartyCreate,
    PartyOut,
    PriceOut,
    PriceSet,
    PrincipalCreate,
    PrincipalCreated,
    PsbtOut,
    RepaymentIn,
    SignatureUpload,
    SigningRequestCreate,
    SigningRequestOut,
    WebhookCreate,
)
from custody.loans.service import Context
from custody.notify.outbox import list_webhooks, register_webhook
from custody.parties import service as parties
from custody.risk import manual as manual_prices
from custody.signer import service as signer_statements
from custody.signing import service as signing
from pledge.errors import InvalidInput, NotFound

router = APIRouter(prefix="/v1")

ExportFormat = Literal["descriptor", "coldcard", "bsms", "caravan"]


@router.get("/health", tags=["ops"])
def health(request: Request, session: SessionDep) -> dict[str, Any]:
    """Liveness plus the watcher's position: its last block and how far it lags the node."""
    cursor = session.get(ChainCursor, 1)
    watcher: dict[str, Any] | None = None
    if cursor is not None:
        updated = (
            cursor.updated_at if cursor.updated_at.tzinfo else cursor.updated_at.replace(tzinfo=UTC)
        )
        watcher = {
            "height": cursor.height,
            "block_hash": cursor.block_hash,
            "node_tip_height": cursor.node_tip_height,
            "lag_blocks": max(0, cursor.node_tip_height - cursor.height),
            "seconds_since_step": round((datetime.now(UTC) - updated).total_seconds(), 3),
        }
    return {"status": "ok", "network": request.app.state.settings.network, "watcher": watcher}


@router.get("/me", tags=["auth"])
def me(principal: PrincipalDep) -> dict[str, Any]:
    return principal_out(principal).model_dump()


@router.post("/principals", status_code=201, tags=["auth"])
def create_principal_endpoint(
    body: PrincipalCreate, session: SessionDep, principal: PrincipalDep
) -> PrincipalCreated:
    require_role(principal, Role.admin)
    created, api_key = create_principal(
        session,
        name=body.name,
        role=Role(body.role),
        party_id=body.party_id,
        actor=f"{principal.role}:{principal.name}",
    )
    return PrincipalCreated(**principal_out(created).model_dump(), api_key=api_key)


@router.post("/parties", status_code=201, tags=["parties"])
def create_party(body: PartyCreate, session: SessionDep, principal: PrincipalDep) -> PartyOut:
    return party_out(
        parties.create_party(session, principal, name=body.name, kind=PartyKind(body.kind))
    )


@router.get("/parties", tags=["parties"])
def list_parties(session: SessionDep, principal: PrincipalDep) -> list[PartyOut]:
    return [party_out(p) for p in parties.list_parties(session, principal)]


@router.get("/parties/{party_id}", tags=["parties"])
def get_party(party_id: int, session: SessionDep, principal: PrincipalDep) -> PartyOut:
    return party_out(parties.get_party(session, principal, party_id))


@router.post("/loans", status_code=201, tags=["loans"])
def create_loan(body: LoanCreate, session: SessionDep, ctx: ContextDep) -> LoanOut:
    return loan_out(session, loans.create_loan(session, ctx, body))


@router.get("/loans", tags=["loans"])
def list_loans(
    session: SessionDep,
    ctx: ContextDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> list[LoanOut]:
    return loans_out(session, loans.list_loans(session, ctx, limit=limit, offset=offset))


@router.get("/loans/{loan_id}", tags=["loans"])
def get_loan(loan_id: int, session: SessionDep, ctx: ContextDep) -> LoanOut:
    return loan_out(session, loans.get_loan(session, ctx, loan_id))


@router.put("/loans/{loan_id}/keys/{seat}", tags=["keys"])
def register_key(
    loan_id: int,
    seat: KeyRole,
    body: Annotated[KeyIn, Body()],
    session: SessionDep,
    ctx: ContextDep,
) -> LoanOut:
    return loan_out(session, loans.register_key(session, ctx, loan_id, seat, body))


@router.post("/loans/{loan_id}/keys/bank/hsm", status_code=201, tags=["keys"])
def request_bank_key(loan_id: int, session: SessionDep, ctx: ContextDep) -> dict[str, Any]:
    """Open the statement that registers this loan with the bank's signer; once a bank
    operator and an approver have signed it, the signer makes the bank key in its HSM
    and builds the descriptor (the miner's and the arbiter's keys come first)."""
    st = signer_statements.request_bank_key(session, ctx, loan_id)
    return signer_statements.statement_view(session, st)


@router.post("/loans/{loan_id}/repayments", status_code=201, tags=["keys"])
def record_repayment(
    loan_id: int, body: RepaymentIn, session: SessionDep, ctx: ContextDep
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


@router.post("/signer-people", status_code=201, tags=["signing"])
def enrol_person(body: EnrolmentIn, session: SessionDep, ctx: ContextDep) -> dict[str, Any]:
    """Open the statement that enrols a person (and their approval key) in the bank's
    signer; two admins enrolled in the signer sign it."""
    st = signer_statements.request_enrolment(
        session,
        ctx,
        name=body.name,
        role=body.role,
        algorithm=body.algorithm,
        public_key=body.public_key.lower(),
    )
    return signer_statements.statement_view(session, st)


@router.post("/signer-people/{name}/removal", status_code=201, tags=["signing"])
def remove_person(
    name: Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[a-z0-9._@-]+$")],
    session: SessionDep,
    ctx: ContextDep,
) -> dict[str, Any]:
    """Open the statement that removes a person from the bank's signer (two other
    enrolled admins sign it); nothing changes until the signer has checked them."""
    st = signer_statements.request_removal(session, ctx, name=name)
    return signer_statements.statement_view(session, st)


@router.get("/signer-statements/{statement_id}", tags=["signing"])
def get_signer_statement(statement_id: int, session: SessionDep, ctx: ContextDep) -> dict[str, Any]:
    """A statement for the bank's signer: its exact bytes to sign and who signed so far."""
    st = signer_statements.get_statement(session, ctx, statement_id)
    return signer_statements.statement_view(session, st)


@router.post("/signer-statements/{statement_id}/retry", tags=["signing"])
def retry_signer_statement(
    statement_id: int, request: Request, settings: SettingsDep, signer: SignerDep
) -> dict[str, Any]:
    """Take a signed statement to the bank's signer again after its call failed or was lost."""
    engine = request.app.state.engine
    ctx = _context(request, settings)
    with transaction(engine) as session:
        signer_statements.ready_to_retry(session, ctx, statement_id)
    signer_statements.execute(
        engine, statement_id, signer, ctx, getattr(request.app.state, "chain", None)
    )
    with transaction(engine) as session:
        st = signer_statements.get_statement(session, ctx, statement_id)
        return signer_statements.statement_view(session, st)


def _context(request: Request, settings: Any) -> Context:
    """Authenticate in a short transaction of its own (routes that call the signer must
    not hold the request's transaction open across that call)."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    with transaction(request.app.state.engine, write=False) as session:
        principal = authenticate(session, token.strip() if scheme.lower() == "bearer" else None)
    return Context(principal=principal, network=settings.network)


@router.post("/signer-statements/{statement_id}/endorsements", tags=["signing"])
def endorse_signer_statement(
    statement_id: int,
    body: EndorsementIn,
    request: Request,
    settings: SettingsDep,
    signer: SignerDep,
) -> dict[str, Any]:
    """One enrolled person's signature. With two, the statement goes to the bank's signer,
    which checks them itself; no database transaction is open while it is called."""
    engine = request.app.state.engine
    chain = getattr(request.app.state, "chain", None)
    ctx = _context(request, settings)
    with transaction(engine) as session:
        st, ready = signer_statements.endorse(
            session, ctx, statement_id, body.person, body.signature
        )
    if ready:
        signer_statements.execute(engine, statement_id, signer, ctx, chain)
    with transaction(engine) as session:
        st = signer_statements.get_statement(session, ctx, statement_id)
        return signer_statements.statement_view(session, st)


@router.post("/loans/{loan_id}/addresses", status_code=201, tags=["addresses"])
def new_address(loan_id: int, session: SessionDep, ctx: ContextDep) -> AddressOut:
    return address_out(loans.new_address(session, ctx, loan_id))


@router.get("/loans/{loan_id}/addresses", tags=["addresses"])
def list_addresses(loan_id: int, session: SessionDep, ctx: ContextDep) -> list[AddressOut]:
    return [address_out(a) for a in loans.list_addresses(session, ctx, loan_id)]


@router.get("/loans/{loan_id}/deposits", tags=["deposits"])
def list_deposits(loan_id: int, session: SessionDep, ctx: ContextDep) -> list[DepositOut]:
    loans.get_loan(session, ctx, loan_id)
    return deposits_out(session, loan_id)


@router.get("/loans/{loan_id}/export/{fmt}", tags=["exports"], response_model=None)
def export(
    loan_id: int, fmt: ExportFormat, session: SessionDep, ctx: ContextDep
) -> Response | dict[str, Any]:
    """Wallet files for the parties to check the collateral address on their own devices.
    A format that cannot express this loan answers 422 `unsupported` and says why."""
    loan = loans.get_loan(session, ctx, loan_id)
    descriptor = loans.loan_descriptor(session, loan, ctx.network)
    name = f"loan-{loan_id}"
    if fmt == "descriptor":
        return exports.export_descriptor(descriptor, name)
    if fmt == "caravan":
        return exports.export_caravan(descriptor, name)
    if fmt == "coldcard":
        return PlainTextResponse(
            exports.export_coldcard(descriptor, name),
            headers={"Content-Disposition": f'attachment; filename="{name}-coldcard.txt"'},
        )
    return PlainTextResponse(
        exports.export_bsms(descriptor, name),
        headers={"Content-Disposition": f'attachment; filename="{name}.bsms"'},
    )


@router.get("/audit/verify", tags=["audit"])
def audit_verify(session: SessionDep, principal: PrincipalDep) -> dict[str, Any]:
    require_role(principal, Role.auditor, Role.admin, Role.bank_approver)
    return verify_chain(session).as_dict()


@router.post(
    "/loans/{loan_id}/signing-requests", status_code=201, tags=["signing"], response_model=None
)
def create_signing_request(
    loan_id: int,
    body: SigningRequestCreate,
    request: Request,
    settings: SettingsDep,
    chain: ChainDep,
    fees: FeesDep,
    signer: SignerDep,
) -> SigningRequestOut | JSONResponse:
    """Build the PSBT (and, when the bank's signer holds the key, have it issue the
    statement to sign); the node and the signer are called with no transaction open."""
    ctx = _context(request, settings)
    params = signing.RequestParams(
        action=SigningAction(body.action),
        fee_rate_sat_vb=body.fee_rate_sat_vb,
        price_rub_per_btc=body.price_rub_per_btc,
        price_source=body.price_source,
        target_ltv_bps=body.target_ltv_bps,
    )
    req = signing.open_request(request.app.state.engine, ctx, loan_id, params, chain, fees, signer)
    if req.reject_reason and req.state == "cancelled":
        # the signer refused the PSBT: the cancelled request and the audit row are kept
        return JSONResponse(
            status_code=422,
            content={
                "error": "refused_by_signer",
                "message": req.reject_reason,
                "field": "psbt",
                "check": signing.evidence(req).get("signer_refusal", {}).get("check"),
                "request_id": req.id,
            },
        )
    return request_out(req)


@router.get("/loans/{loan_id}/signing-requests", tags=["signing"])
def list_signing_requests(
    loan_id: int, session: SessionDep, ctx: ContextDep
) -> list[SigningRequestOut]:
    return [request_out(r) for r in signing.list_requests(session, ctx, loan_id)]


@router.get("/signing-requests/{request_id}", tags=["signing"])
def get_signing_request(request_id: int, session: SessionDep, ctx: ContextDep) -> SigningRequestOut:
    return request_out(signing.get_request(session, ctx, request_id))


@router.get("/signing-requests/{request_id}/psbt", tags=["signing"])
def get_psbt(request_id: int, session: SessionDep, ctx: ContextDep) -> PsbtOut:
    """The PSBT with every signature collected so far (base64)."""
    req = signing.get_request(session, ctx, request_id)
    return PsbtOut(psbt=req.psbt, unsigned_txid=req.unsigned_txid)


@router.get("/signing-requests/{request_id}/psbt.bin", tags=["signing"], response_model=None)
def get_psbt_file(request_id: int, session: SessionDep, ctx: ContextDep) -> Response:
    """The same PSBT as a binary .psbt file, for air-gapped devices (SD card)."""
    req = signing.get_request(session, ctx, request_id)
    return Response(
        base64.b64decode(req.psbt),
        media_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="request-{request_id}.psbt"'},
    )


@router.post("/signing-requests/{request_id}/signatures", tags=["signing"])
def upload_signatures(
    request_id: int,
    request: Request,
    raw: RawBodyDep,
    settings: SettingsDep,
    chain: ChainDep,
) -> SigningRequestOut:
    """A signed PSBT: JSON {"psbt": base64}, or the binary file (application/octet-stream).
    Only new, verified signatures are kept; anything wrong refuses the whole upload. At
    quorum the transaction is broadcast after the signatures are committed."""
    ctx = _context(request, settings)
    if request.headers.get("content-type", "").startswith("application/json"):
        try:
            data: bytes | str = SignatureUpload.model_validate_json(raw).psbt
        except ValueError as exc:
            raise InvalidInput('body must be {"psbt": "<base64>"}', field="psbt") from exc
    else:
        data = raw
    engine = request.app.state.engine
    with transaction(engine) as session:
        req = signing.add_signatures(session, ctx, request_id, data, chain, broadcast=False)
        ready = req.state == "ready"
    if ready:
        signing.broadcast_ready(engine, ctx.actor, request_id, chain)
    with transaction(engine) as session:
        return request_out(signing.get_request(session, ctx, request_id))


@router.post("/signing-requests/{request_id}/broadcast", tags=["signing"])
def retry_broadcast(
    request_id: int, request: Request, settings: SettingsDep, chain: ChainDep
) -> SigningRequestOut:
    """Broadcast a ready request again (the node refused it, or could not be reached)."""
    engine = request.app.state.engine
    ctx = _context(request, settings)
    with transaction(engine) as session:
        signing.check_ready(session, ctx, request_id)
    signing.broadcast_ready(engine, ctx.actor, request_id, chain)
    with transaction(engine) as session:
        return request_out(signing.get_request(session, ctx, request_id))


@router.post("/signing-requests/{request_id}/cancel", tags=["signing"])
def cancel_signing_request(
    request_id: int, request: Request, settings: SettingsDep, signer: SignerDep
) -> SigningRequestOut:
    """Cancel it; its statement's approvals die with it (the signer is told after commit)."""
    engine = request.app.state.engine
    ctx = _context(request, settings)
    with transaction(engine) as session:
        req, nonce = signing.cancel(session, ctx, request_id)
        out = request_out(req)
    if nonce is not None:
        signing.kill_statement(engine, ctx, req, nonce, signer)
    return out


@router.post("/signing-requests/{request_id}/bump", status_code=201, tags=["signing"])
def bump_fee(
    request_id: int,
    body: FeeBump,
    request: Request,
    settings: SettingsDep,
    chain: ChainDep,
    fees: FeesDep,
    signer: SignerDep,
) -> SigningRequestOut:
    """Replace a stuck broadcast request by one paying more (RBF); it must be signed again.
    The signer is asked for its valuation and statement with no transaction open."""
    ctx = _context(request, settings)
    engine = request.app.state.engine
    req = signing.open_bump(engine, ctx, request_id, body.fee_rate_sat_vb, chain, fees, signer)
    with transaction(engine) as session:
        return request_out(signing.get_request(session, ctx, req.id or 0))


@router.post("/signing-requests/{request_id}/approve", tags=["signing"])
def approve(request_id: int, session: SessionDep, ctx: ContextDep) -> SigningRequestOut:
    """A bank approver signs off on this exact transaction when the bank signs with its
    own device (an xpub key). When the bank's signer holds the key, approvals are
    signatures over its statement (`POST /v1/signer-statements/{id}/endorsements`)."""
    return request_out(signing.approve(session, ctx, request_id).request)


@router.post("/prices", status_code=201, tags=["risk"])
def set_price(body: PriceSet, session: SessionDep, ctx: ContextDep) -> PriceOut:
    """Bank staff set the manual BTC/RUB price (audited); the risk engine reads it."""
    row = manual_prices.set_price(session, ctx, body.price_rub_per_btc, body.quoted_at)
    return PriceOut(
        price_rub_per_btc=row.price_rub_per_btc,
        source=row.source,
        quoted_at=row.quoted_at,
        set_by=row.set_by,
    )


@router.get("/prices/latest", tags=["risk"])
def latest_price(session: SessionDep, ctx: ContextDep) -> PriceOut:
    require_role(ctx.principal, Role.bank_operator, Role.bank_approver, Role.auditor, Role.admin)
    row = manual_prices.latest(session)
    if row is None:
        raise NotFound("no price has been set")
    return PriceOut(
        price_rub_per_btc=row.price_rub_per_btc,
        source=row.source,
        quoted_at=row.quoted_at,
        set_by=row.set_by,
    )


def _own_party(principal: Principal, party_id: int) -> None:
    """Webhooks of a party: its own people, or an admin."""
    if principal.role != Role.admin and principal.party_id != party_id:
        raise NotFound(f"party {party_id} not found")


@router.post("/parties/{party_id}/webhooks", status_code=201, tags=["notifications"])
def create_webhook(
    party_id: int, body: WebhookCreate, session: SessionDep, principal: PrincipalDep
) -> dict[str, Any]:
    _own_party(principal, party_id)
    view = register_webhook(
        session,
        party_id,
        body.url,
        body.secret,
        body.events,
        actor=f"{principal.role}:{principal.name}",
    )
    return view.as_dict()


@router.get("/parties/{party_id}/webhooks", tags=["notifications"])
def get_webhooks(
    party_id: int, session: SessionDep, principal: PrincipalDep
) -> list[dict[str, Any]]:
    _own_party(principal, party_id)
    return [v.as_dict() for v in list_webhooks(session, party_id)]
