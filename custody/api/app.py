"""The FastAPI application: each domain's routes under /v1, typed errors mapped to HTTP once,
the framework's own refusals (no such path, a wrong method, a body that is not JSON) in the
same `{error, message, field}` shape."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from http import HTTPStatus
from typing import Any

import anyio.to_thread
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute, iter_route_contexts
from fastapi.staticfiles import StaticFiles
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from custody.api import limits, ops
from custody.api.errors import error_body, media_type
from custody.api.metrics import RequestMetrics
from custody.audit import endpoints as audit
from custody.auth import endpoints as auth
from custody.compliance import endpoints as compliance
from custody.config import Settings
from custody.console import endpoints as console
from custody.db.session import refused_connection
from custody.errors import (
    BodyTooLarge,
    MalformedBody,
    NoSuchRoute,
    ServiceBusy,
    UnsupportedContentType,
    UnsupportedMethod,
)
from custody.loans import endpoints as loans
from custody.notify import endpoints as notify
from custody.parties import endpoints as parties
from custody.proof import endpoints as proof
from custody.reports import endpoints as reports
from custody.risk import endpoints as risk
from custody.risk.manual import Feeds
from custody.screening import endpoints as screening
from custody.signer import endpoints as signer_statements
from custody.signing import endpoints as signing
from custody.signing.chain import Chain, FeePolicy
from hsm.client import BankSigner
from pledge.errors import CustodyError, InvalidInput, NotAuthenticated

log = structlog.get_logger(__name__)


def _field_name(loc: tuple[Any, ...]) -> str | None:
    """The dotted field a validation error is about; None when it is the body as a whole."""
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    # Discriminated unions add the tag to the location: drop it, keep the field.
    parts = [p for p in parts if p not in ("hd", "hsm")]
    return ".".join(parts) or None


def _error_field(error: Mapping[str, Any]) -> str | None:
    """The field of one validation error; for a union told apart by a tag (a key's `kind`)
    whose tag is missing or unknown, the tag's field."""
    loc = tuple(error.get("loc", ()))
    if error.get("type") in ("union_tag_invalid", "union_tag_not_found"):
        tag = str((error.get("ctx") or {}).get("discriminator", "")).strip("'")
        loc = (*loc, tag) if tag.isidentifier() else loc
    return _field_name(loc)


def _answer(error: CustodyError, headers: Mapping[str, str] | None = None) -> JSONResponse:
    out = dict(headers or {})
    if error.status_code == 401:  # RFC 9110: a 401 names the scheme it wants
        out.setdefault("WWW-Authenticate", "Bearer")
    return JSONResponse(status_code=error.status_code, content=error_body(error), headers=out)


def _snake(phrase: str) -> str:
    """An HTTP reason phrase as a code: "I'm a Teapot" -> `im_a_teapot`."""
    words = "".join(c for c in phrase.lower().replace("-", " ") if c.isalnum() or c == " ")
    return "_".join(words.split())


def _framework_error(exc: StarletteHTTPException) -> CustodyError | None:
    """The named error for what the framework refused (Starlette's router, FastAPI's body
    reading, a body-size limit); None for another status, whose HTTP name is its code."""
    status = exc.status_code
    if status == 404:
        return NoSuchRoute("no route serves this path")
    if status == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        return UnsupportedMethod(f"this path does not take this method (it takes: {allowed})")
    if status == 400:
        return MalformedBody("the request body could not be read")
    if status == 413:
        return BodyTooLarge("the request body is larger than this route reads")
    if status == 415:
        return UnsupportedContentType("this route does not read this Content-Type")
    if status == 401:
        return NotAuthenticated("an API key is needed: send 'Authorization: Bearer <key>'")
    return None


def _allowed_methods(request: Request) -> str | None:
    """Every method some route takes on this path. Starlette's 405 lists only the first
    route that matched the path (`GET /v1/loans` and `POST /v1/loans` are two routes)."""
    path = request.scope.get("path", "")
    methods = {
        method
        for context in iter_route_contexts(request.app.routes)
        if context.methods and context.path_regex.match(path)
        for method in context.methods
    }
    return ", ".join(sorted(methods)) or None


def _http_answer(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        allowed = _allowed_methods(request)
        if allowed is not None:
            headers["Allow"] = allowed
        exc = StarletteHTTPException(405, exc.detail, headers)
    named = _framework_error(exc)
    if named is not None:
        return _answer(named, headers)
    try:
        phrase = HTTPStatus(exc.status_code).phrase
    except ValueError:
        phrase = "error"
    message = exc.detail if isinstance(exc.detail, str) else phrase
    body = {"error": _snake(phrase), "message": message, "field": None}
    return JSONResponse(status_code=exc.status_code, content=body, headers=headers)


def _json_decode_message(error: Mapping[str, Any]) -> str:
    reason = str((error.get("ctx") or {}).get("error") or "not JSON")
    loc = tuple(error.get("loc", ()))
    at = f" at character {loc[-1]}" if len(loc) > 1 and isinstance(loc[-1], int) else ""
    return f"the request body is not valid JSON: {reason}{at}"


def _not_json(request: Request) -> bool:
    """A route that reads a JSON body got a body of another `Content-Type` (FastAPI then
    validates the raw bytes, which fails): answered 415, not a puzzling 422. Checked once
    validation fails, so an unauthenticated caller still gets its 401 first."""
    route = request.scope.get("route")
    if not isinstance(route, APIRoute) or route.body_field is None:
        return False
    content_type = request.headers.get("content-type")
    if content_type is None and not _has_body(request):
        return False  # no body at all: validation says which field is required
    return media_type(content_type) != "application/json"


def _has_body(request: Request) -> bool:
    length = request.headers.get("content-length")
    return "transfer-encoding" in request.headers or (length is not None and length != "0")


def _validation_answer(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 naming every bad field (the first in `field`); 400 for a body that is not JSON;
    415 for a body that is not declared JSON."""
    if _not_json(request):
        return _answer(UnsupportedContentType("this route reads only application/json bodies"))
    details = list(exc.errors())
    broken = next((e for e in details if e.get("type") == "json_invalid"), None)
    if broken is not None:
        return _answer(MalformedBody(_json_decode_message(broken)))
    errors = [{"field": _error_field(e), "message": str(e.get("msg", ""))} for e in details]
    first = errors[0] if errors else {"field": None, "message": "invalid request"}
    where = f"{first['field']}: " if first["field"] else "body: "
    body = {
        "error": InvalidInput.code,
        "message": f"{where}{first['message']}",
        "field": first["field"],
        "errors": errors,
    }
    return JSONResponse(status_code=422, content=body)


def create_app(
    settings: Settings,
    engine: Engine,
    *,
    signer: BankSigner | None = None,
    chain: Chain | None = None,
    fees: FeePolicy | None = None,
    price_feeds: Feeds | None = None,
) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # Sync endpoints and dependencies run on anyio's default thread pool: size it
        # from the settings (the database pool is sized to match).
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.api_threads
        yield

    app = FastAPI(
        lifespan=lifespan,
        title="Pledge custody",
        version="0.1.0",
        docs_url="/v1/docs",
        openapi_url="/v1/openapi.json",
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.signer = signer
    app.state.chain = chain
    app.state.fees = fees if fees is not None else FeePolicy.from_settings(settings)
    app.state.price_feeds = price_feeds  # what a manual price is held to (custody.risk.manual)
    # One domain a line, so that branches adding one merge by adding lines.
    domains = (
        ops,
        auth,
        console,
        parties,
        loans,
        signer_statements,
        signing,
        risk,
        notify,
        audit,
        compliance,
        proof,
        reports,
        screening,
    )
    limits.bound_input(app, [domain.router for domain in domains])  # body limits, key first
    for domain in domains:
        app.include_router(domain.router)
    # The web console's pages and their own scripts and styles (their bodies, Origin and
    # CSRF tokens are checked by custody.console.endpoints; its invitation route is above).
    app.include_router(console.pages)
    app.mount("/console/static", StaticFiles(directory=console.STATIC_DIR), name="console-static")
    app.add_middleware(RequestMetrics)  # outermost: the request id and latency of all

    # Every error answer, the framework's included, is one shape (`error_body`).
    @app.exception_handler(CustodyError)
    async def _custody_error(_request: Request, exc: CustodyError) -> JSONResponse:
        return _answer(exc)

    @app.exception_handler(StarletteHTTPException)  # FastAPI's HTTPException subclasses it
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _http_answer(request, exc)

    @app.exception_handler(PoolTimeout)
    async def _no_connection(_request: Request, _exc: PoolTimeout) -> JSONResponse:
        # Every database connection stayed busy for the pool's timeout: overload.
        log.warning("api.busy", detail="no database connection in time: answered 503")
        busy = ServiceBusy("the service is at capacity: retry shortly")
        return _answer(busy, {"Retry-After": "1"})

    @app.exception_handler(OperationalError)
    async def _database_error(request: Request, exc: OperationalError) -> JSONResponse:
        if not refused_connection(exc):
            return await _unexpected(request, exc)
        # PostgreSQL has no room for another connection, or is away: overload or an
        # outage, not a fault of this request (the failed transaction sent nothing).
        log.warning("api.database_refused", detail=str(exc.orig).splitlines()[0][:200])
        busy = ServiceBusy("the database is not taking connections: retry shortly")
        return _answer(busy, {"Retry-After": "1"})

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_answer(request, exc)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        # The traceback (no local variables) for the operator; the caller gets no detail.
        log.error("api.unhandled_error", error_type=type(exc).__name__, exc_info=exc)
        body = {"error": CustodyError.code, "message": "internal error", "field": None}
        return JSONResponse(status_code=500, content=body)

    return app
