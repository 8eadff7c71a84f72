"""The service's errors, named for what happened.

Each class is a subclass of its category in `pledge.errors` (so `except Conflict` still
catches every conflict) with its own stable `code`: the `error` a client reads in the
JSON answer `{"error": code, "message": ..., "field": ...}` (`field` null when no one field
is wrong); the framework's own refusals (no such path, a wrong method, a body that is not
JSON) are answered in the same shape, as the errors of the first section. The category
gives the HTTP status. The first line of each docstring is what the OpenAPI document says about it.

`InvalidInput` itself stays the answer for "this field is wrong" (its `field` says which);
the business refusals that happen to be answered 422 have names of their own below.

This module imports nothing of the service (only the kernel's and the signer's bases), so
every domain (and `auth`, below them all) may raise from it. The signer's errors
(`hsm.signer`), the kernel's (`pledge.errors`) and the few that live next to their code
(`custody.signing.psbt.CannotFinalize`, `custody.risk.prices.PriceUnavailable`,
`custody.chain.rpc.RpcError`) complete the set.
"""

from __future__ import annotations

from typing import Any

from hsm.signer import PolicyViolation
from pledge.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    InvalidInput,
    MethodNotAllowed,
    NotAuthenticated,
    NotFound,
    TooLarge,
    Unsupported,
    UnsupportedMediaType,
    UpstreamUnavailable,
)

# -- the request itself ----------------------------------------------------------------------


class NoSuchRoute(NotFound):
    """No route serves this path (the router's answer, before any route runs)."""

    code = "no_such_route"


class UnsupportedMethod(MethodNotAllowed):
    """This path does not take this method; the `Allow` header lists those it does."""

    code = "unsupported_method"


class MalformedBody(BadRequest):
    """The body cannot be read: it is not JSON (or not text) where JSON is expected."""

    code = "malformed_body"


class UnsupportedContentType(UnsupportedMediaType):
    """The body's `Content-Type` is not one the route reads (JSON, or for a PSBT upload
    also `application/octet-stream`)."""

    code = "unsupported_content_type"


class BodyTooLarge(TooLarge):
    """The body is larger than this route reads."""

    code = "body_too_large"


class ServiceBusy(UpstreamUnavailable):
    """The service is at capacity (no database connection came free in time): retry
    after the `Retry-After` seconds."""

    code = "busy"


# -- who may do what -------------------------------------------------------------------------


class RoleNotAllowed(Forbidden):
    """The caller's role may not do this (the message lists the roles that may)."""

    code = "role_not_allowed"


class SeatNotYours(Forbidden):
    """Only the party holding a key seat of the loan registers that seat's key."""

    code = "seat_not_yours"


class PrincipalNameTaken(Conflict):
    """A principal (API user) of that name already exists."""

    code = "principal_name_taken"


class PrincipalNotFound(NotFound):
    """No principal (API user) of that id or name."""

    code = "principal_not_found"

    def __init__(self, message: str = "principal not found", *, field: str | None = None) -> None:
        super().__init__(message, field=field)


class PrincipalRevoked(Conflict):
    """The principal's API key is revoked: it can be neither revoked again nor rotated."""

    code = "principal_revoked"


class LastAdmin(Conflict):
    """Revoking this key would leave no admin able to manage API keys (create another
    admin first: `custody create-admin`)."""

    code = "last_admin"


# -- parties ---------------------------------------------------------------------------------


class PartyNotFound(NotFound):
    """No such party, or the caller may not see it (no existence oracle)."""

    code = "party_not_found"

    def __init__(self, message: str = "party not found", *, field: str | None = None) -> None:
        super().__init__(message, field=field)


class PartyNameTaken(Conflict):
    """A party of that name already exists."""

    code = "party_name_taken"


class UnknownParty(InvalidInput):
    """The request names a party that does not exist (`field` says where)."""

    code = "unknown_party"


class PartyKindMismatch(InvalidInput):
    """The named party is of the wrong kind here (e.g. a miner where an arbiter is needed)."""

    code = "party_kind_mismatch"


class SecondBankParty(Conflict):
    """A deployment serves one bank: it already has its bank party, and every bank
    operator and approver belongs to it."""

    code = "second_bank_party"


class OperatorWithoutBank(InvalidInput):
    """This bank operator belongs to no bank party, so the loan would have no bank."""

    code = "operator_without_bank"


# -- loans, keys, addresses ------------------------------------------------------------------


class LoanNotFound(NotFound):
    """No such loan, or the caller may not see it (no existence oracle)."""

    code = "loan_not_found"

    def __init__(self, message: str = "loan not found", *, field: str | None = None) -> None:
        super().__init__(message, field=field)


