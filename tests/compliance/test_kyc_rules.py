"""The kernel's checks of a miner's registry data (pledge/kyc.py) against published numbers,
and the rules that flag a record as high-risk."""

from __future__ import annotations

from dataclasses import replace
from datetime import date

import pytest

from pledge.errors import InvalidInput
from pledge.kyc import (
    LegalForm,
    MinerFacts,
    MiningBan,
    RegisterStatus,
    approvals_needed,
    flags_of,
    inn_is_valid,
    ogrn_is_valid,
    record_digest,
    validate_facts,
    validate_inn,
    validate_ogrn,
)

TODAY = date(2026, 12, 2)
# Published: Sberbank (INN, OGRN), a St Petersburg entity, a Moscow-region person; an IE's
# OGRNIP from the FNS's own example.
VALID_INN = ("7707083893", "7830002293", "500100732259")
VALID_OGRN = ("1027700132195", "1027739609391")
VALID_OGRNIP = ("304500116000157",)


@pytest.mark.parametrize("inn", VALID_INN)
def test_published_inns_are_valid(inn: str) -> None:
    assert inn_is_valid(inn)


@pytest.mark.parametrize(
    "inn",
    [
        "7707083894",  # last check digit off by one
        "500100732258",  # n12 wrong
        "500100732269",  # n11 wrong
        "770708389",  # 9 digits
        "77070838930",  # 11 digits
        "77O7083893",  # a letter O
        "\uff17" * 10,  # full-width sevens: isdigit() but not ASCII
        "",
    ],
)
def test_malformed_or_miscounted_inns_are_refused(inn: str) -> None:
    assert not inn_is_valid(inn)
    with pytest.raises(InvalidInput) as err:
        validate_inn(inn, None)
    assert err.value.field == "inn"


def test_an_inn_must_have_the_length_of_its_legal_form() -> None:
    assert validate_inn("7707083893", LegalForm.legal_entity) == "7707083893"
    assert validate_inn("500100732259", LegalForm.individual) == "500100732259"
    with pytest.raises(InvalidInput, match="12 digits"):
        validate_inn("7707083893", LegalForm.individual_entrepreneur)
    with pytest.raises(InvalidInput, match="10 digits"):
        validate_inn("500100732259", LegalForm.legal_entity)


@pytest.mark.parametrize("ogrn", VALID_OGRN + VALID_OGRNIP)
def test_published_ogrns_are_valid(ogrn: str) -> None:
    assert ogrn_is_valid(ogrn)


@pytest.mark.parametrize(
    "ogrn", ["1027700132196", "304500116000158", "102770013219", "30450011600015", "1O27700132195"]
)
def test_wrong_ogrns_are_refused(ogrn: str) -> None:
    assert not ogrn_is_valid(ogrn)


def test_an_ogrn_of_the_wrong_kind_is_refused_naming_the_field() -> None:
    assert validate_ogrn("1027700132195", LegalForm.legal_entity) == "1027700132195"
    assert validate_ogrn("304500116000157", LegalForm.individual_entrepreneur)
    for ogrn, form in (
        ("304500116000157", LegalForm.legal_entity),  # an OGRNIP for a company
        ("1027700132195", LegalForm.individual_entrepreneur),
        ("1027700132195", LegalForm.individual),  # a person has none
        (None, LegalForm.legal_entity),
    ):
        with pytest.raises(InvalidInput) as err:
            validate_ogrn(ogrn, form)
        assert err.value.field == "ogrn"


