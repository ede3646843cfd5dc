"""The one source of "now" for every process, and the test clock (development and test only).

Like Stripe's test clocks: a row in `test_clock` freezes "now" at an instant for every process that
reads it (the scheduler's tick, change requests, gateway webhooks, refunds, `renova run-day`), so a
month can pass in a minute. Outside development and test (`BillingConfig.allow_future_dates` is
False) the row is ignored, the wall clock is used, and a row is an error at start
(`ensure_clock_allowed`). "now" is read once per message or request (one primary-key read).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from sqlalchemy import delete, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from jobs.context import BillingConfig
from models.schema import ClockSetting

CLOCK_ID = 1
# A date alone means that business date one minute after its billing run is due.
AFTER_RUN = timedelta(minutes=1)
_DURATION = re.compile(r"^\s*(\d+)\s*([mhdw])\s*$")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
# Billing adds cycles and lead days to "now": a clock near datetime's end (year 9999) could not.
LATEST_TEST_CLOCK = datetime(2200, 1, 1, tzinfo=UTC)


class ClockRefused(RuntimeError):
    """The test clock is used where it is not allowed (production)."""


class ClockInputError(ValueError):
    """An instant or a duration that cannot be read."""


@dataclass(frozen=True)
class ClockState:
    now: datetime
    updated_at: datetime


def wall_clock() -> datetime:
    return datetime.now(UTC)


def clock_state(session: Session) -> ClockState | None:
    """The test clock's row, or None when the real clock is in use (whatever the environment)."""
    row = session.execute(
        select(ClockSetting.now, ClockSetting.updated_at).where(ClockSetting.id == CLOCK_ID)
    ).one_or_none()
    if row is None:
        return None
    return ClockState(now=row.now.astimezone(UTC), updated_at=row.updated_at.astimezone(UTC))


def now(session: Session, config: BillingConfig) -> datetime:
    """The current instant (UTC-aware): the test clock's when it is set and the environment allows
    it (development, test), else the wall clock's."""
    if not config.allow_future_dates:
        return wall_clock()
    frozen = session.scalar(select(ClockSetting.now).where(ClockSetting.id == CLOCK_ID))
    return wall_clock() if frozen is None else frozen.astimezone(UTC)


def _require_allowed(config: BillingConfig) -> None:
    if not config.allow_future_dates:
        raise ClockRefused("the test clock is for development and test only: refused in production")


def ensure_clock_allowed(session: Session, config: BillingConfig) -> None:
    """At start: a set test clock in production is an error (it would be silently ignored)."""
    if config.allow_future_dates:
        return
    state = clock_state(session)
    if state is not None:
        raise ClockRefused(
            f"a test clock is set (now = {state.now.isoformat()}) but RENOVA_ENV is production, which "
            "always uses the real clock: remove it with `renova clock reset` before starting"
        )


def set_clock(session: Session, instant: datetime, config: BillingConfig) -> ClockState:
    """Freeze "now" at `instant` (aware). Does not commit."""
    _require_allowed(config)
    if instant.tzinfo is None:
        raise ClockInputError("the instant must carry a time zone")
    instant = instant.astimezone(UTC)
    if instant >= LATEST_TEST_CLOCK:
        raise ClockInputError(f"the test clock stays before {LATEST_TEST_CLOCK:%Y-%m-%d}: got {instant:%Y-%m-%d}")
    statement = insert(ClockSetting).values(id=CLOCK_ID, now=instant)
    session.execute(
        statement.on_conflict_do_update(
            index_elements=[ClockSetting.id], set_={"now": statement.excluded.now, "updated_at": wall_clock()}
        )
    )
    state = clock_state(session)
    assert state is not None
    return state


def advance_clock(session: Session, delta: timedelta, config: BillingConfig) -> ClockState:
    """Move the test clock forward by `delta` (from the wall clock when none is set). Does not commit."""
    _require_allowed(config)
    if delta <= timedelta(0):
        raise ClockInputError("the clock only moves forward: give a positive duration")
    current = session.scalar(select(ClockSetting.now).where(ClockSetting.id == CLOCK_ID).with_for_update())
    start = wall_clock() if current is None else current.astimezone(UTC)
    if delta >= LATEST_TEST_CLOCK - start:
        raise ClockInputError(f"the test clock stays before {LATEST_TEST_CLOCK:%Y-%m-%d}: {delta} more would pass it")
    return set_clock(session, start + delta, config)


def reset_clock(session: Session) -> bool:
    """Back to the real clock; True when a test clock was set. Does not commit."""
    return bool(session.execute(delete(ClockSetting).where(ClockSetting.id == CLOCK_ID)).rowcount)


def parse_instant(text: str, timezone: str, run_at: time) -> datetime:
    """`2027-11-22` (that business date, one minute after its run hour, local), `2027-11-22T09:30`
    (local time in `timezone`) or an ISO instant with an offset. Returns a UTC-aware datetime."""
    value = text.strip()
    zone = ZoneInfo(timezone)
    try:
        if len(value) == 10:
            day = date.fromisoformat(value)
            local = datetime.combine(day, run_at, tzinfo=zone) + AFTER_RUN
            return local.astimezone(UTC)
        parsed = datetime.fromisoformat(value)
    except (ValueError, OverflowError):
        raise ClockInputError(f"{text!r} is not a date YYYY-MM-DD or a date and time YYYY-MM-DDTHH:MM") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=zone)
    try:
        return parsed.astimezone(UTC)
    except OverflowError:  # the last hours of year 9999 in UTC
        raise ClockInputError(f"{text!r} is out of range") from None


def parse_duration(text: str) -> timedelta:
    """`30m`, `12h`, `1d`, `2w` (a positive whole number and a unit)."""
    match = _DURATION.match(text)
    if match is None or int(match.group(1)) == 0:
        raise ClockInputError(f"{text!r} is not a duration: use a positive number and m, h, d or w, e.g. 1d, 12h, 2w")
    try:
        return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    except OverflowError:
        raise ClockInputError(f"{text!r} is too long a duration") from None
