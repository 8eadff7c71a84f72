"""What the bank's signer is asked to sign, as the service keeps it: statements (a
signing request's transaction, a loan's registration, a repayment, a person) and the bank
keys the signer holds. Storage only: the orchestration is in `custody.signer.service`."""

from __future__ import annotations

import json
from typing import Any, Final

from sqlmodel import Session

from custody.audit.service import record
from custody.auth.context import Context
from custody.db.models import (
    LoanKey,
    SignerStatement,
    SigningRequest,
    StatementState,
)
from custody.signing.repository import bank_key
from pledge.statements import statement_digest

KEY_LABEL_PREFIX: Final = "pledge-loan:"


def signer_loan_ref(key: LoanKey) -> str:
    label = key.hsm_key_label or ""
    return label[len(KEY_LABEL_PREFIX) :] if label.startswith(KEY_LABEL_PREFIX) else label


def bank_hsm_key(session: Session, loan_id: int) -> LoanKey | None:
    """The loan's bank key when the bank's signer holds it (None: an xpub the bank signs
    with on its own device)."""
    key = bank_key(session, loan_id)
    return key if key is not None and key.hsm_key_label is not None else None


def open_statement(
    session: Session,
    ctx: Context,
    *,
    kind: str,
    body: dict[str, Any],
    loan_id: int | None = None,
    request_id: int | None = None,
    nonce: str | None = None,
) -> SignerStatement:
    st = SignerStatement(
        kind=kind,
        loan_id=loan_id,
        request_id=request_id,
        nonce=nonce,
        body=json.dumps(body, sort_keys=True),
        state=StatementState.open,
        created_by=ctx.actor,
    )
    session.add(st)
    session.flush()
    record(
        session,
        actor=ctx.actor,
        action="signer.statement_opened",
        loan_id=loan_id,
        request_id=request_id,
        data={"statement_id": st.id, "kind": kind, "digest": statement_digest(body).hex()},
    )
    return st


def open_transaction_statement(
    session: Session, ctx: Context, req: SigningRequest, prepared: dict[str, Any]
) -> SignerStatement:
    """The statement the signer issued for a signing request (its nonce is the key)."""
    return open_statement(
        session,
        ctx,
        kind="transaction",
        body=prepared["statement"],
        loan_id=req.loan_id,
        request_id=req.id,
        nonce=str(prepared["nonce"]),
    )
