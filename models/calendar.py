"""Billing dates: cycle arithmetic, the Brazilian bank calendar and the billing time zone.

Business dates are local dates in the billing time zone; every function here takes and returns plain
`datetime.date`/`datetime.datetime` and uses pendulum only inside.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from functools import lru_cache
from typing import Final

import holidays
import pendulum
from dateutil.easter import easter

from models.states import Cycle

# The billing cycles are models.states.Cycle; these names are kept for the callers that import them.
MONTHLY: Final = Cycle.MONTHLY
ANNUAL: Final = Cycle.ANNUAL
CYCLES: Final[tuple[Cycle, ...]] = tuple(Cycle)
_MONTHS_PER_CYCLE: Final[dict[str, int]] = {Cycle.MONTHLY: 1, Cycle.ANNUAL: 12}

BILLING_TIMEZONE_DEFAULT: Final = "America/Sao_Paulo"

# ANBIMA's calendar closes banks on these days of the `holidays` optional category (offsets from
# Easter Sunday). The category's other days (Ash Wednesday, Public Servant's Day, Dec 24 and 31)
# are bank business days, so they are picked by date rather than by taking the whole category.
_CARNIVAL_MONDAY_OFFSET: Final = -48
_CARNIVAL_TUESDAY_OFFSET: Final = -47
_CORPUS_CHRISTI_OFFSET: Final = 60
_BANK_OPTIONAL_EASTER_OFFSETS: Final = (
    _CARNIVAL_MONDAY_OFFSET,
    _CARNIVAL_TUESDAY_OFFSET,
    _CORPUS_CHRISTI_OFFSET,
)
# Law 14.759/2023 made Nov 20 (Consciência Negra) a national holiday from 2024 on.
_BLACK_AWARENESS_FIRST_YEAR: Final = 2024
_SATURDAY: Final = 5


def validate_cycle(cycle: str) -> Cycle:
    """The Cycle named by `cycle` (equal to it) when it is a known billing cycle, else ValueError."""
    if cycle not in _MONTHS_PER_CYCLE:
        raise ValueError(f"unknown billing cycle {cycle!r}; expected one of {', '.join(CYCLES)}")
    return Cycle(cycle)


def _plain(d: date) -> date:
    # A datetime is a date subclass; accepting one would carry a time of day into date arithmetic.
    if isinstance(d, datetime):
        raise TypeError("expected a date, got a datetime")
    return date(d.year, d.month, d.day)


# --- cycles ------------------------------------------------------------------------------------


def add_cycle(anchor: date, cycle: str, n: int) -> date:
    """Renewal `n` of a subscription anchored on `anchor` (n may be negative for past periods).

    Months are always counted from the anchor, never from the previous renewal, and the day is
    clamped to the month's length: anchor Jan 31 gives Feb 28/29, Mar 31, Apr 30… without drifting.
    """
    months = _MONTHS_PER_CYCLE[validate_cycle(cycle)]
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError("n must be an int")
    anchor = _plain(anchor)
    if n == 0:
        return anchor
    shifted = pendulum.date(anchor.year, anchor.month, anchor.day).add(months=months * n)
    return date(shifted.year, shifted.month, shifted.day)


def renewal_date(anchor: date, cycle: str, n: int) -> date:
    """Same as add_cycle; reads better where the result is the n-th renewal date."""
    return add_cycle(anchor, cycle, n)


def period_containing(anchor: date, cycle: str, on: date) -> tuple[date, date]:
    """The billing period [start, end) of an anchored schedule that contains `on`."""
    months = _MONTHS_PER_CYCLE[validate_cycle(cycle)]
    anchor, on = _plain(anchor), _plain(on)
    # Start from the month distance (off by at most one because of clamping), then settle.
    n = ((on.year - anchor.year) * 12 + on.month - anchor.month) // months
    while add_cycle(anchor, cycle, n) > on:
        n -= 1
    while add_cycle(anchor, cycle, n + 1) <= on:
        n += 1
    return add_cycle(anchor, cycle, n), add_cycle(anchor, cycle, n + 1)


# --- bank calendar -----------------------------------------------------------------------------


@lru_cache(maxsize=256)
def _bank_holidays_of_year(year: int) -> dict[date, str]:
    public = holidays.country_holidays("BR", years=year, categories=(holidays.PUBLIC,), language="pt_BR")
    optional = holidays.country_holidays("BR", years=year, categories=(holidays.OPTIONAL,), language="pt_BR")
    easter_sunday = easter(year)
    bank_days_off = {easter_sunday + timedelta(days=offset) for offset in _BANK_OPTIONAL_EASTER_OFFSETS}
    result: dict[date, str] = dict(public.items())
    result.update((day, name) for day, name in optional.items() if day in bank_days_off)
    black_awareness = date(year, 11, 20)
    if year >= _BLACK_AWARENESS_FIRST_YEAR and black_awareness not in result:
        result[black_awareness] = "Dia Nacional de Zumbi e da Consciência Negra"
    return dict(sorted(result.items()))


def bank_holidays(year: int) -> dict[date, str]:
    """Bank holidays of `year` (any weekday) with their pt-BR names, in date order."""
    return dict(_bank_holidays_of_year(year))


def is_bank_holiday(d: date) -> bool:
    d = _plain(d)
    return d in _bank_holidays_of_year(d.year)


def is_business_day(d: date) -> bool:
    """A weekday that is not a bank holiday."""
    d = _plain(d)
    return d.weekday() < _SATURDAY and d not in _bank_holidays_of_year(d.year)


def next_business_day(d: date) -> date:
    """`d` itself when it is a business day, else the first business day after it."""
    d = _plain(d)
    while not is_business_day(d):
        d += timedelta(days=1)
    return d


def previous_business_day(d: date) -> date:
    """`d` itself when it is a business day, else the last business day before it."""
    d = _plain(d)
    while not is_business_day(d):
        d -= timedelta(days=1)
    return d


def add_business_days(d: date, n: int) -> date:
    """The n-th business day after `d` (before it when n < 0); `d` is not counted; n = 0 returns `d`."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError("n must be an int")
    d = _plain(d)
    step = timedelta(days=1 if n > 0 else -1)
    remaining = abs(n)
    while remaining:
        d += step
        if is_business_day(d):
            remaining -= 1
    return d


