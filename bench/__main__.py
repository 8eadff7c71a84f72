"""Run every benchmark, print every figure, exit non-zero if any target failed.

``python -m bench <name> [options]`` runs one benchmark alone with its own options
(``python -m bench load --help``)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from bench import (
    Figure,
    block_scan,
    catchup,
    liquidation_storm,
    load,
    reports,
    signing_load,
    watcher_memory,
)

BENCHMARKS: list[tuple[str, Callable[[], list[Figure]]]] = [
    ("block_scan", block_scan.run),
    ("catchup", catchup.run),
    ("liquidation_storm", liquidation_storm.run),
    ("watcher_memory", watcher_memory.run),
    ("reports", reports.run),
    ("signing_load", signing_load.run),
    # Shorter rates than `python -m bench load` (10 s each) keep the whole run reasonable.
    ("load", lambda: load.run(duration=load.ALL_BENCH_DURATION)),
]

# The benchmarks that run alone with options of their own.
SUBCOMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "catchup": catchup.main,
    "liquidation_storm": liquidation_storm.main,
    "load": load.main,
    "reports": reports.main,
    "signing_load": signing_load.main,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args:
        command = SUBCOMMANDS.get(args[0])
        if command is None:
            print(
                f"python -m bench: unknown benchmark {args[0]!r} (run alone: "
                f"{', '.join(SUBCOMMANDS)}; no arguments runs them all)",
                file=sys.stderr,
            )
            return 2
        return command(args[1:])
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
