"""Report downloads for auditors and compliance officers: the collateral register at a
moment (CSV, XLSX) and a loan's statement (PDF). Sync routes: they run in the thread
pool, read in their own read transaction and ask the node after it has closed."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response, StreamingResponse

from custody.api.deps import ContextDep, LoanId
from custody.api.errors import errors_for
from custody.errors import LoanNotFound, NodeNotConfigured, NodeUnavailable, RoleNotAllowed
from custody.reports import formats, pdf, service
from pledge.errors import InvalidInput, NotAuthenticated

router = APIRouter(prefix="/v1")

AtQuery = Annotated[
    datetime | None,
    Query(description="the moment (ISO 8601 with a zone, not in the future); default now"),
]
_REGISTER_ERRORS = (
    NotAuthenticated,
    InvalidInput,
    RoleNotAllowed,
    NodeNotConfigured,
    NodeUnavailable,
)


def _attachment(name: str) -> dict[str, str]:
    return {"Content-Disposition": f'attachment; filename="{name}"'}


def _register(request: Request, ctx: ContextDep, at: datetime | None) -> service.Register:
    return service.collateral_register(
        request.app.state.engine, ctx, getattr(request.app.state, "chain", None), at
    )


@router.get(
    "/reports/collateral-register.csv",
    tags=["reports"],
    response_class=StreamingResponse,
    responses={**errors_for(*_REGISTER_ERRORS), 200: {"content": {formats.CSV_TYPE: {}}}},
)
def collateral_register_csv(request: Request, ctx: ContextDep, at: AtQuery = None) -> Response:
    register = _register(request, ctx, at)
    return StreamingResponse(
        formats.csv_chunks(register),
        media_type=formats.CSV_TYPE,
        headers=_attachment(f"collateral-register-{formats.iso(register.at)}.csv"),
    )


@router.get(
    "/reports/collateral-register.xlsx",
    tags=["reports"],
    response_class=Response,
    responses={**errors_for(*_REGISTER_ERRORS), 200: {"content": {formats.XLSX_TYPE: {}}}},
)
def collateral_register_xlsx(request: Request, ctx: ContextDep, at: AtQuery = None) -> Response:
    register = _register(request, ctx, at)
    return Response(
        formats.xlsx_bytes(register),
        media_type=formats.XLSX_TYPE,
        headers=_attachment(f"collateral-register-{formats.iso(register.at)}.xlsx"),
    )


@router.get(
    "/loans/{loan_id}/statement.pdf",
    tags=["reports"],
    response_class=Response,
    responses={
        **errors_for(NotAuthenticated, InvalidInput, RoleNotAllowed, LoanNotFound),
        200: {"content": {pdf.PDF_TYPE: {}}},
    },
)
def loan_statement_pdf(
    request: Request, ctx: ContextDep, loan_id: LoanId, at: AtQuery = None
) -> Response:
    statement = service.loan_statement(request.app.state.engine, ctx, loan_id, at)
    return Response(
        pdf.statement_pdf(statement),
        media_type=pdf.PDF_TYPE,
        headers=_attachment(f"loan-{loan_id}-statement.pdf"),
    )
