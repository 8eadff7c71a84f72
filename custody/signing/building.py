"""Building signing requests: collateral inputs and fee from the node, amounts from the kernel, the
unsigned PSBT, and fee bumps (RBF).

The node and the signer are called between commits (`open_request`, `open_bump`), never inside a
transaction."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any

from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from custody.audit.service import record
from custody.auth.context import Context
from custody.auth.policy import ensure_can_view, require_role
from custody.db.models import (
    KeyRole,
    Loan,
    RequestState,
    Role,
    SigningAction,
    SigningRequest,
    utcnow,
)
from custody.db.session import transaction
from custody.errors import (
    CollateralChanged,
    FeeAboveCap,
    FeeBumpTooSmall,
    FeeRateOutOfRange,
    LoanNotFound,
    LoanNotInState,
    NodeUnavailable,
    PricedBySigner,
    RequestAlreadyOpen,
    SignerNotConfigured,
    SigningRequestNotInState,
)
from custody.loans import repository as loans_repository
from custody.loans.debt import outstanding_debt_kopecks
from custody.loans.service import change_state, hand_out_address, loan_descriptor
from custody.notify.events import notify_loan
from custody.screening import service as screening
from custody.screening.service import Screener
from custody.signing.cancel import close_cancelled
from custody.signing.chain import Chain, FeePolicy, PrefetchedChain
from custody.signing.psbt import (
    CollateralInput,
    PayTo,
    PayToCollateral,
    build_psbt,
    dust_limit,
    estimate_vsize,
    unsigned_txid,
)
from custody.signing.repository import (
    confirmed_collateral,
    confirmed_txids,
    evidence,
    get_request,
    open_request_id,
    request_by_id,
    request_inputs,
)
from custody.signing.rules import FROM_STATES, REQUIRED_SEATS, STATE_WHILE_OPEN, WHO_REQUESTS
from custody.signing.statements import bank_hsm_key, open_transaction_statement, signer_loan_ref
from hsm.client import BankSigner
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
from pledge.errors import InvalidInput, NoConfirmedCollateral, UpstreamUnavailable


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


@dataclass(frozen=True)
class Callouts:
    """What building calls between its commits: the node (`chain`), the fee policy, the
    bank's signer and the payout screener (built by the composition root)."""

    chain: Chain
    fees: FeePolicy
    signer: BankSigner | None
    screener: Screener | None = None


@dataclass(frozen=True)
class Plan:
    """A request's transaction before it is stored: what it spends and pays, how the
    amounts split, and the evidence kept with it."""

    descriptor: CollateralDescriptor
    action: SigningAction
    inputs: list[CollateralInput]
    outputs: list[PayTo | PayToCollateral]
    split: Split
    evidence: dict[str, Any]


@dataclass(frozen=True)
class _Stored:
    """A request just committed, as the signer is asked about it (no transaction open)."""

    request_id: int
    psbt: str
    action: SigningAction
    loan_ref: str | None
    valuation_id: str | None


def _collateral_inputs(session: Session, loan: Loan, chain: Chain) -> list[CollateralInput]:
    """Every confirmed, unspent collateral output of the loan, as the watcher recorded it."""
    rows = confirmed_collateral(session, loan.id)
    if not rows:
        raise NoConfirmedCollateral(f"loan {loan.id} has no confirmed collateral to move")
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
    except (UpstreamUnavailable, CollateralChanged):
        raise
    except Exception as exc:  # the node must know every transaction we recorded
        raise NodeUnavailable(f"the node could not return a collateral transaction: {exc}") from exc


def _fee_rate(params: RequestParams, chain: Chain, policy: FeePolicy) -> tuple[Decimal, str]:
    if params.fee_rate_sat_vb is not None:
        if not policy.floor_sat_vb <= params.fee_rate_sat_vb <= policy.ceiling_sat_vb:
            raise FeeRateOutOfRange(
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
    *,
    change_index: int | None = None,
) -> Plan:
    """Split the inputs for the action at the fee rate `params` carries (requested, or
    the node's estimate put there): the outputs, the split and the evidence."""
    fee_rate = params.fee_rate_sat_vb
    assert fee_rate is not None, "the fee rate is settled before the plan"
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
    return Plan(descriptor, params.action, inputs, outputs, split, ev)