class AddressNotFound(NotFound):
    """The loan has handed out no receive address at that index."""

    code = "address_not_found"

    def __init__(
        self, message: str = "no address at that index", *, field: str | None = None
    ) -> None:
        super().__init__(message, field=field)


class LoanNotInState(Conflict):
    """The loan's state does not allow this (keys only on a draft, no collateral once
    released or liquidated, no release of a draft...)."""

    code = "loan_not_in_state"


class KeysIncomplete(Conflict):
    """This step needs keys of the loan that are not registered yet."""

    code = "keys_incomplete"


class KeySeatTaken(Conflict):
    """The key of this seat of the loan is already registered."""

    code = "key_seat_taken"


class BankKeyRequestOpen(Conflict):
    """The loan's bank key statement is open for the other kind of key."""

    code = "bank_key_request_open"


class KeyOfAnotherParty(Conflict):
    """This key is already registered to another party (a key belongs to one party)."""

    code = "key_of_another_party"


class KeyInTwoSeats(InvalidInput):
    """This key already holds another seat of the loan: each seat needs its own key."""

    code = "key_in_two_seats"


class KeySetReused(Conflict):
    """Another loan already uses this set of three keys: every loan needs a fresh set."""

    code = "key_set_reused"


class HdKeyRequired(InvalidInput):
    """The miner's and the arbiter's seats take only an HD key from a hardware wallet."""

    code = "hd_key_required"


class SingleAddressDescriptor(Conflict):
    """The loan's descriptor has no wildcard: it has exactly one address."""

    code = "single_address_descriptor"


class AddressLimitReached(Conflict):
    """The loan has handed out as many collateral addresses as it may."""

    code = "address_limit_reached"


class AddressAlreadyIssued(Conflict):
    """The next address is already handed out (to this or another loan): never reused."""

    code = "address_already_issued"


class ExportUnsupported(Unsupported):
    """The wallet format cannot describe this loan (e.g. a fixed HSM key); the message
    says which format can."""

    code = "export_unsupported"


# -- signing requests ------------------------------------------------------------------------


class SigningRequestNotFound(NotFound):
    """No such signing request, or the caller may not see it (no existence oracle)."""

    code = "signing_request_not_found"

    def __init__(
        self, message: str = "signing request not found", *, field: str | None = None
    ) -> None:
        super().__init__(message, field=field)


class SigningRequestNotInState(Conflict):
    """The signing request's state does not allow this (signatures only while open, a
    broadcast only when ready, a fee bump only once broadcast...)."""

    code = "signing_request_not_in_state"


class RequestAlreadyOpen(Conflict):
    """The loan already has an open signing request: finish or cancel it first."""

    code = "request_already_open"


class FeeAboveCap(Conflict):
    """The transaction's fee would be above the service's absolute fee cap."""

    code = "fee_above_cap"


class FeeRateOutOfRange(InvalidInput):
    """The requested fee rate is outside the service's floor and ceiling."""

    code = "fee_rate_out_of_range"


class FeeBumpTooSmall(InvalidInput):
    """A replacement must pay a higher rate and more than the original's fee plus its
    own relay (BIP-125)."""

    code = "fee_bump_too_small"


class PricedBySigner(Conflict):
    """The bank's signer holds this loan's bank key: its own valuation prices a
    liquidation, not figures from the request."""

    code = "priced_by_signer"


class CollateralChanged(Conflict):
    """The loan's collateral changed while the request was being built: try again."""

    code = "collateral_changed"


class NoBroadcastWhileBuilding(Conflict):
    """Building a request broadcasts nothing (a guard of the prefetched chain)."""

    code = "no_broadcast_while_building"


class PsbtMismatch(InvalidInput):
    """The uploaded PSBT is not the requested transaction (other inputs, outputs or
    scripts)."""

    code = "psbt_mismatch"


class BadSignature(InvalidInput):
    """A signature in the uploaded PSBT is invalid, foreign or malformed."""

    code = "bad_signature"


class NoNewSignature(InvalidInput):
    """The uploaded PSBT carries no signature the request still lacks."""

    code = "no_new_signature"


class BankApprovalRequired(Conflict):
    """The bank's signature needs a bank approver's approval of this transaction first
    (4-eyes)."""

    code = "bank_approval_required"


class BankDoesNotSign(Conflict):
    """This action is not signed by the bank, so there is nothing for it to approve."""

    code = "bank_does_not_sign"


class ApproveViaSignerStatement(Conflict):
    """The bank's signer holds this loan's key: approvers sign its statement instead."""

    code = "approve_via_signer_statement"


