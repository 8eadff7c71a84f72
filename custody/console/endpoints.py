"""The console's HTTP edge: the API's invitation route (`POST /v1/principals/{id}/invitations`)
and the console's pages under /console.

Pages are rendered on the server (Jinja2) from `custody.console.views`, over the same
domain services and policy as the API. Every POST is checked before anything else: its
body's size, its `Origin` (the configured console origin only), and, for a signed-in
form, the session's CSRF token; a refusal is a page (or JSON for our own scripts) with a
4xx status, and changes nothing. A request holds no transaction across a call to the node.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Coroutine, Mapping
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qs

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse
from fastapi.routing import APIRoute
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from custody.api.deps import ContextDep, PrincipalId, SessionDep, SettingsDep
from custody.api.errors import errors_for
from custody.auth.context import Context
from custody.auth.policy import BANK_STAFF, READ_ALL, require_role
from custody.bitcoin import exports
from custody.compliance import service as compliance
from custody.compliance.schemas import MinerRecordIn
from custody.config import Settings
from custody.console import compliance_views, service, views
from custody.db.models import KeyRole, Principal, Role, ScreeningStatus
from custody.db.session import transaction
from custody.errors import (
    AddressNotFound,
    BodyTooLarge,
    DocumentNotFound,
    ExportUnsupported,
    ForgedRequest,
    KeysIncomplete,
    LoanNotFound,
    NoConsoleForRole,
    NotSignedIn,
    PartyNotFound,
    PriceNotFound,
    PrincipalNotFound,
    PrincipalRevoked,
    RoleNotAllowed,
    ScreeningDecisionNotFound,
    SigningRequestNotFound,
)
from custody.loans import service as loans
from custody.loans.schemas import HDKeyIn, LoanCreate
from custody.reports import formats as report_formats
from custody.reports import pdf as report_pdf
from custody.reports import service as report_service
from custody.risk import manual
from custody.schemas import ID_MAX, refused_character
from custody.screening import service as screening
from custody.screening.export import flagged_csv as screening_export_csv
from custody.screening.schemas import decision_out
from custody.signer import service as signer_statements
from custody.signing import broadcast, signatures
from custody.signing.chain import Chain
from pledge.errors import CustodyError, InvalidInput, NotAuthenticated

HERE = Path(__file__).parent
STATIC_DIR = HERE / "static"
TEMPLATES = Jinja2Templates(directory=HERE / "templates")
COOKIE: Final = "console_session"
POLL_HEADER: Final = "x-console-poll"  # a page's own refresh: does not count as activity
FORM_LIMIT = 64 * 1024
UPLOAD_LIMIT = 4 * 1024 * 1024
# No script, style or frame from anywhere but here; nothing of ours framed by others.
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # no-referrer would make form posts say Origin: null
    "Cache-Control": "no-store",
}


# -- the API route: invitations -----------------------------------------------------------------

router = APIRouter(prefix="/v1")


class InvitationOut(BaseModel):
    invitation_id: int
    principal_id: int
    principal: str
    role: str
    expires_at: datetime
    url: str  # holds the token: shown once, never stored


@router.post(
    "/principals/{principal_id}/invitations",
    status_code=201,
    tags=["auth"],
    responses=errors_for(
        NotAuthenticated,
        RoleNotAllowed,
        InvalidInput,
        PrincipalNotFound,
        PrincipalRevoked,
        NoConsoleForRole,
    ),
)
def create_invitation(
    principal_id: PrincipalId,
    session: SessionDep,
    ctx: ContextDep,
    settings: SettingsDep,
    response: Response,
) -> InvitationOut:
    """A one-time link for the principal to register a passkey for the console (admins
    only). The link holds a random token shown only here; the service keeps its SHA-256."""
    require_role(ctx.principal, Role.admin)
    invitation, target, token = service.issue_invitation(
        session, actor=ctx.actor, hours=settings.console_invitation_hours, principal_id=principal_id
    )
    response.headers["Cache-Control"] = "no-store"
    return invitation_out(settings, invitation.id, target, invitation.expires_at, token)


def invitation_out(
    settings: Settings, invitation_id: int | None, target: Principal, expires: datetime, token: str
) -> InvitationOut:
    assert invitation_id is not None and target.id is not None
    return InvitationOut(
        invitation_id=invitation_id,
        principal_id=target.id,
        principal=target.name,
        role=target.role,
        expires_at=expires,
        url=invitation_url(settings, token),
    )


def invitation_url(settings: Settings, token: str) -> str:
    return f"{settings.console_url}/console/invite/{token}"


# -- the console's plumbing ---------------------------------------------------------------------


def _wants_json(request: Request) -> bool:
    return "application/json" in request.headers.get("accept", "")


def error_page(request: Request, exc: CustodyError) -> Response:
    """A refusal: JSON for our scripts, else a page saying what happened, with its status."""
    if _wants_json(request):
        body = {"error": exc.code, "message": str(exc.message)}
        return JSONResponse(body, status_code=exc.status_code, headers=SECURITY_HEADERS)
    return TEMPLATES.TemplateResponse(
        request,
        "error.html",
        {"status": exc.status_code, "message": exc.message, "code": exc.code, "me": None},
        status_code=exc.status_code,
        headers=SECURITY_HEADERS,
    )


class ConsoleRoute(APIRoute):
    """A console route: its named errors become error pages, every answer gets the
    security headers."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def run(request: Request) -> Response:
            try:
                response = await handler(request)
            except CustodyError as exc:
                return error_page(request, exc)
            for name, value in SECURITY_HEADERS.items():
                response.headers.setdefault(name, value)
            return response

        return run


