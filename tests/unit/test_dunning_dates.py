"""models.dunning: the dunning dates, checked against the bank calendar by hand and by property.

Pure: imports only models, needs no database, broker or gateway.
"""

from __future__ import annotations

from datetime import date, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.calendar import count_business_days, is_business_day
from models.dunning import (
    is_past_due,
    last_retry_day,
    latest_renewal_out_of_retries,
    next_retry_date,
    overdue_on,
    payable_until,
    suspend_on,
)
from models.states import PaymentMethod

DAY = timedelta(days=1)
DEFAULT_RETRY_DAYS = (1, 3, 5, 7)

dates = st.dates(min_value=date(2000, 1, 1), max_value=date(2099, 12, 31))
retry_schedules = st.lists(st.integers(min_value=1, max_value=30), min_size=1, max_size=6, unique=True).map(
    lambda days: tuple(sorted(days))
)
methods = st.sampled_from([PaymentMethod.CARD, PaymentMethod.BOLETO, "card", "boleto"])


def _days(start: date, end: date) -> list[date]:
    """Every date in [start, end]."""
    return [start + timedelta(days=n) for n in range((end - start).days + 1)]


# --- payable until / overdue on: by hand -------------------------------------------------------------

# (due date, last day it may be paid) from the ANBIMA calendar. Easter 2025 = Apr 20, 2026 = Apr 5.
PAYABLE_UNTIL = [
    (date(2026, 3, 16), date(2026, 3, 16)),  # Mon, a business day: itself
    (date(2026, 3, 14), date(2026, 3, 16)),  # Sat → Mon
    (date(2026, 3, 15), date(2026, 3, 16)),  # Sun → Mon
    (date(2026, 2, 14), date(2026, 2, 18)),  # Sat before Carnival → Ash Wednesday (a bank business day)
    (date(2026, 2, 16), date(2026, 2, 18)),  # Carnival Monday
    (date(2026, 2, 17), date(2026, 2, 18)),  # Carnival Tuesday
    (date(2026, 2, 18), date(2026, 2, 18)),  # Ash Wednesday: itself
    (date(2025, 3, 1), date(2025, 3, 5)),  # Sat, month start, then Carnival 2025 (Mar 3–4)
    (date(2026, 6, 4), date(2026, 6, 5)),  # Corpus Christi (Thu) → Fri
    (date(2025, 6, 19), date(2025, 6, 20)),  # Corpus Christi 2025 (Thu) → Fri
    (date(2026, 11, 20), date(2026, 11, 23)),  # Nov 20 (Fri), a holiday from 2024 → Mon
    (date(2025, 11, 20), date(2025, 11, 21)),  # Nov 20 (Thu) → Fri
    (date(2023, 11, 20), date(2023, 11, 20)),  # Nov 20 2023 (Mon): not yet a national holiday
    (date(2026, 4, 3), date(2026, 4, 6)),  # Good Friday → Mon
    (date(2026, 4, 21), date(2026, 4, 22)),  # Tiradentes (Tue) → Wed
    (date(2026, 1, 31), date(2026, 2, 2)),  # Sat, month end → Mon of the next month
    (date(2026, 12, 25), date(2026, 12, 28)),  # Christmas (Fri) → Mon
    (date(2026, 12, 24), date(2026, 12, 24)),  # Dec 24: a bank business day
    (date(2026, 12, 31), date(2026, 12, 31)),  # Dec 31: a bank business day
    (date(2027, 1, 1), date(2027, 1, 4)),  # New Year (Fri) → Mon, across the year's end
    (date(2020, 2, 29), date(2020, 3, 2)),  # leap day on a Sat → Mon Mar 2
    (date(2024, 2, 29), date(2024, 2, 29)),  # leap day on a Thu: itself
    (date(2032, 2, 29), date(2032, 3, 1)),  # leap day on a Sun → Mon Mar 1
]


@pytest.mark.parametrize(("due", "until"), PAYABLE_UNTIL)
def test_payable_until_and_overdue_on_by_hand(due: date, until: date) -> None:
    assert payable_until(due) == until
    assert overdue_on(due) == until + DAY


@pytest.mark.parametrize(
    ("overdue_day", "grace", "expected"),
    [
        (date(2026, 3, 17), 0, date(2026, 3, 17)),  # no grace: the overdue day itself
        (date(2026, 3, 17), 3, date(2026, 3, 20)),  # Tue → Fri
        (date(2026, 3, 19), 3, date(2026, 3, 24)),  # Thu → over the weekend → Tue
        (date(2026, 2, 13), 3, date(2026, 2, 20)),  # Fri before Carnival: Wed, Thu, Fri
        (date(2026, 6, 3), 1, date(2026, 6, 5)),  # over Corpus Christi
        (date(2026, 11, 19), 1, date(2026, 11, 23)),  # over Nov 20 and the weekend
        (date(2026, 12, 29), 3, date(2027, 1, 4)),  # Dec 30, Dec 31, (Jan 1), Jan 4
        (date(2024, 2, 28), 1, date(2024, 2, 29)),  # leap day
    ],
)
def test_suspend_on_by_hand(overdue_day: date, grace: int, expected: date) -> None:
    assert suspend_on(overdue_day, grace) == expected


