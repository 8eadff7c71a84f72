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

import asyncio
import weakref
from collections.abc import AsyncIterator
from typing import Annotated

import anyio
from fastapi import Depends, Header, Path, Request
from sqlalchemy.engine import Engine
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from custody.auth.context import Context
from custody.auth.service import authenticate
from custody.config import Settings
from custody.db.models import Principal
from custody.db.session import read_only_engine, transaction
from custody.errors import (
    LoanNotFound,
    NodeNotConfigured,
    PartyNotFound,
    PriceNotFound,
    PrincipalNotFound,
    ScreeningDecisionNotFound,
    ScreeningListEntryNotFound,
    SignerStatementNotFound,
    SigningRequestNotFound,
)
from custody.schemas import PathId
from custody.signing.chain import Chain, FeePolicy
from hsm.client import BankSigner

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


_WRITE_GATES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, anyio.Lock] = (
    weakref.WeakKeyDictionary()
)


def _write_gate() -> anyio.Lock:
    """One request-session writer at a time per process (per event loop)."""
    loop = asyncio.get_running_loop()
    gate = _WRITE_GATES.get(loop)
    if gate is None:
        gate = _WRITE_GATES[loop] = anyio.Lock()
    return gate


async def get_session(request: Request) -> AsyncIterator[Session]:
    """The request's unit of work. It connects lazily: on its first query, in the
    endpoint's thread.

    A read session is closed on the event loop (a rollback: no disk, no thread needed).
    A write session waits at the process's write gate first, on the event loop, holding
    neither a thread nor a connection. Without it, concurrent writers each held a worker
    thread while they waited for the database's write lock (SQLite's lock, a loan's row
    lock), and the writer that had the lock could not get a thread back to commit: under
    load every thread ended up waiting for a commit that needed one of them, until the
    busy timeout. The database serializes writers anyway; here they queue without
    blocking anybody else. Endpoints that call the node or the signer do not use this
    session (their own short transactions), so the gate never waits on the network."""
    engine = request.app.state.engine
    if request.method in READ_METHODS:
        session = Session(read_only_engine(engine), expire_on_commit=False)
        try:
            yield session
        finally:
            session.close()
        return
    async with _write_gate():
        session = Session(engine, expire_on_commit=False)
        try:
            yield session
            await run_in_threadpool(session.commit)
        except BaseException:
            await run_in_threadpool(session.rollback)
            raise
        finally:
            session.close()


SessionDep = Annotated[Session, Depends(get_session, scope="function")]

# The dependencies below that only read app state are `async def`: FastAPI sends every
# sync dependency on its own trip to the thread pool, and five such trips per request
# cost more CPU than the queries of a simple GET.


async def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]


# Where custody.api.limits leaves the outcome of authenticating a request before its body
# is read: the Principal, or the exception to answer with.
AUTHENTICATED = "custody.authenticated"


def bearer_token(authorization: str | None) -> str | None:
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer":
            return value.strip()
    return None


def authenticate_request(engine: Engine, authorization: str | None) -> Principal:
    """The caller, in a read transaction of its own, its connection back in the pool before
    this thread ends."""
    with transaction(engine, write=False) as session:
        return authenticate(session, bearer_token(authorization))


async def get_principal(
    request: Request,
    authorization: Annotated[str | None, Header()] = None,
) -> Principal:
    """The caller: as custody.api.limits found it before reading the body (no second
    transaction), else authenticated here (an app without that middleware)."""
    outcome = request.scope.get(AUTHENTICATED)
    if isinstance(outcome, Principal):
        return outcome
    if isinstance(outcome, BaseException):
        raise outcome
    principal: Principal = await run_in_threadpool(
        authenticate_request, request.app.state.engine, authorization
    )
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]


async def get_context(
    principal: PrincipalDep, settings: Annotated[Settings, Depends(get_settings_dep)]
) -> Context:
    return Context(principal=principal, network=settings.network)


ContextDep = Annotated[Context, Depends(get_context)]


async def get_signer(request: Request) -> BankSigner | None:
    signer: BankSigner | None = getattr(request.app.state, "signer", None)
    return signer


SignerDep = Annotated[BankSigner | None, Depends(get_signer)]


async def get_chain(request: Request) -> Chain:
    chain: Chain | None = getattr(request.app.state, "chain", None)
    if chain is None:
        raise NodeNotConfigured("no Bitcoin node is configured for this service")
    return chain


ChainDep = Annotated[Chain, Depends(get_chain)]


async def get_fee_policy(request: Request) -> FeePolicy:
    fees: FeePolicy = request.app.state.fees
    return fees


FeesDep = Annotated[FeePolicy, Depends(get_fee_policy)]


async def read_body(request: Request) -> bytes:
    """The raw body (a binary .psbt upload); read here so the endpoint can stay sync."""
    return await request.body()


RawBodyDep = Annotated[bytes, Depends(read_body)]


# Path ids. One beyond what an id column holds names nothing: the route's own 404, the same
# as for an id nobody has (custody.schemas.PathId), never a failed query.
LoanId = Annotated[int, Path(), PathId(lambda _: LoanNotFound())]
PartyId = Annotated[int, Path(), PathId(lambda _: PartyNotFound())]
SigningRequestId = Annotated[int, Path(), PathId(lambda _: SigningRequestNotFound())]
SignerStatementId = Annotated[int, Path(), PathId(lambda _: SignerStatementNotFound())]
PriceId = Annotated[int, Path(), PathId(lambda _: PriceNotFound())]
PrincipalId = Annotated[int, Path(), PathId(lambda _: PrincipalNotFound())]
ScreeningDecisionId = Annotated[int, Path(), PathId(lambda _: ScreeningDecisionNotFound())]
ScreeningListEntryId = Annotated[int, Path(), PathId(lambda _: ScreeningListEntryNotFound())]
