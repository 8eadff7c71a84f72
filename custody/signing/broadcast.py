"""Broadcasting a ready request: finalize, have the node check it (testmempoolaccept), send, and
record the node's answer in a new transaction."""

from __future__ import annotations

import contextlib
from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import Session

from custody.audit.service import record
from custody.auth.context import Context
from custody.auth.policy import require_role
from custody.chain.rpc import RpcTxAlreadyKnown
from custody.db.models import (
    RequestState,
    Role,
    SigningAction,
    SigningRequest,
    utcnow,
)
from custody.db.session import transaction
from custody.errors import SigningRequestNotInState
from custody.loans import repository as loans_repository
from custody.notify.events import notify_loan
from custody.signing.chain import Chain
from custody.signing.psbt import (
    finalize,
)
from custody.signing.repository import get_request, request_by_id


def _ask_the_node(chain: Chain, psbt: str) -> tuple[str, dict[str, Any]]:
    """Finalize (bdk checks every signature), have the node check it, and broadcast what
    it accepts. Network only: no session. Returns the raw transaction and the verdict."""
    raw = finalize(psbt).hex()
    verdict = chain.test_mempool_accept(raw)
    if verdict.get("allowed"):
        with contextlib.suppress(RpcTxAlreadyKnown):  # an earlier attempt got through
            chain.send_raw_transaction(raw)
    return raw, verdict


def record_broadcast(
    session: Session, actor: str, req: SigningRequest, verdict: dict[str, Any]
) -> None:
    """What the node said: rejected (the request stays ready with the reason) or sent."""
    if not verdict.get("allowed"):
        req.reject_reason = str(verdict.get("reject-reason") or verdict)
        session.add(req)
        record(
            session,
            actor=actor,
            action="signing_request.rejected_by_node",
            loan_id=req.loan_id,
            request_id=req.id,
            decision="refused",
            reason=req.reject_reason,
        )
        return
    req.state, req.reject_reason, req.updated_at = RequestState.broadcast, None, utcnow()
    session.add(req)
    record(
        session,
        actor=actor,
        action="signing_request.broadcast",
        loan_id=req.loan_id,
        request_id=req.id,
        data={"txid": req.unsigned_txid},
    )
    if req.action in (SigningAction.liquidation, SigningAction.partial_liquidation):
        loan = loans_repository.loan(session, req.loan_id)
        assert loan is not None
        notify_loan(
            session,
            loan,
            "liquidation.broadcast",
            {"request_id": req.id, "txid": req.unsigned_txid},
        )


def broadcast_ready(engine: Engine, actor: str, request_id: int, chain: Chain) -> None:
    """Broadcast a ready request with no transaction open: read its PSBT, ask the node,
    record the answer in a new transaction. If the outcome is lost (a crash after the
    send), the request stays ready: a retry sends the same transaction again (the node
    says it knows it) and the watcher closes the request when it is mined."""
    with transaction(engine) as session:
        req = request_by_id(session, request_id)
        if req is None or req.state != RequestState.ready:
            return
        psbt = req.psbt
    _, verdict = _ask_the_node(chain, psbt)
    with transaction(engine) as session:
        req = request_by_id(session, request_id)
        if req is not None and req.state == RequestState.ready and req.psbt == psbt:
            record_broadcast(session, actor, req, verdict)


def check_ready(session: Session, ctx: Context, request_id: int) -> SigningRequest:
    """May this caller have this request broadcast (again)?"""
    req = get_request(session, ctx, request_id)
    require_role(ctx.principal, Role.bank_operator, Role.bank_approver)
    if req.state != RequestState.ready:
        raise SigningRequestNotInState(f"signing request {request_id} is {req.state}, not ready")
    return req
