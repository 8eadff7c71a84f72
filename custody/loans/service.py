"""Loans: terms, the three key seats, the collateral descriptor and its addresses.

Every rule lives here; routers only translate HTTP to these calls. Each function
runs inside the caller's transaction and writes its audit event there, so a
change and its record commit together or not at all.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import ROUND_CEILING, Decimal
from typing import Any, Protocol

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from custody.audit.service import record
from custody.auth.context import Context
from custody.auth.policy import ensure_can_view, require_role, seat_for, visible_loans_clause
from custody.compliance.service import ensure_cleared
from custody.db.models import (
    CollateralAddress,
    KeyKind,
    KeyRole,
    Loan,
    LoanKey,
    LoanState,
    Party,
    PartyKind,
    Role,
    utcnow,
)
from custody.errors import (
    AddressAlreadyIssued,
    AddressLimitReached,
    AddressNotFound,
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
    SingleAddressDescriptor,
    UnknownParty,
)
from custody.loans import repository
from custody.loans.repository import SEAT_ORDER
from custody.loans.schemas import HDKeyIn, HSMPublicKeyIn, LoanCreate
from pledge.addresses import validate_address
from pledge.descriptors import CollateralDescriptor
from pledge.errors import InvalidInput
from pledge.keys import CollateralKey, FixedKey, HDKey, parse_fixed_key, parse_hd_key
from pledge.network import NetworkName

MAX_ADDRESSES_PER_LOAN = 1_000


class HsmKeyEvidence(Protocol):
    @property
    def label(self) -> str: ...
    @property
    def public_key(self) -> bytes: ...
    @property
    def local(self) -> bool: ...
    @property
    def never_extractable(self) -> bool: ...


def required_collateral_for_ltv(principal_kopecks: int, price: Decimal, target_ltv_bps: int) -> int:
    """Sats needed so that debt / (collateral x price) == target LTV, rounded up
    (the bank's requirement is a minimum; rounding down would start the loan above target)."""
    sats = (
        Decimal(principal_kopecks)
        * Decimal(100_000_000)
        * Decimal(10_000)
        / (Decimal(100) * price * Decimal(target_ltv_bps))
    )
    return int(sats.to_integral_value(rounding=ROUND_CEILING))


def _party(session: Session, party_id: int, kind: PartyKind, field: str) -> Party:
    party = repository.party(session, party_id)
    if party is None:
        raise UnknownParty(f"party {party_id} does not exist", field=field)
    if party.kind != kind:
        raise PartyKindMismatch(
            f"party {party_id} is a {party.kind}, not a {kind.value}", field=field
        )
    return party


def create_loan(session: Session, ctx: Context, body: LoanCreate) -> Loan:
    require_role(ctx.principal, Role.bank_operator)
    if ctx.principal.party_id is None:
        raise OperatorWithoutBank("this operator belongs to no bank party", field="principal")
    terms = body.terms
    _party(session, body.miner_party_id, PartyKind.miner, "miner_party_id")
    _party(session, body.arbiter_party_id, PartyKind.arbiter, "arbiter_party_id")

    if terms.maturity_at <= datetime.now(UTC):
        raise InvalidInput("maturity must be in the future", field="terms.maturity_at")
    if terms.margin_call_ltv_bps >= terms.liquidation_ltv_bps:
        raise InvalidInput(
            "margin-call LTV must be below the liquidation LTV", field="terms.margin_call_ltv_bps"
        )
    if terms.target_ltv_bps is not None and terms.target_ltv_bps >= terms.margin_call_ltv_bps:
        raise InvalidInput(
            "target LTV must be below the margin-call LTV", field="terms.target_ltv_bps"
        )

    if (terms.required_collateral_sats is None) == (terms.target_ltv_bps is None):
        raise InvalidInput(
            "give exactly one of required_collateral_sats or target_ltv_bps",
            field="terms.required_collateral_sats",
        )
    if terms.target_ltv_bps is not None:
        if terms.price_rub_per_btc is None or terms.price_source is None:
            raise InvalidInput(
                "a target LTV needs the price (price_rub_per_btc) and its source (price_source)",
                field="terms.price_rub_per_btc",
            )
        required = required_collateral_for_ltv(
            terms.principal_kopecks, terms.price_rub_per_btc, terms.target_ltv_bps
        )
    else:
        assert terms.required_collateral_sats is not None
        required = terms.required_collateral_sats

    return_address = validate_address(
        terms.miner_return_address, ctx.network, field="terms.miner_return_address"
    )
    liquidation_address = validate_address(
        terms.bank_liquidation_address, ctx.network, field="terms.bank_liquidation_address"
    )
    if return_address == liquidation_address:
        raise InvalidInput(
            "the miner's return address and the bank's liquidation address must differ",
            field="terms.bank_liquidation_address",
        )
    loan = Loan(
        state=LoanState.draft,
        miner_party_id=body.miner_party_id,
        bank_party_id=ctx.principal.party_id,
        arbiter_party_id=body.arbiter_party_id,
        principal_kopecks=terms.principal_kopecks,
        interest_rate_bps=terms.interest_rate_bps,
        maturity_at=terms.maturity_at,
        required_collateral_sats=required,
        target_ltv_bps=terms.target_ltv_bps,
        price_rub_per_btc=str(terms.price_rub_per_btc) if terms.price_rub_per_btc else None,
        price_source=terms.price_source,
        margin_call_ltv_bps=terms.margin_call_ltv_bps,
        liquidation_ltv_bps=terms.liquidation_ltv_bps,
        cure_window_hours=terms.cure_window_hours,
        required_confirmations=terms.required_confirmations,
        miner_return_address=return_address,
        bank_liquidation_address=liquidation_address,
        created_by=ctx.principal.id or 0,
    )
    session.add(loan)
    session.flush()
    record(
        session,
        actor=ctx.actor,
        action="loan.created",
        loan_id=loan.id,
        data={
            "state": str(loan.state),
            "terms": terms.model_dump(mode="json"),
            "required_collateral_sats": required,
        },
    )
    return loan


def change_state(
    session: Session,
    actor: str,
    loan: Loan,
    to: LoanState,
    *,
    reason: str | None = None,
    data: dict[str, Any] | None = None,
) -> None:
    """Every loan state change goes through here: a state never moves without its own
    audit event (DESIGN: a transition is a row in the audit log). It is the loan's
    `state_version`-th change, the number its webhook's id is derived from."""
    before = str(loan.state)
    loan.state, loan.updated_at = to, utcnow()
    loan.state_version += 1
    session.add(loan)
    record(
        session,
        actor=actor,
        action="loan.state_changed",
        loan_id=loan.id,
        reason=reason,
        data={"from": before, "to": to.value, "state_version": loan.state_version, **(data or {})},
    )


def get_loan(session: Session, ctx: Context, loan_id: int) -> Loan:
    return ensure_can_view(ctx.principal, repository.loan(session, loan_id))


def list_loans(session: Session, ctx: Context, *, limit: int = 100, offset: int = 0) -> list[Loan]:
    return repository.loans_page(
        session, visible_loans_clause(ctx.principal), limit=limit, offset=offset
    )


def loan_keys(session: Session, loan_id: int) -> list[LoanKey]:
    return repository.keys_of_loan(session, loan_id)


def _parse_key(
    body: HDKeyIn | HSMPublicKeyIn, seat: KeyRole, network: NetworkName
) -> CollateralKey:
    if isinstance(body, HDKeyIn):
        return parse_hd_key(body.key, network, field="key")
    if seat != KeyRole.bank:
        raise HdKeyRequired(
            f"the {seat.value} key must be an HD key from a hardware wallet", field="kind"
        )
    return parse_fixed_key(body.public_key, field="public_key")


def register_key(
    session: Session, ctx: Context, loan_id: int, seat: KeyRole, body: HDKeyIn | HSMPublicKeyIn
) -> Loan:
    loan = get_loan(session, ctx, loan_id)
    seat_for(ctx.principal, loan, seat)
    key = _parse_key(body, seat, ctx.network)
    return store_key(session, ctx, loan, seat, key)


def _ensure_seat_open(session: Session, loan: Loan, seat: KeyRole) -> None:
    if loan.state != LoanState.draft:
        raise LoanNotInState(
            f"loan {loan.id} is {loan.state}: keys can only be added to a draft loan"
        )
    assert loan.id is not None
    if repository.key_in_seat(session, loan.id, seat) is not None:
        raise KeySeatTaken(
            f"the {seat.value} key of loan {loan.id} is already registered", field="key"
        )


def store_key(
    session: Session,
    ctx: Context,
    loan: Loan,
    seat: KeyRole,
    key: CollateralKey,
    *,
    evidence: HsmKeyEvidence | None = None,
) -> Loan:
    _ensure_seat_open(session, loan, seat)
    assert loan.id is not None
    party_id = {
        KeyRole.miner: loan.miner_party_id,
        KeyRole.bank: loan.bank_party_id,
        KeyRole.arbiter: loan.arbiter_party_id,
    }[seat]
    others = loan_keys(session, loan.id)
    for other in others:
        if other.identity == key.identity:
            raise KeyInTwoSeats(
                f"this key is already the loan's {other.role} key: each seat needs its own key",
                field="key",
            )
    # A key belongs to one party for good: registering someone else's key is refused.
    if repository.key_of_another_party(session, key.identity, party_id) is not None:
        raise KeyOfAnotherParty("this key is registered to another party", field="key")

    row = LoanKey(
        loan_id=loan.id,
        role=seat,
        party_id=party_id,
        kind=KeyKind.hsm if isinstance(key, FixedKey) else KeyKind.hd,
        identity=key.identity,
        descriptor_key=key.descriptor_key,
        fingerprint=key.fingerprint if isinstance(key, HDKey) else None,
        origin_path=key.origin_path if isinstance(key, HDKey) else None,
        xpub=key.xpub if isinstance(key, HDKey) else None,
        public_key_hex=key.public_key_hex if isinstance(key, FixedKey) else None,
        hsm_key_label=evidence.label if evidence else None,
        hsm_local=evidence.local if evidence else None,
        hsm_never_extractable=evidence.never_extractable if evidence else None,
        created_by=ctx.principal.id or 0,
    )
    session.add(row)
    session.flush()
    record(
        session,
        actor=ctx.actor,
        action="key.registered",
        loan_id=loan.id,
        data={
            "seat": seat.value,
            "kind": str(row.kind),
            "descriptor_key": row.descriptor_key,
            "hsm_key_label": row.hsm_key_label,
            "hsm_local": row.hsm_local,
            "hsm_never_extractable": row.hsm_never_extractable,
        },
    )
    if len(others) == 2:
        _complete_keys(session, ctx, loan, [*others, row])
    return loan


def collateral_descriptor(
    loan_keys_rows: list[LoanKey], network: NetworkName
) -> CollateralDescriptor:
    keys: list[CollateralKey] = []
    by_seat = {KeyRole(k.role): k for k in loan_keys_rows}
    for seat in SEAT_ORDER:
        row = by_seat[seat]
        if row.kind == KeyKind.hd:
            assert row.fingerprint and row.origin_path and row.xpub
            keys.append(
                parse_hd_key(
                    f"[{row.fingerprint}{row.origin_path[1:]}]{row.xpub}", network, field="key"
                )
            )
        else:
            assert row.public_key_hex
            keys.append(parse_fixed_key(row.public_key_hex, field="key"))
    return CollateralDescriptor((keys[0], keys[1], keys[2]), network)


def loan_descriptor(session: Session, loan: Loan, network: NetworkName) -> CollateralDescriptor:
    if loan.descriptor is None or loan.id is None:
        raise KeysIncomplete(f"loan {loan.id} has no descriptor yet: all three keys are needed")
    return collateral_descriptor(loan_keys(session, loan.id), network)


def _complete_keys(session: Session, ctx: Context, loan: Loan, rows: list[LoanKey]) -> None:
    # The compliance gate (issue 15): the third key takes the loan out of draft, so it is
    # refused (409 compliance_pending, nothing stored) until the miner's record is approved.
    ensure_cleared(session, loan)
    descriptor = collateral_descriptor(rows, ctx.network)
    key_set = "|".join(sorted(descriptor.key_set_identity))
    if repository.loan_with_key_set(session, key_set) is not None:
        raise KeySetReused(
            "this key set is already used by another loan: every loan needs a fresh key set",
            field="key",
        )
    loan.descriptor = descriptor.descriptor
    loan.key_set = key_set
    change_state(
        session,
        ctx.actor,
        loan,
        LoanState.awaiting_deposit,
        reason="all three keys registered",
        data={"descriptor": loan.descriptor},
    )
    try:
        session.flush()
    except IntegrityError as exc:  # a concurrent loan took the same key set first
        raise KeySetReused("this key set is already used by another loan", field="key") from exc
    hand_out_address(session, ctx, loan, descriptor)


def hand_out_address(
    session: Session, ctx: Context, loan: Loan, descriptor: CollateralDescriptor
) -> CollateralAddress:
    index = loan.next_address_index
    if index > 0 and not descriptor.has_wildcard:
        raise SingleAddressDescriptor(
            "this loan's descriptor has no wildcard: it has exactly one address"
        )
    if index >= MAX_ADDRESSES_PER_LOAN:
        raise AddressLimitReached(f"a loan may hand out at most {MAX_ADDRESSES_PER_LOAN} addresses")
    address = descriptor.address(index)
    row = CollateralAddress(
        loan_id=loan.id or 0,
        change=False,
        index=index,
        address=address,
        script_pubkey_hex=descriptor.script_pubkey(index).hex(),
    )
    loan.next_address_index = index + 1
    loan.updated_at = utcnow()
    session.add(row)
    session.add(loan)
    try:
        session.flush()
    except IntegrityError as exc:
        # Unique address/script across all loans: a reuse would be a bug or an attack.
        raise AddressAlreadyIssued(f"address {address} is already handed out") from exc
    record(
        session,
        actor=ctx.actor,
        action="address.issued",
        loan_id=loan.id,
        data={"index": index, "address": address},
    )
    return row


def new_address(session: Session, ctx: Context, loan_id: int) -> CollateralAddress:
    # Lock the loan row before reading its next index: concurrent hand-outs on one loan
    # queue here and each gets the next index (PostgreSQL: FOR NO KEY UPDATE, which
    # rows referencing the loan do not wait for; SQLite: the write transaction's BEGIN
    # IMMEDIATE already holds the database), instead of racing to the same index.
    locked = repository.loan(session, loan_id, lock=True)
    loan = ensure_can_view(ctx.principal, locked)
    require_role(ctx.principal, Role.miner, Role.bank_operator)
    if loan.state in (LoanState.draft,):
        raise KeysIncomplete(f"loan {loan_id} is a draft: all three keys are needed first")
    if loan.state in (LoanState.released, LoanState.liquidated):
        raise LoanNotInState(f"loan {loan_id} is {loan.state}: it takes no more collateral")
    return hand_out_address(session, ctx, loan, loan_descriptor(session, loan, ctx.network))


def list_addresses(session: Session, ctx: Context, loan_id: int) -> list[CollateralAddress]:
    get_loan(session, ctx, loan_id)
    return repository.addresses_of_loan(session, loan_id)


def latest_receive_addresses(
    session: Session, ctx: Context, loan_id: int, limit: int
) -> tuple[list[CollateralAddress], int]:
    """The newest receive addresses of a loan the caller may see, and how many it has."""
    get_loan(session, ctx, loan_id)
    return repository.latest_receive_addresses(session, loan_id, limit)


def receive_address(session: Session, ctx: Context, loan_id: int, index: int) -> str:
    """The receive address at `index` of a loan the caller may see (404 otherwise)."""
    get_loan(session, ctx, loan_id)
    address = repository.receive_address(session, loan_id, index)
    if address is None:
        raise AddressNotFound(field="index")
    return address


def get_loan_or_404(session: Session, loan_id: int) -> Loan:
    loan = repository.loan(session, loan_id)
    if loan is None:
        raise LoanNotFound()
    return loan
