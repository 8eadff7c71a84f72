"""Signing requests: a PSBT built for an action, the two seats that must sign it,
the signatures collected, and its way to the chain.

Lifecycle: awaiting_signatures -> ready -> broadcast -> confirmed (or cancelled;
or replaced when an RBF sibling confirms). Every step is an audit event in the
same transaction. The watcher closes requests when their transaction is mined.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Protocol

from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from custody.audit.service import record
from custody.auth.policy import ensure_can_view, require_role
from custody.chain.rpc import RpcTxAlreadyKnown
from custody.db.models import (
    Approval,
    CollateralAddress,
    Deposit,
    DepositState,
    KeyRole,
    Loan,
    LoanState,
    RequestState,
    Role,
    SigningAction,
    SigningRequest,
    utcnow,
)
from custody.db.session import transaction
from custody.loans.debt import outstanding_debt_kopecks
from custody.loans.service import Context, change_state, hand_out_address, loan_descriptor
from custody.notify.events import notify_loan
from custody.signing.psbt import (
    CollateralInput,
    PayTo,
    PayToCollateral,
    build_psbt,
    check_upload,
    dust_limit,
    estimate_vsize,
    finalize,
    merge_signatures,
    signers_per_input,
    unsigned_txid,
)
from hsm.client import BankSigner, Signed
from hsm.signer import PolicyViolation
from pledge.addresses import address_script_pubkey
from pledge.amounts import (
    Split,
    clamp_fee_rate,
    fee_for,
    kopecks_for_sats,
    liquidation_split,
    partial_liquidation_split,
    release_split,
)
from pledge.descriptors import CollateralDescriptor
from pledge.errors import Conflict, InvalidInput, NotFound, UpstreamUnavailable
from pledge.keys import HDKey

REQUIRED_SEATS: dict[SigningAction, tuple[KeyRole, KeyRole]] = {
    SigningAction.release: (KeyRole.miner, KeyRole.bank),
    SigningAction.dispute_release: (KeyRole.miner, KeyRole.arbiter),
    SigningAction.liquidation: (KeyRole.bank, KeyRole.arbiter),
    SigningAction.partial_liquidation: (KeyRole.bank, KeyRole.arbiter),
}
WHO_REQUESTS: dict[SigningAction, tuple[Role, ...]] = {
    SigningAction.release: (Role.bank_operator,),  # the bank records the repayment
    SigningAction.dispute_release: (Role.arbiter,),  # the bank does not cooperate
    SigningAction.liquidation: (Role.bank_operator, Role.risk_engine),
    SigningAction.partial_liquidation: (Role.bank_operator, Role.risk_engine),
}
FROM_STATES: dict[SigningAction, frozenset[LoanState]] = {
    SigningAction.release: frozenset({LoanState.active, LoanState.margin_call}),
    SigningAction.dispute_release: frozenset(
        {LoanState.active, LoanState.margin_call, LoanState.releasing}
    ),
    SigningAction.liquidation: frozenset(
        {LoanState.active, LoanState.margin_call, LoanState.liquidating}
    ),
    SigningAction.partial_liquidation: frozenset({LoanState.active, LoanState.margin_call}),
}
STATE_WHILE_OPEN: dict[SigningAction, LoanState | None] = {
    SigningAction.release: LoanState.releasing,
    SigningAction.dispute_release: LoanState.releasing,
    SigningAction.liquidation: LoanState.liquidating,
    SigningAction.partial_liquidation: None,  # the loan stays as it is
}
STATE_WHEN_DONE: dict[SigningAction, LoanState | None] = {
    SigningAction.release: LoanState.released,
    SigningAction.dispute_release: LoanState.released,
    SigningAction.liquidation: LoanState.liquidated,
    SigningAction.partial_liquidation: None,
}
OPEN = (RequestState.awaiting_signatures, RequestState.ready, RequestState.broadcast)


class Chain(Protocol):
    """What signing needs from the node (custody.chain.rpc.NodeRpc satisfies it)."""

    def get_raw_transaction(self, txid: str, block_hash: str | None = None) -> bytes: ...
    def estimate_fee_rate_sat_vb(self, conf_target: int) -> float | None: ...
    def test_mempool_accept(
        self, tx_hex: str, max_fee_rate_btc_kvb: float = 0.1
    ) -> dict[str, Any]: ...
    def send_raw_transaction(self, tx_hex: str) -> str: ...


@dataclass(frozen=True)
class FeePolicy:
    floor_sat_vb: Decimal = Decimal(2)
    ceiling_sat_vb: Decimal = Decimal(200)
    max_fee_sats: int = 1_000_000
    conf_target: int = 6


@dataclass(frozen=True)
class RequestParams:
    action: SigningAction
    fee_rate_sat_vb: Decimal | None = None
    price_rub_per_btc: Decimal | None = None
    price_source: str | None = None
    target_ltv_bps: int | None = None
    risk_evidence: dict[str, Any] | None = None  # automatic liquidation: price quote and LTV
    debt_kopecks: int | None = None  # the bank signer's figure, when its valuation prices it
    valuation_id: str | None = None  # the bank signer's valuation the amounts come from


# -- reading ------------------------------------------------------------------------


def get_request(session: Session, ctx: Context, request_id: int) -> SigningRequest:
    req = session.get(SigningRequest, request_id)
    if req is None:
        raise NotFound(f"signing request {request_id} not found")
    ensure_can_view(ctx.principal, session.get(Loan, req.loan_id), req.loan_id)
    return req


def list_requests(session: Session, ctx: Context, loan_id: int) -> list[SigningRequest]:
    ensure_can_view(ctx.principal, session.get(Loan, loan_id), loan_id)
    return list(
        session.exec(
            select(SigningRequest)
            .where(SigningRequest.loan_id == loan_id)
            .order_by(col(SigningRequest.id))
        ).all()
    )


def request_inputs(req: SigningRequest) -> list[CollateralInput]:
    return [
        CollateralInput(
            txid=i["txid"],
            vout=i["vout"],
            amount_sats=i["amount_sats"],
            address_index=i["address_index"],
            change=i["change"],
            prev_tx=bytes.fromhex(i["prev_tx"]),
        )
        for i in json.loads(req.inputs_json)
    ]


def evidence(req: SigningRequest) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(req.evidence_json)
    return value


# -- creating -----------------------------------------------------------------------


def _collateral_inputs(session: Session, loan: Loan, chain: Chain) -> list[CollateralInput]:
    """Every confirmed, unspent collateral output of the loan, as the watcher recorded it."""
    rows = session.exec(
        select(Deposit, CollateralAddress)
        .where(
            Deposit.loan_id == loan.id,
            Deposit.state == DepositState.confirmed,
            col(Deposit.address_id) == col(CollateralAddress.id),
        )
        .order_by(col(Deposit.id))
    ).all()
    if not rows:
        raise Conflict(f"loan {loan.id} has no confirmed collateral to move")
    try:
        return [
            CollateralInput(
                txid=dep.txid,
                vout=dep.vout,
                amount_sats=dep.amount_sats,
                address_index=addr.index,
                change=addr.change,
                prev_tx=chain.get_raw_transaction(dep.txid),
            )
            for dep, addr in rows
        ]
    except UpstreamUnavailable:
        raise
    except Exception as exc:  # the node must know every transaction we recorded
        raise UpstreamUnavailable(
            f"the node could not return a collateral transaction: {exc}"
        ) from exc


def _fee_rate(params: RequestParams, chain: Chain, policy: FeePolicy) -> tuple[Decimal, str]:
    if params.fee_rate_sat_vb is not None:
        if not policy.floor_sat_vb <= params.fee_rate_sat_vb <= policy.ceiling_sat_vb:
            raise InvalidInput(
                f"fee rate must be between {policy.floor_sat_vb} and {policy.ceiling_sat_vb} "
                "sat/vB",
                field="fee_rate_sat_vb",
            )
        return params.fee_rate_sat_vb, "requested"
    estimate = chain.estimate_fee_rate_sat_vb(policy.conf_target)
    return clamp_fee_rate(
        Decimal(str(estimate)) if estimate is not None else None,
        floor=policy.floor_sat_vb,
        ceiling=policy.ceiling_sat_vb,
    )


def _plan(
    session: Session,
    ctx: Context,
    loan: Loan,
    descriptor: CollateralDescriptor,
    inputs: list[CollateralInput],
    params: RequestParams,
    fee_rate: Decimal,
    *,
    change_index: int | None = None,
) -> tuple[Split, list[PayTo | PayToCollateral], dict[str, Any]]:
    """Split the inputs for the action; returns the split, the outputs and the evidence."""
    total = sum(i.amount_sats for i in inputs)
    miner_spk = address_script_pubkey(loan.miner_return_address, ctx.network)
    bank_spk = address_script_pubkey(loan.bank_liquidation_address, ctx.network)
    ev: dict[str, Any] = {"fee_rate_sat_vb": str(fee_rate)}
    if params.valuation_id is not None:
        ev["valuation_id"] = params.valuation_id
    outputs: list[PayTo | PayToCollateral] = []
    if params.action in (SigningAction.release, SigningAction.dispute_release):
        fee = fee_for(estimate_vsize(descriptor, len(inputs), [miner_spk]), fee_rate)
        split = release_split(total, fee, dust_limit(miner_spk))
    else:
        if params.price_rub_per_btc is None or not params.price_source:
            raise InvalidInput(
                "a liquidation needs the price used (price_rub_per_btc) and its source",
                field="price_rub_per_btc",
            )
        debt = (
            params.debt_kopecks
            if params.debt_kopecks is not None
            else outstanding_debt_kopecks(loan)
        )
        ev.update(
            debt_kopecks=debt,
            price_rub_per_btc=str(params.price_rub_per_btc),
            price_source=params.price_source,
        )
        if params.action not in (SigningAction.liquidation, SigningAction.partial_liquidation):
            raise InvalidInput(f"unknown action {params.action}", field="action")
        if params.action == SigningAction.liquidation:
            fee = fee_for(estimate_vsize(descriptor, len(inputs), [bank_spk, miner_spk]), fee_rate)
            split = liquidation_split(
                total,
                fee,
                debt,
                params.price_rub_per_btc,
                bank_dust=dust_limit(bank_spk),
                miner_dust=dust_limit(miner_spk),
            )
        else:
            target = params.target_ltv_bps or loan.target_ltv_bps or 6_000
            if change_index is None:
                change_index = hand_out_address(session, ctx, loan, descriptor).index
            change_spk = descriptor.script_pubkey(change_index)
            fee = fee_for(estimate_vsize(descriptor, len(inputs), [bank_spk, change_spk]), fee_rate)
            split = partial_liquidation_split(
                total,
                fee,
                debt,
                params.price_rub_per_btc,
                target,
                bank_dust=dust_limit(bank_spk),
                change_dust=dust_limit(change_spk),
            )
            ev.update(
                target_ltv_bps=target,
                change_address_index=change_index,
                credited_kopecks=kopecks_for_sats(
                    split.outputs["bank_liquidation"], params.price_rub_per_btc
                ),
            )
    if "bank_liquidation" in split.outputs:
        outputs.append(
            PayTo(
                loan.bank_liquidation_address, split.outputs["bank_liquidation"], "bank_liquidation"
            )
        )
    if "miner_return" in split.outputs:
        outputs.append(
            PayTo(loan.miner_return_address, split.outputs["miner_return"], "miner_return")
        )
    if "collateral_change" in split.outputs:
        assert change_index is not None
        outputs.append(PayToCollateral(change_index, False, split.outputs["collateral_change"]))
    ev.update(fee_sats=split.fee, notes=split.notes, total_in_sats=total)
    return split, outputs, ev


def create_request(
    session: Session,
    ctx: Context,
    loan_id: int,
    params: RequestParams,
    chain: Chain,
    fees: FeePolicy,
) -> SigningRequest:
    """Build and store the request's PSBT inside the caller's transaction, calling nothing
    but `chain` (a `PrefetchedChain` keeps that off the network). When the bank's signer
    holds the bank key, a liquidation must come priced by its valuation; `open_request`
    asks for it, and for the signer's statement, with no transaction open."""
    loan = ensure_can_view(ctx.principal, session.get(Loan, loan_id), loan_id)
    require_role(ctx.principal, *WHO_REQUESTS[params.action])
    if ctx.principal.role == Role.arbiter and loan.arbiter_party_id != ctx.principal.party_id:
        raise NotFound(f"loan {loan_id} not found")
    slot = f"loan:{loan_id}"
    if session.exec(select(SigningRequest.id).where(SigningRequest.open_key == slot)).first():
        raise Conflict(f"loan {loan_id} already has an open signing request: finish or cancel it")
    if loan.state not in FROM_STATES[params.action]:
        raise Conflict(f"loan {loan_id} is {loan.state}: a {params.action.value} is not possible")
    descriptor = loan_descriptor(session, loan, ctx.network)
    _check_priced(session, loan, params)
    inputs = _collateral_inputs(session, loan, chain)
    fee_rate, fee_note = _fee_rate(params, chain, fees)
    split, outputs, ev = _plan(session, ctx, loan, descriptor, inputs, params, fee_rate)
    ev["fee_rate_note"] = fee_note
    if params.risk_evidence is not None:
        ev["risk"] = params.risk_evidence
    if split.fee > fees.max_fee_sats:
        raise Conflict(f"the fee ({split.fee} sats) is above the cap ({fees.max_fee_sats} sats)")
    req = _store(
        session,
        ctx,
        loan,
        descriptor,
        params.action,
        inputs,
        outputs,
        split,
        ev,
        slot=slot,
        replaces=None,
    )
    return req


