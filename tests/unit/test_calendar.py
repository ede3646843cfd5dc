from __future__ import annotations

import calendar as stdlib_calendar
from datetime import UTC, date, datetime, time, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.calendar import (
    ANNUAL,
    BILLING_TIMEZONE_DEFAULT,
    CYCLES,
    MONTHLY,
    add_business_days,
    add_cycle,
    bank_holidays,
    count_business_days,
    format_date_br,
    is_bank_holiday,
    is_business_day,
    latest_due_run_date,
    local_run_instant,
    local_today,
    next_business_day,
    period_containing,
    previous_business_day,
    renewal_date,
    validate_cycle,
)

# --- cycles ----------------------------------------------------------------------------------------


def _expected_monthly(anchor: date, n: int) -> date:
    """Independent computation: move the month index, clamp the day with calendar.monthrange."""
    month_index = anchor.year * 12 + (anchor.month - 1) + n
    year, month = divmod(month_index, 12)
    month += 1
    return date(year, month, min(anchor.day, stdlib_calendar.monthrange(year, month)[1]))


def _month_end_anchors() -> list[date]:
    anchors = []
    for year in (2023, 2024):
        for month in range(1, 13):
            last_day = stdlib_calendar.monthrange(year, month)[1]
            anchors.extend(date(year, month, day) for day in range(28, last_day + 1))
    return anchors


@pytest.mark.parametrize("anchor", _month_end_anchors(), ids=str)
def test_add_cycle_monthly_month_end_anchors_over_36_months(anchor: date) -> None:
    for n in range(37):
        assert add_cycle(anchor, MONTHLY, n) == _expected_monthly(anchor, n), n


def test_add_cycle_counts_from_the_anchor_never_drifting() -> None:
    anchor = date(2024, 1, 31)
    assert [add_cycle(anchor, MONTHLY, n) for n in range(5)] == [
        date(2024, 1, 31),
        date(2024, 2, 29),
        date(2024, 3, 31),
        date(2024, 4, 30),
        date(2024, 5, 31),
    ]
    assert add_cycle(date(2023, 1, 31), MONTHLY, 1) == date(2023, 2, 28)
    assert add_cycle(date(2023, 1, 31), MONTHLY, 2) == date(2023, 3, 31)


def test_add_cycle_annual_leap_day_over_12_years() -> None:
    anchor = date(2024, 2, 29)
    for n in range(13):
        year = 2024 + n
        expected_day = 29 if stdlib_calendar.isleap(year) else 28
        assert add_cycle(anchor, ANNUAL, n) == date(year, 2, expected_day)


def test_add_cycle_annual_leap_day_across_a_century() -> None:
    # 2100 is not a leap year (divisible by 100, not by 400); 2000 was.
    assert add_cycle(date(2096, 2, 29), ANNUAL, 4) == date(2100, 2, 28)
    assert add_cycle(date(1996, 2, 29), ANNUAL, 4) == date(2000, 2, 29)


def test_add_cycle_zero_and_negative() -> None:
    for cycle in CYCLES:
        assert add_cycle(date(2024, 1, 31), cycle, 0) == date(2024, 1, 31)
    assert add_cycle(date(2024, 3, 31), MONTHLY, -1) == date(2024, 2, 29)
    assert add_cycle(date(2025, 2, 28), ANNUAL, -1) == date(2024, 2, 28)


