"""The service's side of the bank's signer: statements people sign, carried to the signer.

The signer trusts none of this: it checks every signature against the people enrolled in
it, and every figure against its own records, node and price. The service's job is to
build the statement from the loan's records, show it to people, collect their signatures
and relay them; then apply what the signer did (a bank key, a repayment, signatures).

Network calls happen outside any database transaction: a statement with enough signatures
is read and committed, the signer is called, and the outcome is written in a new
transaction (`execute`). A statement whose outcome was lost (a crash mid-call, the signer
unreachable) stays open with the reason and is taken to the signer again on request
(`POST /v1/signer-statements/{id}/retry`); the signer makes that safe (a registration or
repayment is recorded once, a used statement cannot be used twice).
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import structlog
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from custody.audit.service import record
from custody.auth.context import Context
from custody.auth.policy import require_role, seat_for
from custody.compliance.service import ensure_cleared
from custody.db.models import (
    KeyKind,
    KeyRole,
    Loan,
    LoanKey,
    LoanState,
    RequestState,
    Role,
    SignerEndorsement,
    SignerStatement,
    StatementState,
    utcnow,
)
from custody.db.session import transaction
from custody.errors import (
    AlreadyEndorsed,
    BankKeyNotInSigner,
    BankKeyRequestOpen,
    KeySeatTaken,
    KeysIncomplete,
    LoanNotFound,
    LoanNotInState,
    SignerDescriptorMismatch,
    SignerNotConfigured,
    SignerStatementNotFound,
    SignerStatementNotInState,
    SignerStatementUnsigned,
    SigningRequestNotInState,
)
from custody.loans import repository as loans_repository
from custody.loans.service import get_loan, loan_keys, store_key
from custody.signer import repository
from custody.signing import repository as signing_repository
from custody.signing.broadcast import broadcast_ready
from custody.signing.signatures import add_signatures
from custody.signing.statements import (
    KEY_LABEL_PREFIX,
    bank_hsm_key,
    open_statement,
    signer_loan_ref,
)
from hsm.client import BankSigner
from hsm.signer import PolicyViolation, SignerError
from pledge.errors import InvalidInput, UpstreamUnavailable
from pledge.keys import CollateralKey, parse_fixed_key, parse_hd_key
from pledge.statements import canonical_statement, iso, statement_digest

__all__ = [
    "TAKEN_TO_SIGNER",
    "UNREACHABLE",
    "approval_challenge",
    "endorse",
    "execute",
    "get_statement",
    "may_have_acted",
    "registration_statement",
    "request_bank_key",
    "request_repayment",
    "statement_view",
    "stored_endorsement",
]

log = structlog.get_logger(__name__)

STATEMENT_TTL: Final = timedelta(hours=24)
# The signer's terms carry one confirmation count per loan; when the loan names none, the
# watcher's rule for large deposits (3) is what it gets, the cautious side of the two.
SIGNER_CONFIRMATIONS: Final = 3
# Refusals that more or other signatures can still fix: the statement stays open.
# A passkey that is not the person's, or whose counter did not rise (a race, or a clone:
# the signer refused it either way), is fixed by that person signing again.
RECOVERABLE: Final = frozenset(
    {
        "approval_roles",
        "approval_unknown_person",
        "approval_signature",
        "approval_duplicate",
        "approval_credential",
        "approval_counter",
    }
)
STAFF: Final = (Role.bank_operator, Role.bank_approver)


# -- reading -------------------------------------------------------------------------------


def _check_view(session: Session, ctx: Context, st: SignerStatement) -> None:
    """Bank staff of the loan's bank, auditors and admins; nobody else learns it exists."""
    role = ctx.principal.role
    hidden = SignerStatementNotFound()
    if role in (Role.auditor, Role.admin):
        return
    if role not in STAFF:
        raise hidden
    if st.loan_id is not None:
        loan = loans_repository.loan(session, st.loan_id)
        if loan is None or loan.bank_party_id != ctx.principal.party_id:
            raise hidden


