"""Which seats sign which action, who may ask for it, and the loan states around it."""

from __future__ import annotations

from custody.db.models import (
    KeyRole,
    LoanState,
    RequestState,
    Role,
    SigningAction,
)

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
