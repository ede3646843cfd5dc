from __future__ import annotations

import json
from datetime import date, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.calendar import ANNUAL, MONTHLY, add_cycle
from models.proration import Quote, quote_cycle_change, unused_credit

MONTHLY_PRICE = 9990  # R$ 99,90
ANNUAL_PRICE = 99900  # R$ 999,00


def _quote(**overrides: object) -> Quote:
    arguments: dict[str, object] = {
        "monthly_price_cents": MONTHLY_PRICE,
        "annual_price_cents": ANNUAL_PRICE,
        "balance_cents": 0,
    }
    arguments.update(overrides)
    return quote_cycle_change(**arguments)  # type: ignore[arg-type]


# --- unused credit -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("paid", "start", "end", "on", "expected"),
    [
        # [Mar 10, Apr 10) has 31 days; on Mar 25, 16 are left: 9990 × 16 / 31 = 5156.13 → 5156.
        (9990, date(2025, 3, 10), date(2025, 4, 10), date(2025, 3, 25), 5156),
        # Half-even tie: 100 × 1 / 8 = 12.5 → 12; 100 × 3 / 8 = 37.5 → 38.
        (100, date(2025, 1, 1), date(2025, 1, 9), date(2025, 1, 8), 12),
        (100, date(2025, 1, 1), date(2025, 1, 9), date(2025, 1, 6), 38),
        # Clamps: on or before the start everything is unused; on or after the end nothing is.
        (9990, date(2025, 3, 10), date(2025, 4, 10), date(2025, 3, 10), 9990),
        (9990, date(2025, 3, 10), date(2025, 4, 10), date(2025, 3, 1), 9990),
        (9990, date(2025, 3, 10), date(2025, 4, 10), date(2025, 4, 10), 0),
        (9990, date(2025, 3, 10), date(2025, 4, 10), date(2025, 5, 1), 0),
        (0, date(2025, 3, 10), date(2025, 4, 10), date(2025, 3, 25), 0),
    ],
)
def test_unused_credit_examples(paid: int, start: date, end: date, on: date, expected: int) -> None:
    assert unused_credit(paid, start, end, on) == expected


def test_unused_credit_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        unused_credit(-1, date(2025, 1, 1), date(2025, 2, 1), date(2025, 1, 15))
    with pytest.raises(ValueError):
        unused_credit(100, date(2025, 2, 1), date(2025, 2, 1), date(2025, 1, 15))
    with pytest.raises(ValueError):
        unused_credit(100, date(2025, 2, 1), date(2025, 1, 1), date(2025, 1, 15))


# --- monthly → annual ---------------------------------------------------------------------------------


def test_monthly_to_annual_mid_month() -> None:
    # Period [Mar 10, Apr 10) = 31 days, paid 9990, change on Mar 25 with 16 days left:
    # unused = round(9990 × 16 / 31) = round(5156.13) = 5156; credit = 5156 + 0.
    # Due now = 99900 − 5156 = 94744; new period [Mar 25 2025, Mar 25 2026).
    quote = _quote(
        from_cycle=MONTHLY,
        to_cycle=ANNUAL,
        period_start=date(2025, 3, 10),
        period_end=date(2025, 4, 10),
        paid_cents=9990,
        on=date(2025, 3, 25),
    )
    assert quote.unused_cents == 5156
    assert quote.credit_cents == 5156
    assert quote.credit_applied_cents == 5156
    assert quote.amount_due_cents == 94744
    assert quote.balance_after_cents == 0
    assert (quote.new_period_start, quote.new_period_end) == (date(2025, 3, 25), date(2026, 3, 25))
    assert quote.months is None and quote.extra_days is None and quote.days_value_cents is None


def test_monthly_to_annual_on_the_first_day() -> None:
    # D = S: nothing used yet, the whole 9990 is credit → due 99900 − 9990 = 89910.
    quote = _quote(
        from_cycle=MONTHLY,
        to_cycle=ANNUAL,
        period_start=date(2025, 3, 10),
        period_end=date(2025, 4, 10),
        paid_cents=9990,
        on=date(2025, 3, 10),
    )
    assert (quote.credit_cents, quote.amount_due_cents, quote.balance_after_cents) == (9990, 89910, 0)