class SelfApproval(Conflict):
    """The requester cannot approve their own request (4-eyes)."""

    code = "self_approval"


# -- statements for the bank's signer --------------------------------------------------------


class SignerStatementNotFound(NotFound):
    """No such signer statement, or the caller may not see it (no existence oracle)."""

    code = "signer_statement_not_found"

    def __init__(
        self, message: str = "signer statement not found", *, field: str | None = None
    ) -> None:
        super().__init__(message, field=field)


class SignerStatementNotInState(Conflict):
    """The signer statement is no longer open (done, refused or cancelled)."""

    code = "signer_statement_not_in_state"


class SignerStatementUnsigned(Conflict):
    """The signer statement does not have its two signatures yet: nothing to retry."""

    code = "signer_statement_unsigned"


class AlreadyEndorsed(Conflict):
    """This person has already sent this signature for the statement."""

    code = "already_endorsed"


class BankKeyNotInSigner(Conflict):
    """The loan's bank key is not held by the bank's signer (it takes no statement)."""

    code = "bank_key_not_in_signer"


class SignerDescriptorMismatch(Conflict):
    """The signer's descriptor for the loan differs from the service's: no address is
    handed out."""

    code = "signer_descriptor_mismatch"


# -- prices, notifications -------------------------------------------------------------------


class PriceNotSet(NotFound):
    """No manual price has been confirmed yet."""

    code = "price_not_set"


class PriceNotFound(NotFound):
    """No such manual price (proposal)."""

    code = "price_not_found"

    def __init__(self, message: str = "price not found", *, field: str | None = None) -> None:
        super().__init__(message, field=field)


class PriceFarFromFeeds(InvalidInput):
    """The manual price is further from the price feeds' median than the configured bound
    allows (`price_manual_max_deviation_bps`)."""

    code = "price_far_from_feeds"


class PriceQuotedInFuture(InvalidInput):
    """The manual price is dated further ahead of the service's clock than the allowed
    clock skew (`price_future_skew_seconds`)."""

    code = "price_quoted_in_future"


class PriceNotProposed(Conflict):
    """The manual price is no longer a proposal: it was already confirmed or rejected."""

    code = "price_not_proposed"


class PriceProposalExpired(Conflict):
    """The manual price proposal was not confirmed in time (`price_proposal_ttl_seconds`):
    propose it again."""

    code = "price_proposal_expired"


class PriceSuperseded(Conflict):
    """A manual price quoted at the same time or later is already in effect: confirming
    this older quote would turn the price back."""

    code = "price_superseded"


class SelfConfirmation(Conflict):
    """The person who proposed a manual price cannot confirm it (4-eyes): another member
    of the bank's staff must."""

    code = "self_confirmation"


class WebhookNotFound(NotFound):
    """No such webhook, or the caller may not see it."""

    code = "webhook_not_found"

    def __init__(self, message: str = "webhook not found", *, field: str | None = None) -> None:
        super().__init__(message, field=field)


class UrlNotAllowed(InvalidInput):
    """The webhook URL may not receive requests from the service: off regtest only https
    to a host whose every address is public (no loopback, private, link-local, ...)."""

    code = "url_not_allowed"


# -- the web console ---------------------------------------------------------------------------


class NoConsoleForRole(InvalidInput):
    """This principal's role has no console (the risk engine is automation)."""

    code = "no_console_for_role"


class InvitationNotValid(NotFound):
    """The invitation link is unknown, already used or expired: ask an admin for a new one."""

    code = "invitation_not_valid"


class PasskeyNotVerified(BadRequest):
    """The passkey's answer did not verify (wrong challenge, origin, relying party or
    signature, an unknown credential, or a challenge used or expired): nothing changed."""

    code = "passkey_not_verified"


class PasskeyNotWithSigner(Forbidden):
    """None of the caller's console passkeys is enrolled with the bank's signer for a
    role that signs this statement (or they have signed it already)."""

    code = "passkey_not_with_signer"


class NotSignedIn(NotAuthenticated):
    """No console session, or one that ended (signed out or idle too long): sign in again."""

    code = "not_signed_in"


class ForgedRequest(Forbidden):
    """A console form without this session's CSRF token or from another origin: refused,
    nothing changed."""

    code = "forged_request"


# -- what the service depends on -------------------------------------------------------------


class NodeNotConfigured(UpstreamUnavailable):
    """This service runs without a Bitcoin node, which this needs."""

    code = "node_not_configured"


class NodeUnavailable(UpstreamUnavailable):
    """The Bitcoin node could not be asked, or could not answer what it must know."""

    code = "node_unavailable"