class PrefetchedChain:
    """The node's answers a request needs, fetched before its transaction opens: the
    previous transactions of the loan's confirmed deposits and the fee estimate. Asked
    for anything else (the collateral changed meanwhile), it refuses instead of calling."""

    def __init__(self, chain: Chain, txids: list[str], conf_target: int) -> None:
        self._txs = {txid: chain.get_raw_transaction(txid) for txid in dict.fromkeys(txids)}
        self._estimate = chain.estimate_fee_rate_sat_vb(conf_target)

    def get_raw_transaction(self, txid: str, block_hash: str | None = None) -> bytes:
        raw = self._txs.get(txid)
        if raw is None:
            raise Conflict("the loan's collateral changed while the request was built: try again")
        return raw

    def estimate_fee_rate_sat_vb(self, conf_target: int) -> float | None:
        return self._estimate

    def test_mempool_accept(self, tx_hex: str, max_fee_rate_btc_kvb: float = 0.1) -> dict[str, Any]:
        raise Conflict("building a request broadcasts nothing")

    def send_raw_transaction(self, tx_hex: str) -> str:
        raise Conflict("building a request broadcasts nothing")


def open_request(
    engine: Engine,
    ctx: Context,
    loan_id: int,
    params: RequestParams,
    chain: Chain,
    fees: FeePolicy,
    signer: BankSigner | None,
) -> SigningRequest:
    """`create_request` with every network call outside a database transaction: read what
    is needed and commit; ask the signer for its valuation and the node for the inputs and
    the fee; build and store the request; ask the signer for its statement; store it (or
    the signer's refusal). A crash between the last two leaves a request with no statement:
    it shows `signer_statement_id` null and is cancelled and asked for again."""
    from custody.signer.service import bank_hsm_key, signer_loan_ref

    with transaction(engine) as session:
        loan = ensure_can_view(ctx.principal, session.get(Loan, loan_id), loan_id)
        require_role(ctx.principal, *WHO_REQUESTS[params.action])
        key = bank_hsm_key(session, loan_id)
        loan_ref = signer_loan_ref(key) if key is not None else None
        txids = list(
            session.exec(
                select(Deposit.txid).where(
                    Deposit.loan_id == loan.id, Deposit.state == DepositState.confirmed
                )
            ).all()
        )
    if (
        loan_ref is not None
        and params.valuation_id is None
        and params.action
        in (
            SigningAction.liquidation,
            SigningAction.partial_liquidation,
        )
    ):
        if signer is None:
            raise UpstreamUnavailable("no bank signer is configured: it prices this liquidation")
        params = _valued(params, signer.valuation(loan_ref))
    prefetched = PrefetchedChain(chain, txids, fees.conf_target)
    with transaction(engine) as session:
        req = create_request(session, ctx, loan_id, params, prefetched, fees)
        request_id, psbt = req.id or 0, req.psbt
    return _statement_after(
        engine, ctx, request_id, psbt, params.action, loan_ref, params.valuation_id, signer
    )


