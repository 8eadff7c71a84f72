"""One person cannot move the price (issue 12), tried as the people who would try it.

A manual price is proposed by one member of the bank's staff and counts only once a second
one confirms it; it is refused when dated in the future or far from the feeds' median; only
staff and auditors see who set it; the risk engine reads only confirmed prices; and one
deployment serves one bank. On SQLite and PostgreSQL (the `engine` fixture), through the
HTTP API with a real HTTP price feed on 127.0.0.1."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, func, select
from support.databases import wait_for_a_lock_wait
from support.offline import record_confirmed_deposit
from support.world import World, build_world

from custody.auth.context import Context
from custody.auth.repository import principal_by_name
from custody.auth.service import create_principal
from custody.db.migrate import upgrade
from custody.db.models import (
    AuditEvent,
    Loan,
    Party,
    PartyKind,
    PriceRecord,
    Principal,
    Role,
)
from custody.db.session import make_engine, transaction
from custody.errors import PriceNotProposed, SecondBankParty
from custody.parties.service import create_party
from custody.risk.manual import DbManualPriceSource, FeedCheck, PricePolicy, confirm_price
from custody.root import Root
from regtest.price_feed import PriceFeed, price_feed
from regtest.wait import wait_until

FEED_PRICE = 6_000_000
OUTSIDERS = ("miner", "other_miner", "arbiter", "other_arbiter")


@pytest.fixture
def feed() -> Iterator[PriceFeed]:
    with price_feed(str(FEED_PRICE)) as f:
        yield f


@pytest.fixture
def world(engine: Engine) -> World:
    """No price feed: nothing to hold a manual price to but the second person."""
    return build_world(engine)


@pytest.fixture
def fed_world(engine: Engine, feed: PriceFeed) -> World:
    """The service with one HTTP price feed (the bound: the default 500 bps)."""
    return build_world(engine, price_sources=[feed.source_config()])


def _propose(world: World, who: str, price: str, **body: Any) -> Any:
    return world.call(who, "POST", "/v1/prices", json={"price_rub_per_btc": price, **body})


def _snapshot(engine: Engine) -> tuple[list[tuple[Any, ...]], int]:
    """Every price row as it is, and how many audit events there are."""
    with Session(engine) as s:
        prices = [
            (p.id, p.state, p.price_rub_per_btc, p.confirmed_by, p.rejected_by)
            for p in s.exec(select(PriceRecord).order_by(col(PriceRecord.id))).all()
        ]
        events = s.exec(select(func.count()).select_from(AuditEvent)).one()
    return prices, int(events)


def _audit(engine: Engine, action: str) -> list[AuditEvent]:
    with Session(engine) as s:
        return list(s.exec(select(AuditEvent).where(AuditEvent.action == action)).all())


def _ctx(engine: Engine, who: str) -> Context:
    with Session(engine) as s:
        principal = principal_by_name(s, f"user-{who}")
    assert principal is not None
    return Context(principal=principal, network="regtest")


# --------------------------------------------------------------------------- 4-eyes


def test_one_operator_cannot_propose_and_confirm_their_own_price(world: World) -> None:
    r = _propose(world, "bank_operator", "100000")  # a crash price, by one person
    assert r.status_code == 201, r.text
    proposal = r.json()
    assert proposal["state"] == "proposed" and proposal["confirmed_by"] is None
    assert proposal["proposed_by"] == "bank_operator:user-bank_operator"
    before = _snapshot(world.engine)

    r = world.call("bank_operator", "POST", f"/v1/prices/{proposal['id']}/confirm")
    assert r.status_code == 409 and r.json()["error"] == "self_confirmation", r.text
    assert _snapshot(world.engine) == before  # nothing changed, not even the audit log
    latest = world.call("bank_operator", "GET", "/v1/prices/latest")
    assert latest.status_code == 404 and latest.json()["error"] == "price_not_set"

    # The approver proposes too: the same rule for every role of the staff.
    own = _propose(world, "bank_approver", "100001").json()
    r = world.call("bank_approver", "POST", f"/v1/prices/{own['id']}/confirm")
    assert r.status_code == 409 and r.json()["error"] == "self_confirmation"

    # A second person confirms: now it is the price, with both names in the history.
    r = world.call("bank_approver", "POST", f"/v1/prices/{proposal['id']}/confirm")
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "confirmed"
    assert r.json()["confirmed_by"] == "bank_approver:user-bank_approver"
    latest = world.call("auditor", "GET", "/v1/prices/latest").json()
    assert (latest["id"], latest["proposed_by"], latest["confirmed_by"]) == (
        proposal["id"],
        "bank_operator:user-bank_operator",
        "bank_approver:user-bank_approver",
    )
    assert [e.actor for e in _audit(world.engine, "price.proposed")] == [
        "bank_operator:user-bank_operator",
        "bank_approver:user-bank_approver",
    ]
    [confirmed] = _audit(world.engine, "price.confirmed")
    assert confirmed.actor == "bank_approver:user-bank_approver"
    assert json.loads(confirmed.data)["price_id"] == proposal["id"]
    assert json.loads(confirmed.data)["proposed_by"] == "bank_operator:user-bank_operator"


def test_a_replayed_confirmation_is_a_clean_409(world: World) -> None:
    pid = _propose(world, "bank_operator", "6000000").json()["id"]
    path = f"/v1/prices/{pid}/confirm"
    assert world.call("bank_approver", "POST", path).status_code == 200
    before = _snapshot(world.engine)
    for who in ("bank_approver", "bank_operator"):
        r = world.call(who, "POST", path)
        assert r.status_code == 409 and r.json()["error"] == "price_not_proposed", r.text
    r = world.call("bank_approver", "POST", f"/v1/prices/{pid}/reject")
    assert r.status_code == 409 and r.json()["error"] == "price_not_proposed"
    assert _snapshot(world.engine) == before


def test_a_rejected_or_expired_proposal_cannot_be_confirmed(engine: Engine) -> None:
    world = build_world(engine, price_proposal_ttl_seconds=1)
    rejected = _propose(world, "bank_operator", "6000000").json()["id"]
    r = world.call("bank_operator", "POST", f"/v1/prices/{rejected}/reject")  # withdrawn
    assert r.status_code == 200 and r.json()["rejected_by"] == "bank_operator:user-bank_operator"
    r = world.call("bank_approver", "POST", f"/v1/prices/{rejected}/confirm")
    assert r.status_code == 409 and r.json()["error"] == "price_not_proposed"

    stale = _propose(world, "bank_operator", "6000001").json()
    expires_at = datetime.fromisoformat(stale["expires_at"])
    wait_until(lambda: datetime.now(UTC) > expires_at, timeout=5, message="the proposal to expire")
    r = world.call("bank_approver", "POST", f"/v1/prices/{stale['id']}/confirm")
    assert r.status_code == 409 and r.json()["error"] == "price_proposal_expired", r.text
    shown = world.call("auditor", "GET", f"/v1/prices/{stale['id']}").json()
    assert shown["state"] == "expired"
    assert world.call("auditor", "GET", "/v1/prices/latest").status_code == 404


def test_an_older_quote_cannot_turn_the_price_back(world: World) -> None:
    now = datetime.now(UTC)
    old = _propose(
        world, "bank_operator", "5000000", quoted_at=(now - timedelta(minutes=5)).isoformat()
    )
    new = _propose(world, "bank_operator", "6000000", quoted_at=now.isoformat())
    assert (
        world.call("bank_approver", "POST", f"/v1/prices/{new.json()['id']}/confirm").status_code
        == 200
    )
    r = world.call("bank_approver", "POST", f"/v1/prices/{old.json()['id']}/confirm")
    assert r.status_code == 409 and r.json()["error"] == "price_superseded", r.text
    assert (
        world.call("auditor", "GET", "/v1/prices/latest").json()["price_rub_per_btc"] == "6000000"
    )


@pytest.mark.parametrize("who", (*OUTSIDERS, "auditor", "admin"))
def test_only_bank_staff_propose_confirm_or_reject(world: World, who: str) -> None:
    pid = _propose(world, "bank_operator", "6000000").json()["id"]
    before = _snapshot(world.engine)
    for method, path, body in (
        ("POST", "/v1/prices", {"price_rub_per_btc": "1"}),
        ("POST", f"/v1/prices/{pid}/confirm", None),
        ("POST", f"/v1/prices/{pid}/reject", None),
    ):
        r = world.call(who, method, path, json=body)
        assert r.status_code == 403 and r.json()["error"] == "role_not_allowed", (path, r.text)
    assert _snapshot(world.engine) == before


@pytest.mark.parametrize("who", OUTSIDERS)
def test_miners_and_arbiters_cannot_see_the_history_or_who_set_the_price(
    world: World, who: str
) -> None:
    pid = _propose(world, "bank_operator", "6000000").json()["id"]
    assert world.call("bank_approver", "POST", f"/v1/prices/{pid}/confirm").status_code == 200
    for path in ("/v1/prices", "/v1/prices/latest", f"/v1/prices/{pid}"):
        r = world.call(who, "GET", path)
        assert r.status_code == 403, (path, r.text)
        assert "user-bank" not in r.text and "6000000" not in r.text
    history = world.call("auditor", "GET", "/v1/prices").json()
    assert [(p["id"], p["proposed_by"], p["confirmed_by"]) for p in history] == [
        (pid, "bank_operator:user-bank_operator", "bank_approver:user-bank_approver")
    ]
    # What a risk pass writes as evidence (which miners read) names the price, not a person.
    quote = DbManualPriceSource(world.engine).quote()
    assert quote.source == f"manual#{pid}" and "user" not in quote.source


# --------------------------------------------------------------------------- bounds


def test_a_price_far_from_the_feeds_is_refused_and_nothing_stored(
    fed_world: World, feed: PriceFeed
) -> None:
    world = fed_world
    before = _snapshot(world.engine)
    for far in ("1", "5600000", "6400000", "60000000"):  # the bound: 5% of 6,000,000
        r = _propose(world, "bank_operator", far)
        assert r.status_code == 422, (far, r.text)
        assert r.json()["error"] == "price_far_from_feeds"
        assert r.json()["field"] == "price_rub_per_btc"
        assert "6000000" in r.json()["message"]  # says what it was held to
    assert _snapshot(world.engine) == before
    assert feed.requests >= 4  # asked every time

    r = _propose(world, "bank_operator", "6290000")  # 4.8%: within the bound
    assert r.status_code == 201, r.text
    [event] = _audit(world.engine, "price.proposed")
    assert json.loads(event.data)["feeds_median"] == "6000000"


def test_the_confirmation_is_held_to_the_feeds_as_they_are_then(
    fed_world: World, feed: PriceFeed
) -> None:
    world = fed_world
    pid = _propose(world, "bank_operator", "6200000").json()["id"]
    feed.set("7000000")  # the market moved away from the proposal meanwhile
    before = _snapshot(world.engine)
    r = world.call("bank_approver", "POST", f"/v1/prices/{pid}/confirm")
    assert r.status_code == 422 and r.json()["error"] == "price_far_from_feeds", r.text
    assert _snapshot(world.engine) == before  # still a proposal
    feed.set("6100000")
    r = world.call("bank_approver", "POST", f"/v1/prices/{pid}/confirm")
    assert r.status_code == 200 and r.json()["state"] == "confirmed", r.text


def test_with_the_feeds_down_a_proposal_says_so_and_still_needs_two(
    fed_world: World, feed: PriceFeed
) -> None:
    """The case a manual price is for: no median to hold it to, the second person is."""
    world = fed_world
    feed.set(str(FEED_PRICE), datetime.now(UTC) - timedelta(hours=2))  # stale
    r = _propose(world, "bank_operator", "5000000")
    assert r.status_code == 201, r.text
    [event] = _audit(world.engine, "price.proposed")
    assert (
        json.loads(event.data)["feeds_median"] is None
        and "stale" in json.loads(event.data)["feeds_unavailable"]
    )
    r = world.call("bank_operator", "POST", f"/v1/prices/{r.json()['id']}/confirm")
    assert r.status_code == 409 and r.json()["error"] == "self_confirmation"


def test_a_quote_from_the_future_is_refused(world: World) -> None:
    before = _snapshot(world.engine)
    for ahead in (timedelta(minutes=5), timedelta(days=365)):
        at = (datetime.now(UTC) + ahead).isoformat()
        r = _propose(world, "bank_operator", "6000000", quoted_at=at)
        assert r.status_code == 422, r.text
        assert (r.json()["error"], r.json()["field"]) == ("price_quoted_in_future", "quoted_at")
    assert _snapshot(world.engine) == before
    near = (datetime.now(UTC) + timedelta(seconds=10)).isoformat()  # within the clock skew
    assert _propose(world, "bank_operator", "6000000", quoted_at=near).status_code == 201


def test_the_confirmation_rechecks_the_clock(engine: Engine) -> None:
    """A proposal checked under a looser bound (or clock) is checked again when confirmed."""
    world = build_world(engine)
    at = datetime.now(UTC) + timedelta(seconds=20)
    pid = _propose(world, "bank_operator", "6000000", quoted_at=at.isoformat()).json()["id"]
    strict = PricePolicy(0, future_skew=timedelta(seconds=5), proposal_ttl=timedelta(hours=1))
    with pytest.raises(Exception) as refused, transaction(engine) as s:
        confirm_price(s, _ctx(engine, "bank_approver"), pid, policy=strict, feeds=FeedCheck(None))
    assert getattr(refused.value, "code", None) == "price_quoted_in_future"


# --------------------------------------------------------------------------- the risk engine


def _active_loan(world: World) -> int:
    """An active loan of 1,500,000 RUB with 0.5 BTC confirmed (the watcher's record of it,
    written here)."""
    loan_id: int = world.keyed_loan(principal_kopecks=1_500_000_00)["id"]
    return record_confirmed_deposit(world, loan_id, f"{loan_id:064x}")


def _loan_state(engine: Engine, loan_id: int) -> str:
    with Session(engine) as s:
        loan = s.get(Loan, loan_id)
        assert loan is not None
        return str(loan.state)


def test_an_unconfirmed_proposal_never_reaches_the_risk_engine(world: World) -> None:
    loan_id = _active_loan(world)
    risk = Root.assemble(world.settings, engine=world.engine).risk_engine()
    crash = _propose(world, "bank_operator", "100000").json()["id"]  # LTV 3000%: liquidate

    report = risk.run_once()
    assert report.paused is not None and "no price has been confirmed" in report.paused
    assert report.margin_calls == [] and report.liquidations == []
    assert _loan_state(world.engine, loan_id) == "active"

    fair = _propose(world, "bank_operator", "6000000").json()["id"]  # LTV 50%
    assert world.call("bank_approver", "POST", f"/v1/prices/{fair}/confirm").status_code == 200
    crash_again = _propose(world, "bank_operator", "100000").json()["id"]  # newer, unconfirmed
    report = risk.run_once()
    assert report.paused is None and report.errors == {}
    assert report.price == f"6000000 (median(manual#{fair}))", report.price
    assert report.margin_calls == [] and report.liquidations == []
    assert _loan_state(world.engine, loan_id) == "active"
    states = {p["id"]: p["state"] for p in world.call("auditor", "GET", "/v1/prices").json()}
    assert states == {crash: "proposed", fair: "confirmed", crash_again: "proposed"}
    # Not a price the engine never reads: once a second person confirms it, it is the price.
    r = world.call("bank_approver", "POST", f"/v1/prices/{crash_again}/confirm")
    assert r.status_code == 200, r.text
    quote = Root.assemble(world.settings, engine=world.engine).prices.consensus().quote
    assert quote is not None and quote.source == f"median(manual#{crash_again})"
    assert quote.price_rub_per_btc == 100_000


# --------------------------------------------------------------------------- one bank


def test_a_second_bank_party_is_refused(world: World) -> None:
    with Session(world.engine) as s:
        banks_before = s.exec(select(Party).where(Party.kind == PartyKind.bank)).all()
    assert len(banks_before) == 1
    for who in ("admin", "bank_operator"):
        r = world.call(who, "POST", "/v1/parties", json={"name": f"bank-{who}", "kind": "bank"})
        assert r.status_code == 409, r.text
        assert r.json()["error"] == "second_bank_party" and r.json()["field"] == "kind"
        assert "one bank" in r.json()["message"]
    with Session(world.engine) as s:
        assert len(s.exec(select(Party).where(Party.kind == PartyKind.bank)).all()) == 1
    r = world.call("admin", "POST", "/v1/parties", json={"name": "a miner", "kind": "miner"})
    assert r.status_code == 201  # other parties as before


def test_a_fresh_deployment_gets_its_one_bank(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'fresh.db'}")
    upgrade(engine)
    admin = _admin(engine)
    with transaction(engine) as s:
        create_party(s, admin, name="The Bank", kind=PartyKind.bank)
    with pytest.raises(SecondBankParty), transaction(engine) as s:
        create_party(s, admin, name="Another Bank", kind=PartyKind.bank)


def _admin(engine: Engine) -> Principal:
    with transaction(engine) as s:
        principal, _ = create_principal(
            s, name="the-admin", role=Role.admin, party_id=None, actor="test"
        )
    return principal


# --------------------------------------------------------------------------- races (PostgreSQL)


def _second_waits_then(
    engine: Engine, first: Callable[[Session], object], second: Callable[[Session], object]
) -> BaseException | None:
    """`first` runs in a transaction left open while `second` starts in another thread;
    once PostgreSQL shows `second` waiting on a lock, `first` commits. Returns what
    `second` raised (None: it succeeded)."""
    outcome: list[BaseException | None] = []

    def run_second() -> None:
        try:
            with transaction(engine) as s:
                second(s)
            outcome.append(None)
        except BaseException as exc:  # reported to the test's thread
            outcome.append(exc)

    session = Session(engine)
    try:
        first(session)
        thread = threading.Thread(target=run_second)
        thread.start()
        wait_for_a_lock_wait(engine)
        session.commit()
    finally:
        session.close()
    thread.join(timeout=20)
    assert not thread.is_alive() and len(outcome) == 1
    return outcome[0]


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_two_confirmations_at_once_confirm_once(world: World) -> None:
    pid = _propose(world, "bank_operator", "6000000").json()["id"]
    approver = _ctx(world.engine, "bank_approver")  # the same confirmation, sent twice
    policy = PricePolicy.from_settings(world.settings)
    error = _second_waits_then(
        world.engine,
        lambda s: confirm_price(s, approver, pid, policy=policy, feeds=FeedCheck(None)),
        lambda s: confirm_price(s, approver, pid, policy=policy, feeds=FeedCheck(None)),
    )
    assert isinstance(error, PriceNotProposed)
    assert len(_audit(world.engine, "price.confirmed")) == 1


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_two_banks_created_at_once_make_one(engine: Engine) -> None:
    admin = _admin(engine)
    error = _second_waits_then(
        engine,
        lambda s: create_party(s, admin, name="Bank A", kind=PartyKind.bank),
        lambda s: create_party(s, admin, name="Bank B", kind=PartyKind.bank),
    )
    assert isinstance(error, SecondBankParty)
    with Session(engine) as s:
        assert [p.name for p in s.exec(select(Party)).all()] == ["Bank A"]


# --------------------------------------------------------------------------- the migration


@pytest.fixture(params=["sqlite", "postgres"])
def empty_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    url = (
        f"sqlite:///{tmp_path / 'old.db'}"
        if request.param == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    eng = make_engine(url)
    yield eng
    eng.dispose()


def test_prices_set_by_one_person_before_the_migration_stay_history_and_unused(
    empty_engine: Engine,
) -> None:
    engine = empty_engine
    upgrade(engine, "0008")
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO pricerecord (price_rub_per_btc, source, quoted_at, set_by, "
                "created_at) VALUES ('1', 'manual', :at, 'bank_operator:mallory', :at)"
            ),
            {"at": datetime.now(UTC)},
        )
    upgrade(engine)
    with Session(engine) as s:
        [row] = s.exec(select(PriceRecord)).all()
    assert (row.state, row.proposed_by, row.confirmed_by) == (
        "legacy",
        "bank_operator:mallory",
        None,
    )
    with pytest.raises(Exception, match="no price has been confirmed"):
        DbManualPriceSource(engine).quote()
    assert Decimal(row.price_rub_per_btc) == 1


def test_bad_proposals_name_their_field_and_store_nothing(world: World) -> None:
    before = _snapshot(world.engine)
    for body, field in (
        ({"price_rub_per_btc": "1e20"}, "price_rub_per_btc"),  # above the sanity ceiling
        ({"price_rub_per_btc": "0"}, "price_rub_per_btc"),
        ({"price_rub_per_btc": "1", "quoted_at": "0001-01-01T00:00:00+01:00"}, "quoted_at"),
        ({"price_rub_per_btc": "1", "quoted_at": "9999-12-31T23:59:59-01:00"}, "quoted_at"),
        ({"price_rub_per_btc": "1", "quoted_at": "2026-12-01T10:00:00"}, "quoted_at"),  # naive
    ):
        r = world.call("bank_operator", "POST", "/v1/prices", json=body)
        assert r.status_code == 422 and r.json()["field"] == field, (body, r.text)
    assert _snapshot(world.engine) == before
    tiny = _propose(world, "bank_operator", "0.00000001").json()
    assert tiny["price_rub_per_btc"] == "0.00000001"  # kept as written, never "1E-8"
