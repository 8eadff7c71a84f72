"""Collecting signatures: each upload is checked before it is kept; the request is ready once its
two seats have signed."""

from __future__ import annotations

from sqlmodel import Session

from custody.audit.service import record
from custody.auth.context import Context
from custody.auth.policy import require_role
from custody.db.models import (
    KeyRole,
    Loan,
    RequestState,
    Role,
    SigningAction,
    SigningRequest,
    utcnow,
)
from custody.errors import BankApprovalRequired, SigningRequestNotInState
from custody.loans import repository as loans_repository
from custody.loans.service import loan_descriptor
from custody.signing.psbt import (
    CollateralInput,
    check_and_merge,
)
from custody.signing.repository import approval_not_by, get_request, request_inputs
from custody.signing.rules import REQUIRED_SEATS
from pledge.descriptors import CollateralDescriptor
from pledge.keys import HDKey


def _seat_of_pubkeys(
    session: Session, loan: Loan, descriptor: CollateralDescriptor, inputs: list[CollateralInput]
) -> list[dict[bytes, KeyRole]]:
    seats = (KeyRole.miner, KeyRole.bank, KeyRole.arbiter)
    out: list[dict[bytes, KeyRole]] = []
    for item in inputs:
        mapping: dict[bytes, KeyRole] = {}
        for seat, key in zip(seats, descriptor.keys, strict=True):
            pub = (
                key.public_key(1 if item.change else 0, item.address_index)
                if isinstance(key, HDKey)
                else key.public_key
            )
            mapping[pub] = seat
        out.append(mapping)
    return out


def _signed_seats(signed: list[set[bytes]], per_input: list[dict[bytes, KeyRole]]) -> set[KeyRole]:
    """Seats that have signed every input (`signed`: each input's signing public keys)."""
    seats: set[KeyRole] | None = None
    for pubs, mapping in zip(signed, per_input, strict=True):
        here = {mapping[p] for p in pubs if p in mapping}
        seats = here if seats is None else seats & here
    return seats or set()


def add_signatures(
    session: Session,
    ctx: Context,
    request_id: int,
    uploaded: bytes | str,
    *,
    via: str = "upload",
) -> SigningRequest:
    """Keep the new, verified signatures. At quorum the request is ready, and the caller
    broadcasts it after commit with `broadcast_ready` (no transaction is ever open across
    the node's calls)."""
    req = get_request(session, ctx, request_id)
    loan = loans_repository.loan(session, req.loan_id)
    assert loan is not None
    if via != "hsm":  # the HSM path was authorised by the signer's own boundary checks
        require_role(
            ctx.principal, Role.miner, Role.arbiter, Role.bank_operator, Role.bank_approver
        )
    if req.state not in (RequestState.awaiting_signatures, RequestState.ready):
        raise SigningRequestNotInState(
            f"signing request {request_id} is {req.state}: it takes no signatures"
        )
    descriptor = loan_descriptor(session, loan, ctx.network)
    inputs = request_inputs(req)
    checked = check_and_merge(req.psbt, uploaded, descriptor, inputs)
    new = checked.new
    per_input = _seat_of_pubkeys(session, loan, descriptor, inputs)
    bank_signs = any(
        per_input[i].get(pub) == KeyRole.bank for i, sigs in new.items() for pub in sigs
    )
    if bank_signs and via != "hsm" and not _approved(session, req):
        raise BankApprovalRequired(
            "the bank's signature needs a bank approver's approval of this "
            "transaction first (4-eyes)"
        )
    seats_now = sorted({per_input[i][pub].value for i, sigs in new.items() for pub in sigs})
    req.psbt = checked.merged
    done = _signed_seats(checked.signers, per_input)
    req.signed_seats = ",".join(
        s.value for s in (KeyRole.miner, KeyRole.bank, KeyRole.arbiter) if s in done
    )
    req.updated_at = utcnow()
    session.add(req)
    record(
        session,
        actor=ctx.actor,
        action="signing_request.signed",
        loan_id=loan.id,
        request_id=req.id,
        data={"seats": seats_now, "via": via, "signed_seats": req.signed_seats},
    )
    required = set(REQUIRED_SEATS[SigningAction(req.action)])
    if required <= done and req.state == RequestState.awaiting_signatures:
        req.state = RequestState.ready
        record(
            session,
            actor=ctx.actor,
            action="signing_request.ready",
            loan_id=loan.id,
            request_id=req.id,
        )
    return req


def _approved(session: Session, req: SigningRequest) -> bool:
    return approval_not_by(session, req.id, req.unsigned_txid, req.created_by) is not None