COMPANY = MinerFacts(
    legal_form=LegalForm.legal_entity,
    inn="7707083893",
    ogrn="1027700132195",
    register_number="RM-77-0001",
    register_date=date(2024, 11, 15),
    register_status=RegisterStatus.active,
    region="77",
    monthly_energy_kwh=50_000,
)
PERSON = MinerFacts(
    legal_form=LegalForm.individual,
    inn="500100732259",
    ogrn=None,
    register_number=None,
    register_date=None,
    register_status=None,
    region="50",
    monthly_energy_kwh=5_000,
)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        (
            {"register_number": None, "register_date": None, "register_status": None},
            "register_number",
        ),
        ({"register_status": None}, "register_status"),
        ({"register_date": date(2027, 1, 1)}, "register_date"),
        ({"region": "80"}, "region"),  # merged into Zabaykalsky in 2008
        ({"region": "7"}, "region"),
        ({"monthly_energy_kwh": -1}, "monthly_energy_kwh"),
        ({"data_centre_inn": "7707083893"}, "data_centre_name"),
        ({"data_centre_name": "DC", "data_centre_inn": "7707083894"}, "data_centre_inn"),
    ],
)
def test_a_bad_record_names_its_field(changes: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidInput) as err:
        validate_facts(replace(COMPANY, **changes), today=TODAY)  # type: ignore[arg-type]
    assert err.value.field == field


def test_a_person_needs_no_register_entry_nor_ogrn() -> None:
    assert validate_facts(PERSON, today=TODAY) == PERSON
    assert flags_of(PERSON, [], start=TODAY, end=None) == []
    assert approvals_needed([]) == 1


def test_an_unregistered_person_above_6000_kwh_is_flagged() -> None:
    at_limit = replace(PERSON, monthly_energy_kwh=6_000)
    assert flags_of(at_limit, [], start=TODAY, end=None) == []
    above = replace(PERSON, monthly_energy_kwh=6_001)
    [flag] = flags_of(above, [], start=TODAY, end=None)
    assert flag.code == "unregistered_above_energy_limit" and "6001 kWh" in flag.reason
    assert approvals_needed([flag]) == 2


def test_a_register_entry_not_active_and_high_energy_without_a_data_centre_are_flagged() -> None:
    suspended = replace(COMPANY, register_status=RegisterStatus.suspended)
    assert [f.code for f in flags_of(suspended, [], start=TODAY, end=None)] == [
        "register_not_active"
    ]
    big = replace(COMPANY, monthly_energy_kwh=2_000_000)
    assert [f.code for f in flags_of(big, [], start=TODAY, end=None)] == [
        "no_data_centre_for_high_energy"
    ]
    hosted = replace(big, data_centre_name="Bratsk DC", data_centre_inn="7830002293")
    assert flags_of(hosted, [], start=TODAY, end=None) == []


def test_a_ban_flags_a_loan_only_within_its_period_and_season() -> None:
    buryatia = replace(COMPANY, region="03")
    winter = MiningBan("03", date(2025, 1, 1), date(2031, 3, 15), frozenset({11, 12, 1, 2, 3}))
    summer_loan = (date(2027, 4, 1), date(2027, 10, 31))
    assert flags_of(buryatia, [winter], start=summer_loan[0], end=summer_loan[1]) == []
    [flag] = flags_of(buryatia, [winter], start=date(2027, 4, 1), end=date(2027, 11, 1))
    assert flag.code == "region_mining_ban" and "region 03" in flag.reason
    assert flags_of(buryatia, [winter], start=date(2031, 3, 16), end=None) == []  # ended
    all_year = MiningBan("03", date(2028, 1, 1), None)
    assert flags_of(buryatia, [all_year], start=TODAY, end=date(2027, 12, 31)) == []
    assert flags_of(buryatia, [all_year], start=TODAY, end=date(2028, 1, 1))
    assert flags_of(COMPANY, [all_year], start=TODAY, end=None) == []  # another region


def test_the_digest_covers_every_fact_and_document() -> None:
    base = record_digest(COMPANY, ["aa", "bb"])
    assert record_digest(COMPANY, ["bb", "aa"]) == base  # order of upload does not matter
    assert record_digest(COMPANY, ["aa"]) != base
    assert record_digest(replace(COMPANY, monthly_energy_kwh=50_001), ["aa", "bb"]) != base
    assert record_digest(replace(COMPANY, register_date=date(2024, 11, 16)), ["aa", "bb"]) != base