def get_statement(session: Session, ctx: Context, statement_id: int) -> SignerStatement:
    st = repository.statement_by_id(session, statement_id)
    if st is None:
        raise SignerStatementNotFound()
    _check_view(session, ctx, st)
    return st


def statement_view(session: Session, st: SignerStatement) -> dict[str, Any]:
    """What a person needs to check and sign: the statement, its exact bytes, its digest
    (a passkey's challenge) and who has signed so far."""
    body = json.loads(st.body)
    people = repository.endorsers(session, st.id)
    return {
        "id": st.id,
        "kind": st.kind,
        "loan_id": st.loan_id,
        "request_id": st.request_id,
        "state": str(st.state),
        "statement": body,
        "canonical": canonical_statement(body).decode("utf-8"),
        "digest": statement_digest(body).hex(),
        "challenge": _b64url(statement_digest(body)),
        "signed_by": list(people),
        "outcome": st.outcome,
    }


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


# Who signs a statement of each kind, as the signer's quorum rules have it.
_SIGNING_ROLES: Final = {"enroll": ("admin",), "remove": ("admin",)}
_STAFF_ROLES: Final = ("bank_operator", "bank_approver")


def known_passkeys(session: Session) -> dict[str, dict[str, str]]:
    """Passkeys enrolled through this service and not removed through it since, by person
    (from the enrolment and removal statements the signer acted on). The signer's own list
    may hold more (its ceremony, another service): this is a hint for a browser's
    `allowCredentials`, never a check; the signer checks every assertion itself."""
    known: dict[str, dict[str, str]] = {}
    for st in repository.done_statements_of_kinds(session, ("enroll", "remove")):
        body = json.loads(st.body)
        name = str(body.get("name"))
        if st.kind == "remove":
            known.pop(name, None)
        elif body.get("algorithm") == "webauthn":
            known[name] = {
                "person": name,
                "role": str(body.get("role")),
                "credential_id": str(body.get("credential_id")),
                "rp_id": str(body.get("rp_id")),
            }
    return known


def approval_challenge(session: Session, ctx: Context, request_id: int) -> dict[str, Any]:
    """What the approval page of a signing request awaiting the bank's approval needs: the
    statement the bank's signer issued for it, the WebAuthn challenge (its digest) and the
    passkeys that may still sign it (people of the right roles who have not signed yet)."""
    req = signing_repository.get_request(session, ctx, request_id)  # others get 404
    require_role(ctx.principal, *STAFF, Role.admin, Role.auditor)
    if req.state not in (RequestState.awaiting_signatures, RequestState.ready):
        raise SigningRequestNotInState(
            f"signing request {request_id} is {req.state}: nothing to approve"
        )
    st = signing_repository.transaction_statement_of(session, request_id)
    if st is None or st.id is None:
        raise SigningRequestNotInState(
            f"signing request {request_id} has no statement of the bank's signer to approve"
        )
    if st.state != StatementState.open:
        raise SignerStatementNotInState(
            f"signer statement {st.id} is {st.state}: it takes no signatures"
        )
    view = statement_view(session, st)
    roles = _SIGNING_ROLES.get(st.kind, _STAFF_ROLES)
    signed = set(view["signed_by"])
    credentials = [
        p
        for name, p in sorted(known_passkeys(session).items())
        if p["role"] in roles and name not in signed
    ]
    return {
        "request_id": request_id,
        "statement_id": st.id,
        "state": view["state"],
        "statement": view["statement"],
        "canonical": view["canonical"],
        "digest": view["digest"],
        "challenge": view["challenge"],
        "signed_by": view["signed_by"],
        "credentials": credentials,
        "endorse_at": f"/v1/signer-statements/{st.id}/endorsements",
    }


# -- creating statements --------------------------------------------------------------------


