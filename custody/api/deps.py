"""Request-scoped dependencies: one database session per request, committed once
when the endpoint returns (before the response is sent), rolled back on any error."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Request
from sqlmodel import Session

from custody.auth.context import Context
from custody.auth.service import authenticate
from custody.config import Settings
from custody.db.models import Principal
from custody.db.session import transaction
from custody.errors import NodeNotConfigured
from custody.signing.chain import Chain, FeePolicy
from hsm.client import BankSigner


def get_session(request: Request) -> Iterator[Session]:
    with transaction(request.app.state.engine) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session, scope="function")]


def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]


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


def get_signer(request: Request) -> BankSigner | None:
    signer: BankSigner | None = getattr(request.app.state, "signer", None)
    return signer


SignerDep = Annotated[BankSigner | None, Depends(get_signer)]


def get_chain(request: Request) -> Chain:
    chain: Chain | None = getattr(request.app.state, "chain", None)
    if chain is None:
        raise NodeNotConfigured("no Bitcoin node is configured for this service")
    return chain


ChainDep = Annotated[Chain, Depends(get_chain)]


def get_fee_policy(request: Request) -> FeePolicy:
    fees: FeePolicy = request.app.state.fees
    return fees


FeesDep = Annotated[FeePolicy, Depends(get_fee_policy)]


async def read_body(request: Request) -> bytes:
    """The raw body (a binary .psbt upload); read here so the endpoint can stay sync."""
    return await request.body()


RawBodyDep = Annotated[bytes, Depends(read_body)]


def authenticate_briefly(request: Request, settings: Settings) -> Context:
    """Authenticate in a short transaction of its own (routes that call the signer must
    not hold the request's transaction open across that call)."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    with transaction(request.app.state.engine) as session:
        principal = authenticate(session, token.strip() if scheme.lower() == "bearer" else None)
    return Context(principal=principal, network=settings.network)

