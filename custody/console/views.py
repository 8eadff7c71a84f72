"""What the console's pages show, read through the domain services and repositories with
the API's own policy (a miner sees their loans only; a loan they may not see is 404).

Each function takes the read session and the caller's context and returns plain data for
a template. Amounts stay integers (sats, kopecks) until the template formats them."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import lru_cache
from typing import Any

import pygal
import segno
from pygal.style import Style
from sqlmodel import Session

from custody.audit.service import verify_chain
from custody.auth.context import Context
from custody.auth.policy import BANK_STAFF, READ_ALL, require_role
from custody.config import Settings
from custody.console import repository
from custody.db.models import (
    AuditEvent,
    Loan,
    LoanState,
    PriceRecord,
    Role,
    SigningRequest,
    as_utc,
)
from custody.loans import service as loans
from custody.loans.debt import outstanding_debt_kopecks
from custody.loans.schemas import LoanOut
from custody.loans.views import deposits_out, loan_out, loans_out
from custody.notify import repository as notify_repository
from custody.reports import service as report_service
from custody.risk import repository as risk_repository
from custody.screening import service as screening
from custody.signer import repository as signer_repository
from custody.signer import service as signer_statements
from custody.signing import repository as signing_repository
from custody.watcher.health import health_in
from custody.workers.service import workers_in
from pledge.amounts import kopecks_for_sats, ltv_bps
from pledge.statements import statement_digest

EXPORT_FORMATS = ("descriptor", "caravan", "wallet-policy", "coldcard", "bsms", "sparrow")


@lru_cache(maxsize=4096)
def qr_svg(text: str) -> str:
    """The QR code of `text` as an SVG document (segno; upper-case bech32 fits alphanumeric
    mode, but wallets read either, so the address is encoded as shown). Memoised: segno's
    mask search costs about 15 ms a code. A white background and a viewBox, so it stays
    readable at whatever size the page draws it."""
    out = io.BytesIO()
    segno.make_qr(text, error="m").save(
        out, kind="svg", scale=4, border=2, title=text, xmldecl=False, omitsize=True, light="#fff"
    )
    return out.getvalue().decode()


@dataclass(frozen=True)
class Price:
    value: Decimal
    source: str
    at: datetime

    @property
    def age(self) -> timedelta:
        return datetime.now(UTC) - self.at


def current_price(session: Session, loan: Loan | None = None) -> Price | None:
    """The price the risk engine would use when no feed answers: the last confirmed manual
    price, else the price the loan's terms were set at."""
    row: PriceRecord | None = risk_repository.latest_price(session)
    if row is not None:
        at = row.confirmed_at or row.quoted_at
        at = at if at.tzinfo else at.replace(tzinfo=UTC)
        return Price(Decimal(row.price_rub_per_btc), row.source, at)
    if loan is not None and loan.price_rub_per_btc:
        created = loan.created_at if loan.created_at.tzinfo else loan.created_at.replace(tzinfo=UTC)
        return Price(Decimal(loan.price_rub_per_btc), loan.price_source or "loan terms", created)
    return None


