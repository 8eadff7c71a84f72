"""Run every benchmark, print every figure, exit non-zero if any target failed."""

from __future__ import annotations

import sys
from collections.abc import Callable

from bench import Figure, block_scan, catchup, liquidation_storm, watcher_memory

BENCHMARKS: list[tuple[str, Callable[[], list[Figure]]]] = [
    ("block_scan", block_scan.run),
    ("catchup", catchup.run),
    ("liquidation_storm", liquidation_storm.run),
    ("watcher_memory", watcher_memory.run),
]


def main() -> int:
    figures: list[Figure] = []
    for name, run in BENCHMARKS:
        print(f"== {name}")
        figures += run()
    print("== results")
    for figure in figures:
        print(figure.line())
    failed = [f.name for f in figures if not f.passed]
    print(f"bench: {'FAIL: ' + ', '.join(failed) if failed else 'all targets met'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
