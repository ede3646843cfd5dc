from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.money import cents_to_decimal, format_brl, prorate, round_half_even

NBSP = "\u00a0"


@pytest.mark.parametrize(
    ("numerator", "denominator", "expected"),
    [
        (0, 7, 0),
        (10, 4, 2),  # 2.5 → 2 (even)
        (14, 4, 4),  # 3.5 → 4 (even)
        (11, 4, 3),  # 2.75 → 3
        (9, 4, 2),  # 2.25 → 2
        (-10, 4, -2),  # −2.5 → −2
        (-14, 4, -4),  # −3.5 → −4
        (-11, 4, -3),
        (10, -4, -2),
        (-10, -4, 2),
        (1, 3, 0),
        (2, 3, 1),
        (10**30 + 1, 2, 5 * 10**29),  # exact beyond float precision: …0.5 → even
        (10**30 + 3, 2, 5 * 10**29 + 2),
    ],
)
def test_round_half_even_examples(numerator: int, denominator: int, expected: int) -> None:
    assert round_half_even(numerator, denominator) == expected


@settings(max_examples=500, deadline=None)
@given(
    numerator=st.integers(min_value=-(10**15), max_value=10**15),
    denominator=st.integers(min_value=-(10**6), max_value=10**6).filter(lambda value: value != 0),
)
def test_round_half_even_matches_decimal(numerator: int, denominator: int) -> None:
    exact = Decimal(numerator) / Decimal(denominator)
    expected = round(Fraction(numerator, denominator))  # Fraction rounds half to even
    assert round_half_even(numerator, denominator) == expected
    assert expected == int(exact.quantize(Decimal(1), rounding=ROUND_HALF_EVEN))


def test_round_half_even_rejects_zero_and_non_int() -> None:
    with pytest.raises(ZeroDivisionError):
        round_half_even(1, 0)
    with pytest.raises(TypeError):
        round_half_even(1.5, 2)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        round_half_even(True, 2)


@pytest.mark.parametrize(
    ("amount", "part", "whole", "expected"),
    [
        (30000, 15, 30, 15000),
        (29990, 16, 31, 15479),  # 29990 × 16 / 31 = 15478.709… → 15479
        (100, 1, 8, 12),  # 12.5 → 12
        (100, 3, 8, 38),  # 37.5 → 38
        (0, 5, 10, 0),
        (12345, 0, 10, 0),
        (12345, 10, 10, 12345),
    ],
)
def test_prorate_examples(amount: int, part: int, whole: int, expected: int) -> None:
    assert prorate(amount, part, whole) == expected


def test_prorate_rejects_empty_whole() -> None:
    with pytest.raises(ValueError):
        prorate(100, 1, 0)
    with pytest.raises(ValueError):
        prorate(100, 1, -3)


@pytest.mark.parametrize(
    ("cents", "expected"),
    [
        (0, f"R${NBSP}0,00"),
        (5, f"R${NBSP}0,05"),
        (2980, f"R${NBSP}29,80"),
        (123456, f"R${NBSP}1.234,56"),
        (100000000, f"R${NBSP}1.000.000,00"),
        (-123456, f"-R${NBSP}1.234,56"),
        (-1, f"-R${NBSP}0,01"),
    ],
)
def test_format_brl(cents: int, expected: str) -> None:
    assert format_brl(cents) == expected


def test_format_brl_rejects_non_int() -> None:
    with pytest.raises(TypeError):
        format_brl(12.5)  # type: ignore[arg-type]


def test_cents_to_decimal_is_exact() -> None:
    assert cents_to_decimal(123456) == Decimal("1234.56")
    assert cents_to_decimal(-1) == Decimal("-0.01")