@dataclass(frozen=True)
class Risk:
    """A loan's LTV against its thresholds at a price, and what cures a margin call."""

    debt_kopecks: int
    ltv_bps: int | None
    margin_call_ltv_bps: int
    liquidation_ltv_bps: int
    top_up_sats: int | None  # sats that bring the LTV back below the margin call
    cure_by: datetime | None  # when the cure window ends (margin call start + window)

    @property
    def bar_percent(self) -> int:
        """The bar's fill: LTV as a share of the liquidation threshold (capped)."""
        if self.ltv_bps is None:
            return 0
        return min(100, self.ltv_bps * 100 // max(1, self.liquidation_ltv_bps))

    @property
    def call_percent(self) -> int:
        return min(100, self.margin_call_ltv_bps * 100 // max(1, self.liquidation_ltv_bps))


def top_up_to_cure(debt: int, collateral: int, price: Decimal, margin_call_bps: int) -> int:
    """The fewest sats that, added to the confirmed collateral, put the LTV (rounded up, as
    the risk engine rounds it) below the margin-call threshold."""
    if debt <= 0:
        return 0
    if collateral > 0 and ltv_bps(debt, collateral, price) < margin_call_bps:
        return 0
    low, high = collateral, max(collateral, 1)
    while ltv_bps(debt, high, price) >= margin_call_bps:
        high *= 2
    while low + 1 < high:  # invariant: LTV(high) < call <= LTV(low) (or low has none)
        mid = (low + high) // 2
        if mid > 0 and ltv_bps(debt, mid, price) < margin_call_bps:
            high = mid
        else:
            low = mid
    return high - collateral


def risk_of(loan: Loan, confirmed_sats: int, price: Price | None) -> Risk:
    """The loan's LTV now; in a margin call, the top-up that cures it if it confirms
    before the cure window ends (counted on the debt as it will be then: interest keeps
    accruing, and a top-up sized for the debt of now could fall a few sats short)."""
    debt = outstanding_debt_kopecks(loan)
    ltv = None
    if price is not None and confirmed_sats > 0:
        ltv = ltv_bps(debt, confirmed_sats, price.value)
    cure_by = None
    if loan.state == LoanState.margin_call and loan.margin_call_at is not None:
        since = loan.margin_call_at
        since = since if since.tzinfo else since.replace(tzinfo=UTC)
        cure_by = since + timedelta(hours=loan.cure_window_hours)
    top_up = None
    if price is not None and loan.state == LoanState.margin_call:
        debt_then = outstanding_debt_kopecks(loan, cure_by) if cure_by else debt
        top_up = top_up_to_cure(debt_then, confirmed_sats, price.value, loan.margin_call_ltv_bps)
    return Risk(
        debt_kopecks=debt,
        ltv_bps=ltv,
        margin_call_ltv_bps=loan.margin_call_ltv_bps,
        liquidation_ltv_bps=loan.liquidation_ltv_bps,
        top_up_sats=top_up,
        cure_by=cure_by,
    )


@dataclass(frozen=True)
class LoanRow:
    loan: Loan
    out: LoanOut
    risk: Risk
    party_names: dict[str, str]


def _party_names(session: Session, loans_: list[Loan]) -> dict[int, str]:
    ids = sorted(
        {i for ln in loans_ for i in (ln.miner_party_id, ln.bank_party_id, ln.arbiter_party_id)}
    )
    return {pid: p.name for pid, p in repository.parties_by_id(session, ids).items()}


def _rows(session: Session, loans_: list[Loan], price: Price | None) -> list[LoanRow]:
    outs = loans_out(session, loans_)
    names = _party_names(session, loans_)
    return [
        LoanRow(
            loan=loan,
            out=out,
            risk=risk_of(
                loan, out.collateral.confirmed_sats, price or current_price(session, loan)
            ),
            party_names={
                "miner": names.get(loan.miner_party_id, "?"),
                "bank": names.get(loan.bank_party_id, "?"),
                "arbiter": names.get(loan.arbiter_party_id, "?"),
            },
        )
        for loan, out in zip(loans_, outs, strict=True)
    ]


def dashboard(session: Session, ctx: Context) -> dict[str, Any]:
    """The first page: the caller's loans (all of them for staff and auditors), the price
    and its age, alerts, and the signing requests waiting for this caller's seat."""
    visible = loans.list_loans(session, ctx, limit=500)
    price = current_price(session)
    rows = _rows(session, visible, price)
    role = Role(ctx.principal.role)
    lease = repository.watcher_lease(session)
    alerts: list[str] = [
        f"loan {r.loan.id}: margin call, {r.risk.top_up_sats or 0} sats to cure"
        for r in rows
        if r.loan.state == LoanState.margin_call
    ] + [f"loan {r.loan.id}: liquidating" for r in rows if r.loan.state == LoanState.liquidating]
    if role in READ_ALL:
        if lease is not None and lease.stalled_since is not None:
            alerts.append(
                f"the watcher has been stalled since {lease.stalled_since:%Y-%m-%d %H:%M} UTC"
            )
        alerts += [_alert_line(e) for e in repository.recent_alerts(session, limit=10)]
    # An approver signs no PSBT, but the bank's signature waits on their approval: they
    # are shown what waits for the bank's seat, as its operator is.
    seat = "bank" if role == Role.bank_approver else seat_of(role)
    waiting = [
        req
        for req in repository.open_requests_of_loans(session, [r.out.id for r in rows])
        if seat is not None
        and seat in req.required_seats.split(",")
        and seat not in req.signed_seats.split(",")
    ]
    signer_people = []
    if role == Role.admin:  # whose console passkey an admin may enrol with the bank's signer
        signer_people = repository.principals_with_passkeys(
            session, (Role.bank_operator, Role.bank_approver, Role.admin)
        )
    return {
        "rows": rows,
        "price": price,
        "alerts": alerts,
        "waiting": waiting,
        "role": role.value,
        "signer_people": signer_people,
    }


def _alert_line(event: AuditEvent) -> str:
    where = f"loan {event.loan_id}: " if event.loan_id is not None else ""
    return f"{event.at:%Y-%m-%d %H:%M} {where}{event.action} {event.reason or ''}".strip()


def seat_of(role: Role) -> str | None:
    """The seat whose key this role signs with (the bank's operator holds the bank's
    device); None for roles that sign nothing."""
    return {Role.miner: "miner", Role.arbiter: "arbiter", Role.bank_operator: "bank"}.get(role)


EARLIER_ADDRESSES = 10  # listed on a loan page under the newest one
TIMELINE_EVENTS = 50  # the latest of a loan's audit events its page shows


def address_qr(session: Session, ctx: Context, loan_id: int, index: int) -> str:
    """The QR code (SVG) of the loan's receive address at `index`, for whoever may see
    the loan (404 otherwise, as the API)."""
    return qr_svg(loans.receive_address(session, ctx, loan_id, index))


def loan_page(session: Session, ctx: Context, loan_id: int) -> dict[str, Any]:
    """Everything about one loan the caller may see (404 otherwise, as the API)."""
    loan = loans.get_loan(session, ctx, loan_id)
    price = current_price(session, loan)
    (row,) = _rows(session, [loan], price)
    out = row.out
    # The newest address is the one to pay, shown with its QR code (an image of its own,
    # `address_qr`, kept by the browser); the earlier ones, still watched, as text, the
    # latest EARLIER_ADDRESSES of them (the API lists them all).
    newest, address_count = loans.latest_receive_addresses(
        session, ctx, loan_id, EARLIER_ADDRESSES + 1
    )
    events = repository.loan_events(session, loan_id, TIMELINE_EVENTS + 1)
    return {
        "row": row,
        "out": out,
        "price": price,
        "address": newest[0] if newest else None,
        "earlier": newest[1:],
        "address_count": address_count,
        "exports": EXPORT_FORMATS if loan.descriptor else (),
        "events": events[-TIMELINE_EVENTS:],
        "events_cut": len(events) > TIMELINE_EVENTS,
        "live": _live(session, ctx, loan, out),
        "role": ctx.principal.role,
        "is_staff": ctx.principal.role in BANK_STAFF,
        "seats_open": [
            s for s in ("miner", "bank", "arbiter") if s not in {k.role for k in out.keys}
        ],
        "bank_key_statement": _open_bank_key_statement(session, ctx, loan),
    }


def _open_bank_key_statement(session: Session, ctx: Context, loan: Loan) -> dict[str, Any] | None:
    """The open statement asking the bank's signer for this loan's bank key, for bank
    staff (what they check and sign), or None."""
    if ctx.principal.role not in BANK_STAFF or loan.id is None:
        return None
    st = signer_repository.open_statement_of_loan(session, loan.id, "register_loan")
    return None if st is None else signer_statements.statement_view(session, st)


def live(session: Session, ctx: Context, loan_id: int) -> dict[str, Any]:
    """The part of the loan page that changes under the reader: its state, deposits with
    their confirmations, and its signing requests (polled by the page)."""
    loan = loans.get_loan(session, ctx, loan_id)
    return _live(session, ctx, loan, loan_out(session, loan))


def _live(session: Session, ctx: Context, loan: Loan, out: LoanOut) -> dict[str, Any]:
    assert loan.id is not None
    loan_id = loan.id
    requests = signing_repository.list_requests(session, ctx, loan_id)
    return {
        "state": loan.state,
        "collateral": out.collateral,
        "deposits": deposits_out(session, loan_id),
        "requests": [request_view(r) for r in requests],
        "screening": _deposit_screening(session, ctx, loan_id),
    }


def _deposit_screening(session: Session, ctx: Context, loan_id: int) -> dict[str, str] | None:
    """Each deposit's screening status by "txid:vout", for the bank's staff, compliance
    officers, auditors and the admin (None for the miner and the arbiter: an AML finding
    is not shown to its subject)."""
    if ctx.principal.role in (Role.miner, Role.arbiter):
        return None
    return {
        f"{d.txid}:{d.vout}": str(d.status)
        for d in screening.decisions_of_loans(session, [loan_id])
        if d.subject == "deposit"
    }


def request_view(req: SigningRequest) -> dict[str, Any]:
    evidence: dict[str, Any] = json.loads(req.evidence_json)
    return {
        "id": req.id,
        "loan_id": req.loan_id,
        "action": req.action,
        "state": req.state,
        "unsigned_txid": req.unsigned_txid,
        "required": req.required_seats.split(","),
        "signed": [s for s in req.signed_seats.split(",") if s],
        "outputs": json.loads(req.outputs_json),
        "fee_sats": req.fee_sats,
        "evidence": evidence,
        "psbt": req.psbt,
    }


APPROVERS = (Role.bank_operator, Role.bank_approver)


@dataclass(frozen=True)
class Approval:
    """What an approver checks before their passkey signs: each output in BTC and in RUB
    at the price in use, the fee and its rate, and the LTV now and once this transaction
    confirms (the debt less what the bank is paid, over the change that stays collateral)."""

    outputs: list[dict[str, Any]]
    fee_sats: int
    fee_rub_kopecks: int | None
    fee_rate_sat_vb: str | None
    ltv_before_bps: int | None
    ltv_after_bps: int | None
    collateral_after_sats: int
    debt_after_kopecks: int


def approval_of(view: dict[str, Any], risk: Risk, price: Price | None) -> Approval:
    def rub(sats: int) -> int | None:
        return kopecks_for_sats(sats, price.value) if price is not None else None

    outputs = [{**o, "rub_kopecks": rub(int(o["amount_sats"]))} for o in view["outputs"]]
    kept = sum(int(o["amount_sats"]) for o in view["outputs"] if o["role"] == "collateral_change")
    to_bank = sum(int(o["amount_sats"]) for o in view["outputs"] if o["role"] == "bank_liquidation")
    debt_after = max(0, risk.debt_kopecks - (rub(to_bank) or 0))
    ltv_after = None
    if price is not None and kept > 0:
        ltv_after = ltv_bps(debt_after, kept, price.value)
    rate = view["evidence"].get("fee_rate_sat_vb")
    return Approval(
        outputs=outputs,
        fee_sats=int(view["fee_sats"]),
        fee_rub_kopecks=rub(int(view["fee_sats"])),
        fee_rate_sat_vb=str(rate) if rate is not None else None,
        ltv_before_bps=risk.ltv_bps,
        ltv_after_bps=ltv_after,
        collateral_after_sats=kept,
        debt_after_kopecks=debt_after,
    )


def _statement_digest(session: Session, request_id: int) -> str | None:
    """The digest of the bank's signer's statement for this request (what a passkey signs)."""
    st = signing_repository.transaction_statement_of(session, request_id)
    return statement_digest(json.loads(st.body)).hex() if st is not None else None


def request_page(session: Session, ctx: Context, request_id: int) -> dict[str, Any]:
    """A signing request beside its evidence and the loan's terms (404 as the API); for
    the bank's staff who endorse, the approval (amounts in RUB, LTV before and after)."""
    req = signing_repository.get_request(session, ctx, request_id)
    loan = loans.get_loan(session, ctx, req.loan_id)
    price = current_price(session, loan)
    (row,) = _rows(session, [loan], price)
    view = request_view(req)
    return {
        "req": view,
        "row": row,
        "price": price,
        "role": ctx.principal.role,
        "seat": seat_of(Role(ctx.principal.role)),
        "approval": approval_of(view, row.risk, price),
        "approves": ctx.principal.role in APPROVERS,
        "digest": _statement_digest(session, request_id),
    }


CHART_STYLE = Style(
    background="white", plot_background="white", colors=("#15324d", "#c0392b", "#d98c00")
)


def loan_chart(session: Session, ctx: Context, loan_id: int) -> str:
    """The loan's price and LTV over time, as an SVG document (pygal, no script): the
    price in effect when the loan was opened, each confirmed manual price since, and now;
    the LTV at each of the debt then over the collateral confirmed now (the service keeps
    no history of confirmed collateral per moment, so earlier points do not show a deposit
    arriving later)."""
    loan = loans.get_loan(session, ctx, loan_id)
    confirmed = loan_out(session, loan).collateral.confirmed_sats
    since = as_utc(loan.created_at)
    moments: list[tuple[datetime, Decimal]] = []
    opening = repository.confirmed_price_before(session, since)
    if opening is not None:
        moments.append((since, Decimal(opening.price_rub_per_btc)))
    for row in repository.confirmed_prices_since(session, since):
        moments.append((as_utc(row.confirmed_at or row.quoted_at), Decimal(row.price_rub_per_btc)))
    now = current_price(session, loan)
    if now is not None:
        moments.append((datetime.now(UTC), now.value))
    points = []
    for at, price in moments:
        debt = outstanding_debt_kopecks(loan, at)
        ltv = ltv_bps(debt, confirmed, price) / 100 if confirmed > 0 else None
        points.append((at, float(price), ltv))
    chart = pygal.Line(
        style=CHART_STYLE,
        js=[],  # no script fetched from pygal's CDN (the chart's policy allows none)
        disable_xml_declaration=False,
        height=320,
        width=900,
        x_label_rotation=20,
        show_minor_x_labels=False,
        secondary_range=(0, max(100, *(p[2] or 0 for p in points)) if points else 100),
        title="BTC/RUB (left) and LTV % (right)",
    )
    chart.x_labels = [p[0].strftime("%m-%d %H:%M") for p in points]
    chart.x_labels_major_count = 8
    chart.add("BTC/RUB", [p[1] for p in points])
    chart.add("LTV %", [p[2] for p in points], secondary=True)
    chart.add("margin call %", [loan.margin_call_ltv_bps / 100] * len(points), secondary=True)
    svg: bytes = chart.render()
    return svg.decode()


# -- the audit log and the service's own state ---------------------------------------------------

AUDIT_PAGE = 100
# Who may see the chain's verification result: the API's `GET /v1/audit/verify` rule.
VERIFIERS = frozenset({Role.auditor, Role.admin, Role.bank_approver})


@dataclass(frozen=True)
class AuditFilters:
    """The audit page's query: each filter optional, `before` pages back by event id."""

    action: str | None = None
    loan_id: int | None = None
    actor: str | None = None
    decision: str | None = None
    before: int | None = None

    def query(self, **override: Any) -> str:
        """These filters as a query string (for the next page's link)."""
        from urllib.parse import urlencode

        values = {
            "action": self.action,
            "loan": self.loan_id,
            "actor": self.actor,
            "decision": self.decision,
            "before": self.before,
        }
        values.update(override)
        return urlencode({k: v for k, v in values.items() if v not in (None, "")})


def audit_page(session: Session, ctx: Context, filters: AuditFilters) -> dict[str, Any]:
    """The audit log for bank staff, auditors and the admin, newest first, with the chain's
    verification (for those the API lets verify it)."""
    require_role(ctx.principal, *READ_ALL)
    events = repository.audit_events(
        session,
        action=filters.action,
        loan_id=filters.loan_id,
        actor=filters.actor,
        decision=filters.decision,
        before_id=filters.before,
        limit=AUDIT_PAGE,
    )
    chain = verify_chain(session) if Role(ctx.principal.role) in VERIFIERS else None
    older = events[-1].id if len(events) == AUDIT_PAGE else None
    return {
        "events": [(e, json.loads(e.data or "{}")) for e in events],
        "filters": filters,
        "chain": chain,
        "older": None if older is None else filters.query(before=older),
    }


def system_status(session: Session, ctx: Context, settings: Settings) -> dict[str, Any]:
    """What the service's own processes are doing, for staff and auditors: the watcher's
    height and how far behind the node it was at its last write (a catch-up in progress),
    the risk engine's and the notifier's last passes, a pause, the webhook backlog. Read
    from the database only (no node call from a page)."""
    require_role(ctx.principal, *READ_ALL)
    now = datetime.now(UTC)
    watcher = health_in(session)
    quiet = timedelta(seconds=settings.watch_stall_polls * settings.watch_poll_seconds)
    stale = timedelta(seconds=settings.worker_stale_seconds)
    workers: dict[str, list[dict[str, Any]]] = {"risk": [], "notify": []}
    for worker in workers_in(session, now):
        if worker.kind in workers:
            workers[worker.kind].append(worker.as_dict(now, stale))
    pause = risk_repository.last_pause_change(session)
    paused = pause.reason if pause is not None and pause.action == "risk.paused" else None
    backlog, oldest = notify_repository.outbox_backlog(session)
    return {
        "watcher": None if watcher is None else watcher.as_dict(now, quiet, None),
        "workers": workers,
        "risk_paused": paused,
        "outbox_backlog": backlog,
        "outbox_oldest_seconds": None
        if oldest is None
        else int((now - as_utc(oldest)).total_seconds()),
    }


def reports_page(session: Session, ctx: Context) -> dict[str, Any]:
    """The register's form and every loan's statement, for auditors and compliance officers."""
    require_role(ctx.principal, *report_service.READERS)
    return {"loans": loans.list_loans(session, ctx, limit=500)}