def registration_statement(
    session: Session,
    loan: Loan,
    network: str,
    *,
    loan_ref: str,
    expires_at: datetime,
    bank_key: str = "hd",
) -> dict[str, Any]:
    """The loan as the signer will record it. The signer makes the bank key and builds the
    descriptor from the two HD keys here, so those must be registered first."""
    assert loan.id is not None
    keys = {KeyRole(k.role): k for k in loan_keys(session, loan.id)}
    missing = [s.value for s in (KeyRole.miner, KeyRole.arbiter) if s not in keys]
    if missing:
        raise KeysIncomplete(
            f"register the {' and '.join(missing)} key first: the bank's signer builds the "
            "loan's descriptor from the miner's and the arbiter's keys when it makes its own",
            field="key",
        )

    def hd(row: LoanKey) -> str:
        assert row.kind == KeyKind.hd and row.fingerprint and row.origin_path and row.xpub
        return f"[{row.fingerprint}{row.origin_path[1:]}]{row.xpub}"

    created = loan.created_at if loan.created_at.tzinfo else loan.created_at.replace(tzinfo=UTC)
    maturity = loan.maturity_at if loan.maturity_at.tzinfo else loan.maturity_at.replace(tzinfo=UTC)
    return {
        "kind": "register_loan",
        "bank_key": bank_key,
        "network": network,
        "loan_ref": loan_ref,
        "miner_key": hd(keys[KeyRole.miner]),
        "arbiter_key": hd(keys[KeyRole.arbiter]),
        "terms": {
            "principal_kopecks": loan.principal_kopecks,
            "interest_rate_bps": loan.interest_rate_bps,
            "start_at": iso(created),
            "maturity_at": iso(maturity),
            "margin_call_ltv_bps": loan.margin_call_ltv_bps,
            "liquidation_ltv_bps": loan.liquidation_ltv_bps,
            "cure_window_hours": loan.cure_window_hours,
            "required_confirmations": loan.required_confirmations or SIGNER_CONFIRMATIONS,
            "target_ltv_bps": loan.target_ltv_bps or 6_000,
        },
        "miner_return_address": loan.miner_return_address,
        "bank_liquidation_address": loan.bank_liquidation_address,
        "expires_at": iso(expires_at),
    }


def request_bank_key(
    session: Session, ctx: Context, loan_id: int, *, kind: str = "hd"
) -> SignerStatement:
    """Open the registration statement of a loan's bank key (or return the open one).
    Once an operator and an approver have signed it, the signer makes the key."""
    # Who may see the loan first (others get 404, as everywhere), then who holds the seat.
    loan = get_loan(session, ctx, loan_id)
    seat_for(ctx.principal, loan, KeyRole.bank)
    if loan.state != LoanState.draft:
        raise LoanNotInState(
            f"loan {loan_id} is {loan.state}: keys can only be added to a draft loan"
        )
    if any(k.role == KeyRole.bank for k in loan_keys(session, loan_id)):
        raise KeySeatTaken(f"the bank key of loan {loan_id} is already registered", field="key")
    # The bank key is the last: the signer makes none for a loan the gate would keep in draft.
    ensure_cleared(session, loan)
    existing = repository.open_statement_of_loan(session, loan_id, "register_loan")
    if existing is not None:
        if json.loads(existing.body).get("bank_key", "fixed") != kind:
            raise BankKeyRequestOpen(
                f"loan {loan_id} already has an open bank key statement for a "
                f"{json.loads(existing.body).get('bank_key', 'fixed')} key: sign or let it "
                "expire first",
                field="kind",
            )
        return existing
    body = registration_statement(
        session,
        loan,
        ctx.network,
        loan_ref=f"loan-{loan_id}-{secrets.token_hex(4)}",
        expires_at=utcnow() + STATEMENT_TTL,
        bank_key=kind,
    )
    return open_statement(session, ctx, kind="register_loan", body=body, loan_id=loan_id)


def request_enrolment(
    session: Session,
    ctx: Context,
    *,
    name: str,
    role: str,
    algorithm: str,
    public_key: str,
    passkey: Mapping[str, Any] | None = None,
) -> SignerStatement:
    """Open the statement that enrols a person in the bank's signer; two enrolled admins
    sign it (`custody approve --statement ID`). The signer checks the key and the names.
    A passkey (`webauthn`) adds its `credential_id`, `rp_id` and `origins`."""
    require_role(ctx.principal, Role.admin)
    body: dict[str, Any] = {
        "kind": "enroll",
        "name": name,
        "role": role,
        "algorithm": algorithm,
        "public_key": public_key,
        **dict(passkey or {}),
        "expires_at": iso(utcnow() + STATEMENT_TTL),
    }
    return open_statement(session, ctx, kind="enroll", body=body)