def test_monthly_to_annual_on_the_last_day() -> None:
    # D = T − 1 (Apr 9): one day of 31 left → round(9990 / 31) = round(322.26) = 322 → due 99578.
    quote = _quote(
        from_cycle=MONTHLY,
        to_cycle=ANNUAL,
        period_start=date(2025, 3, 10),
        period_end=date(2025, 4, 10),
        paid_cents=9990,
        on=date(2025, 4, 9),
    )
    assert (quote.credit_cents, quote.amount_due_cents) == (322, 99578)


def test_monthly_to_annual_with_a_balance_larger_than_the_price() -> None:
    # Credit = 5156 (as mid-month) + 100000 balance = 105156 ≥ 99900 → nothing due,
    # 105156 − 99900 = 5256 stays as balance.
    quote = _quote(
        from_cycle=MONTHLY,
        to_cycle=ANNUAL,
        period_start=date(2025, 3, 10),
        period_end=date(2025, 4, 10),
        paid_cents=9990,
        balance_cents=100000,
        on=date(2025, 3, 25),
    )
    assert quote.credit_cents == 105156
    assert quote.credit_applied_cents == 99900
    assert quote.amount_due_cents == 0
    assert quote.balance_after_cents == 5256


def test_monthly_to_annual_on_a_leap_day() -> None:
    # Period [Feb 15, Mar 15 2024) = 29 days; on Feb 29, 15 left: 9990 × 15 / 29 = 5167.24 → 5167.
    # The new annual period starting on Feb 29 renews on Feb 28 2025 (clamped).
    quote = _quote(
        from_cycle=MONTHLY,
        to_cycle=ANNUAL,
        period_start=date(2024, 2, 15),
        period_end=date(2024, 3, 15),
        paid_cents=9990,
        on=date(2024, 2, 29),
    )
    assert quote.credit_cents == 5167
    assert quote.amount_due_cents == 99900 - 5167
    assert quote.new_period_end == date(2025, 2, 28)


# --- annual → monthly ---------------------------------------------------------------------------------


def test_annual_to_monthly_in_a_leap_year() -> None:
    # Period [Jan 15 2024, Jan 15 2025) = 366 days, paid 99900, change on Feb 29 2024: 321 days left.
    # unused = round(99900 × 321 / 366) = round(32067900 / 366) = round(87617.21) = 87617.
    # k = 87617 // 9990 = 8 (79920), R = 7697. After 8 months: Oct 29 2024; the next month
    # [Oct 29, Nov 29) has L = 31 days. r = floor(7697 × 31 / 9990) = floor(23.88) = 23 days,
    # worth floor(23 × 9990 / 31) = floor(7411.94) = 7411; balance = 7697 − 7411 = 286.
    # New renewal = Oct 29 + 23 days = Nov 21 2024. Check: 79920 + 7411 + 286 = 87617.
    quote = _quote(
        from_cycle=ANNUAL,
        to_cycle=MONTHLY,
        period_start=date(2024, 1, 15),
        period_end=date(2025, 1, 15),
        paid_cents=99900,
        on=date(2024, 2, 29),
    )
    assert quote.unused_cents == 87617
    assert (quote.months, quote.extra_days, quote.month_length_days) == (8, 23, 31)
    assert quote.days_value_cents == 7411
    assert quote.balance_after_cents == 286
    assert quote.amount_due_cents == 0
    assert (quote.new_period_start, quote.new_period_end) == (date(2024, 2, 29), date(2024, 11, 21))
    assert quote.credit_applied_cents == 87617 - 286


def test_annual_to_monthly_on_the_first_day_month_end_anchor() -> None:
    # Period [Jan 31 2025, Jan 31 2026), change on Jan 31 2025: credit = 99900 = exactly 10 months,
    # R = 0, r = 0. add_cycle(Jan 31, monthly, 10) = Nov 30 2025 (clamped: November has 30 days).
    quote = _quote(
        from_cycle=ANNUAL,
        to_cycle=MONTHLY,
        period_start=date(2025, 1, 31),
        period_end=date(2026, 1, 31),
        paid_cents=99900,
        on=date(2025, 1, 31),
    )
    assert (quote.credit_cents, quote.months, quote.extra_days, quote.balance_after_cents) == (99900, 10, 0, 0)
    assert quote.new_period_end == date(2025, 11, 30)