def _valued(params: RequestParams, valuation: dict[str, Any]) -> RequestParams:
    """The request priced by the bank signer's own valuation."""
    return RequestParams(
        action=params.action,
        fee_rate_sat_vb=params.fee_rate_sat_vb,
        price_rub_per_btc=Decimal(valuation["price_rub_per_btc"]),
        price_source="bank signer valuation " + str(valuation["valuation_id"]),
        target_ltv_bps=params.target_ltv_bps,
        risk_evidence=params.risk_evidence,
        debt_kopecks=int(valuation["debt_kopecks"]),
        valuation_id=str(valuation["valuation_id"]),
    )


def _check_priced(session: Session, loan: Loan, params: RequestParams) -> None:
    """A liquidation of a loan whose bank key the signer holds is priced by the signer's
    own valuation (it refuses any other figures): refuse to build one without it."""
    from custody.signer.service import bank_hsm_key

    if params.action not in (SigningAction.liquidation, SigningAction.partial_liquidation):
        return
    if params.valuation_id is None and bank_hsm_key(session, loan.id or 0) is not None:
        raise Conflict(
            "this liquidation must be priced by the bank signer's own valuation",
            field="price_rub_per_btc",
        )


def _refused_request(
    session: Session, ctx: Context, req: SigningRequest, refusal: PolicyViolation
) -> None:
    """The signer will not sign this PSBT: the request is cancelled with its reason."""
    record(
        session,
        actor=ctx.actor,
        action="signer.refused",
        loan_id=req.loan_id,
        request_id=req.id,
        decision="refused",
        reason=refusal.reason,
        data={"check": refusal.check},
    )
    req.reject_reason = f"refused by the bank's signer ({refusal.check}): {refusal.reason}"
    ev = evidence(req)
    ev["signer_refusal"] = {"check": refusal.check, "reason": refusal.reason}  # for the answer
    req.evidence_json = json.dumps(ev, default=str)
    _close_cancelled(session, ctx, req, reason="refused by the bank's signer")