def test_add_cycle_rejects_unknown_cycle_and_bad_types() -> None:
    with pytest.raises(ValueError, match="weekly"):
        add_cycle(date(2024, 1, 1), "weekly", 1)
    with pytest.raises(ValueError):
        add_cycle(date(2024, 1, 1), "Monthly", 1)
    with pytest.raises(ValueError):
        validate_cycle("")
    with pytest.raises(TypeError):
        add_cycle(date(2024, 1, 1), MONTHLY, 1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        add_cycle(datetime(2024, 1, 1, 12, 0), MONTHLY, 1)


def test_renewal_date_is_add_cycle() -> None:
    assert renewal_date(date(2024, 1, 31), MONTHLY, 1) == date(2024, 2, 29)
    assert CYCLES == (MONTHLY, ANNUAL)


@settings(max_examples=300, deadline=None)
@given(
    anchor=st.dates(min_value=date(2000, 1, 1), max_value=date(2060, 12, 31)),
    n=st.integers(min_value=-40, max_value=200),
)
def test_add_cycle_properties(anchor: date, n: int) -> None:
    monthly = add_cycle(anchor, MONTHLY, n)
    assert monthly == _expected_monthly(anchor, n)
    assert add_cycle(anchor, ANNUAL, n) == add_cycle(anchor, MONTHLY, 12 * n)
    # Strictly increasing: every period has at least 28 days and at most 31.
    assert 28 <= (add_cycle(anchor, MONTHLY, n + 1) - monthly).days <= 31


@settings(max_examples=300, deadline=None)
@given(
    anchor=st.dates(min_value=date(2000, 1, 1), max_value=date(2040, 12, 31)),
    offset_days=st.integers(min_value=-800, max_value=3000),
    cycle=st.sampled_from(CYCLES),
)
def test_period_containing(anchor: date, offset_days: int, cycle: str) -> None:
    on = anchor + timedelta(days=offset_days)
    start, end = period_containing(anchor, cycle, on)
    assert start <= on < end
    # Both bounds are renewals of the same schedule, one cycle apart.
    n = next(n for n in range(-80, 120) if add_cycle(anchor, cycle, n) == start)
    assert add_cycle(anchor, cycle, n + 1) == end


# --- bank calendar -----------------------------------------------------------------------------------

# Listed by hand from the ANBIMA calendar (national holidays + Carnival Monday/Tuesday + Corpus Christi).
# Easter 2025 = Apr 20: Carnival = Easter − 48/−47, Good Friday = Easter − 2, Corpus Christi = Easter + 60.
BANK_HOLIDAYS_2025 = {
    date(2025, 1, 1),  # Wed, Confraternização Universal
    date(2025, 3, 3),  # Mon, Carnaval
    date(2025, 3, 4),  # Tue, Carnaval
    date(2025, 4, 18),  # Fri, Sexta-feira Santa
    date(2025, 4, 21),  # Mon, Tiradentes
    date(2025, 5, 1),  # Thu, Dia do Trabalhador
    date(2025, 6, 19),  # Thu, Corpus Christi
    date(2025, 9, 7),  # Sun, Independência
    date(2025, 10, 12),  # Sun, Nossa Senhora Aparecida
    date(2025, 11, 2),  # Sun, Finados
    date(2025, 11, 15),  # Sat, Proclamação da República
    date(2025, 11, 20),  # Thu, Consciência Negra
    date(2025, 12, 25),  # Thu, Natal
}
# Easter 2026 = Apr 5.
BANK_HOLIDAYS_2026 = {
    date(2026, 1, 1),  # Thu
    date(2026, 2, 16),  # Mon, Carnaval
    date(2026, 2, 17),  # Tue, Carnaval
    date(2026, 4, 3),  # Fri, Sexta-feira Santa
    date(2026, 4, 21),  # Tue
    date(2026, 5, 1),  # Fri
    date(2026, 6, 4),  # Thu, Corpus Christi
    date(2026, 9, 7),  # Mon
    date(2026, 10, 12),  # Mon
    date(2026, 11, 2),  # Mon
    date(2026, 11, 15),  # Sun
    date(2026, 11, 20),  # Fri
    date(2026, 12, 25),  # Fri
}


def _every_day(year: int) -> list[date]:
    first = date(year, 1, 1)
    return [first + timedelta(days=offset) for offset in range((date(year + 1, 1, 1) - first).days)]


@pytest.mark.parametrize(("year", "holidays"), [(2025, BANK_HOLIDAYS_2025), (2026, BANK_HOLIDAYS_2026)])
def test_bank_holidays_match_the_hand_list(year: int, holidays: set[date]) -> None:
    assert set(bank_holidays(year)) == holidays
    for day in _every_day(year):
        assert is_bank_holiday(day) == (day in holidays), day
        assert is_business_day(day) == (day.weekday() < 5 and day not in holidays), day


@pytest.mark.parametrize(
    "day",
    [
        date(2025, 3, 5),  # Ash Wednesday
        date(2026, 2, 18),  # Ash Wednesday
        date(2025, 10, 28),  # Tue, Dia do Servidor Público
        date(2026, 10, 28),  # Wed
        date(2025, 12, 24),  # Wed
        date(2025, 12, 31),  # Wed
        date(2026, 12, 24),  # Thu
        date(2026, 12, 31),  # Thu
        date(2023, 11, 20),  # Mon: Consciência Negra only became national in 2024
    ],
)
def test_optional_days_outside_anbima_are_business_days(day: date) -> None:
    assert day.weekday() < 5
    assert is_business_day(day)
    assert not is_bank_holiday(day)


def test_consciencia_negra_is_a_holiday_from_2024() -> None:
    assert is_bank_holiday(date(2024, 11, 20))
    assert not is_business_day(date(2024, 11, 20))  # a Wednesday
    assert "Consciência Negra" in bank_holidays(2024)[date(2024, 11, 20)]


def test_business_day_counts_by_hand() -> None:
    # 2025 starts on a Wednesday and has 365 days: 52 full weeks + Wed Dec 31 → 52 × 5 + 1 = 261 weekdays.
    # Weekday holidays: Jan 1, Mar 3, Mar 4, Apr 18, Apr 21, May 1, Jun 19, Nov 20, Dec 25 = 9
    # (Sep 7, Oct 12, Nov 2 fall on Sundays and Nov 15 on a Saturday) → 261 − 9 = 252.
    assert count_business_days(date(2025, 1, 1), date(2026, 1, 1)) == 252
    # 2026 starts on a Thursday: 52 × 5 + 1 (Thu Dec 31) = 261 weekdays; only Nov 15 (Sunday) of the
    # 13 holidays falls on a weekend → 261 − 12 = 249.
    assert count_business_days(date(2026, 1, 1), date(2027, 1, 1)) == 249


@pytest.mark.parametrize(
    ("day", "expected"),
    [
        (date(2025, 2, 28), date(2025, 2, 28)),  # a business day is its own next business day
        (date(2025, 3, 1), date(2025, 3, 5)),  # Sat, Sun, Carnival Mon, Tue → Ash Wednesday
        (date(2025, 3, 3), date(2025, 3, 5)),
        (date(2025, 4, 18), date(2025, 4, 22)),  # Good Friday, weekend, Tiradentes Monday
        (date(2026, 12, 25), date(2026, 12, 28)),  # Christmas Friday + weekend
        (date(2026, 12, 31), date(2026, 12, 31)),  # New Year's Eve is a bank business day
        (date(2027, 1, 1), date(2027, 1, 4)),  # Fri holiday + weekend, across the year boundary
    ],
)
def test_next_business_day(day: date, expected: date) -> None:
    assert next_business_day(day) == expected


def test_previous_business_day() -> None:
    assert previous_business_day(date(2025, 4, 21)) == date(2025, 4, 17)
    assert previous_business_day(date(2025, 4, 17)) == date(2025, 4, 17)


@pytest.mark.parametrize(
    ("day", "n", "expected"),
    [
        (date(2025, 4, 17), 0, date(2025, 4, 17)),
        (date(2025, 4, 19), 0, date(2025, 4, 19)),  # n = 0 never moves, even from a Saturday
        (date(2025, 4, 17), 1, date(2025, 4, 22)),  # skips Good Friday, weekend, Tiradentes
        (date(2025, 4, 17), 3, date(2025, 4, 24)),
        (date(2025, 2, 28), 1, date(2025, 3, 5)),
        (date(2025, 2, 28), 3, date(2025, 3, 7)),
        (date(2025, 3, 1), 1, date(2025, 3, 5)),  # from a Saturday the first business day counts as 1
        (date(2025, 4, 22), -1, date(2025, 4, 17)),
        (date(2025, 12, 31), 1, date(2026, 1, 2)),
    ],
)
def test_add_business_days(day: date, n: int, expected: date) -> None:
    assert add_business_days(day, n) == expected


@settings(max_examples=200, deadline=None)
@given(
    day=st.dates(min_value=date(2020, 1, 1), max_value=date(2035, 12, 31)),
    n=st.integers(min_value=1, max_value=60),
)
def test_add_business_days_properties(day: date, n: int) -> None:
    later = add_business_days(day, n)
    assert is_business_day(later)
    assert count_business_days(day + timedelta(days=1), later + timedelta(days=1)) == n
    # Walking back n business days lands on the last business day on or before `day`.
    assert add_business_days(later, -n) == previous_business_day(day)
    assert next_business_day(day) >= day
    assert is_business_day(next_business_day(day))


def test_calendar_rejects_datetimes() -> None:
    with pytest.raises(TypeError):
        is_business_day(datetime(2025, 1, 2, 10, 0))


# --- time zone -----------------------------------------------------------------------------------------


def test_local_today_uses_the_billing_time_zone() -> None:
    assert BILLING_TIMEZONE_DEFAULT == "America/Sao_Paulo"
    # 02:00 UTC on Jan 1 is still 23:00 of Dec 31 in São Paulo (UTC−3).
    assert local_today(datetime(2025, 1, 1, 2, 0, tzinfo=UTC)) == date(2024, 12, 31)
    assert local_today(datetime(2025, 1, 1, 3, 0, tzinfo=UTC)) == date(2025, 1, 1)
    assert local_today(datetime(2025, 1, 1, 2, 0, tzinfo=UTC), tz="UTC") == date(2025, 1, 1)
    assert local_today(datetime(2025, 1, 1, 8, 0, tzinfo=timezone(timedelta(hours=9)))) == date(2024, 12, 31)


def test_local_today_rejects_naive_datetimes() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        local_today(datetime(2025, 1, 1, 12, 0))


def test_local_run_instant() -> None:
    instant = local_run_instant(date(2025, 3, 10), time(6, 0))
    assert instant == datetime(2025, 3, 10, 9, 0, tzinfo=UTC)
    assert instant.utcoffset() == timedelta(0)
    # Brazil still had daylight saving time in early 2018 (UTC−2).
    assert local_run_instant(date(2018, 1, 15), time(6, 0)) == datetime(2018, 1, 15, 8, 0, tzinfo=UTC)
    # 2018-11-04 00:30 did not exist in São Paulo (clocks jumped from 00:00 to 01:00): moves forward.
    assert local_run_instant(date(2018, 11, 4), time(0, 30)) == datetime(2018, 11, 4, 3, 30, tzinfo=UTC)
    with pytest.raises(ValueError):
        local_run_instant(date(2025, 3, 10), time(6, 0, tzinfo=UTC))


def test_latest_due_run_date() -> None:
    run_at = time(6, 0)
    assert latest_due_run_date(datetime(2025, 3, 10, 8, 59, tzinfo=UTC), run_at) == date(2025, 3, 9)
    assert latest_due_run_date(datetime(2025, 3, 10, 9, 0, tzinfo=UTC), run_at) == date(2025, 3, 10)


def test_format_date_br() -> None:
    assert format_date_br(date(2026, 3, 7)) == "07/03/2026"
