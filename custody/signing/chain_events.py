"""What the watcher tells signing: a request's transaction was mined (closing its RBF family and
moving the loan) or un-mined by a reorg."""

from __future__ import annotations

from sqlmodel import Session

from custody.audit.service import record
from custody.db.models import (
    RequestState,
    SigningAction,
    SigningRequest,
    utcnow,
)
from custody.loans import repository as loans_repository
from custody.loans.service import change_state
from custody.notify.events import notify_loan
from custody.signing.repository import evidence, rbf_family
from custody.signing.rules import OPEN, STATE_WHEN_DONE, STATE_WHILE_OPEN


def mined(session: Session, req: SigningRequest, height: int, actor: str) -> None:
    """The request's transaction is in a block: it is confirmed, its siblings replaced,
    and the loan reaches the action's end state."""
    if req.mined_height == height:
        return
    req.state, req.mined_height, req.open_key = RequestState.confirmed, height, None
    req.updated_at = utcnow()
    session.add(req)
    record(
        session,
        actor=actor,
        action="signing_request.confirmed",
        loan_id=req.loan_id,
        request_id=req.id,
        data={"txid": req.unsigned_txid, "height": height},
    )
    for sibling in rbf_family(session, req):
        if sibling.state in OPEN:
            sibling.state, sibling.open_key, sibling.updated_at = (
                RequestState.replaced,
                None,
                utcnow(),
            )
            session.add(sibling)
            record(
                session,
                actor=actor,
                action="signing_request.replaced",
                loan_id=req.loan_id,
                request_id=sibling.id,
                data={"by": req.id},
            )
    loan = loans_repository.loan(session, req.loan_id)
    assert loan is not None
    done = STATE_WHEN_DONE[SigningAction(req.action)]
    if req.action in (SigningAction.liquidation, SigningAction.partial_liquidation):
        notify_loan(
            session,
            loan,
            "liquidation.confirmed",
            {"request_id": req.id, "txid": req.unsigned_txid, "height": height},
        )
    if done is not None:
        change_state(session, actor, loan, done, reason=f"{req.action} confirmed")
    else:
        loan.credited_kopecks += int(evidence(req).get("credited_kopecks", 0))
        loan.updated_at = utcnow()
        session.add(loan)


def unmined(session: Session, req: SigningRequest, actor: str) -> None:
    """A reorg took the request's transaction out of the chain: undo `mined`."""
    if req.mined_height is None:
        return
    req.state, req.mined_height, req.open_key = RequestState.broadcast, None, req.slot
    req.updated_at = utcnow()
    session.add(req)
    record(
        session,
        actor=actor,
        action="signing_request.unconfirmed",
        loan_id=req.loan_id,
        request_id=req.id,
        reason="reorg",
    )
    for sibling in rbf_family(session, req):
        if sibling.state == RequestState.replaced:
            sibling.state, sibling.open_key = RequestState.broadcast, sibling.slot
            session.add(sibling)
    loan = loans_repository.loan(session, req.loan_id)
    assert loan is not None
    action = SigningAction(req.action)
    if STATE_WHEN_DONE[action] is not None:
        back = STATE_WHILE_OPEN[action]
        assert back is not None
        change_state(session, actor, loan, back, reason="reorg")
    else:
        loan.credited_kopecks -= int(evidence(req).get("credited_kopecks", 0))
        session.add(loan)
