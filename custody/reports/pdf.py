"""A loan's statement as a PDF (fpdf2): terms, parties, keys and descriptor, deposits,
valuations at its events, the audit timeline and the signatures. Set in DejaVu Sans,
embedded, so Russian names print (Debian's fonts-dejavu-core)."""

from __future__ import annotations

from pathlib import Path
from typing import Final

from fpdf import FPDF
from fpdf.enums import XPos, YPos

from custody.db.models import Approval, SignerEndorsement
from custody.reports.formats import iso
from custody.reports.service import Statement

FONT_DIR: Final = Path("/usr/share/fonts/truetype/dejavu")  # Debian's fonts-dejavu-core
FONT: Final = "DejaVu"
PDF_TYPE: Final = "application/pdf"


def _money(kopecks: int | None) -> str:
    if kopecks is None:
        return "-"
    return f"{kopecks} kopecks ({kopecks // 100}.{kopecks % 100:02d} RUB)"


class _Doc:
    def __init__(self, title: str) -> None:
        pdf = FPDF(format="A4")
        pdf.set_auto_page_break(True, margin=15)
        pdf.add_font(FONT, "", str(FONT_DIR / "DejaVuSans.ttf"))
        pdf.set_title(title)
        pdf.set_creator("pledge custody")
        pdf.add_page()
        self.pdf = pdf

    def heading(self, text: str, size: int = 12) -> None:
        self.pdf.ln(2)
        self.line(text, size=size)

    def line(self, text: str, *, size: int = 8) -> None:
        # One face (loading a TrueType font costs ~0.6 s): headings are set larger instead.
        self.pdf.set_font(FONT, "", size)
        self.pdf.multi_cell(
            0,
            size * 0.5,
            text,
            new_x=XPos.LMARGIN,
            new_y=YPos.NEXT,
        )

    def output(self) -> bytes:
        return bytes(self.pdf.output())


def statement_pdf(s: Statement) -> bytes:
    loan = s.loan
    doc = _Doc(f"Loan {loan.id} statement")
    doc.heading(f"Loan {loan.id}: statement at {iso(s.at)}", 14)
    doc.line(f"Generated {iso(s.generated_at)}. State at {iso(s.at)}: {s.valuations[-1].state}.")

    doc.heading("Terms")
    for text in (
        f"Principal: {_money(loan.principal_kopecks)}",
        f"Interest: {loan.interest_rate_bps} bps a year; "
        f"opened {loan.created_at:%Y-%m-%d %H:%M:%S} UTC",
        f"Maturity: {loan.maturity_at:%Y-%m-%d %H:%M:%S} UTC",
        f"Required collateral: {loan.required_collateral_sats} sats",
        f"Margin call at LTV {loan.margin_call_ltv_bps} bps, liquidation at "
        f"{loan.liquidation_ltv_bps} bps, cure window {loan.cure_window_hours} h",
        f"Miner's return address: {loan.miner_return_address}",
        f"Bank's liquidation address: {loan.bank_liquidation_address}",
    ):
        doc.line(text)

    doc.heading("Parties")
    for role, party in s.parties.items():
        inn = f", INN {s.miner_inn}" if role == "miner" and s.miner_inn else ""
        doc.line(f"{role}: {party.name} (party {party.id}{inn})")

    doc.heading("Keys and descriptor")
    for key in s.keys:
        where = key.hsm_key_label or key.origin_path or ""
        material = key.xpub or key.public_key_hex or key.descriptor_key
        doc.line(f"{key.role} ({key.kind}) {key.fingerprint or ''} {where}: {material}")
    doc.line(f"Descriptor: {loan.descriptor or 'not all keys registered'}")

    doc.heading("Deposits")
    held = {(h.txid, h.vout) for h in s.held}
    for dep in s.deposits:
        counted = "held" if (dep.txid, dep.vout) in held else "not held"
        spent = f", spent by {dep.spent_txid} at {dep.spent_height}" if dep.spent_txid else ""
        doc.line(
            f"{dep.txid}:{dep.vout} {dep.amount_sats} sats, block {dep.block_height}, "
            f"{dep.state} now, {counted} at {iso(s.at)}{spent}"
        )
    if not s.deposits:
        doc.line("None.")

    doc.heading("Valuations")
    for p in s.valuations:
        v = p.valuation
        price = f"{p.price.price_rub_per_btc} RUB/BTC ({p.price.source})" if p.price else "no price"
        doc.line(
            f"{iso(p.at)} {p.action}{f' #{p.event_id}' if p.event_id else ''} [{p.state}]: "
            f"collateral {v.collateral_sats} sats, debt {v.debt_kopecks} kopecks, value "
            f"{v.value_kopecks if v.value_kopecks is not None else '-'} kopecks, LTV "
            f"{v.ltv_bps if v.ltv_bps is not None else '-'} bps at {price}"
        )

    doc.heading("Events")
    for e in s.events:
        extra = "".join(
            f"; {label} {value}"
            for label, value in (("decision", e.decision), ("reason", e.reason))
            if value
        )
        doc.line(f"#{e.id} {iso(e.at)} {e.action} by {e.actor}{extra}")

    doc.heading("Signatures")
    approvals: dict[int, list[Approval]] = {}
    for a in s.approvals:
        approvals.setdefault(a.request_id, []).append(a)
    for req in s.requests:
        doc.line(
            f"Request {req.id} {req.action} [{req.state}]: txid {req.unsigned_txid}, fee "
            f"{req.fee_sats} sats, signed {req.signed_seats or 'none'} of {req.required_seats}"
            + (f", mined at {req.mined_height}" if req.mined_height is not None else ""),
            size=9,
        )
        for a in approvals.get(req.id or 0, []):
            doc.line(f"  approved by {a.principal} ({a.role}) for {a.unsigned_txid}")
    endorsed: dict[int, list[SignerEndorsement]] = {}
    for en in s.endorsements:
        endorsed.setdefault(en.statement_id, []).append(en)
    for st in s.statements:
        people = ", ".join(en.person for en in endorsed.get(st.id or 0, [])) or "nobody yet"
        doc.line(f"Signer statement {st.id} {st.kind} [{st.state}]: signed by {people}")
        if st.outcome:
            doc.line(f"  {st.outcome}")
    if not s.requests and not s.statements:
        doc.line("None.")
    return doc.output()
