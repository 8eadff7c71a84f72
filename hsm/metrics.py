"""The signer's Prometheus metrics (`GET /metrics` of `hsm serve`, behind its bearer token).

Decisions by operation, result and rule (the `PolicyViolation` check that refused, empty
for an accepted one), and the bank key's signatures: the token's C_Sign calls and the seed's
digests, read from the parts at scrape time. Each core has its own registry (several cores
live in one test process)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["SignerMetrics"]


class _Signatures(Collector):
    def __init__(self, c_sign: Callable[[], int], seed: Callable[[], int]) -> None:
        self.c_sign, self.seed = c_sign, seed

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "hsm_c_sign_calls", "C_Sign calls the token made (fixed bank keys)", self.c_sign()
        )
        yield CounterMetricFamily(
            "hsm_seed_signatures", "Digests the bank seed's keys signed (HD bank keys)", self.seed()
        )


class SignerMetrics:
    def __init__(self, c_sign: Callable[[], int], seed: Callable[[], int]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.decisions = Counter(
            "hsm_signer_decisions",
            "The signer's decisions by operation, result (signed, accepted, refused, "
            "unavailable) and rule (the refusing check)",
            ["op", "result", "rule"],
            registry=self.registry,
        )
        self.registry.register(_Signatures(c_sign, seed))

    def decided(self, op: str, result: str, rule: str = "") -> None:
        self.decisions.labels(op=op, result=result, rule=rule).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
