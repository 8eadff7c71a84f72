"""`custody notify`'s own metrics (served by `--metrics-port`, on loopback): webhook
deliveries by result and how long each attempt's POST took. In the process's default
registry."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

DELIVERIES = Counter(
    "custody_notify_deliveries",
    "Webhook delivery attempts by result (delivered, failed: retried later, dead: given up)",
    ["result"],
)
ATTEMPT_SECONDS = Histogram(
    "custody_notify_attempt_duration_seconds",
    "How long one webhook POST took (resolving and checking the address included)",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
for result in ("delivered", "failed", "dead"):
    DELIVERIES.labels(result=result)