def request_removal(session: Session, ctx: Context, *, name: str) -> SignerStatement:
    """Open the statement that removes a person from the signer (two other admins sign)."""
    require_role(ctx.principal, Role.admin)
    body = {"kind": "remove", "name": name, "expires_at": iso(utcnow() + STATEMENT_TTL)}
    return open_statement(session, ctx, kind="remove", body=body)


def request_repayment(
    session: Session,
    ctx: Context,
    loan_id: int,
    *,
    amount_kopecks: int,
    paid_at: datetime,
    repayment_id: str | None = None,
) -> SignerStatement:
    """Open the statement of a repayment; the signer records it (and the service credits
    the loan) once an operator and an approver have signed it."""
    loan = get_loan(session, ctx, loan_id)  # others get 404, as everywhere
    require_role(ctx.principal, Role.bank_operator)
    if loan.bank_party_id != ctx.principal.party_id:
        raise LoanNotFound()
    key = bank_hsm_key(session, loan_id)
    if key is None:
        raise BankKeyNotInSigner(f"loan {loan_id}'s bank key is not held by the bank's signer")
    if paid_at.tzinfo is None:
        raise InvalidInput("paid_at must carry a time zone", field="paid_at")
    body = {
        "kind": "repayment",
        "network": ctx.network,
        "loan_ref": signer_loan_ref(key),
        "repayment_id": repayment_id or secrets.token_hex(8),
        "amount_kopecks": amount_kopecks,
        "paid_at": iso(paid_at),
        "expires_at": iso(utcnow() + STATEMENT_TTL),
    }
    return open_statement(session, ctx, kind="repayment", body=body, loan_id=loan_id)


# -- signatures -----------------------------------------------------------------------------

_WEBAUTHN_FIELDS: Final = ("credential_id", "authenticator_data", "client_data_json", "signature")


def stored_endorsement(signature: str | None, webauthn: Mapping[str, str] | None) -> str:
    """How an endorsement is kept (`SignerEndorsement.signature`): a raw signature as sent
    (base64), a passkey's assertion as JSON `{"webauthn": {...}}` (base64 never starts
    with `{`), so both live in the one column and are relayed to the signer as sent."""
    if webauthn is not None:
        return json.dumps({"webauthn": {k: webauthn[k] for k in _WEBAUTHN_FIELDS}}, sort_keys=True)
    assert signature is not None
    return signature


def relayed_endorsement(person: str, stored: str) -> dict[str, Any]:
    """The endorsement as the signer takes it, from how it is kept (a row someone rewrote
    into anything else is relayed as a signature, which the signer refuses)."""
    if stored.startswith("{"):
        try:
            kept = json.loads(stored)
        except ValueError:
            kept = None
        assertion = kept.get("webauthn") if isinstance(kept, dict) else None
        if isinstance(assertion, dict):
            return {
                "person": person,
                "webauthn": {k: str(assertion.get(k, "")) for k in _WEBAUTHN_FIELDS},
            }
    return {"person": person, "signature": stored}


def ready_to_retry(session: Session, ctx: Context, statement_id: int) -> SignerStatement:
    """A statement whose signer call failed or was lost (a crash, an unreachable signer):
    still open with two signatures, it may be taken to the signer again. The signer makes
    that safe: a registration or repayment is recorded once, a statement used once."""
    st = get_statement(session, ctx, statement_id)
    require_role(ctx.principal, *STAFF, Role.admin)
    if st.state != StatementState.open:
        raise SignerStatementNotInState(
            f"signer statement {statement_id} is {st.state}: nothing to retry"
        )
    count = repository.endorsement_count(session, statement_id)
    if count < 2:
        raise SignerStatementUnsigned(
            f"signer statement {statement_id} has {count} signature(s); it needs 2"
        )
    return st