def test_a_boleto_dunning_calendar_around_carnival() -> None:
    # Due Sat Feb 14 2026: payable until Ash Wednesday, overdue Thursday, suspended 3 business days later.
    due = date(2026, 2, 14)
    overdue = overdue_on(due)
    assert overdue == date(2026, 2, 19)
    assert suspend_on(overdue, 3) == date(2026, 2, 24)
    assert [on for on in _days(due, date(2026, 2, 25)) if is_past_due(**_boleto(due, on))] == _days(
        date(2026, 2, 19), date(2026, 2, 25)
    )


def _boleto(due: date, on: date, charge_failed: bool = False) -> dict[str, object]:
    return {"method": PaymentMethod.BOLETO, "due_date": due, "on": on, "charge_failed": charge_failed}


# --- payable until / overdue on: every day and by property ---------------------------------------------


def test_payable_until_every_day_of_four_years_including_a_leap_year() -> None:
    for due in _days(date(2024, 1, 1), date(2027, 12, 31)):
        until = payable_until(due)
        assert is_business_day(until), due
        assert all(not is_business_day(day) for day in _days(due, until - DAY)), due
        assert overdue_on(due) == until + DAY


@given(dates)
def test_payable_until_is_the_first_business_day_on_or_after_the_due_date(due: date) -> None:
    until = payable_until(due)
    assert until >= due
    assert is_business_day(until)
    assert count_business_days(due, until) == 0
    assert (until == due) == is_business_day(due)
    # A boleto is never payable more than a long holiday stretch after its due date.
    assert (until - due).days <= 6


@given(dates, dates)
def test_payable_until_keeps_the_order_of_due_dates(first: date, second: date) -> None:
    first, second = min(first, second), max(first, second)
    assert payable_until(first) <= payable_until(second)
    assert overdue_on(first) <= overdue_on(second)


@given(dates)
def test_overdue_on_is_the_day_after_payable_until(due: date) -> None:
    assert overdue_on(due) == payable_until(due) + DAY
    assert overdue_on(due) > due


@given(dates, st.integers(min_value=0, max_value=30))
def test_suspend_on_counts_business_days_after_the_overdue_day(overdue_day: date, grace: int) -> None:
    suspended = suspend_on(overdue_day, grace)
    assert suspended >= overdue_day
    # Exactly `grace` business days in (overdue_day, suspended], and the last of them is that day.
    assert count_business_days(overdue_day + DAY, suspended + DAY) == grace
    if grace:
        assert is_business_day(suspended)
    else:
        assert suspended == overdue_day


# --- card retries ------------------------------------------------------------------------------------------


def test_the_default_schedule_retries_on_t_plus_1_3_5_7() -> None:
    renewal = date(2026, 2, 14)  # a Saturday before Carnival: card retries count calendar days
    on, attempt, attempts = renewal, 1, [renewal]
    while (retry := next_retry_date(renewal, attempt, on, DEFAULT_RETRY_DAYS)) is not None:
        attempts.append(retry)
        on, attempt = retry, attempt + 1
    assert attempts == [renewal + timedelta(days=n) for n in (0, 1, 3, 5, 7)]
    assert last_retry_day(renewal, DEFAULT_RETRY_DAYS) == attempts[-1] == date(2026, 2, 21)


def test_a_late_run_retries_on_the_next_scheduled_day_still_ahead() -> None:
    renewal = date(2024, 2, 28)
    # Attempt 1 recorded on T+4 (the runs were down): T+1 and T+3 are past, T+5 is next.
    assert next_retry_date(renewal, 1, renewal + timedelta(days=4), DEFAULT_RETRY_DAYS) == date(2024, 3, 4)
    assert next_retry_date(renewal, 1, renewal + timedelta(days=7), DEFAULT_RETRY_DAYS) is None
    assert next_retry_date(renewal, 5, renewal + timedelta(days=7), DEFAULT_RETRY_DAYS) is None
    assert next_retry_date(renewal, 9, renewal, DEFAULT_RETRY_DAYS) is None


@given(dates, st.integers(min_value=1, max_value=8), st.integers(min_value=0, max_value=40), retry_schedules)
def test_next_retry_date_is_the_first_scheduled_day_after_on(
    renewal: date, attempt: int, offset: int, retry_days: tuple[int, ...]
) -> None:
    on = renewal + timedelta(days=offset)
    retry = next_retry_date(renewal, attempt, on, retry_days)
    scheduled = [renewal + timedelta(days=days) for days in retry_days[attempt - 1 :]]
    ahead = [day for day in scheduled if day > on]
    assert retry == (min(ahead) if ahead else None)
    if retry is not None:
        assert on < retry <= last_retry_day(renewal, retry_days)
    if on >= last_retry_day(renewal, retry_days):
        assert retry is None