def _may_request(session: Session, ctx: Context, loan_id: int, params: RequestParams) -> Loan:
    """The refusals that need nothing but the database: who asks, an open request, the
    loan's state. Checked before anything is screened or built, so a refused
    request leaves no trace (not even a screening decision)."""
    loan = ensure_can_view(ctx.principal, loans_repository.loan(session, loan_id))
    require_role(ctx.principal, *WHO_REQUESTS[params.action])
    if ctx.principal.role == Role.arbiter and loan.arbiter_party_id != ctx.principal.party_id:
        raise LoanNotFound()
    if open_request_id(session, f"loan:{loan_id}"):
        raise RequestAlreadyOpen(
            f"loan {loan_id} already has an open signing request: finish or cancel it"
        )
    if loan.state not in FROM_STATES[params.action]:
        raise LoanNotInState(
            f"loan {loan_id} is {loan.state}: a {params.action.value} is not possible"
        )
    return loan


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
    loan = _may_request(session, ctx, loan_id, params)
    slot = f"loan:{loan_id}"
    descriptor = loan_descriptor(session, loan, ctx.network)
    _check_priced(session, loan, params)  # after open_request has asked for the valuation
    screening.check_payouts(session, loan, params.action.value)  # the risk engine's too
    inputs = _collateral_inputs(session, loan, chain)
    fee_rate, fee_note = _fee_rate(params, chain, fees)
    plan = _plan(session, ctx, loan, descriptor, inputs, replace(params, fee_rate_sat_vb=fee_rate))
    plan.evidence["fee_rate_note"] = fee_note
    if params.risk_evidence is not None:
        plan.evidence["risk"] = params.risk_evidence
    if plan.split.fee > fees.max_fee_sats:
        raise FeeAboveCap(
            f"the fee ({plan.split.fee} sats) is above the cap ({fees.max_fee_sats} sats)"
        )
    return _store(session, ctx, loan, plan, slot=slot, replaces=None)