pages = APIRouter(prefix="/console", route_class=ConsoleRoute, include_in_schema=False)


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def _engine(request: Request) -> Any:
    return request.app.state.engine


def _check_origin(request: Request) -> None:
    """A state-changing request must come from a page of the console itself."""
    origin = request.headers.get("origin")
    if origin != _settings(request).console_url:
        raise ForgedRequest("this request did not come from the console's own pages")


async def _body(request: Request, limit: int) -> bytes:
    """The body, at most `limit` bytes, read only once its Origin is ours."""
    length = request.headers.get("content-length")
    if length is None or not length.isdigit() or int(length) > limit:
        raise BodyTooLarge(f"the console reads bodies of a declared length up to {limit} bytes")
    body = await request.body()
    if len(body) > limit:
        raise BodyTooLarge(f"the console reads bodies up to {limit} bytes")
    return body


def _form(body: bytes) -> dict[str, str]:
    """An urlencoded form, one value per field (the last one)."""
    try:
        fields = parse_qs(body.decode(), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError as exc:
        raise InvalidInput("the form is not text") from exc
    return {k: v[-1] for k, v in fields.items()}


def _identify(request: Request, *, touch: bool) -> Principal:
    """The session's principal (a thread: it queries), its idle clock moved if `touch`."""
    token = request.cookies.get(COOKIE)
    settings = _settings(request)
    engine = _engine(request)
    with transaction(engine, write=False) as session:
        outcome = service.check_session(session, token, idle_seconds=settings.console_idle_seconds)
    if outcome.ended is not None:
        with transaction(engine) as session:
            service.end_session(session, outcome.ended)
    if outcome.error is not None:
        raise outcome.error
    assert outcome.principal is not None and outcome.session_id is not None
    if touch and outcome.touch_due:
        with transaction(engine) as session:
            service.touch_session(session, outcome.session_id)
    return outcome.principal


def _context(request: Request, principal: Principal) -> Context:
    return Context(principal=principal, network=_settings(request).network)


async def _signed_in(request: Request) -> Context:
    touch = request.headers.get(POLL_HEADER) is None
    principal = await run_in_threadpool(_identify, request, touch=touch)
    return _context(request, principal)


async def _acting(request: Request, limit: int = FORM_LIMIT) -> tuple[Context, bytes]:
    """A signed-in form's POST: its origin, its size, its session, then its CSRF token
    (the form's `csrf` field, or the `X-CSRF-Token` header of our scripts)."""
    _check_origin(request)
    body = await _body(request, limit)
    ctx = await _signed_in(request)
    token = request.cookies.get(COOKIE, "")
    submitted = request.headers.get("x-csrf-token")
    if submitted is None and request.headers.get("content-type", "").startswith(
        "application/x-www-form-urlencoded"
    ):
        submitted = _form(body).get("csrf")
    if not service.csrf_matches(token, submitted):
        raise ForgedRequest("this form does not carry this session's CSRF token")
    return ctx, body


def _page(
    request: Request, name: str, ctx: Context | None, data: Mapping[str, Any], status: int = 200
) -> HTMLResponse:
    token = request.cookies.get(COOKIE, "")
    context = {
        **data,
        "me": ctx.principal if ctx is not None else None,
        "csrf": service.csrf_token(token) if ctx is not None else "",
    }
    return TEMPLATES.TemplateResponse(request, name, context, status_code=status)


def _session_cookie(request: Request, response: Response, token: str) -> None:
    settings = _settings(request)
    response.set_cookie(
        COOKIE,
        token,
        httponly=True,
        samesite="strict",
        secure=not service.is_loopback(settings.console_url),
        path="/console",
        max_age=None,  # a browser session's cookie; the server ends idle sessions itself
    )


def _id(text: str, missing: Callable[[], CustodyError]) -> int:
    """A path id, or the object's own 404 (beyond the column, or not a number)."""
    if not text.isdigit() or int(text) > ID_MAX:
        raise missing()
    return int(text)


def _redirect(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


# -- sign-in -------------------------------------------------------------------------------------


@pages.get("/")
async def home(request: Request) -> Response:
    try:
        await _signed_in(request)
    except NotSignedIn:
        return _redirect("/console/sign-in")
    return _redirect("/console/loans")


@pages.get("/sign-in")
async def sign_in_page(request: Request) -> Response:
    return _page(request, "sign_in.html", None, {})


@pages.post("/sign-in/options")
async def sign_in_options(request: Request) -> Response:
    _check_origin(request)
    await _body(request, FORM_LIMIT)
    origin = _settings(request).console_url

    def work() -> str:
        with transaction(_engine(request)) as session:
            return service.sign_in_options(session, origin)

    return Response(await run_in_threadpool(work), media_type="application/json")


@pages.post("/sign-in")
async def sign_in(request: Request) -> Response:
    _check_origin(request)
    credential = service.credential_json(await _body(request, FORM_LIMIT))
    origin = _settings(request).console_url

    def work() -> service.SignedIn:
        with transaction(_engine(request)) as session:
            return service.sign_in(session, credential, origin)

    done = await run_in_threadpool(work)
    response = JSONResponse({"redirect": "/console/loans", "name": done.principal.name})
    _session_cookie(request, response, done.session_token)
    return response


@pages.post("/sign-out")
async def sign_out(request: Request) -> Response:
    await _acting(request)
    token = request.cookies.get(COOKIE)

    def work() -> None:
        with transaction(_engine(request)) as session:
            service.sign_out(session, token)

    await run_in_threadpool(work)
    response = _redirect("/console/sign-in")
    response.delete_cookie(COOKIE, path="/console")
    return response


@pages.get("/invite/{token}")
async def invitation_page(request: Request, token: str) -> Response:
    def work() -> Principal:
        with transaction(_engine(request), write=False) as session:
            return service.open_invitation(session, token, lock=False)[1]

    target = await run_in_threadpool(work)
    return _page(request, "invite.html", None, {"invitee": target, "token": token})


@pages.post("/invite/{token}/options")
async def registration_options(request: Request, token: str) -> Response:
    _check_origin(request)
    await _body(request, FORM_LIMIT)
    origin = _settings(request).console_url

    def work() -> str:
        with transaction(_engine(request)) as session:
            return service.registration_options(session, token, origin)

    return Response(await run_in_threadpool(work), media_type="application/json")


@pages.post("/invite/{token}/register")
async def register_passkey(request: Request, token: str) -> Response:
    _check_origin(request)
    credential = service.credential_json(await _body(request, FORM_LIMIT))
    origin = _settings(request).console_url

    def work() -> service.SignedIn:
        with transaction(_engine(request)) as session:
            return service.register_passkey(session, token, credential, origin)

    done = await run_in_threadpool(work)
    response = JSONResponse({"redirect": "/console/loans", "name": done.principal.name})
    _session_cookie(request, response, done.session_token)
    return response


# -- pages ---------------------------------------------------------------------------------------


def _read(request: Request, work: Callable[[Any], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    def run() -> dict[str, Any]:
        with transaction(_engine(request), write=False) as session:
            return work(session)

    return run


@pages.get("/loans")
async def dashboard(request: Request) -> Response:
    ctx = await _signed_in(request)
    settings = _settings(request)

    def work(session: Any) -> dict[str, Any]:
        data = views.dashboard(session, ctx)
        if ctx.principal.role in READ_ALL:
            data["status"] = views.system_status(session, ctx, settings)
        if ctx.principal.role == Role.compliance_officer:  # miners' records to review
            data["to_review"] = compliance_views.review_queue(session, ctx)
        return data

    data = await run_in_threadpool(_read(request, work))
    return _page(request, "dashboard.html", ctx, data)


@pages.get("/loans/{loan_id}")
async def loan_page(request: Request, loan_id: str) -> Response:
    ctx = await _signed_in(request)
    lid = _id(loan_id, LoanNotFound)
    data = await run_in_threadpool(_read(request, lambda s: views.loan_page(s, ctx, lid)))
    return _page(request, "loan.html", ctx, data)


@pages.get("/loans/{loan_id}/live")
async def loan_live(request: Request, loan_id: str) -> Response:
    """The loan page's fragment that changes under the reader (polled by console.js)."""
    ctx = await _signed_in(request)
    lid = _id(loan_id, LoanNotFound)
    data = await run_in_threadpool(
        _read(request, lambda s: {"live": views.live(s, ctx, lid), "loan_id": lid})
    )
    return _page(request, "_live.html", ctx, data)


# The chart is its own SVG document, shown as an <img> (where an SVG's scripts never run):
# its inline styles are allowed, no script (pygal inlines a config script: it stays inert).
CHART_POLICY: Final = "default-src 'none'; style-src 'unsafe-inline'"


@pages.get("/loans/{loan_id}/chart.svg")
async def loan_chart(request: Request, loan_id: str) -> Response:
    ctx = await _signed_in(request)
    lid = _id(loan_id, LoanNotFound)

    def work() -> str:
        with transaction(_engine(request), write=False) as session:
            return views.loan_chart(session, ctx, lid)

    svg = await run_in_threadpool(work)
    headers = {"Content-Security-Policy": CHART_POLICY}
    return Response(svg, media_type="image/svg+xml", headers=headers)


# An address at a loan's index never changes, so its QR code may stay in the browser's
# own cache (not a shared one: it says which address is whose).
QR_CACHE: Final = "private, max-age=86400, immutable"


@pages.get("/loans/{loan_id}/addresses/{index}/qr.svg")
async def address_qr(request: Request, loan_id: str, index: str) -> Response:
    ctx = await _signed_in(request)
    lid = _id(loan_id, LoanNotFound)
    idx = _id(index, AddressNotFound)

    def work() -> str:
        with transaction(_engine(request), write=False) as session:
            return views.address_qr(session, ctx, lid, idx)

    svg = await run_in_threadpool(work)
    headers = {"Content-Security-Policy": CHART_POLICY, "Cache-Control": QR_CACHE}
    return Response(svg, media_type="image/svg+xml", headers=headers)


_JSON_EXPORTS: Final = {
    "descriptor": exports.export_descriptor,
    "caravan": exports.export_caravan,
    "wallet-policy": exports.export_wallet_policy,
}
_TEXT_EXPORTS: Final = {
    "coldcard": (exports.export_coldcard, "-coldcard.txt"),
    "bsms": (exports.export_bsms, ".bsms"),
    "sparrow": (exports.export_sparrow, "-sparrow.txt"),
}


@pages.get("/loans/{loan_id}/export/{fmt}")
async def export(request: Request, loan_id: str, fmt: str) -> Response:
    """The API's wallet exports as downloads (the same functions, the same refusals)."""
    ctx = await _signed_in(request)
    lid = _id(loan_id, LoanNotFound)
    if fmt not in _JSON_EXPORTS and fmt not in _TEXT_EXPORTS:
        raise ExportUnsupported(f"no export called {fmt!r}")

    def work() -> Response:
        with transaction(_engine(request), write=False) as session:
            loan = loans.get_loan(session, ctx, lid)
            if loan.descriptor is None:
                raise KeysIncomplete("the loan's three keys are not all registered yet")
            descriptor = loans.loan_descriptor(session, loan, ctx.network)
        name = f"loan-{lid}"
        headers = exports.export_notice(descriptor, fmt).headers()
        if fmt in _JSON_EXPORTS:
            text = json.dumps(_JSON_EXPORTS[fmt](descriptor, name), indent=2)
            suffix = f"-{fmt}.json"
        else:
            render, suffix = _TEXT_EXPORTS[fmt]
            text = render(descriptor, name)
        headers["Content-Disposition"] = f'attachment; filename="{name}{suffix}"'
        return PlainTextResponse(text, headers=headers)

    return await run_in_threadpool(work)


@pages.post("/loans")
async def create_loan(request: Request) -> Response:
    """Bank staff open a loan from the dashboard's form (the API's body, the API's rules)."""
    ctx, body = await _acting(request)
    form = _form(body)
    try:
        kopecks = Decimal(form.get("principal_rub", "").replace(" ", "")) * 100
        if not kopecks.is_finite() or kopecks != kopecks.to_integral_value():
            raise InvalidInput(
                "the principal is in roubles with at most two decimals (whole kopecks)",
                field="principal_rub",
            )
        terms: dict[str, Any] = {
            "principal_kopecks": int(kopecks),
            "interest_rate_bps": int(form.get("interest_rate_bps", "")),
            "maturity_at": form.get("maturity_at", ""),
            "miner_return_address": form.get("miner_return_address", ""),
            "bank_liquidation_address": form.get("bank_liquidation_address", ""),
        }
        if form.get("required_collateral_sats"):
            terms["required_collateral_sats"] = int(form["required_collateral_sats"])
        for name in ("margin_call_ltv_bps", "liquidation_ltv_bps", "cure_window_hours"):
            if form.get(name):
                terms[name] = int(form[name])
        parsed = LoanCreate.model_validate(
            {
                "miner_party_id": int(form.get("miner_party_id", "")),
                "arbiter_party_id": int(form.get("arbiter_party_id", "")),
                "terms": terms,
            }
        )
    except (ValueError, InvalidOperation) as exc:
        raise InvalidInput(
            f"the loan form is not complete or not valid: {_first_error(exc)}"
        ) from exc

    def work() -> int:
        with transaction(_engine(request)) as session:
            loan = loans.create_loan(session, ctx, parsed)
            assert loan.id is not None
            return loan.id

    return _redirect(f"/console/loans/{await run_in_threadpool(work)}")


def _first_error(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        first = errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        return f"{where}: {first.get('msg', '')}"
    return str(exc)


@pages.post("/loans/{loan_id}/keys/{seat}")
async def register_key(request: Request, loan_id: str, seat: str) -> Response:
    """A seat's key from the loan page's form (an HD key: `[fingerprint/path]xpub`)."""
    ctx, body = await _acting(request)
    lid = _id(loan_id, LoanNotFound)
    try:
        key_seat = KeyRole(seat)
        key = HDKeyIn.model_validate({"kind": "hd", "key": _form(body).get("key", "").strip()})
    except ValueError as exc:
        raise InvalidInput(f"the key is not valid: {_first_error(exc)}", field="key") from exc

    def work() -> None:
        with transaction(_engine(request)) as session:
            loans.register_key(session, ctx, lid, key_seat, key)

    await run_in_threadpool(work)
    return _redirect(f"/console/loans/{lid}")


@pages.post("/loans/{loan_id}/keys/bank/signer")
async def request_bank_key(request: Request, loan_id: str) -> Response:
    """A bank operator asks the bank's signer for the loan's bank key (an HD account of
    its sealed seed, or a fixed key): the same statement as the API's route, which an
    operator and an approver then sign."""
    ctx, body = await _acting(request)
    lid = _id(loan_id, LoanNotFound)
    kind = _form(body).get("kind", "hd")
    if kind not in ("hd", "fixed"):
        raise InvalidInput("the bank key is either 'hd' or 'fixed'", field="kind")

    def work() -> None:
        with transaction(_engine(request)) as session:
            signer_statements.request_bank_key(session, ctx, lid, kind=kind)

    await run_in_threadpool(work)
    return _redirect(f"/console/loans/{lid}#terms")


@pages.post("/loans/{loan_id}/addresses")
async def new_address(request: Request, loan_id: str) -> Response:
    ctx, _ = await _acting(request)
    lid = _id(loan_id, LoanNotFound)

    def work() -> None:
        with transaction(_engine(request)) as session:
            loans.new_address(session, ctx, lid)

    await run_in_threadpool(work)
    return _redirect(f"/console/loans/{lid}")


@pages.get("/requests/{request_id}")
async def request_page(request: Request, request_id: str) -> Response:
    ctx = await _signed_in(request)
    rid = _id(request_id, SigningRequestNotFound)
    data = await run_in_threadpool(_read(request, lambda s: views.request_page(s, ctx, rid)))
    return _page(request, "request.html", ctx, data)


@pages.get("/requests/{request_id}/psbt")
async def request_psbt(request: Request, request_id: str) -> Response:
    """The PSBT with every signature so far: `?as=base64` as text, else the .psbt file."""
    ctx = await _signed_in(request)
    rid = _id(request_id, SigningRequestNotFound)
    data = await run_in_threadpool(_read(request, lambda s: views.request_page(s, ctx, rid)["req"]))
    psbt: str = data["psbt"]
    if request.query_params.get("as") == "base64":
        disposition = f'attachment; filename="request-{rid}.psbt.txt"'
        return PlainTextResponse(psbt, headers={"Content-Disposition": disposition})
    return Response(
        base64.b64decode(psbt),
        media_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="request-{rid}.psbt"'},
    )


@pages.post("/requests/{request_id}/signatures")
async def upload_signed_psbt(request: Request, request_id: str) -> Response:
    """The signed .psbt file (binary or base64), through the API's own service call: only
    new, verified signatures are kept; at quorum the transaction is broadcast after they
    are committed (no transaction open across the node's call)."""
    _check_origin(request)
    length = request.headers.get("content-length", "")
    if not length.isdigit() or int(length) > UPLOAD_LIMIT:
        raise BodyTooLarge(f"the signed PSBT file must be at most {UPLOAD_LIMIT} bytes")
    ctx = await _signed_in(request)
    rid = _id(request_id, SigningRequestNotFound)
    form = await request.form(max_files=1, max_fields=4, max_part_size=UPLOAD_LIMIT)
    submitted = form.get("csrf")
    if not service.csrf_matches(request.cookies.get(COOKIE, ""), str(submitted or "")):
        raise ForgedRequest("this form does not carry this session's CSRF token")
    upload = form.get("psbt")
    if not isinstance(upload, UploadFile):
        raise InvalidInput("choose the signed .psbt file to upload", field="psbt")
    raw = await upload.read()
    data: bytes | str = raw
    if raw.strip() and all(c < 128 for c in raw):
        data = raw.decode().strip()  # a base64 text file, as wallets also save them
    engine = _engine(request)
    chain: Chain | None = getattr(request.app.state, "chain", None)

    def work() -> None:
        with transaction(engine) as session:
            req = signatures.add_signatures(session, ctx, rid, data)
            ready = req.state == "ready"
        if ready and chain is not None:
            broadcast.broadcast_ready(engine, ctx.actor, rid, chain)

    await run_in_threadpool(work)
    return _redirect(f"/console/requests/{rid}")


@pages.get("/requests/{request_id}/approval")
async def approval_options(request: Request, request_id: str) -> Response:
    """The approval button's `navigator.credentials.get` options (JSON): the challenge is
    the digest of the signer's statement for this request (the API's approval view)."""
    ctx = await _signed_in(request)
    rid = _id(request_id, SigningRequestNotFound)
    origin = _settings(request).console_url
    data = await run_in_threadpool(
        _read(request, lambda s: service.approval_options(s, ctx, rid, origin))
    )
    return JSONResponse(data)


@pages.post("/requests/{request_id}/approval")
async def approve_with_passkey(request: Request, request_id: str) -> Response:
    """The passkey's assertion (`PublicKeyCredential.toJSON()`) as the caller's endorsement
    of this request's signer statement, through the API's own service calls; at quorum the
    statement goes to the bank's signer, with no transaction open while it answers."""
    ctx, body = await _acting(request)
    rid = _id(request_id, SigningRequestNotFound)
    credential = service.credential_json(body)
    origin = _settings(request).console_url
    engine = _engine(request)
    signer = getattr(request.app.state, "signer", None)
    chain: Chain | None = getattr(request.app.state, "chain", None)

    def work() -> dict[str, Any]:
        with transaction(engine) as session:
            done = service.approve_with_passkey(session, ctx, rid, credential, origin)
        if done.ready:
            signer_statements.execute(engine, done.statement_id, signer, ctx, chain)
        with transaction(engine, write=False) as session:
            st = signer_statements.get_statement(session, ctx, done.statement_id)
            view = signer_statements.statement_view(session, st)
        return {
            "person": done.person,
            "state": view["state"],
            "signed_by": view["signed_by"],
            "outcome": view.get("outcome"),
            "redirect": f"/console/requests/{rid}",
        }

    return JSONResponse(await run_in_threadpool(work))


@pages.post("/principals/{principal_id}/signer-enrolment")
async def enrol_with_signer(request: Request, principal_id: str) -> Response:
    """An admin opens the signer's enrolment of a person's console passkey; two signer
    admins sign it as any enrolment (`custody approve --statement ID`)."""
    ctx, _ = await _acting(request)
    pid = _id(principal_id, PrincipalNotFound)
    origin = _settings(request).console_url

    def work() -> dict[str, Any]:
        with transaction(_engine(request)) as session:
            statement_id = service.enrol_with_signer(session, ctx, pid, origin)
            st = signer_statements.get_statement(session, ctx, statement_id)
            view = signer_statements.statement_view(session, st)
        return {
            "statement_id": statement_id,
            "name": view["statement"]["name"],
            "rp_id": view["statement"]["rp_id"],
            "origin": origin,
        }

    data = await run_in_threadpool(work)
    return _page(request, "enrolment.html", ctx, data, status=201)


@pages.get("/requests/{request_id}/live")
async def request_live(request: Request, request_id: str) -> Response:
    ctx = await _signed_in(request)
    rid = _id(request_id, SigningRequestNotFound)
    data = await run_in_threadpool(_read(request, lambda s: views.request_page(s, ctx, rid)))
    return _page(request, "_request_live.html", ctx, data)


# -- the price desk ------------------------------------------------------------------------------


def _feed_status(request: Request) -> dict[str, Any] | None:
    """The HTTP price sources as they answer now (a network call: no transaction is open
    here): each fresh quote, each source left out and why, the median or why there is
    none. None when no source is configured."""
    feeds: manual.Feeds | None = getattr(request.app.state, "price_feeds", None)
    if feeds is None:
        return None
    consensus = feeds.consensus()
    return {
        "usable": consensus.usable,
        "median": consensus.quote,
        "reason": consensus.reason,
        "quotes": consensus.quotes,
        "failures": consensus.failures,
    }


@pages.get("/prices")
async def price_desk(request: Request) -> Response:
    ctx = await _signed_in(request)
    require_role(ctx.principal, *manual.READERS)
    feeds = await run_in_threadpool(_feed_status, request)

    def work(session: Any) -> dict[str, Any]:
        history = manual.price_history(session, ctx, limit=20, offset=0)
        now = datetime.now(UTC)
        return {
            "history": [(row, manual.shown_state(row, now)) for row in history],
            "price": views.current_price(session),
            "can_decide": ctx.principal.role in BANK_STAFF,
            "feeds": feeds,
        }

    data = await run_in_threadpool(_read(request, work))
    return _page(request, "prices.html", ctx, data)


def _price_policy(request: Request) -> manual.PricePolicy:
    return manual.PricePolicy.from_settings(_settings(request))


def _feeds(request: Request) -> manual.FeedCheck:
    """The feeds' median now (a network call: no transaction is open here)."""
    feeds: manual.Feeds | None = getattr(request.app.state, "price_feeds", None)
    return manual.feed_check(feeds)


@pages.post("/prices")
async def propose_price(request: Request) -> Response:
    ctx, body = await _acting(request)
    require_role(ctx.principal, *manual.DECIDERS)
    form = _form(body)
    try:
        price = Decimal(form.get("price_rub_per_btc", ""))
    except InvalidOperation as exc:
        raise InvalidInput("the price is not a number", field="price_rub_per_btc") from exc
    if not price.is_finite() or price <= 0:
        raise InvalidInput("the price must be a positive number", field="price_rub_per_btc")

    def work() -> None:
        feeds = _feeds(request)
        with transaction(_engine(request)) as session:
            manual.propose_price(
                session, ctx, price, datetime.now(UTC), policy=_price_policy(request), feeds=feeds
            )

    await run_in_threadpool(work)
    return _redirect("/console/prices")


@pages.post("/prices/{price_id}/confirm")
async def confirm_price(request: Request, price_id: str) -> Response:
    ctx, _ = await _acting(request)
    require_role(ctx.principal, *manual.DECIDERS)
    pid = _id(price_id, PriceNotFound)

    def work() -> None:
        feeds = _feeds(request)
        with transaction(_engine(request)) as session:
            manual.confirm_price(session, ctx, pid, policy=_price_policy(request), feeds=feeds)

    await run_in_threadpool(work)
    return _redirect("/console/prices")


@pages.post("/prices/{price_id}/reject")
async def reject_price(request: Request, price_id: str) -> Response:
    ctx, _ = await _acting(request)
    pid = _id(price_id, PriceNotFound)

    def work() -> None:
        with transaction(_engine(request)) as session:
            manual.reject_price(session, ctx, pid)

    await run_in_threadpool(work)
    return _redirect("/console/prices")


# -- AML screening: the compliance officer's queue --------------------------------------------


@pages.get("/screening")
async def screening_queue(request: Request) -> Response:
    """Screenings waiting for a compliance officer (review, block) and those resolved, for
    compliance officers (who clear or block with a reason) and auditors (who read)."""
    ctx = await _signed_in(request)

    def work(session: Any) -> dict[str, Any]:
        waiting = [
            decision_out(row, miner)
            for status in ("review", "block")
            for row, _loan, miner in screening.decisions(session, ctx, status, limit=200, offset=0)
            if row.status in (ScreeningStatus.review, ScreeningStatus.block)
        ]
        recent = screening.decisions(session, ctx, None, limit=200, offset=0)
        return {
            "queue": sorted(waiting, key=lambda d: d.id),
            "resolved": [decision_out(r, m) for r, _l, m in recent if r.resolved_at is not None],
            "can_resolve": ctx.principal.role in screening.RESOLVERS,
        }

    data = await run_in_threadpool(_read(request, work))
    return _page(request, "screening.html", ctx, data)


@pages.get("/screening/decisions.csv")
async def screening_export(request: Request) -> Response:
    """The API's export for the bank's filing, as a download for a signed-in officer (the
    API's route wants an API key, which a console session does not send)."""
    ctx = await _signed_in(request)

    def work() -> str:
        with transaction(_engine(request), write=False) as session:
            return screening_export_csv(session, ctx)

    body = await run_in_threadpool(work)
    return Response(
        body,
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": 'attachment; filename="screening-decisions.csv"'},
    )


@pages.post("/screening/{decision_id}/resolution")
async def resolve_screening(request: Request, decision_id: str) -> Response:
    ctx, body = await _acting(request)
    require_role(ctx.principal, *screening.RESOLVERS)
    did = _id(decision_id, ScreeningDecisionNotFound)
    form = _form(body)
    reason = form.get("reason", "").strip()
    if not reason or len(reason) > 2000 or refused_character(reason) is not None:
        raise InvalidInput("a resolution needs its reason (plain text)", field="reason")

    def work() -> None:
        with transaction(_engine(request)) as session:
            screening.resolve(session, ctx, did, form.get("outcome", ""), reason)

    await run_in_threadpool(work)
    return _redirect("/console/screening")


# -- the audit log and the service's state -------------------------------------------------------


def _query_text(request: Request, name: str, longest: int) -> str | None:
    value = request.query_params.get(name, "").strip()
    if len(value) > longest:
        raise InvalidInput(f"{name} is longer than {longest} characters", field=name)
    return value or None


def _query_id(request: Request, name: str) -> int | None:
    value = request.query_params.get(name, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) > ID_MAX:
        raise InvalidInput(f"{name} must be a positive whole number", field=name)
    return int(value)


@pages.get("/audit")
async def audit_log(request: Request) -> Response:
    """The audit log with filters (action prefix, loan, actor, decision) and the chain's
    verification, for bank staff, auditors and the admin."""
    ctx = await _signed_in(request)
    filters = views.AuditFilters(
        action=_query_text(request, "action", 64),
        loan_id=_query_id(request, "loan"),
        actor=_query_text(request, "actor", 160),
        decision=_query_text(request, "decision", 32),
        before=_query_id(request, "before"),
    )
    data = await run_in_threadpool(_read(request, lambda s: views.audit_page(s, ctx, filters)))
    return _page(request, "audit.html", ctx, data)


@pages.get("/status")
async def system_status(request: Request) -> Response:
    """The dashboard's fragment of what the service's processes are doing (polled)."""
    ctx = await _signed_in(request)
    settings = _settings(request)
    data = await run_in_threadpool(
        _read(request, lambda s: {"status": views.system_status(s, ctx, settings)})
    )
    return _page(request, "_status.html", ctx, data)


# -- reports (issue 15): the collateral register and a loan's statement --------------------------


def _report_moment(request: Request) -> datetime | None:
    """The form's `at` (a datetime-local field, read as UTC; a zone may be given), or None."""
    value = _query_text(request, "at", 40)
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError as exc:
        raise InvalidInput(
            "at must be a date and time (e.g. 2026-12-01T00:00)", field="at"
        ) from exc
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


@pages.get("/reports")
async def reports_page(request: Request) -> Response:
    """The reports an auditor and a compliance officer download."""
    ctx = await _signed_in(request)
    require_role(ctx.principal, *report_service.READERS)
    data = await run_in_threadpool(_read(request, lambda s: views.reports_page(s, ctx)))
    return _page(request, "reports.html", ctx, data)


@pages.get("/reports/collateral-register.{fmt}")
async def collateral_register(request: Request, fmt: str) -> Response:
    """The API's register, as a download (the same function, the same refusals)."""
    ctx = await _signed_in(request)
    if fmt not in ("csv", "xlsx"):
        raise ExportUnsupported(f"no register as {fmt!r}: csv or xlsx")
    at = _report_moment(request)

    def work() -> Response:
        register = report_service.collateral_register(
            _engine(request), ctx, getattr(request.app.state, "chain", None), at
        )
        name = f'attachment; filename="collateral-register-{report_formats.iso(register.at)}.{fmt}"'
        if fmt == "csv":
            body = b"".join(report_formats.csv_chunks(register))
            media = report_formats.CSV_TYPE
        else:
            body, media = report_formats.xlsx_bytes(register), report_formats.XLSX_TYPE
        return Response(body, media_type=media, headers={"Content-Disposition": name})

    return await run_in_threadpool(work)


@pages.get("/loans/{loan_id}/statement.pdf")
async def loan_statement(request: Request, loan_id: str) -> Response:
    ctx = await _signed_in(request)
    lid = _id(loan_id, LoanNotFound)

    def work() -> Response:
        statement = report_service.loan_statement(_engine(request), ctx, lid)
        return Response(
            report_pdf.statement_pdf(statement),
            media_type=report_pdf.PDF_TYPE,
            headers={"Content-Disposition": f'attachment; filename="loan-{lid}-statement.pdf"'},
        )

    return await run_in_threadpool(work)


# -- compliance (issue 15): a miner's registry record, its evidence and its reviews --------------


@pages.get("/compliance")
async def compliance_queue(request: Request) -> Response:
    """The records waiting for a compliance officer's review (staff)."""
    ctx = await _signed_in(request)
    data = await run_in_threadpool(
        _read(request, lambda s: {"to_review": compliance_views.review_queue(s, ctx)})
    )
    return _page(request, "compliance.html", ctx, data)


@pages.get("/parties/{party_id}/miner-record")
async def miner_record_page(request: Request, party_id: str) -> Response:
    ctx = await _signed_in(request)
    pid = _id(party_id, PartyNotFound)
    data = await run_in_threadpool(
        _read(request, lambda s: compliance_views.miner_record_page(s, ctx, pid))
    )
    return _page(request, "miner_record.html", ctx, data)


def _optional(form: Mapping[str, str], name: str) -> str | None:
    value = form.get(name, "").strip()
    return value or None


@pages.post("/parties/{party_id}/miner-record")
async def save_miner_record(request: Request, party_id: str) -> Response:
    """The edit form: the API's body and rules (a bad value is a 422 page naming it)."""
    ctx, body = await _acting(request)
    pid = _id(party_id, PartyNotFound)
    form = _form(body)
    fields: dict[str, Any] = {
        name: _optional(form, name)
        for name in (
            "legal_form",
            "inn",
            "ogrn",
            "register_number",
            "register_date",
            "register_status",
            "region",
            "data_centre_name",
            "data_centre_inn",
        )
    }
    energy = form.get("monthly_energy_kwh", "").replace(" ", "")
    fields["monthly_energy_kwh"] = int(energy) if energy.isdigit() else energy
    try:
        parsed = MinerRecordIn.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise InvalidInput(f"{where}: {first.get('msg', '')}", field=where or None) from exc

    def work() -> None:
        with transaction(_engine(request)) as session:
            compliance.put_record(session, ctx, pid, parsed)

    await run_in_threadpool(work)
    return _redirect(f"/console/parties/{pid}/miner-record")


@pages.post("/parties/{party_id}/miner-record/reviews")
async def review_miner_record(request: Request, party_id: str) -> Response:
    ctx, body = await _acting(request)
    pid = _id(party_id, PartyNotFound)
    form = _form(body)
    decision = form.get("decision", "")
    if decision not in ("approve", "reject"):
        raise InvalidInput("approve or reject", field="decision")
    reason = form.get("reason", "").strip()
    if not reason or len(reason) > 2000:
        raise InvalidInput("say why, in at most 2000 characters", field="reason")

    def work() -> None:
        with transaction(_engine(request)) as session:
            compliance.review(
                session,
                ctx,
                pid,
                approve=decision == "approve",
                reason=reason,
                digest=form.get("digest", ""),
            )

    await run_in_threadpool(work)
    return _redirect(f"/console/parties/{pid}/miner-record")


@pages.post("/parties/{party_id}/documents")
async def upload_document(request: Request, party_id: str) -> Response:
    """One evidence file (multipart form), through the API's service: its type, its size
    and who may upload are the API's."""
    _check_origin(request)
    length = request.headers.get("content-length", "")
    if not length.isdigit() or int(length) > UPLOAD_LIMIT + FORM_LIMIT:
        raise BodyTooLarge(f"a document must be at most {UPLOAD_LIMIT} bytes")
    ctx = await _signed_in(request)
    pid = _id(party_id, PartyNotFound)
    form = await request.form(max_files=1, max_fields=4, max_part_size=UPLOAD_LIMIT)
    if not service.csrf_matches(request.cookies.get(COOKIE, ""), str(form.get("csrf") or "")):
        raise ForgedRequest("this form does not carry this session's CSRF token")
    upload = form.get("document")
    if not isinstance(upload, UploadFile):
        raise InvalidInput("choose the file to upload", field="document")
    content = await upload.read()
    kind = str(form.get("kind") or "other")

    def work() -> None:
        with transaction(_engine(request)) as session:
            compliance.upload_document(
                session,
                ctx,
                pid,
                kind=kind,
                content_type=upload.content_type,
                filename=(upload.filename or "")[:200] or None,
                content=content,
            )

    await run_in_threadpool(work)
    return _redirect(f"/console/parties/{pid}/miner-record#documents")


@pages.get("/parties/{party_id}/documents/{document_id}")
async def download_document(request: Request, party_id: str, document_id: str) -> Response:
    ctx = await _signed_in(request)
    pid = _id(party_id, PartyNotFound)
    did = _id(document_id, DocumentNotFound)

    def work() -> tuple[bytes, str]:
        with transaction(_engine(request), write=False) as session:
            doc = compliance.read_document(session, ctx.principal, pid, did)
            return doc.content, doc.content_type

    content, media = await run_in_threadpool(work)
    disposition = f'attachment; filename="document-{did}"'
    return Response(content, media_type=media, headers={"Content-Disposition": disposition})
