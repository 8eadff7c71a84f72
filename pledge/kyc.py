"""Who a miner is, by Russian law: the checks on its registry data and the rules that flag
a record as high-risk. Pure functions (no I/O): the service stores, the kernel decides.

- INN (taxpayer number, FNS order): 10 digits for a legal entity, 12 for a person or an
  individual entrepreneur; check digits are weighted sums mod 11 mod 10.
- OGRN (13 digits, legal entity): the first 12 digits mod 11, last digit of that (10 -> 0).
  OGRNIP (15 digits, individual entrepreneur): the first 14 mod 13, last digit.
- Federal Law 221-FZ (from 1 November 2024): legal entities and individual entrepreneurs
  that mine must be on the FNS register of miners; an individual may mine without it up to
  6,000 kWh a month. The government bans mining in some regions, all year or in winter.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import date
from enum import StrEnum

from pledge.errors import InvalidInput

INDIVIDUAL_ENERGY_LIMIT_KWH = 6_000  # 221-FZ: an individual above this must register
# Above this a miner needs a hosting data centre on record: ~140 kW of machines running all
# month is not a home installation, and the bank wants to know whose grid it is on.
DATA_CENTRE_ENERGY_KWH = 100_000
MAX_MONTHLY_ENERGY_KWH = 10**12  # a sanity bound (a whole country's output), not a rule


class LegalForm(StrEnum):
    legal_entity = "legal_entity"
    individual_entrepreneur = "individual_entrepreneur"
    individual = "individual"


class RegisterStatus(StrEnum):
    """The entry's status on the FNS register of miners."""

    active = "active"
    suspended = "suspended"
    excluded = "excluded"


# The two-digit codes of the subjects of the Russian Federation (as in car plates and the
# first two digits of an INN): 01-79, the autonomous okrugs 83, 86, 87, 89, and 90-95
# (Zaporozhye, Crimea, Sevastopol, Donetsk, Luhansk, Kherson).
REGIONS: frozenset[str] = frozenset(
    [f"{n:02d}" for n in range(1, 80)]
    + ["83", "86", "87", "89", "90", "91", "92", "93", "94", "95"]
)

_INN10 = (2, 4, 10, 3, 5, 9, 4, 6, 8)
_INN12_11 = (7, 2, 4, 10, 3, 5, 9, 4, 6, 8)
_INN12_12 = (3, 7, 2, 4, 10, 3, 5, 9, 4, 6, 8)


def _check(digits: Sequence[int], weights: Sequence[int]) -> int:
    return sum(d * w for d, w in zip(digits, weights, strict=False)) % 11 % 10


def inn_is_valid(inn: str) -> bool:
    """True for a 10- or 12-digit INN whose check digits hold."""
    if not (inn.isascii() and inn.isdigit()) or len(inn) not in (10, 12):
        return False
    d = [int(c) for c in inn]
    if len(inn) == 10:
        return _check(d, _INN10) == d[9]
    return _check(d, _INN12_11) == d[10] and _check(d, _INN12_12) == d[11]


def ogrn_is_valid(ogrn: str) -> bool:
    """True for a 13-digit OGRN or a 15-digit OGRNIP whose check digit holds."""
    if not (ogrn.isascii() and ogrn.isdigit()) or len(ogrn) not in (13, 15):
        return False
    body, check = int(ogrn[:-1]), int(ogrn[-1])
    modulus = 11 if len(ogrn) == 13 else 13
    return body % modulus % 10 == check


def validate_inn(inn: str, legal_form: LegalForm | None, *, field: str = "inn") -> str:
    """The INN, or InvalidInput naming `field`: digits, the length the legal form needs
    (None: either length, e.g. a data centre's), its check digits."""
    inn = inn.strip()
    if not (inn.isascii() and inn.isdigit()):
        raise InvalidInput("an INN is digits only", field=field)
    lengths = {None: (10, 12), LegalForm.legal_entity: (10,)}.get(legal_form, (12,))
    if len(inn) not in lengths:
        want = " or ".join(str(n) for n in lengths)
        raise InvalidInput(f"this INN must have {want} digits, not {len(inn)}", field=field)
    if not inn_is_valid(inn):
        raise InvalidInput("the INN's check digits do not match: a typo?", field=field)
    return inn


def validate_ogrn(ogrn: str | None, legal_form: LegalForm, *, field: str = "ogrn") -> str | None:
    """The OGRN (legal entity, 13 digits) or OGRNIP (individual entrepreneur, 15 digits);
    an individual has none."""
    if legal_form == LegalForm.individual:
        if ogrn is not None:
            raise InvalidInput("an individual has no OGRN/OGRNIP", field=field)
        return None
    if ogrn is None:
        raise InvalidInput(f"a {legal_form.value} must give its OGRN/OGRNIP", field=field)
    ogrn = ogrn.strip()
    length = 13 if legal_form == LegalForm.legal_entity else 15
    if not (ogrn.isascii() and ogrn.isdigit()) or len(ogrn) != length:
        raise InvalidInput(
            f"a {legal_form.value}'s {'OGRN' if length == 13 else 'OGRNIP'} is {length} digits",
            field=field,
        )
    if not ogrn_is_valid(ogrn):
        raise InvalidInput("the OGRN's check digit does not match: a typo?", field=field)
    return ogrn


@dataclass(frozen=True)
class MinerFacts:
    """A miner's registry data as the bank recorded it (what a review approves)."""

    legal_form: LegalForm
    inn: str
    ogrn: str | None
    register_number: str | None
    register_date: date | None
    register_status: RegisterStatus | None
    region: str
    monthly_energy_kwh: int
    data_centre_name: str | None = None
    data_centre_inn: str | None = None

    @property
    def registered(self) -> bool:
        return self.register_number is not None