def endorse(
    session: Session, ctx: Context, statement_id: int, person: str, signature: str
) -> tuple[SignerStatement, bool]:
    """Keep one person's signature; (statement, ready to take to the signer)."""
    # Who may not see it gets 404, as for a loan; who sees it without the right, 403.
    st = get_statement(session, ctx, statement_id)
    require_role(ctx.principal, *STAFF, Role.admin)
    if st.state != StatementState.open:
        raise SignerStatementNotInState(
            f"signer statement {statement_id} is {st.state}: it takes no signatures"
        )
    existing = repository.endorsement_by(session, statement_id, person)
    action = "signer.statement_signed"
    if existing is not None:
        if existing.signature == signature:
            raise AlreadyEndorsed(
                f"{person} has already signed signer statement {statement_id}", field="person"
            )
        # Only the signer can tell a good signature from a bad one. A bad one sent under
        # someone's name (by mistake, or by another bank login) must not block them: their
        # own, different signature replaces it, and the audit log keeps both posts.
        existing.signature, existing.submitted_by = signature, ctx.actor
        existing.created_at = utcnow()
        session.add(existing)
        action = "signer.statement_resigned"
    else:
        row = SignerEndorsement(
            statement_id=statement_id,
            person=person,
            signature=signature,
            submitted_by=ctx.actor,
        )
        try:
            with session.begin_nested():
                session.add(row)
        except IntegrityError:
            raise AlreadyEndorsed(
                f"{person} has already signed signer statement {statement_id}", field="person"
            ) from None
    record(
        session,
        actor=ctx.actor,
        action=action,
        loan_id=st.loan_id,
        request_id=st.request_id,
        data={"statement_id": statement_id, "person": person},
    )
    count = repository.endorsement_count(session, statement_id)
    return st, count >= 2


@dataclass(frozen=True)
class _Work:
    kind: str
    body: dict[str, Any]
    approvals: list[dict[str, Any]]
    nonce: str | None
    loan_id: int | None
    request_id: int | None
    psbt: str | None
    action: str | None
    loan_ref: str | None


@dataclass(frozen=True)
class _HsmEvidence:
    label: str
    public_key: bytes
    local: bool
    never_extractable: bool


# The intent, committed before the signer is called: a statement still open with this
# outcome and no `result` after a crash is one whose outcome is unknown (the signer may
# or may not have acted); `custody.signer.reconcile` takes it to the signer again.
TAKEN_TO_SIGNER: Final = "taken to the signer; its answer is not recorded yet"
UNREACHABLE: Final = "the signer could not be reached"


def may_have_acted(st: SignerStatement) -> bool:
    """Was this open statement taken to the signer before without an answer recorded (a
    crash mid-call, a timeout)? Then the signer may already have acted on it."""
    outcome = st.outcome or ""
    return st.result is None and (outcome == TAKEN_TO_SIGNER or outcome.startswith(UNREACHABLE))


