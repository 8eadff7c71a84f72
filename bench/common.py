"""Set-up shared by the benchmarks that make loans through the real services."""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import time
from collections.abc import Callable
from typing import TypeVar

from sqlmodel import Session

from custody.auth.context import Context
from custody.auth.service import create_principal
from custody.db.models import KeyRole, Party, PartyKind, Role
from pledge.network import NetworkName
from regtest.kyc import approve_miner

T = TypeVar("T")


def timed(fn: Callable[[], T], *, profile: bool, top: int = 30) -> tuple[T, float, str | None]:
    """Run `fn` once: its result, its wall time, and (with `profile`) the cProfile report."""
    profiler = cProfile.Profile() if profile else None
    t0 = time.perf_counter()
    result = fn() if profiler is None else profiler.runcall(fn)
    seconds = time.perf_counter() - t0
    if profiler is None:
        return result, seconds, None
    if dump := os.environ.get("BENCH_PROFILE_DUMP"):  # for `python -m pstats <file>`
        profiler.dump_stats(dump)
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)
    return result, seconds, out.getvalue()


def seat_contexts(session: Session, prefix: str, network: NetworkName) -> dict[KeyRole, Context]:
    """A bank, a miner and an arbiter party, and one principal per seat acting for it."""
    parties: dict[str, int] = {}
    for name, kind in (
        ("bank", PartyKind.bank),
        ("miner", PartyKind.miner),
        ("arbiter", PartyKind.arbiter),
    ):
        party = Party(name=f"{prefix}-{name}", kind=kind)
        session.add(party)
        session.flush()
        assert party.id is not None
        parties[name] = party.id
    ctx: dict[KeyRole, Context] = {}
    for seat, role, party_name in (
        (KeyRole.bank, Role.bank_operator, "bank"),
        (KeyRole.miner, Role.miner, "miner"),
        (KeyRole.arbiter, Role.arbiter, "arbiter"),
    ):
        principal, _ = create_principal(
            session,
            name=f"{prefix}-{seat.value}",
            role=role,
            party_id=parties[party_name],
            actor="bench",
        )
        ctx[seat] = Context(principal=principal, network=network)
    officer, _ = create_principal(
        session,
        name=f"{prefix}-compliance",
        role=Role.compliance_officer,
        party_id=parties["bank"],
        actor="bench",
    )
    # The miner through the compliance gate, or its loans never leave draft.
    approve_miner(
        session,
        parties["miner"],
        editor=ctx[KeyRole.bank].principal,
        officer=officer,
        network=network,
    )
    return ctx
