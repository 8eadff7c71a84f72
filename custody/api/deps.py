"""Request-scoped dependencies: one database session per request, committed once
when the endpoint returns (before the response is sent), rolled back on any error."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Request
from sqlmodel import Session

from custody.auth.service import authenticate
from custody.config import Settings
from custody.db.models import Principal
from custody.db.session import transaction
from custody.loans.service import Context, LoanKeyGenerator


def get_session(request: Request) -> Iterator[Session]:
    with transaction(request.app.state.engine) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session, scope="function")]


def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_principal(
    session: SessionDep,
    authorization: Annotated[str | None, Header()] = None,
) -> Principal:
    token = None
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer":
            token = value.strip()
    return authenticate(session, token)


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def get_context(
    principal: PrincipalDep, settings: Annotated[Settings, Depends(get_settings_dep)]
) -> Context:
    return Context(principal=principal, network=settings.network)


ContextDep = Annotated[Context, Depends(get_context)]


def get_hsm(request: Request) -> LoanKeyGenerator | None:
    hsm: LoanKeyGenerator | None = getattr(request.app.state, "hsm", None)
    return hsm


HsmDep = Annotated[LoanKeyGenerator | None, Depends(get_hsm)]