def _store(
    session: Session,
    ctx: Context,
    loan: Loan,
    descriptor: CollateralDescriptor,
    action: SigningAction,
    inputs: list[CollateralInput],
    outputs: list[PayTo | PayToCollateral],
    split: Split,
    ev: dict[str, Any],
    *,
    slot: str,
    replaces: SigningRequest | None,
) -> SigningRequest:
    psbt = build_psbt(descriptor, ctx.network, inputs, outputs)
    before = str(loan.state)
    req = SigningRequest(
        loan_id=loan.id or 0,
        action=action,
        state=RequestState.awaiting_signatures,
        slot=slot,
        open_key=slot,
        psbt=psbt,
        unsigned_txid=unsigned_txid(psbt),
        required_seats=",".join(s.value for s in REQUIRED_SEATS[action]),
        inputs_json=json.dumps(
            [
                {
                    "txid": i.txid,
                    "vout": i.vout,
                    "amount_sats": i.amount_sats,
                    "address_index": i.address_index,
                    "change": i.change,
                    "prev_tx": i.prev_tx.hex(),
                }
                for i in inputs
            ]
        ),
        outputs_json=json.dumps(
            [
                {"role": o.role, "address": o.address, "amount_sats": o.amount_sats}
                if isinstance(o, PayTo)
                else {
                    "role": "collateral_change",
                    "address": descriptor.address(o.address_index, o.change),
                    "amount_sats": o.amount_sats,
                }
                for o in outputs
            ]
        ),
        evidence_json=json.dumps(ev, default=str),
        fee_sats=split.fee,
        loan_state_before=before if replaces is None else replaces.loan_state_before,
        replaces_id=replaces.id if replaces else None,
        created_by=ctx.actor,
    )
    try:
        with session.begin_nested():  # a savepoint, so the failure leaves the session usable
            session.add(req)
    except IntegrityError as exc:  # a concurrent request took the slot first
        raise Conflict(f"loan {loan.id} already has an open signing request") from exc
    record(
        session,
        actor=ctx.actor,
        action="signing_request.created",
        loan_id=loan.id,
        request_id=req.id,
        data={
            "action": action.value,
            "unsigned_txid": req.unsigned_txid,
            "outputs": json.loads(req.outputs_json),
            "evidence": ev,
            "replaces": replaces.id if replaces else None,
        },
    )
    seats = [s.value for s in REQUIRED_SEATS[action]]
    if action in (SigningAction.release, SigningAction.dispute_release):
        notify_loan(
            session,
            loan,
            "release.ready_to_sign",
            {"request_id": req.id, "unsigned_txid": req.unsigned_txid},
        )
    notify_loan(
        session,
        loan,
        "signature.needed",
        {"request_id": req.id, "action": action.value, "seats": seats},
        seats=tuple(seats),
    )
    new_state = STATE_WHILE_OPEN[action]
    if replaces is None and new_state is not None and loan.state != new_state:
        if action in (SigningAction.release, SigningAction.dispute_release):
            loan.repaid_at = loan.repaid_at or utcnow()
        change_state(session, ctx.actor, loan, new_state, reason=f"{action.value} requested")
    return req