@given(dates, retry_schedules)
def test_last_retry_day_is_the_last_scheduled_day(renewal: date, retry_days: tuple[int, ...]) -> None:
    assert last_retry_day(renewal, retry_days) == renewal + timedelta(days=max(retry_days))


@given(dates, dates, retry_schedules)
def test_latest_renewal_out_of_retries_inverts_last_retry_day(
    renewal: date, on: date, retry_days: tuple[int, ...]
) -> None:
    assert (last_retry_day(renewal, retry_days) <= on) == (renewal <= latest_renewal_out_of_retries(on, retry_days))


# --- is_past_due -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("due", "until"), PAYABLE_UNTIL)
@pytest.mark.parametrize("charge_failed", [False, True])
def test_a_boleto_is_past_due_the_day_after_it_stops_being_payable(due: date, until: date, charge_failed: bool) -> None:
    assert not is_past_due(**_boleto(due, due - DAY, charge_failed))
    assert not is_past_due(**_boleto(due, due, charge_failed))
    assert not is_past_due(**_boleto(due, until, charge_failed))  # the last day it may be paid
    assert is_past_due(**_boleto(due, until + DAY, charge_failed))  # overdue_on
    assert is_past_due(**_boleto(due, until + timedelta(days=30), charge_failed))


@pytest.mark.parametrize(
    "due",
    [
        date(2026, 3, 16),  # a business day
        date(2026, 3, 14),  # Saturday
        date(2026, 2, 16),  # Carnival: a card has no payable-until grace
        date(2026, 6, 4),  # Corpus Christi
        date(2026, 11, 20),  # Nov 20
        date(2024, 2, 29),  # leap day
        date(2026, 12, 31),  # year end
    ],
)
def test_card_boundaries(due: date) -> None:
    def past_due(on: date, charge_failed: bool) -> bool:
        return is_past_due(method=PaymentMethod.CARD, due_date=due, on=on, charge_failed=charge_failed)

    assert (past_due(due - DAY, False), past_due(due - DAY, True)) == (False, False)
    # On the due date only once an attempt failed (the charge may still be running or scheduled).
    assert (past_due(due, False), past_due(due, True)) == (False, True)
    assert (past_due(due + DAY, False), past_due(due + DAY, True)) == (True, True)


def test_is_past_due_for_every_due_date_of_a_leap_year_and_the_week_after() -> None:
    for due in _days(date(2024, 1, 1), date(2024, 12, 31)):
        for on in _days(due - DAY, due + timedelta(days=8)):
            # Independent statement of the boleto rule: a business day on which it could be paid has gone by.
            paid_window_passed = any(is_business_day(day) for day in _days(due, on - DAY))
            for failed in (False, True):
                assert is_past_due(**_boleto(due, on, failed)) == paid_window_passed, (due, on)
                card = is_past_due(method=PaymentMethod.CARD, due_date=due, on=on, charge_failed=failed)
                assert card == (on > due or (on == due and failed)), (due, on, failed)


@given(methods, dates, st.integers(min_value=-10, max_value=20), st.booleans())
def test_is_past_due_never_before_the_due_date_and_stays_past_due(
    method: str, due: date, offset: int, charge_failed: bool
) -> None:
    on = due + timedelta(days=offset)
    past_due = is_past_due(method=method, due_date=due, on=on, charge_failed=charge_failed)
    if on < due:
        assert not past_due
    if past_due:
        assert is_past_due(method=method, due_date=due, on=on + DAY, charge_failed=charge_failed)
    # A card is past due no later than a boleto with the same due date.
    if method in (PaymentMethod.BOLETO, "boleto") and past_due:
        assert is_past_due(method=PaymentMethod.CARD, due_date=due, on=on, charge_failed=charge_failed)


@given(dates, st.integers(min_value=-3, max_value=10), st.booleans())
@settings(max_examples=200)
def test_is_past_due_takes_plain_strings_like_the_enum(due: date, offset: int, charge_failed: bool) -> None:
    on = due + timedelta(days=offset)
    for member in PaymentMethod:
        assert is_past_due(method=member, due_date=due, on=on, charge_failed=charge_failed) == is_past_due(
            method=member.value, due_date=due, on=on, charge_failed=charge_failed
        )
    assert is_past_due(**_boleto(due, on, charge_failed)) == (on >= overdue_on(due))


def test_is_past_due_refuses_an_unknown_method() -> None:
    with pytest.raises(ValueError, match="pix"):
        is_past_due(method="pix", due_date=date(2026, 3, 16), on=date(2026, 3, 20), charge_failed=False)