def test_annual_to_monthly_month_end_with_balance() -> None:
    # Period [Mar 15 2024, Mar 15 2025) = 365 days, change on Jan 31 2025 with 43 days left:
    # unused = round(99900 × 43 / 365) = round(11768.99) = 11769; + balance 3231 = credit 15000.
    # k = 1, R = 5010. add_cycle(Jan 31, monthly, 1) = Feb 28 2025; [Feb 28, Mar 31) → L = 31.
    # r = floor(5010 × 31 / 9990) = floor(15.55) = 15, worth floor(15 × 9990 / 31) = floor(4833.87) = 4833;
    # balance = 5010 − 4833 = 177. New renewal = Feb 28 + 15 days = Mar 15 2025.
    quote = _quote(
        from_cycle=ANNUAL,
        to_cycle=MONTHLY,
        period_start=date(2024, 3, 15),
        period_end=date(2025, 3, 15),
        paid_cents=99900,
        balance_cents=3231,
        on=date(2025, 1, 31),
    )
    assert (quote.unused_cents, quote.balance_cents, quote.credit_cents) == (11769, 3231, 15000)
    assert (quote.months, quote.extra_days, quote.month_length_days) == (1, 15, 31)
    assert (quote.days_value_cents, quote.balance_after_cents) == (4833, 177)
    assert quote.new_period_end == date(2025, 3, 15)


def test_annual_to_monthly_on_the_last_day() -> None:
    # Period [Jan 15 2025, Jan 15 2026) = 365 days, change on Jan 14 2026: one day left,
    # round(99900 / 365) = round(273.70) = 274. Less than a month (k = 0) and less than one monthly
    # day (r = floor(274 × 31 / 9990) = 0): no time can be bought, so the first monthly period starts
    # now and is charged now, less all the credit.
    quote = _quote(
        from_cycle=ANNUAL,
        to_cycle=MONTHLY,
        period_start=date(2025, 1, 15),
        period_end=date(2026, 1, 15),
        paid_cents=99900,
        on=date(2026, 1, 14),
    )
    assert quote.first_period_charged_now
    assert (quote.credit_cents, quote.credit_applied_cents, quote.balance_after_cents) == (274, 274, 0)
    assert (quote.invoice_price_cents, quote.amount_due_cents) == (9990, 9990 - 274)
    assert (quote.new_period_start, quote.new_period_end) == (date(2026, 1, 14), date(2026, 2, 14))


def test_quote_to_dict_is_json_friendly() -> None:
    quote = _quote(
        from_cycle=ANNUAL,
        to_cycle=MONTHLY,
        period_start=date(2024, 1, 15),
        period_end=date(2025, 1, 15),
        paid_cents=99900,
        on=date(2024, 2, 29),
    )
    data = quote.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["new_period_end"] == "2024-11-21"
    assert data["on"] == "2024-02-29"
    assert data["balance_after_cents"] == 286
    assert data["credit_cents"] == 87617
    with pytest.raises(AttributeError):
        quote.credit_cents = 0  # type: ignore[misc]


@pytest.mark.parametrize(
    "overrides",
    [
        {"from_cycle": MONTHLY, "to_cycle": MONTHLY},
        {"from_cycle": ANNUAL, "to_cycle": ANNUAL},
        {"from_cycle": "weekly", "to_cycle": ANNUAL},
        {"to_cycle": "biennial"},
        {"paid_cents": -1},
        {"balance_cents": -1},
        {"monthly_price_cents": -9990},
        {"monthly_price_cents": 0},
        {"annual_price_cents": -1},
        {"period_end": date(2025, 3, 10)},
    ],
)
def test_quote_rejects_invalid_input(overrides: dict[str, object]) -> None:
    arguments: dict[str, object] = {
        "from_cycle": MONTHLY,
        "to_cycle": ANNUAL,
        "period_start": date(2025, 3, 10),
        "period_end": date(2025, 4, 10),
        "paid_cents": 9990,
        "on": date(2025, 3, 25),
        **overrides,
    }
    with pytest.raises(ValueError):
        _quote(**arguments)


# --- properties ------------------------------------------------------------------------------------------

starts = st.dates(min_value=date(2020, 1, 1), max_value=date(2040, 12, 31))
# Bounded so the credit buys at most a few centuries of months (dates stop at year 9999).
amounts = st.integers(min_value=0, max_value=2_000_000)
prices = st.integers(min_value=1_000, max_value=500_000)