def count_business_days(start: date, end: date) -> int:
    """Business days in [start, end)."""
    start, end = _plain(start), _plain(end)
    count = 0
    day = start
    while day < end:
        count += is_business_day(day)
        day += timedelta(days=1)
    return count


# --- time zone ---------------------------------------------------------------------------------


def _require_aware(now: datetime) -> None:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be timezone-aware; a naive datetime has no defined business date")


def local_today(now: datetime, tz: str = BILLING_TIMEZONE_DEFAULT) -> date:
    """The business date in `tz` at the instant `now`."""
    _require_aware(now)
    local = pendulum.instance(now).in_timezone(tz)
    return date(local.year, local.month, local.day)


def local_run_instant(d: date, run_at: time, tz: str = BILLING_TIMEZONE_DEFAULT) -> datetime:
    """The UTC instant at which the billing run for business date `d` is due (`run_at` local time in `tz`).

    A local time that does not exist (a daylight-saving gap) moves forward to the first instant that does.
    """
    if run_at.tzinfo is not None:
        raise ValueError("run_at is a local wall-clock time; it must not carry a time zone")
    d = _plain(d)
    local = pendulum.datetime(
        d.year, d.month, d.day, run_at.hour, run_at.minute, run_at.second, run_at.microsecond, tz=tz
    )
    utc = local.in_timezone("UTC")
    return datetime(utc.year, utc.month, utc.day, utc.hour, utc.minute, utc.second, utc.microsecond, tzinfo=UTC)


def latest_due_run_date(now: datetime, run_at: time, tz: str = BILLING_TIMEZONE_DEFAULT) -> date:
    """The latest business date whose run is due at `now`: today once `run_at` has passed, else yesterday."""
    today = local_today(now, tz)
    if now >= local_run_instant(today, run_at, tz):
        return today
    return today - timedelta(days=1)


def format_date_br(d: date) -> str:
    """`dd/mm/aaaa`, the way dates appear in pt-BR messages."""
    return f"{d.day:02d}/{d.month:02d}/{d.year:04d}"
