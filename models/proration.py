"""Cycle-change proration: the customer never loses money already paid.

Notation (DESIGN §1): D the change date, [S, T) the current paid period, P what was paid for it,
B the existing credit balance, M the monthly price.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import date, timedelta
from typing import Any

from models.calendar import ANNUAL, MONTHLY, add_cycle, validate_cycle
from models.money import round_half_even


def _require_non_negative(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < 0:
            raise ValueError(f"{name} must not be negative, got {value}")


def unused_credit(paid_cents: int, period_start: date, period_end: date, on: date) -> int:
    """The part of `paid_cents` for [S, T) not yet used on `on`: round_half_even(P × (T − D) / (T − S)).

    Clamped so a change before the period started returns everything and one at or after its end nothing.
    """
    _require_non_negative(paid_cents=paid_cents)
    period_days = (period_end - period_start).days
    if period_days <= 0:
        raise ValueError(f"empty period [{period_start}, {period_end})")
    if on <= period_start:
        return paid_cents
    if on >= period_end:
        return 0
    return round_half_even(paid_cents * (period_end - on).days, period_days)


@dataclass(frozen=True, slots=True)
class Quote:
    """Everything a notification, the console or a change-request result shows about a cycle change.

    `months`, `extra_days`, `month_length_days` and `days_value_cents` only apply to annual → monthly
    when the credit buys time, and are None otherwise. The new period's invoice is `invoice_price_cents`
    less `credit_applied_cents`, i.e. `amount_due_cents` now: the annual price less the credit; the time
    the credit bought, fully paid by it; or, when the credit does not buy even one day
    (`first_period_charged_now`), a first monthly period `[D, D + 1 month)` charged now less all the credit.
    """

    from_cycle: str
    to_cycle: str
    on: date
    period_start: date
    period_end: date
    paid_cents: int
    unused_cents: int
    balance_cents: int
    credit_cents: int
    new_price_cents: int
    credit_applied_cents: int
    amount_due_cents: int
    new_period_start: date
    new_period_end: date
    balance_after_cents: int
    invoice_price_cents: int
    first_period_charged_now: bool = False
    months: int | None = None
    extra_days: int | None = None
    month_length_days: int | None = None
    days_value_cents: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly: dates as ISO strings, money as integer cents."""
        return {key: value.isoformat() if isinstance(value, date) else value for key, value in asdict(self).items()}


def quote_cycle_change(
    *,
    from_cycle: str,
    to_cycle: str,
    period_start: date,
    period_end: date,
    paid_cents: int,
    balance_cents: int,
    on: date,
    monthly_price_cents: int,
    annual_price_cents: int,
) -> Quote:
    """Price a change of billing cycle on `on`. Rejections the user sees live in models.policy."""
    validate_cycle(from_cycle)
    validate_cycle(to_cycle)
    if from_cycle == to_cycle:
        raise ValueError(f"a cycle change needs two different cycles, got {from_cycle!r} twice")
    _require_non_negative(
        paid_cents=paid_cents,
        balance_cents=balance_cents,
        monthly_price_cents=monthly_price_cents,
        annual_price_cents=annual_price_cents,
    )
    if monthly_price_cents == 0 or annual_price_cents == 0:
        raise ValueError("plan prices must be positive")

    unused = unused_credit(paid_cents, period_start, period_end, on)
    credit = unused + balance_cents
    common = {
        "from_cycle": from_cycle,
        "to_cycle": to_cycle,
        "on": on,
        "period_start": period_start,
        "period_end": period_end,
        "paid_cents": paid_cents,
        "unused_cents": unused,
        "balance_cents": balance_cents,
        "credit_cents": credit,
        "new_period_start": on,
    }

    if to_cycle == ANNUAL:
        # The credit is a discount on the first annual payment; what it does not cover is due now,
        # what exceeds the price stays as balance for the next invoice.
        applied = min(credit, annual_price_cents)
        return Quote(
            **common,
            new_price_cents=annual_price_cents,
            credit_applied_cents=applied,
            amount_due_cents=annual_price_cents - applied,
            new_period_end=add_cycle(on, ANNUAL, 1),
            balance_after_cents=credit - applied,
            invoice_price_cents=annual_price_cents,
        )

    # Annual → monthly. The credit buys time: k whole months, then r whole days of the month that
    # follows them, priced at M / L a day. The cents that cannot buy a whole day stay as balance.
    months, remainder = divmod(credit, monthly_price_cents)
    months_end = add_cycle(on, MONTHLY, months)
    month_length = (add_cycle(on, MONTHLY, months + 1) - months_end).days
    extra_days = remainder * month_length // monthly_price_cents
    days_value = extra_days * monthly_price_cents // month_length
    balance_after = remainder - days_value
    if months == 0 and extra_days == 0:
        # Less credit than a day of the monthly plan: the renewal date would be today, so the first
        # monthly period starts now and is charged now, less all the credit.
        return Quote(
            **common,
            new_price_cents=monthly_price_cents,
            credit_applied_cents=credit,
            amount_due_cents=monthly_price_cents - credit,
            new_period_end=add_cycle(on, MONTHLY, 1),
            balance_after_cents=0,
            invoice_price_cents=monthly_price_cents,
            first_period_charged_now=True,
        )
    return Quote(
        **common,
        new_price_cents=monthly_price_cents,
        credit_applied_cents=credit - balance_after,
        amount_due_cents=0,
        new_period_end=months_end + timedelta(days=extra_days),
        balance_after_cents=balance_after,
        # The time bought is an invoice fully paid by the credit, so a later change prorates it.
        invoice_price_cents=credit - balance_after,
        months=months,
        extra_days=extra_days,
        month_length_days=month_length,
        days_value_cents=days_value,
    )