def execute(
    engine: Engine, statement_id: int, signer: BankSigner | None, ctx: Context, chain: Any
) -> dict[str, Any]:
    """Take a statement with its signatures to the signer and apply what it did.
    Three steps, no transaction open across the call. Returns the outcome.

    The intent is committed first (`TAKEN_TO_SIGNER`). If an earlier call's answer was
    lost (`may_have_acted`), the signer may already have acted: a repayment it says it
    already recorded is credited unless another statement credited it, and a
    registration it already has is taken from its own record of the loan."""
    if signer is None:
        raise SignerNotConfigured("no bank signer is configured for this service")
    with transaction(engine) as session:
        st = repository.statement_by_id(session, statement_id)
        if st is None or st.state != StatementState.open:
            return {"state": str(st.state) if st else "missing"}
        answer_lost = may_have_acted(st)
        if st.result is None:
            st.outcome, st.updated_at = TAKEN_TO_SIGNER, utcnow()
            session.add(st)
        rows = repository.endorsements(session, statement_id)
        psbt = action = loan_ref = None
        if st.request_id is not None:
            req = repository.request_by_id(session, st.request_id)
            assert req is not None
            psbt, action = req.psbt, str(req.action)
            key = bank_hsm_key(session, req.loan_id)
            loan_ref = signer_loan_ref(key) if key else None
        stored = json.loads(st.result) if st.result else None
        work = _Work(
            st.kind,
            json.loads(st.body),
            [relayed_endorsement(r.person, r.signature) for r in rows],
            st.nonce,
            st.loan_id,
            st.request_id,
            psbt,
            action,
            loan_ref,
        )
    if stored is not None:  # the signer acted before; only applying it failed
        with transaction(engine) as session:
            _apply(session, ctx, statement_id, work, stored, chain)
        _broadcast_if_ready(engine, ctx, statement_id, work, chain)
        return {"state": "done", "result": stored}
    try:
        result = _call(signer, work)
    except PolicyViolation as refusal:
        recovered = _registered_before(signer, work, refusal) if answer_lost else None
        if recovered is None:
            with transaction(engine) as session:
                _refused(session, ctx, statement_id, refusal)
            return {"state": "refused", "check": refusal.check, "reason": refusal.reason}
        result = recovered
    except (UpstreamUnavailable, SignerError) as exc:
        with transaction(engine) as session:
            st = repository.statement_by_id(session, statement_id)
            assert st is not None
            st.outcome = f"{UNREACHABLE}: {exc.message}"
            st.updated_at = utcnow()
        return {"state": "open", "reason": exc.message}
    with transaction(engine) as session:  # keep what the signer did before applying it
        st = repository.statement_by_id(session, statement_id)
        assert st is not None
        st.result = json.dumps(result, sort_keys=True, default=str)
        st.outcome = "the signer acted; applying its answer"
        st.updated_at = utcnow()
    with transaction(engine) as session:
        _apply(session, ctx, statement_id, work, result, chain, answer_lost=answer_lost)
    _broadcast_if_ready(engine, ctx, statement_id, work, chain)
    return {"state": "done", "result": result}


def _registered_before(
    signer: BankSigner, work: _Work, refusal: PolicyViolation
) -> dict[str, Any] | None:
    """A registration whose answer was lost, refused now because the signer has the loan:
    its own record of the loan is the answer (the token's key attributes are not in it)."""
    if work.kind != "register_loan" or refusal.check != "loan_registered":
        return None
    loan = signer.loan(str(work.body["loan_ref"]))
    if loan.get("descriptor") is None or loan.get("public_key") is None:
        return None
    return {**loan, "recovered": True}


def _broadcast_if_ready(
    engine: Engine, ctx: Context, statement_id: int, work: _Work, chain: Any
) -> None:
    """With the bank's signature committed, a request at quorum is broadcast (no
    transaction open). If the node cannot be reached the request stays ready and the
    statement says how to go on."""

    if work.kind != "transaction" or work.request_id is None or chain is None:
        return
    try:
        broadcast_ready(engine, ctx.actor, work.request_id, chain)
    except UpstreamUnavailable as exc:
        with transaction(engine) as session:
            st = repository.statement_by_id(session, statement_id)
            assert st is not None
            st.outcome = (
                f"{st.outcome}; not broadcast yet ({exc.message}): "
                f"POST /v1/signing-requests/{work.request_id}/broadcast"
            )


def _call(signer: BankSigner, work: _Work) -> dict[str, Any]:
    if work.kind == "register_loan":
        return signer.register_loan(work.body, work.approvals)
    if work.kind == "repayment":
        return signer.record_repayment(work.body, work.approvals)
    if work.kind == "enroll":
        return signer.enroll(work.body, work.approvals)
    if work.kind == "remove":
        return signer.remove(work.body, work.approvals)
    if work.kind == "desk_quote":
        return signer.desk_quote(work.body, work.approvals)
    if work.kind == "transaction":
        assert work.psbt and work.action and work.loan_ref
        signed = signer.sign(
            work.loan_ref, work.action, work.psbt, nonce=work.nonce, approvals=work.approvals
        )
        return {"psbt": signed.psbt, "authorized": signed.authorized, "report": signed.report}
    raise InvalidInput(f"unknown statement kind {work.kind!r}")