def open_request(
    engine: Engine, ctx: Context, loan_id: int, params: RequestParams, out: Callouts
) -> SigningRequest:
    """`create_request` with every network call outside a database transaction: read what
    is needed and commit; ask the signer for its valuation and the node for the inputs and
    the fee; build and store the request; ask the signer for its statement; store it (or
    the signer's refusal). A crash between the last two leaves a request with no statement:
    it shows `signer_statement_id` null and is cancelled and asked for again. The addresses
    it would pay are screened first (`screening.screen_payouts`): a blocked one, or one a
    compliance officer has yet to clear, refuses it (409)."""

    with transaction(engine) as session:
        loan = _may_request(session, ctx, loan_id, params)
        key = bank_hsm_key(session, loan_id)
        loan_ref = signer_loan_ref(key) if key is not None else None
        txids = confirmed_txids(session, loan.id)
    screening.screen_payouts(
        engine,
        ctx,
        loan_id,
        params.action.value,
        out.screener or screening.Screener(screening.ScreeningConfig(network=ctx.network)),
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
        if out.signer is None:
            raise SignerNotConfigured("no bank signer is configured: it prices this liquidation")
        params = _valued(params, out.signer.valuation(loan_ref))
    prefetched = PrefetchedChain(out.chain, txids, out.fees.conf_target)
    with transaction(engine) as session:
        req = create_request(session, ctx, loan_id, params, prefetched, out.fees)
        stored = _Stored(req.id or 0, req.psbt, params.action, loan_ref, params.valuation_id)
    return _statement_after(engine, ctx, stored, out.signer)


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

    if params.action not in (SigningAction.liquidation, SigningAction.partial_liquidation):
        return
    if params.valuation_id is None and bank_hsm_key(session, loan.id or 0) is not None:
        raise PricedBySigner(
            "this liquidation must be priced by the bank signer's own valuation",
            field="price_rub_per_btc",
        )


def refused_request(
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
    close_cancelled(session, ctx, req, reason="refused by the bank's signer")


def _store(
    session: Session,
    ctx: Context,
    loan: Loan,
    plan: Plan,
    *,
    slot: str,
    replaces: SigningRequest | None,
) -> SigningRequest:
    descriptor, action, inputs, outputs = plan.descriptor, plan.action, plan.inputs, plan.outputs
    split, ev = plan.split, plan.evidence
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
        raise RequestAlreadyOpen(f"loan {loan.id} already has an open signing request") from exc
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
        raise SigningRequestNotInState(
            f"signing request {request_id} is {old.state}: only a broadcast one is bumped"
        )
    loan = loans_repository.loan(session, old.loan_id)
    assert loan is not None
    descriptor = loan_descriptor(session, loan, ctx.network)
    inputs = request_inputs(old)
    ev_old = evidence(old)
    old_rate = Decimal(ev_old["fee_rate_sat_vb"])
    if fee_rate <= old_rate:
        raise FeeBumpTooSmall(
            f"the new fee rate must be above {old_rate} sat/vB", field="fee_rate_sat_vb"
        )
    if fee_rate > fees.ceiling_sat_vb:
        raise FeeRateOutOfRange(
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
    plan = _plan(
        session,
        ctx,
        loan,
        descriptor,
        inputs,
        params,
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
            for o in plan.outputs
        ],
    )
    if plan.split.fee < min_fee:
        raise FeeBumpTooSmall(
            f"a replacement must pay at least {min_fee} sats; raise the fee rate",
            field="fee_rate_sat_vb",
        )
    if plan.split.fee > fees.max_fee_sats:
        raise FeeAboveCap(
            f"the fee ({plan.split.fee} sats) is above the cap ({fees.max_fee_sats} sats)"
        )
    plan.evidence["fee_rate_note"] = f"fee bump of request {old.id}"
    return _store(session, ctx, loan, plan, slot=f"rbf:{old.id}", replaces=old)


def open_bump(
    engine: Engine, ctx: Context, request_id: int, fee_rate: Decimal, out: Callouts
) -> SigningRequest:
    """`bump_fee` with the signer's valuation and statement asked outside transactions."""

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
        if out.signer is None:
            raise SignerNotConfigured("no bank signer is configured: it prices this liquidation")
        valuation = out.signer.valuation(loan_ref)
    with transaction(engine) as session:
        req = bump_fee(session, ctx, request_id, fee_rate, out.chain, out.fees, valuation=valuation)
        valuation_id = evidence(req).get("valuation_id")
        stored = _Stored(req.id or 0, req.psbt, action, loan_ref, valuation_id)
    return _statement_after(engine, ctx, stored, out.signer)


def _statement_after(
    engine: Engine, ctx: Context, stored: _Stored, signer: BankSigner | None
) -> SigningRequest:
    """Ask the signer for the statement of a stored request (no transaction open), then
    store it, or its refusal, in a new transaction."""
    request_id, action, loan_ref = stored.request_id, stored.action, stored.loan_ref
    needs = (
        loan_ref is not None
        and KeyRole.bank in REQUIRED_SEATS[action]
        and ctx.principal.role != Role.risk_engine
    )
    if not needs:
        with transaction(engine) as session:
            found = request_by_id(session, request_id)
            assert found is not None
            return found
    assert loan_ref is not None
    if signer is None:
        raise SignerNotConfigured("no bank signer is configured for this service")
    try:
        prepared: dict[str, Any] | PolicyViolation = signer.prepare(
            loan_ref, str(action), stored.psbt, stored.valuation_id
        )
    except PolicyViolation as refusal:
        prepared = refusal
    with transaction(engine) as session:
        found = request_by_id(session, request_id)
        assert found is not None
        req = found
        if isinstance(prepared, PolicyViolation):
            refused_request(session, ctx, req, prepared)
        else:
            st = open_transaction_statement(session, ctx, req, prepared)
            ev = evidence(req)
            ev["signer_statement_id"] = st.id
            req.evidence_json = json.dumps(ev, default=str)
            session.add(req)
        return req
