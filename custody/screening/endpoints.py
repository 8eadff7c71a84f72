"""Screening endpoints: the decisions (the compliance officer's queue, the auditor's view,
the CSV for the bank's filing), a compliance officer's resolution, and the bank's lists
the built-in provider reads."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query
from fastapi.responses import PlainTextResponse

from custody.api.deps import ContextDep, ScreeningDecisionId, ScreeningListEntryId, SessionDep
from custody.api.errors import BODY_ERRORS, errors_for
from custody.errors import (
    RoleNotAllowed,
    ScreeningAlreadyResolved,
    ScreeningDecisionNotFound,
    ScreeningListEntryExists,
    ScreeningListEntryNotFound,
    ScreeningNotDecided,
)
from custody.screening import export, service
from custody.screening.schemas import (
    DecisionOut,
    ListEntryIn,
    ListEntryOut,
    ListRemovalIn,
    ResolutionIn,
    decision_out,
    entry_out,
)
from pledge.errors import InvalidInput, NotAuthenticated

router = APIRouter(prefix="/v1")
_READ = (NotAuthenticated, InvalidInput, RoleNotAllowed)


@router.get("/screening-decisions", tags=["screening"], responses=errors_for(*_READ))
def list_decisions(
    session: SessionDep,
    ctx: ContextDep,
    result: Literal["review", "block", "pending", "clear"] | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Annotated[int, Query(ge=0, le=2**62)] = 0,
) -> list[DecisionOut]:
    """Screening decisions, newest first; `result=review` is the compliance officer's
    queue, `block` the blocked ones (confirmed or not). Compliance officers and auditors."""
    rows = service.decisions(session, ctx, result, limit=limit, offset=offset)
    return [decision_out(row, miner) for row, _loan, miner in rows]


@router.get(
    "/screening-decisions.csv",
    tags=["screening"],
    response_class=PlainTextResponse,
    responses={
        200: {"description": "CSV, one row per decision", "content": {"text/csv": {}}},
        **errors_for(*_READ),
    },
)
def export_decisions(session: SessionDep, ctx: ContextDep) -> PlainTextResponse:
    """Every decision the providers did not call clear (review or block, resolved or
    not), for the bank's own filing: subject, loan, miner, outpoints, addresses, amount,
    score, reasons, when decided, who resolved it and when."""
    body = export.flagged_csv(session, ctx)
    return PlainTextResponse(
        body,
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": 'attachment; filename="screening-decisions.csv"'},
    )


@router.get(
    "/screening-decisions/{decision_id}",
    tags=["screening"],
    responses=errors_for(*_READ, ScreeningDecisionNotFound),
)
def get_decision(
    decision_id: ScreeningDecisionId, session: SessionDep, ctx: ContextDep
) -> DecisionOut:
    return decision_out(service.decision_by_id(session, ctx, decision_id))


@router.post(
    "/screening-decisions/{decision_id}/resolution",
    tags=["screening"],
    responses=errors_for(
        *_READ,
        ScreeningDecisionNotFound,
        ScreeningNotDecided,
        ScreeningAlreadyResolved,
        *BODY_ERRORS,
    ),
)
def resolve_decision(
    decision_id: ScreeningDecisionId, body: ResolutionIn, session: SessionDep, ctx: ContextDep
) -> DecisionOut:
    """A compliance officer clears a decision under review or blocked (its deposit then
    counts as collateral on the watcher's next step) or confirms its block, with the
    reason (audited). Once: a second resolution is refused and changes nothing."""
    return decision_out(service.resolve(session, ctx, decision_id, body.outcome, body.reason))


@router.get("/screening-lists", tags=["screening"], responses=errors_for(*_READ))
def list_entries(session: SessionDep, ctx: ContextDep) -> list[ListEntryOut]:
    """The bank's lists the built-in provider screens against."""
    return [entry_out(e) for e in service.list_entries(session, ctx)]


@router.post(
    "/screening-lists",
    status_code=201,
    tags=["screening"],
    responses=errors_for(*_READ, ScreeningListEntryExists, *BODY_ERRORS),
)
def add_entry(body: ListEntryIn, session: SessionDep, ctx: ContextDep) -> ListEntryOut:
    """Put an address, a txid or an outpoint on the block or review list (compliance
    officers and the admin; audited). It applies to screenings from now on."""
    entry = service.add_list_entry(session, ctx, body.kind, body.value, body.action, body.note)
    return entry_out(entry)


@router.post(
    "/screening-lists/{entry_id}/removal",
    tags=["screening"],
    responses=errors_for(*_READ, ScreeningListEntryNotFound, *BODY_ERRORS),
)
def remove_entry(
    entry_id: ScreeningListEntryId, body: ListRemovalIn, session: SessionDep, ctx: ContextDep
) -> dict[str, int]:
    """Take an entry off the lists, with the reason (audited)."""
    service.remove_list_entry(session, ctx, entry_id, body.reason)
    return {"removed": entry_id}
