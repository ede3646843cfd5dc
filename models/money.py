"""Money is integer cents of BRL everywhere; these helpers keep divisions exact and rounding explicit."""

from __future__ import annotations

from decimal import Decimal

from babel.numbers import format_currency

CURRENCY = "BRL"
LOCALE = "pt_BR"


def _require_int(value: int, name: str) -> None:
    # bool is an int subclass; a True slipping in as "1 cent" would be a silent bug.
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")


def round_half_even(numerator: int, denominator: int) -> int:
    """numerator / denominator rounded to the nearest integer, ties to even, with no float on the way."""
    _require_int(numerator, "numerator")
    _require_int(denominator, "denominator")
    if denominator == 0:
        raise ZeroDivisionError("denominator must not be zero")
    if denominator < 0:
        numerator, denominator = -numerator, -denominator
    quotient, remainder = divmod(numerator, denominator)  # floor division: 0 <= remainder < denominator
    twice_remainder = 2 * remainder
    if twice_remainder > denominator or (twice_remainder == denominator and quotient % 2 == 1):
        quotient += 1
    return quotient


def prorate(amount_cents: int, part: int, whole: int) -> int:
    """The share `part / whole` of `amount_cents`, rounded half to even."""
    _require_int(amount_cents, "amount_cents")
    _require_int(part, "part")
    _require_int(whole, "whole")
    if whole <= 0:
        raise ValueError(f"whole must be positive, got {whole}")
    return round_half_even(amount_cents * part, whole)


def cents_to_decimal(cents: int) -> Decimal:
    """Exact reais for display or export (never for arithmetic that is stored back)."""
    _require_int(cents, "cents")
    return Decimal(cents).scaleb(-2)


def format_brl(cents: int) -> str:
    """`R$ 1.234,56` as Babel writes it for pt_BR (non-breaking space after R$); negatives as `-R$ 1,00`."""
    return format_currency(cents_to_decimal(cents), CURRENCY, locale=LOCALE)
