"""Request-scoped dependencies: one database session per request, committed once
when the endpoint returns (before the response is sent), rolled back on any error.

A GET (or HEAD) gets a read-only transaction: no write lock, and no write. The caller
is authenticated in a short read transaction of its own, so a request holds a database
connection only while its own thread runs: FastAPI runs each sync dependency and the
endpoint on separate trips to the thread pool, and a connection held across that wait
let requests that had one queue for a thread behind requests that had a thread and
queued for a connection (the whole service froze until the pool's timeout).
"""

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

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def get_session(request: Request) -> Iterator[Session]:
    # The session connects lazily: on its first query, in the endpoint's thread.
    write = request.method not in READ_METHODS
    with transaction(request.app.state.engine, write=write) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session, scope="function")]


def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]


def get_principal(
    request: Request,
    authorization: Annotated[str | None, Header()] = None,
) -> Principal:
    token = None
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer":
            token = value.strip()
    # Its own read transaction, its connection back in the pool before this thread ends.
    with transaction(request.app.state.engine, write=False) as session:
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
