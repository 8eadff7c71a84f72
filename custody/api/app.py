"""The FastAPI application: each domain's routes under /v1, typed errors mapped to HTTP once."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio.to_thread
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.engine import Engine
from sqlalchemy.exc import TimeoutError as PoolTimeout

from custody.api import ops
from custody.audit import endpoints as audit
from custody.auth import endpoints as auth
from custody.config import Settings
from custody.loans import endpoints as loans
from custody.notify import endpoints as notify
from custody.parties import endpoints as parties
from custody.risk import endpoints as risk
from custody.risk.manual import Feeds
from custody.signer import endpoints as signer_statements
from custody.signing import endpoints as signing
from custody.signing.chain import Chain, FeePolicy
from hsm.client import BankSigner
from pledge.errors import CustodyError, InvalidInput

log = structlog.get_logger(__name__)


def _field_name(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    # Discriminated unions add the tag to the location: drop it, keep the field.
    parts = [p for p in parts if p not in ("hd", "hsm")]
    return ".".join(parts) or "body"


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
    for domain in (ops, auth, parties, loans, signer_statements, signing, risk, notify, audit):
        app.include_router(domain.router)

    @app.exception_handler(CustodyError)
    async def _custody_error(_request: Request, exc: CustodyError) -> JSONResponse:
        return JSONResponse(status_code=exc.status_code, content=exc.to_dict())

    @app.exception_handler(PoolTimeout)
    async def _no_connection(_request: Request, _exc: PoolTimeout) -> JSONResponse:
        # Every database connection stayed busy for the pool's timeout: overload.
        log.warning("no database connection in time: answered 503")
        return JSONResponse(
            status_code=503,
            content={"error": "busy", "message": "the service is at capacity: retry shortly"},
            headers={"Retry-After": "1"},
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"field": _field_name(tuple(e.get("loc", ()))), "message": str(e.get("msg", ""))}
            for e in exc.errors()
        ]
        first = errors[0] if errors else {"field": "body", "message": "invalid request"}
        return JSONResponse(
            status_code=422,
            content={
                "error": InvalidInput.code,
                "message": f"{first['field']}: {first['message']}",
                "field": first["field"],
                "errors": errors,
            },
        )

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        # The traceback (no local variables) for the operator; the caller gets no detail.
        log.error("unhandled error", error_type=type(exc).__name__, exc_info=exc)
        return JSONResponse(
            status_code=500, content={"error": "internal_error", "message": "internal error"}
        )

    return app
