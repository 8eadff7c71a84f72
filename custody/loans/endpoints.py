"""Loan endpoints: terms, key seats, collateral addresses, deposits and wallet exports."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Body, Query
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from custody.api.deps import (
    ContextDep,
    LoanId,
    SessionDep,
)
from custody.api.errors import BODY_ERRORS, errors_for
from custody.bitcoin import exports
from custody.db.models import KeyRole
from custody.errors import (
    AddressAlreadyIssued,
    AddressLimitReached,
    CompliancePending,
    ExportUnsupported,
    HdKeyRequired,
    KeyInTwoSeats,
    KeyOfAnotherParty,
    KeySeatTaken,
    KeySetReused,
    KeysIncomplete,
    LoanNotFound,
    LoanNotInState,
    OperatorWithoutBank,
    PartyKindMismatch,
    RoleNotAllowed,
    SeatNotYours,
    SingleAddressDescriptor,
    UnknownParty,
)
from custody.loans import service as loans
from custody.loans.schemas import (
    AddressOut,
    DepositOut,
    ExportFormat,
    KeyIn,
    LoanCreate,
    LoanOut,
)
from custody.loans.views import address_out, deposits_out, loan_out, loans_out
from custody.schemas import ID_MAX
from pledge.descriptors import CollateralDescriptor
from pledge.errors import InvalidInput, NotAuthenticated

router = APIRouter(prefix="/v1")

# Who may not see a loan learns nothing more than that it is not found.
_READ_LOAN = (NotAuthenticated, InvalidInput, LoanNotFound)


@router.post(
    "/loans",
    status_code=201,
    tags=["loans"],
    responses=errors_for(
        NotAuthenticated,
        RoleNotAllowed,
        InvalidInput,
        OperatorWithoutBank,
        UnknownParty,
        PartyKindMismatch,
        *BODY_ERRORS,
    ),
)
def create_loan(body: LoanCreate, session: SessionDep, ctx: ContextDep) -> LoanOut:
    return loan_out(session, loans.create_loan(session, ctx, body))


@router.get("/loans", tags=["loans"], responses=errors_for(NotAuthenticated, InvalidInput))
def list_loans(
    session: SessionDep,
    ctx: ContextDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Annotated[int, Query(ge=0, lt=ID_MAX + 1)] = 0,  # an SQL OFFSET is 64-bit
) -> list[LoanOut]:
    return loans_out(session, loans.list_loans(session, ctx, limit=limit, offset=offset))


@router.get("/loans/{loan_id}", tags=["loans"], responses=errors_for(*_READ_LOAN))
def get_loan(loan_id: LoanId, session: SessionDep, ctx: ContextDep) -> LoanOut:
    return loan_out(session, loans.get_loan(session, ctx, loan_id))


@router.put(
    "/loans/{loan_id}/keys/{seat}",
    tags=["keys"],
    responses=errors_for(
        *_READ_LOAN,
        SeatNotYours,
        HdKeyRequired,
        LoanNotInState,
        KeySeatTaken,
        KeyInTwoSeats,
        KeyOfAnotherParty,
        KeySetReused,
        AddressAlreadyIssued,
        CompliancePending,
        *BODY_ERRORS,
    ),
)
def register_key(
    loan_id: LoanId,
    seat: KeyRole,
    body: Annotated[KeyIn, Body()],
    session: SessionDep,
    ctx: ContextDep,
) -> LoanOut:
    return loan_out(session, loans.register_key(session, ctx, loan_id, seat, body))


@router.post(
    "/loans/{loan_id}/addresses",
    status_code=201,
    tags=["addresses"],
    responses=errors_for(
        *_READ_LOAN,
        RoleNotAllowed,
        KeysIncomplete,
        LoanNotInState,
        SingleAddressDescriptor,
        AddressLimitReached,
        AddressAlreadyIssued,
    ),
)
def new_address(loan_id: LoanId, session: SessionDep, ctx: ContextDep) -> AddressOut:
    return address_out(loans.new_address(session, ctx, loan_id))


@router.get("/loans/{loan_id}/addresses", tags=["addresses"], responses=errors_for(*_READ_LOAN))
def list_addresses(loan_id: LoanId, session: SessionDep, ctx: ContextDep) -> list[AddressOut]:
    return [address_out(a) for a in loans.list_addresses(session, ctx, loan_id)]


@router.get("/loans/{loan_id}/deposits", tags=["deposits"], responses=errors_for(*_READ_LOAN))
def list_deposits(loan_id: LoanId, session: SessionDep, ctx: ContextDep) -> list[DepositOut]:
    loans.get_loan(session, ctx, loan_id)
    return deposits_out(session, loan_id)


@router.get(
    "/loans/{loan_id}/export/{fmt}",
    tags=["exports"],
    response_model=None,
    responses={
        200: {
            "description": "`descriptor`, `caravan` and `wallet-policy` (BIP-388): a JSON "
            "wallet file with `works_with` and `note`; `coldcard`, `bsms` (BIP-129) and "
            "`sparrow`: a text file (attachment). Every answer says in its `X-Works-With` "
            "and `X-Export-Note` headers which devices and programs can use it.",
            "content": {
                "application/json": {"schema": {"type": "object"}},
                "text/plain": {"schema": {"type": "string"}},
            },
        },
        **errors_for(*_READ_LOAN, KeysIncomplete, ExportUnsupported),
    },
)
def export(loan_id: LoanId, fmt: ExportFormat, session: SessionDep, ctx: ContextDep) -> Response:
    """Wallet files for the parties to check the collateral address on their own devices.
    A format that cannot express this loan answers 422 `export_unsupported` and says why
    (a fixed HSM key: only Trezor via HWI, Bitcoin Core and BDK can use it)."""
    loan = loans.get_loan(session, ctx, loan_id)
    descriptor = loans.loan_descriptor(session, loan, ctx.network)
    name = f"loan-{loan_id}"
    if fmt in _JSON_EXPORTS:
        body = _JSON_EXPORTS[fmt](descriptor, name)
        headers = exports.export_notice(descriptor, fmt).headers()
        return JSONResponse(body, headers=headers)
    text_export, filename = _TEXT_EXPORTS[fmt]
    text = text_export(descriptor, name)
    headers = exports.export_notice(descriptor, fmt).headers()
    headers["Content-Disposition"] = f'attachment; filename="{name}{filename}"'
    return PlainTextResponse(text, headers=headers)


_JSON_EXPORTS: dict[str, Callable[[CollateralDescriptor, str], dict[str, Any]]] = {
    "descriptor": exports.export_descriptor,
    "caravan": exports.export_caravan,
    "wallet-policy": exports.export_wallet_policy,
}
_TEXT_EXPORTS: dict[str, tuple[Callable[[CollateralDescriptor, str], str], str]] = {
    "coldcard": (exports.export_coldcard, "-coldcard.txt"),
    "bsms": (exports.export_bsms, ".bsms"),
    "sparrow": (exports.export_sparrow, "-sparrow.txt"),
}