@st.composite
def cycle_changes(draw: st.DrawFn, from_cycle: str) -> dict[str, object]:
    start = draw(starts)
    end = add_cycle(start, from_cycle, 1)
    on = start + timedelta(days=draw(st.integers(min_value=-5, max_value=(end - start).days + 5)))
    return {
        "from_cycle": from_cycle,
        "to_cycle": ANNUAL if from_cycle == MONTHLY else MONTHLY,
        "period_start": start,
        "period_end": end,
        "paid_cents": draw(amounts),
        "balance_cents": draw(amounts),
        "on": on,
        "monthly_price_cents": draw(prices),
        "annual_price_cents": draw(prices),
    }


@settings(max_examples=300, deadline=None)
@given(change=st.one_of(cycle_changes(MONTHLY), cycle_changes(ANNUAL)))
def test_credit_is_never_negative_nor_more_than_paid_plus_balance(change: dict[str, object]) -> None:
    quote = quote_cycle_change(**change)  # type: ignore[arg-type]
    assert 0 <= quote.unused_cents <= quote.paid_cents
    assert 0 <= quote.credit_cents <= quote.paid_cents + quote.balance_cents
    assert quote.credit_cents == quote.unused_cents + quote.balance_cents
    assert quote.amount_due_cents >= 0 and quote.balance_after_cents >= 0
    assert quote.new_period_start == quote.on <= quote.new_period_end
    assert json.loads(json.dumps(quote.to_dict())) == quote.to_dict()


@settings(max_examples=200, deadline=None)
@given(
    start=starts,
    cycle=st.sampled_from([MONTHLY, ANNUAL]),
    paid=amounts,
    first=st.integers(min_value=-3, max_value=370),
    step=st.integers(min_value=0, max_value=370),
)
def test_credit_does_not_grow_as_the_change_date_nears_the_renewal(
    start: date, cycle: str, paid: int, first: int, step: int
) -> None:
    end = add_cycle(start, cycle, 1)
    earlier = start + timedelta(days=first)
    later = earlier + timedelta(days=step)
    assert unused_credit(paid, start, end, later) <= unused_credit(paid, start, end, earlier)


@settings(max_examples=300, deadline=None)
@given(change=cycle_changes(ANNUAL))
def test_annual_to_monthly_converts_credit_to_the_cent(change: dict[str, object]) -> None:
    quote = quote_cycle_change(**change)  # type: ignore[arg-type]
    monthly = quote.new_price_cents
    if quote.first_period_charged_now:
        # Not even a day of credit: the first month is charged now, less all of it.
        assert quote.credit_cents * 28 < monthly  # r = floor(credit × L / M) = 0, and L ≥ 28
        assert quote.amount_due_cents == monthly - quote.credit_cents and quote.balance_after_cents == 0
        assert quote.new_period_end == add_cycle(quote.on, MONTHLY, 1)
        return
    assert quote.invoice_price_cents == quote.credit_applied_cents and quote.amount_due_cents == 0
    assert quote.months is not None and quote.extra_days is not None
    assert quote.month_length_days is not None and quote.days_value_cents is not None
    length = quote.month_length_days
    assert 28 <= length <= 31
    assert quote.amount_due_cents == 0
    # Every cent of credit is either months, days or balance.
    assert quote.months * monthly + quote.days_value_cents + quote.balance_after_cents == quote.credit_cents
    remainder = quote.credit_cents - quote.months * monthly
    assert 0 <= remainder < monthly
    assert 0 <= quote.extra_days < length
    # The days bought are the most the remainder pays for at M / L a day…
    assert quote.extra_days * monthly <= remainder * length < (quote.extra_days + 1) * monthly
    # …so what stays as balance is less than one day's value (plus the cent lost flooring the days' value).
    assert quote.balance_after_cents >= 0
    assert quote.balance_after_cents * length < monthly + length
    expected_end = add_cycle(quote.on, MONTHLY, quote.months) + timedelta(days=quote.extra_days)
    assert quote.new_period_end == expected_end
    assert quote.credit_applied_cents + quote.balance_after_cents == quote.credit_cents


@settings(max_examples=300, deadline=None)
@given(change=cycle_changes(MONTHLY))
def test_monthly_to_annual_pays_exactly_the_annual_price(change: dict[str, object]) -> None:
    quote = quote_cycle_change(**change)  # type: ignore[arg-type]
    annual = quote.new_price_cents
    assert quote.amount_due_cents + quote.credit_cents - quote.balance_after_cents == annual
    assert quote.amount_due_cents == max(0, annual - quote.credit_cents)
    assert quote.balance_after_cents == max(0, quote.credit_cents - annual)
    assert quote.new_period_end == add_cycle(quote.on, ANNUAL, 1)