# -- signatures -----------------------------------------------------------------------


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


def _signed_seats(req: SigningRequest, per_input: list[dict[bytes, KeyRole]]) -> set[KeyRole]:
    """Seats that have signed every input."""
    signed = signers_per_input(req.psbt)
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
    chain: Chain,
    *,
    via: str = "upload",
    broadcast: bool = True,
) -> SigningRequest:
    """Keep the new, verified signatures. At quorum the request is ready; with
    `broadcast` it is broadcast in this transaction too, else the caller does it after
    commit with `broadcast_ready` (no transaction open across the node's calls)."""
    req = get_request(session, ctx, request_id)
    loan = session.get(Loan, req.loan_id)
    assert loan is not None
    if via != "hsm":  # the HSM path was authorised by the signer's own boundary checks
        require_role(
            ctx.principal, Role.miner, Role.arbiter, Role.bank_operator, Role.bank_approver
        )
    if req.state not in (RequestState.awaiting_signatures, RequestState.ready):
        raise Conflict(f"signing request {request_id} is {req.state}: it takes no signatures")
    descriptor = loan_descriptor(session, loan, ctx.network)
    inputs = request_inputs(req)
    new = check_upload(req.psbt, uploaded, descriptor, inputs)
    per_input = _seat_of_pubkeys(session, loan, descriptor, inputs)
    bank_signs = any(
        per_input[i].get(pub) == KeyRole.bank for i, sigs in new.items() for pub in sigs
    )
    if bank_signs and via != "hsm" and not _approved(session, req):
        raise Conflict(
            "the bank's signature needs a bank approver's approval of this "
            "transaction first (4-eyes)"
        )
    seats_now = sorted({per_input[i][pub].value for i, sigs in new.items() for pub in sigs})
    req.psbt = merge_signatures(req.psbt, new)
    done = _signed_seats(req, per_input)
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
    if req.state == RequestState.ready and broadcast:
        _finalize_and_broadcast(session, ctx.actor, req, chain)
    return req


def _approved(session: Session, req: SigningRequest) -> bool:
    return (
        session.exec(
            select(Approval.id).where(
                Approval.request_id == req.id,
                Approval.unsigned_txid == req.unsigned_txid,
                Approval.principal != req.created_by,
            )
        ).first()
        is not None
    )


def _ask_the_node(chain: Chain, psbt: str) -> tuple[str, dict[str, Any]]:
    """Finalize (bdk checks every signature), have the node check it, and broadcast what
    it accepts. Network only: no session. Returns the raw transaction and the verdict."""
    raw = finalize(psbt).hex()
    verdict = chain.test_mempool_accept(raw)
    if verdict.get("allowed"):
        with contextlib.suppress(RpcTxAlreadyKnown):  # an earlier attempt got through
            chain.send_raw_transaction(raw)
    return raw, verdict


