"""Dunning dates: when an unpaid invoice is past due, when its card is retried, when its
subscription is suspended (DESIGN "Renewals, boletos, dunning").

Pure functions of dates and settings; the flows that apply them (mark overdue, retry, suspend) live
in jobs/. Every "is this invoice past due?" question in Renova is answered by `is_past_due`.
"""

from __future__ import annotations

from datetime import date, timedelta

from models.calendar import add_business_days, next_business_day
from models.states import PaymentMethod

# --- boletos -----------------------------------------------------------------------------------


def payable_until(due_date: date) -> date:
    """The last day a boleto is paid on time: its due date, or the next business day when that is not one."""
    return next_business_day(due_date)


def overdue_on(due_date: date) -> date:
    """The day a still-unpaid boleto becomes overdue: the day after `payable_until`."""
    return payable_until(due_date) + timedelta(days=1)


def suspend_on(overdue_day: date, grace_business_days: int) -> date:
    """The day a subscription whose boleto became overdue on `overdue_day` is suspended if still unpaid."""
    return add_business_days(overdue_day, grace_business_days)


# --- card retries ------------------------------------------------------------------------------


def next_retry_date(renewal_date: date, attempt: int, on: date, retry_days: tuple[int, ...]) -> date | None:
    """When a renewal's failed `attempt` (1 = on the renewal date) is retried; None after the last.

    Retries are T+1, T+3, T+5, T+7 by default: attempt n+1 happens on T + retry_days[n-1], or on the
    next scheduled day still ahead when a run was caught up late.
    """
    remaining = retry_days[attempt - 1 :] if attempt - 1 < len(retry_days) else ()
    for days in remaining:
        candidate = renewal_date + timedelta(days=days)
        if candidate > on:
            return candidate
    return None


def last_retry_day(renewal_date: date, retry_days: tuple[int, ...]) -> date:
    """The day of a card renewal's last scheduled retry; still unpaid after it, the subscription is suspended."""
    return renewal_date + timedelta(days=retry_days[-1])


def latest_renewal_out_of_retries(on: date, retry_days: tuple[int, ...]) -> date:
    """The latest renewal date whose last retry day is on or before `on` (the inverse of `last_retry_day`,
    for scans that compare a due-date column): `last_retry_day(T) <= on` exactly when `T <= this`."""
    return on - timedelta(days=retry_days[-1])


# --- past due ----------------------------------------------------------------------------------


def is_past_due(*, method: str, due_date: date, on: date, charge_failed: bool) -> bool:
    """Whether an open invoice is past due on `on`.

    Boleto: once it can no longer be paid on time (`payable_until(due_date) < on`), whatever the charges.
    Card: the day after its due date, or on the due date itself once an attempt to charge it failed.
    """
    if method == PaymentMethod.BOLETO:
        return payable_until(due_date) < on
    if method == PaymentMethod.CARD:
        return due_date < on or (due_date == on and charge_failed)
    raise ValueError(f"unknown payment method {method!r}")