def validate_facts(facts: MinerFacts, *, today: date) -> MinerFacts:
    """The facts with their numbers normalised, or InvalidInput naming the first bad field."""
    inn = validate_inn(facts.inn, facts.legal_form)
    ogrn = validate_ogrn(facts.ogrn, facts.legal_form)
    entry = (facts.register_number, facts.register_date, facts.register_status)
    if facts.legal_form != LegalForm.individual and facts.register_number is None:
        raise InvalidInput(
            f"a {facts.legal_form.value} must be on the FNS register of miners (221-FZ): "
            "give its entry's number, date and status",
            field="register_number",
        )
    if any(part is not None for part in entry):
        for name, part in zip(
            ("register_number", "register_date", "register_status"), entry, strict=True
        ):
            if part is None:
                raise InvalidInput("a register entry needs its number, date and status", field=name)
    if facts.register_date is not None and facts.register_date > today:
        raise InvalidInput("the register entry is dated in the future", field="register_date")
    if facts.region not in REGIONS:
        raise InvalidInput(
            "region is the two-digit code of a subject of the Russian Federation, e.g. 77",
            field="region",
        )
    if not 0 <= facts.monthly_energy_kwh <= MAX_MONTHLY_ENERGY_KWH:
        raise InvalidInput(
            "monthly energy use is a whole number of kWh", field="monthly_energy_kwh"
        )
    dc_inn = facts.data_centre_inn
    if dc_inn is not None:
        if facts.data_centre_name is None:
            raise InvalidInput("a data centre's INN needs its name", field="data_centre_name")
        dc_inn = validate_inn(dc_inn, None, field="data_centre_inn")
    return MinerFacts(
        legal_form=facts.legal_form,
        inn=inn,
        ogrn=ogrn,
        register_number=facts.register_number,
        register_date=facts.register_date,
        register_status=facts.register_status,
        region=facts.region,
        monthly_energy_kwh=facts.monthly_energy_kwh,
        data_centre_name=facts.data_centre_name,
        data_centre_inn=dc_inn,
    )


@dataclass(frozen=True)
class MiningBan:
    """A region where mining is banned from `starts_on` to `ends_on` (inclusive; None:
    open-ended); `months` (1-12) limits it to those months of each year (a winter ban),
    empty for all year."""

    region: str
    starts_on: date
    ends_on: date | None
    months: frozenset[int] = frozenset()
    note: str = ""

    def applies_within(self, start: date, end: date | None) -> bool:
        """Is mining banned on any day between start and end (None: open-ended)?"""
        first = max(start, self.starts_on)
        ends = [d for d in (end, self.ends_on) if d is not None]
        last = min(ends) if ends else None
        if last is not None and first > last:
            return False
        if not self.months:
            return True
        year, month = first.year, first.month
        for _ in range(12):  # a year covers every month
            if month in self.months:
                return True
            year, month = (year + 1, 1) if month == 12 else (year, month + 1)
            if last is not None and date(year, month, 1) > last:
                return False
        return False


@dataclass(frozen=True)
class Flag:
    """Why a record is high-risk: a stable code and the reason in words."""

    code: str
    reason: str


def flags_of(
    facts: MinerFacts, bans: Iterable[MiningBan], *, start: date, end: date | None
) -> list[Flag]:
    """What makes this miner high-risk for a loan from `start` to `end` (None: any time
    from `start` on). Any flag means a second compliance officer must approve."""
    flags: list[Flag] = []
    if (
        facts.legal_form == LegalForm.individual
        and facts.monthly_energy_kwh > INDIVIDUAL_ENERGY_LIMIT_KWH
        and not facts.registered
    ):
        flags.append(
            Flag(
                "unregistered_above_energy_limit",
                f"an individual using {facts.monthly_energy_kwh} kWh a month, above the "
                f"{INDIVIDUAL_ENERGY_LIMIT_KWH} kWh 221-FZ allows without registering, "
                "is not on the register of miners",
            )
        )
    if facts.register_status is not None and facts.register_status != RegisterStatus.active:
        flags.append(
            Flag(
                "register_not_active",
                f"the register of miners shows this entry as {facts.register_status.value}",
            )
        )
    for ban in bans:
        if ban.region == facts.region and ban.applies_within(start, end):
            when = f"from {ban.starts_on}" + (f" to {ban.ends_on}" if ban.ends_on else "")
            season = (
                f", in months {','.join(str(m) for m in sorted(ban.months))}" if ban.months else ""
            )
            flags.append(
                Flag(
                    "region_mining_ban",
                    f"mining is banned in region {ban.region} {when}{season}"
                    + (f" ({ban.note})" if ban.note else "")
                    + ", within the loan's period",
                )
            )
    if facts.monthly_energy_kwh > DATA_CENTRE_ENERGY_KWH and facts.data_centre_name is None:
        flags.append(
            Flag(
                "no_data_centre_for_high_energy",
                f"{facts.monthly_energy_kwh} kWh a month (above {DATA_CENTRE_ENERGY_KWH}) "
                "with no hosting data centre on record",
            )
        )
    return flags


def approvals_needed(flags: Sequence[Flag]) -> int:
    """One compliance officer approves a clean record; a flagged one needs a second."""
    return 2 if flags else 1


def record_digest(facts: MinerFacts, document_digests: Iterable[str]) -> str:
    """SHA-256 over the record's facts and its evidence documents' digests: what an approval
    is bound to, so any change to either voids it."""
    content = {
        key: (value.isoformat() if isinstance(value, date) else value)
        for key, value in asdict(facts).items()
    }
    content["documents"] = sorted(document_digests)
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