class SignerNotConfigured(UpstreamUnavailable):
    """This service runs without the bank's signer, which this needs."""

    code = "signer_not_configured"


class RequestRefusedBySigner(PolicyViolation):
    """The bank's signer refused the new request's PSBT: the request is kept, cancelled,
    and the answer gives its `request_id` and the signer's rule (`check`)."""

    code = "request_refused_by_signer"

    def __init__(self, check: str, reason: str, *, message: str, request_id: int) -> None:
        super().__init__(check, reason, field="psbt")
        self.message = message
        self.request_id = request_id

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "request_id": self.request_id}


# -- proof of collateral (custody/proof/) ----------------------------------------------------


class ProofHeightNotFollowed(Conflict):
    """The watcher has not applied the chain up to this height (or has not started): the
    ledger cannot say yet what was collateral there."""

    code = "proof_height_not_followed"


class ProofChainMoved(Conflict):
    """The node's block at a height the proof needs is not the block the ledger applied (a
    reorganisation the watcher has not applied yet): built now, the proof would be wrong."""

    code = "proof_chain_moved"


class ProofNoCollateral(Conflict):
    """The loan holds no collateral at the watcher's height: there is nothing to prove
    control of."""

    code = "proof_no_collateral"


# -- compliance (custody/compliance/) ---------------------------------------------------------


class MinerRecordNotFound(NotFound):
    """This miner has no registry record yet (bank staff enter it: `PUT .../miner-record`)."""

    code = "miner_record_not_found"

    def __init__(
        self, message: str = "miner record not found", *, field: str | None = None
    ) -> None:
        super().__init__(message, field=field)


class DocumentNotFound(NotFound):
    """No evidence document of that id for this party."""

    code = "document_not_found"

    def __init__(self, message: str = "document not found", *, field: str | None = None) -> None:
        super().__init__(message, field=field)


class DocumentCorrupted(UpstreamUnavailable):
    """The stored document's bytes no longer match the SHA-256 recorded at upload: the
    storage failed, and the document is not served until it is restored from a backup."""

    code = "document_corrupted"


class RecordChangedSinceReview(Conflict):
    """The record (or its documents) changed since the version the reviewer looked at:
    look at the current one (its `digest`) and review that."""

    code = "record_changed"


class ReviewRepeated(Conflict):
    """This compliance officer already reviewed this exact content of the record: a
    second approval must come from a different officer."""

    code = "review_repeated"


class SelfReview(Conflict):
    """The officer who last changed the record, or uploaded any of its evidence, may not
    review it (four eyes)."""

    code = "self_review"


class CompliancePending(Conflict):
    """The loan's miner has no approved compliance record (or its approval was voided by a
    change, or a high-risk record lacks its second approval): `state` and `flags` say why."""

    code = "compliance_pending"

    def __init__(self, message: str, *, state: str, flags: list[dict[str, str]]) -> None:
        super().__init__(message)
        self.state = state
        self.flags = flags

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "state": self.state, "flags": self.flags}


class MiningBanNotFound(NotFound):
    """No regional mining ban of that id."""

    code = "mining_ban_not_found"

    def __init__(self, message: str = "mining ban not found", *, field: str | None = None) -> None:
        super().__init__(message, field=field)


# -- AML screening (custody/screening) ---------------------------------------------------------


class ScreeningDecisionNotFound(NotFound):
    """No such screening decision."""

    code = "screening_decision_not_found"

    def __init__(
        self, message: str = "screening decision not found", *, field: str | None = None
    ) -> None:
        super().__init__(message, field=field)


class ScreeningListEntryNotFound(NotFound):
    """No such entry on the bank's screening lists."""

    code = "screening_list_entry_not_found"

    def __init__(
        self, message: str = "screening list entry not found", *, field: str | None = None
    ) -> None:
        super().__init__(message, field=field)


class ScreeningNotDecided(Conflict):
    """The screening has no decision yet (its providers were not asked yet): nothing to
    resolve."""

    code = "screening_not_decided"


class ScreeningAlreadyResolved(Conflict):
    """The screening was clear, or a compliance officer already resolved it."""

    code = "screening_already_resolved"


class ScreeningListEntryExists(Conflict):
    """That address, txid or outpoint is already on the bank's lists."""

    code = "screening_list_entry_exists"


class PayoutAddressBlocked(Conflict):
    """A payout address of the loan is blocked by AML screening: nothing is built to it."""

    code = "payout_address_blocked"


class PayoutAddressUnderReview(Conflict):
    """A payout address of the loan awaits a compliance officer's screening decision."""

    code = "payout_address_under_review"