def _record_broadcast(
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
        loan = session.get(Loan, req.loan_id)
        assert loan is not None
        notify_loan(
            session,
            loan,
            "liquidation.broadcast",
            {"request_id": req.id, "txid": req.unsigned_txid},
        )


def _finalize_and_broadcast(
    session: Session, actor: str, req: SigningRequest, chain: Chain
) -> None:
    """Finalize, check and broadcast inside the caller's transaction (paths not yet moved
    to `broadcast_ready`)."""
    _, verdict = _ask_the_node(chain, req.psbt)
    _record_broadcast(session, actor, req, verdict)


def broadcast_ready(engine: Engine, actor: str, request_id: int, chain: Chain) -> None:
    """Broadcast a ready request with no transaction open: read its PSBT, ask the node,
    record the answer in a new transaction. If the outcome is lost (a crash after the
    send), the request stays ready: a retry sends the same transaction again (the node
    says it knows it) and the watcher closes the request when it is mined."""
    with transaction(engine) as session:
        req = session.get(SigningRequest, request_id)
        if req is None or req.state != RequestState.ready:
            return
        psbt = req.psbt
    _, verdict = _ask_the_node(chain, psbt)
    with transaction(engine) as session:
        req = session.get(SigningRequest, request_id)
        if req is not None and req.state == RequestState.ready and req.psbt == psbt:
            _record_broadcast(session, actor, req, verdict)


def check_ready(session: Session, ctx: Context, request_id: int) -> SigningRequest:
    """May this caller have this request broadcast (again)?"""
    req = get_request(session, ctx, request_id)
    require_role(ctx.principal, Role.bank_operator, Role.bank_approver)
    if req.state != RequestState.ready:
        raise Conflict(f"signing request {request_id} is {req.state}, not ready")
    return req


# -- cancelling and fee bumps --------------------------------------------------------


def cancel(session: Session, ctx: Context, request_id: int) -> tuple[SigningRequest, str | None]:
    """Cancel an unbroadcast request; returns it with the nonce of the signer's statement
    to kill, which the caller tells the signer once this transaction has committed
    (`kill_statement`). Until then, or if the signer cannot be told, the statement is dead
    here (cancelled) and expires there on its own."""
    req = get_request(session, ctx, request_id)
    require_role(ctx.principal, *WHO_REQUESTS[SigningAction(req.action)])
    if req.state not in (RequestState.awaiting_signatures, RequestState.ready):
        raise Conflict(
            f"signing request {request_id} is {req.state}: only an unbroadcast request can be "
            "cancelled (a broadcast one can only be replaced by a fee bump)"
        )
    _close_cancelled(session, ctx, req, reason=f"{req.action} cancelled")
    return req, _cancel_statement(session, req)


def _cancel_statement(session: Session, req: SigningRequest) -> str | None:
    from custody.db.models import StatementState
    from custody.signer.service import transaction_statement_of

    st = transaction_statement_of(session, req.id or 0)
    if st is None or st.state != StatementState.open:
        return None
    st.state, st.updated_at = StatementState.cancelled, utcnow()
    session.add(st)
    return st.nonce


def kill_statement(
    engine: Engine, ctx: Context, req: SigningRequest, nonce: str, signer: BankSigner | None
) -> None:
    """Tell the signer a cancelled request's statement is dead (no transaction open)."""
    if signer is None:
        return
    try:
        signer.cancel(nonce)
    except (PolicyViolation, UpstreamUnavailable) as exc:
        with transaction(engine) as session:
            record(
                session,
                actor=ctx.actor,
                action="signer.cancel_failed",
                loan_id=req.loan_id,
                request_id=req.id,
                reason=str(exc),
            )


def cancel_unsigned(session: Session, ctx: Context, req: SigningRequest, *, reason: str) -> None:
    """Cancel an automatic request nobody will sign as it is (the risk engine's reconcile)."""
    _close_cancelled(session, ctx, req, reason=reason)


def _close_cancelled(session: Session, ctx: Context, req: SigningRequest, *, reason: str) -> None:
    req.state, req.open_key, req.updated_at = RequestState.cancelled, None, utcnow()
    session.add(req)
    record(
        session,
        actor=ctx.actor,
        action="signing_request.cancelled",
        loan_id=req.loan_id,
        request_id=req.id,
        reason=reason,
    )
    loan = session.get(Loan, req.loan_id)
    assert loan is not None
    if req.replaces_id is None and str(loan.state) != req.loan_state_before:
        change_state(
            session,
            ctx.actor,
            loan,
            LoanState(req.loan_state_before),
            reason=reason,
        )


def bump_fee(
    session: Session,
    ctx: Context,
    request_id: int,
    fee_rate: Decimal,
    chain: Chain,
    fees: FeePolicy,
    *,
    valuation: dict[str, Any] | None = None,
) -> SigningRequest:
    """A replacement (BIP-125) of a broadcast request at a higher fee rate: same inputs,
    same action, a new PSBT that needs its signatures again. `open_bump` is the version
    with every signer call outside a transaction."""
    old = get_request(session, ctx, request_id)
    require_role(ctx.principal, *WHO_REQUESTS[SigningAction(old.action)])
    if old.state != RequestState.broadcast:
        raise Conflict(
            f"signing request {request_id} is {old.state}: only a broadcast one is bumped"
        )
    loan = session.get(Loan, old.loan_id)
    assert loan is not None
    descriptor = loan_descriptor(session, loan, ctx.network)
    inputs = request_inputs(old)
    ev_old = evidence(old)
    old_rate = Decimal(ev_old["fee_rate_sat_vb"])
    if fee_rate <= old_rate:
        raise InvalidInput(
            f"the new fee rate must be above {old_rate} sat/vB", field="fee_rate_sat_vb"
        )
    if fee_rate > fees.ceiling_sat_vb:
        raise InvalidInput(
            f"the fee rate cap is {fees.ceiling_sat_vb} sat/vB", field="fee_rate_sat_vb"
        )
    params = RequestParams(
        action=SigningAction(old.action),
        fee_rate_sat_vb=fee_rate,
        price_rub_per_btc=Decimal(ev_old["price_rub_per_btc"])
        if "price_rub_per_btc" in ev_old
        else None,
        price_source=ev_old.get("price_source"),
        target_ltv_bps=ev_old.get("target_ltv_bps"),
    )
    if valuation is not None:
        params = _valued(params, valuation)
    _check_priced(session, loan, params)
    split, outputs, ev = _plan(
        session,
        ctx,
        loan,
        descriptor,
        inputs,
        params,
        fee_rate,
        change_index=ev_old.get("change_address_index"),
    )
    # BIP-125: the replacement pays for its own relay on top of the original's fee.
    min_fee = old.fee_sats + estimate_vsize(
        descriptor,
        len(inputs),
        [
            address_script_pubkey(o.address, ctx.network)
            if isinstance(o, PayTo)
            else descriptor.script_pubkey(o.address_index)
            for o in outputs
        ],
    )
    if split.fee < min_fee:
        raise InvalidInput(
            f"a replacement must pay at least {min_fee} sats; raise the fee rate",
            field="fee_rate_sat_vb",
        )
    if split.fee > fees.max_fee_sats:
        raise Conflict(f"the fee ({split.fee} sats) is above the cap ({fees.max_fee_sats} sats)")
    ev["fee_rate_note"] = f"fee bump of request {old.id}"
    req = _store(
        session,
        ctx,
        loan,
        descriptor,
        SigningAction(old.action),
        inputs,
        outputs,
        split,
        ev,
        slot=f"rbf:{old.id}",
        replaces=old,
    )
    return req


def open_bump(
    engine: Engine,
    ctx: Context,
    request_id: int,
    fee_rate: Decimal,
    chain: Chain,
    fees: FeePolicy,
    signer: BankSigner | None,
) -> SigningRequest:
    """`bump_fee` with the signer's valuation and statement asked outside transactions."""
    from custody.signer.service import bank_hsm_key, signer_loan_ref

    with transaction(engine) as session:
        old = get_request(session, ctx, request_id)
        require_role(ctx.principal, *WHO_REQUESTS[SigningAction(old.action)])
        key = bank_hsm_key(session, old.loan_id)
        loan_ref = signer_loan_ref(key) if key is not None else None
        action = SigningAction(old.action)
    valuation = None
    if loan_ref is not None and action in (
        SigningAction.liquidation,
        SigningAction.partial_liquidation,
    ):
        if signer is None:
            raise UpstreamUnavailable("no bank signer is configured: it prices this liquidation")
        valuation = signer.valuation(loan_ref)
    with transaction(engine) as session:
        req = bump_fee(session, ctx, request_id, fee_rate, chain, fees, valuation=valuation)
        new_id, psbt, valuation_id = req.id or 0, req.psbt, evidence(req).get("valuation_id")
    return _statement_after(engine, ctx, new_id, psbt, action, loan_ref, valuation_id, signer)


def _statement_after(
    engine: Engine,
    ctx: Context,
    request_id: int,
    psbt: str,
    action: SigningAction,
    loan_ref: str | None,
    valuation_id: str | None,
    signer: BankSigner | None,
) -> SigningRequest:
    """Ask the signer for the statement of a stored request (no transaction open), then
    store it, or its refusal, in a new transaction."""
    from custody.signer.service import open_transaction_statement

    needs = (
        loan_ref is not None
        and KeyRole.bank in REQUIRED_SEATS[action]
        and ctx.principal.role != Role.risk_engine
    )
    if not needs:
        with transaction(engine) as session:
            found = session.get(SigningRequest, request_id)
            assert found is not None
            return found
    assert loan_ref is not None
    if signer is None:
        raise UpstreamUnavailable("no bank signer is configured for this service")
    try:
        prepared: dict[str, Any] | PolicyViolation = signer.prepare(
            loan_ref, str(action), psbt, valuation_id
        )
    except PolicyViolation as refusal:
        prepared = refusal
    with transaction(engine) as session:
        stored = session.get(SigningRequest, request_id)
        assert stored is not None
        req = stored
        if isinstance(prepared, PolicyViolation):
            _refused_request(session, ctx, req, prepared)
        else:
            st = open_transaction_statement(session, ctx, req, prepared)
            ev = evidence(req)
            ev["signer_statement_id"] = st.id
            req.evidence_json = json.dumps(ev, default=str)
            session.add(req)
        return req


# -- the chain closes requests (called by the watcher) ---------------------------------


def request_for_txid(session: Session, txid: str) -> SigningRequest | None:
    """The request whose transaction this is: an open one if any, else the newest."""
    rows = session.exec(
        select(SigningRequest)
        .where(SigningRequest.unsigned_txid == txid)
        .order_by(col(SigningRequest.id).desc())
    ).all()
    return next((r for r in rows if r.state in OPEN), rows[0] if rows else None)


def _family(session: Session, req: SigningRequest) -> list[SigningRequest]:
    """The request and every RBF sibling spending the same collateral."""
    rows = session.exec(
        select(SigningRequest).where(
            SigningRequest.loan_id == req.loan_id, col(SigningRequest.id) != req.id
        )
    ).all()
    mine = {i["txid"] + ":" + str(i["vout"]) for i in json.loads(req.inputs_json)}
    return [
        r
        for r in rows
        if mine & {i["txid"] + ":" + str(i["vout"]) for i in json.loads(r.inputs_json)}
    ]


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
    for sibling in _family(session, req):
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
    loan = session.get(Loan, req.loan_id)
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
    for sibling in _family(session, req):
        if sibling.state == RequestState.replaced:
            sibling.state, sibling.open_key = RequestState.broadcast, sibling.slot
            session.add(sibling)
    loan = session.get(Loan, req.loan_id)
    assert loan is not None
    action = SigningAction(req.action)
    if STATE_WHEN_DONE[action] is not None:
        back = STATE_WHILE_OPEN[action]
        assert back is not None
        change_state(session, actor, loan, back, reason="reorg")
    else:
        loan.credited_kopecks -= int(evidence(req).get("credited_kopecks", 0))
        session.add(loan)


# -- 4-eyes approval and the bank's signature -------------------------------------------


@dataclass(frozen=True)
class HsmDecision:
    """What the bank's signer decided. A refusal is recorded and answered, not raised,
    so its audit event commits with the request."""

    request: SigningRequest
    refused: str | None = None
    check: str | None = None


def approve(session: Session, ctx: Context, request_id: int) -> HsmDecision:
    """A bank approver signs off on this exact transaction (4-eyes: the requester cannot),
    for a loan whose bank key is an xpub the bank signs with on its own device. When the
    bank's signer holds the key, its approvals are signatures over its statement instead."""
    from custody.signer.service import bank_hsm_key, transaction_statement_of

    req = get_request(session, ctx, request_id)
    require_role(ctx.principal, Role.bank_approver)
    loan = session.get(Loan, req.loan_id)
    assert loan is not None
    if loan.bank_party_id != ctx.principal.party_id:
        raise NotFound(f"signing request {request_id} not found")
    if req.state not in (RequestState.awaiting_signatures, RequestState.ready):
        raise Conflict(f"signing request {request_id} is {req.state}: nothing to approve")
    if KeyRole.bank.value not in req.required_seats.split(","):
        raise Conflict(f"a {req.action} is not signed by the bank")
    if bank_hsm_key(session, loan.id or 0) is not None:
        st = transaction_statement_of(session, request_id)
        where = f"signer statement {st.id}" if st is not None else "its signer statement"
        raise Conflict(
            "the bank's signer holds this loan's key: approve by signing "
            f"{where} (`custody approve {request_id} --key FILE`)"
        )
    if ctx.actor == req.created_by:
        raise Conflict("the requester cannot approve their own request (4-eyes)")
    already = session.exec(
        select(Approval.id).where(
            Approval.request_id == req.id,
            Approval.principal == ctx.actor,
            Approval.unsigned_txid == req.unsigned_txid,
        )
    ).first()
    if already is None:
        session.add(
            Approval(
                request_id=req.id or 0,
                unsigned_txid=req.unsigned_txid,
                principal_id=ctx.principal.id or 0,
                principal=ctx.actor,
                role=str(ctx.principal.role),
            )
        )
        record(
            session,
            actor=ctx.actor,
            action="signing_request.approved",
            loan_id=loan.id,
            request_id=req.id,
            decision="approved",
            data={"unsigned_txid": req.unsigned_txid},
        )
    return HsmDecision(req)


def record_automatic_signature(
    session: Session,
    ctx: Context,
    request_id: int,
    outcome: Signed | PolicyViolation,
    chain: Chain,
) -> HsmDecision:
    """What the bank's signer did with an automatic liquidation, asked outside any
    transaction: its signatures taken like any upload, or its refusal recorded (and the
    request cancelled, so the next risk pass starts again from fresh figures)."""
    req = session.get(SigningRequest, request_id)
    assert req is not None
    if isinstance(outcome, PolicyViolation):
        _refused_request(session, ctx, req, outcome)
        return HsmDecision(req, refused=outcome.reason, check=outcome.check)
    record(
        session,
        actor=ctx.actor,
        action="signer.signed",
        loan_id=req.loan_id,
        request_id=req.id,
        decision="signed",
        reason=outcome.authorized,
        data={"automatic": True, "fee_sats": outcome.report.get("fee_sats")},
    )
    return HsmDecision(add_signatures(session, ctx, request_id, outcome.psbt, chain, via="hsm"))