def _refused(session: Session, ctx: Context, statement_id: int, refusal: PolicyViolation) -> None:
    st = repository.statement_by_id(session, statement_id)
    assert st is not None
    st.outcome = f"refused ({refusal.check}): {refusal.reason}"
    st.updated_at = utcnow()
    if refusal.check not in RECOVERABLE:
        st.state = StatementState.refused
    record(
        session,
        actor=ctx.actor,
        action="signer.refused",
        loan_id=st.loan_id,
        request_id=st.request_id,
        decision="refused",
        reason=refusal.reason,
        data={"statement_id": statement_id, "kind": st.kind, "check": refusal.check},
    )
    log.info("signer.refused", statement_id=statement_id, check=refusal.check)


def _apply(
    session: Session,
    ctx: Context,
    statement_id: int,
    work: _Work,
    result: dict[str, Any],
    chain: Any,
    *,
    answer_lost: bool = False,
) -> None:
    st = repository.statement_by_id(session, statement_id)
    assert st is not None
    st.state = StatementState.done
    st.updated_at = utcnow()
    if work.kind == "register_loan":
        assert work.loan_id is not None
        loan = loans_repository.loan(session, work.loan_id)
        assert loan is not None
        key: CollateralKey
        if result.get("bank_key_kind") == "hd":
            # The loan's account of the bank seed. The label names the loan in the signer
            # (its registry's reference), as a fixed key's PKCS#11 label does.
            key = parse_hd_key(str(result["bank_key"]), ctx.network, field="bank_key")
            label = KEY_LABEL_PREFIX + str(result["loan_ref"])
        else:
            key = parse_fixed_key(str(result["public_key"]), field="public_key")
            label = str(result["key_ref"])
        evidence = _HsmEvidence(
            label=label,
            public_key=bytes.fromhex(str(result["public_key"])),
            local=bool(result.get("local")),
            never_extractable=bool(result.get("never_extractable")),
        )
        store_key(session, ctx, loan, KeyRole.bank, key, evidence=evidence)
        if loan.descriptor != result["descriptor"]:
            raise SignerDescriptorMismatch(
                "the signer's descriptor for this loan differs from the service's: refusing "
                "to hand out addresses"
            )
        st.outcome = f"bank key {evidence.label} made; registered by {result['registered_by']}"
    elif work.kind == "repayment":
        assert work.loan_id is not None
        loan = loans_repository.loan(session, work.loan_id)
        assert loan is not None
        credit = bool(result.get("recorded")) or (
            answer_lost and not _credited_elsewhere(session, statement_id, work)
        )
        if credit:
            loan.credited_kopecks += int(work.body["amount_kopecks"])
            loan.updated_at = utcnow()
            session.add(loan)
        st.outcome = f"repaid so far: {result.get('repaid_kopecks')} kopecks"
        record(
            session,
            actor=ctx.actor,
            action="loan.repayment_recorded",
            loan_id=loan.id,
            data={
                "repayment_id": work.body["repayment_id"],
                "amount_kopecks": work.body["amount_kopecks"],
                "recorded": result.get("recorded"),
                "credited": credit,
            },
        )
    elif work.kind == "transaction":
        assert work.request_id is not None
        record(
            session,
            actor=ctx.actor,
            action="signer.signed",
            loan_id=work.loan_id,
            request_id=work.request_id,
            decision="signed",
            reason=str(result.get("authorized")),
            data={"statement_id": statement_id, "fee_sats": result["report"].get("fee_sats")},
        )
        add_signatures(session, ctx, work.request_id, result["psbt"], via="hsm")
        st.outcome = str(result.get("authorized"))
    else:
        st.outcome = json.dumps(result, sort_keys=True, default=str)[:500]
    session.add(st)


def _credited_elsewhere(session: Session, statement_id: int, work: _Work) -> bool:
    """Did another statement of this loan already credit this repayment id?"""
    others = repository.done_statements_of_loan_except(
        session, work.loan_id, "repayment", statement_id
    )
    repayment_id = work.body["repayment_id"]
    return any(json.loads(o.body).get("repayment_id") == repayment_id for o in others)
