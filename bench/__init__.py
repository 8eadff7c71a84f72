"""Benchmarks for the service's hot paths; `python -m bench` runs them all.

Each benchmark module exposes `run() -> list[Figure]`; a figure with a target
says whether it met it, so `make bench` can fail the build on a regression.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Figure:
    """One measured number, its unit, the target it is held to, and the verdict."""

    name: str
    value: float
    unit: str
    target: str
    passed: bool

    def line(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        return f"{self.name} = {self.value:.2f} {self.unit}  [target {self.target}]  {verdict}"
