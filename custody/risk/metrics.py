"""`custody risk`'s own metrics (served by `--metrics-port`, on loopback): its passes,
when the last one ended and how long it took, the liquidations it requested, and whether
automatic liquidation is paused now. In the process's default registry."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

PASSES = Counter("custody_risk_passes", "Risk engine passes")
PASS_SECONDS = Histogram(
    "custody_risk_pass_duration_seconds",
    "How long a risk pass took",
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0),
)
LAST_PASS = Gauge("custody_risk_last_pass_timestamp_seconds", "Unix time the last pass ended")
LAST_PASS_SECONDS = Gauge("custody_risk_last_pass_duration_seconds", "The last pass's duration")
LIQUIDATIONS = Counter(
    "custody_risk_liquidations_requested", "Automatic liquidations the engine requested"
)
MARGIN_CALLS = Counter("custody_risk_margin_calls", "Margin calls the engine made")
LOAN_ERRORS = Counter("custody_risk_loan_errors", "Loans whose pass failed")
PAUSED = Gauge("custody_risk_paused", "1 while automatic liquidation is paused (no usable price)")
LOANS = Gauge("custody_risk_loans", "Loans the last pass looked at")
