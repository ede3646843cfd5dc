from __future__ import annotations

from datetime import date, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.boleto import (
    FIRST_ENCODABLE_DUE_DATE,
    MAX_AMOUNT_CENTS,
    REASON_CURRENCY,
    REASON_DUE_FACTOR,
    REASON_FIELD_CHECK_DIGIT,
    REASON_GENERAL_CHECK_DIGIT,
    REASON_LENGTH,
    REASON_NON_DIGIT,
    BoletoFields,
    InvalidBoletoLine,
    barcode_from_digitable_line,
    digitable_line,
    due_factor,
    due_from_factor,
    free_field_for,
    general_check_digit,
    is_valid_nosso_numero,
    make_barcode,
    mod10_check_digit,
    nosso_numero,
    parse_barcode,
    parse_digitable_line,
)

# Public Itaú example (due 2009-10-19, R$ 29,80).
ITAU_BARCODE = "34199439500000029801090000015710293013280000"
ITAU_LINE = "34191.09008 00015.710296 30132.800001 9 43950000002980"
ITAU_FREE_FIELD = "1090000015710293013280000"
ITAU_DUE = date(2009, 10, 19)


def _digits(line: str) -> str:
    return line.replace(".", "").replace(" ", "")


def _replace_digit(digits: str, index: int, new_digit: str) -> str:
    return digits[:index] + new_digit + digits[index + 1 :]


def _other_digit(digit: str) -> str:
    return str((int(digit) + 1) % 10)


# --- the public vector ----------------------------------------------------------------------------


def test_itau_vector_barcode() -> None:
    assert make_barcode("341", 2980, ITAU_DUE, ITAU_FREE_FIELD) == ITAU_BARCODE


def test_itau_vector_digitable_line() -> None:
    assert digitable_line(ITAU_BARCODE) == ITAU_LINE


def test_itau_vector_parses_formatted_and_digits_only() -> None:
    expected = BoletoFields(bank="341", amount_cents=2980, due=ITAU_DUE, free_field=ITAU_FREE_FIELD)
    assert parse_digitable_line(ITAU_LINE, reference=date(2009, 10, 1)) == expected
    assert parse_digitable_line(_digits(ITAU_LINE), reference=date(2009, 10, 1)) == expected
    bank, amount_cents, due, free_field = parse_digitable_line(ITAU_LINE, reference=ITAU_DUE)
    assert (bank, amount_cents, due, free_field) == ("341", 2980, ITAU_DUE, ITAU_FREE_FIELD)


def test_itau_vector_barcode_from_line_and_parse_barcode() -> None:
    assert barcode_from_digitable_line(ITAU_LINE) == ITAU_BARCODE
    assert parse_barcode(ITAU_BARCODE, reference=ITAU_DUE) == ("341", 2980, ITAU_DUE, ITAU_FREE_FIELD)


def test_itau_vector_check_digits_by_hand() -> None:
    # Field 1 payload 341910900, weights 2,1,2,… from the right:
    # 0·2=0, 0·1=0, 9·2=18→1+8=9, 0·1=0, 1·2=2, 9·1=9, 1·2=2, 4·1=4, 3·2=6 → 32; (10 − 2) % 10 = 8.
    assert mod10_check_digit("341910900") == "8"
    # Field 3 payload 3013280000: 0,0,0,0·…; 8·2=16→7, 2·1=2, 3·2=6, 1·1=1, 0·2=0, 3·1=3 → 19; 10 − 9 = 1.
    assert mod10_check_digit("3013280000") == "1"
    assert general_check_digit(ITAU_BARCODE[:4] + ITAU_BARCODE[5:]) == "9"


# --- due-date factor ------------------------------------------------------------------------------


def test_due_factor_rollover_2025() -> None:
    assert due_factor(date(2025, 2, 21)) == 9999
    assert due_factor(date(2025, 2, 22)) == 1000
    assert due_factor(date(2025, 2, 23)) == 1001
    assert due_factor(date(2000, 7, 3)) == 1000
    assert due_factor(ITAU_DUE) == 4395


def test_due_factor_refuses_dates_before_factor_1000() -> None:
    assert due_factor(FIRST_ENCODABLE_DUE_DATE) == 1000
    assert date(2000, 7, 3) == FIRST_ENCODABLE_DUE_DATE
    with pytest.raises(ValueError):
        due_factor(date(2000, 7, 2))


@pytest.mark.parametrize(
    ("factor", "reference", "expected"),
    [
        (9999, date(2025, 2, 22), date(2025, 2, 21)),
        (9999, date(2025, 3, 10), date(2025, 2, 21)),  # not 2049: the nearest occurrence wins
        (1000, date(2025, 2, 21), date(2025, 2, 22)),
        (1000, date(2025, 1, 1), date(2025, 2, 22)),
        (1000, date(2000, 6, 1), date(2000, 7, 3)),
        (1005, date(2025, 2, 10), date(2025, 2, 27)),
        (9990, date(2025, 2, 27), date(2025, 2, 12)),
        (4395, date(2009, 10, 1), date(2009, 10, 19)),
        (4395, date(2034, 1, 1), date(2034, 6, 10)),  # the same factor 9000 days later
    ],
)
def test_due_from_factor_picks_date_nearest_reference(factor: int, reference: date, expected: date) -> None:
    assert due_from_factor(factor, reference) == expected


@pytest.mark.parametrize("factor", [0, 999, 10000, -1])
def test_due_from_factor_rejects_out_of_range(factor: int) -> None:
    with pytest.raises(ValueError):
        due_from_factor(factor, date(2025, 1, 1))


@settings(max_examples=300, deadline=None)
@given(
    due=st.dates(min_value=date(2000, 7, 3), max_value=date(2090, 12, 31)),
    offset_days=st.integers(min_value=-4499, max_value=4499),
)
def test_due_from_factor_inverts_due_factor_within_half_a_cycle(due: date, offset_days: int) -> None:
    assert due_from_factor(due_factor(due), due + timedelta(days=offset_days)) == due


# --- building ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bank", "amount_cents", "free_field", "error"),
    [
        ("341", -1, ITAU_FREE_FIELD, ValueError),
        ("341", MAX_AMOUNT_CENTS + 1, ITAU_FREE_FIELD, ValueError),
        ("341", 29.8, ITAU_FREE_FIELD, TypeError),
        ("341", True, ITAU_FREE_FIELD, TypeError),
        ("34", 2980, ITAU_FREE_FIELD, ValueError),
        ("34a", 2980, ITAU_FREE_FIELD, ValueError),
        ("341", 2980, ITAU_FREE_FIELD[:-1], ValueError),
        ("341", 2980, ITAU_FREE_FIELD[:-1] + "x", ValueError),
    ],
)
def test_make_barcode_rejects_bad_input(bank: str, amount_cents: int, free_field: str, error: type) -> None:
    with pytest.raises(error):
        make_barcode(bank, amount_cents, ITAU_DUE, free_field)


def test_make_barcode_accepts_extreme_amounts() -> None:
    assert make_barcode("001", 0, ITAU_DUE, "0" * 25)[9:19] == "0000000000"
    assert make_barcode("001", MAX_AMOUNT_CENTS, ITAU_DUE, "0" * 25)[9:19] == "9999999999"


def test_general_check_digit_maps_0_10_11_to_1() -> None:
    # Vary the last two digits so every residue occurs, including those whose raw result
    # 11 − (sum % 11) would be 11 (residue 0) or 10 (residue 1).
    seen_residues = set()
    for last_two in range(100):
        body = "0019" + "1000" + "0000000000" + "0" * 23 + f"{last_two:02d}"
        residue = sum(int(c) * (2 + i % 8) for i, c in enumerate(reversed(body))) % 11
        seen_residues.add(residue)
        digit = general_check_digit(body)
        assert digit == ("1" if residue in (0, 1) else str(11 - residue))
        assert digit != "0"
    assert seen_residues == set(range(11))


# --- nosso número and free field ----------------------------------------------------------------------


def test_nosso_numero_check_digit_by_hand() -> None:
    # 0000000042: 2·2 + 4·3 = 16; 16 % 11 = 5; 11 − 5 = 6.
    assert nosso_numero(42) == "00000000426"
    # All zeros: sum 0 → 11 − 0 = 11 → 0.
    assert nosso_numero(0) == "00000000000"
    # 6: 6·2 = 12; 12 % 11 = 1; 11 − 1 = 10 → 0.
    assert nosso_numero(6, width=1) == "60"
    # 123: 3·2 + 2·3 + 1·4 = 16 → 6.
    assert nosso_numero(123, width=3) == "1236"


def test_nosso_numero_validation() -> None:
    assert is_valid_nosso_numero("00000000426")
    assert not is_valid_nosso_numero("00000000425")
    assert not is_valid_nosso_numero("4")
    assert not is_valid_nosso_numero("0000000042x")
    with pytest.raises(ValueError):
        nosso_numero(-1)
    with pytest.raises(ValueError):
        nosso_numero(10**10)
    with pytest.raises(TypeError):
        nosso_numero(True)


def test_free_field_for_layout() -> None:
    assert free_field_for("00000000426") == "0001" + "1234567" + "00000000000426"
    assert free_field_for("426", agency="12", account="9") == "0012" + "0000009" + "00000000000426"
    assert len(free_field_for(nosso_numero(9_999_999_999))) == 25
    for bad in ({"nosso_numero": ""}, {"nosso_numero": "1" * 15}, {"nosso_numero": "12a"}):
        with pytest.raises(ValueError):
            free_field_for(**bad)
    with pytest.raises(ValueError):
        free_field_for("426", agency="12345")
    with pytest.raises(ValueError):
        free_field_for("426", account="12345678")


def test_sandbox_boleto_round_trip() -> None:
    free_field = free_field_for(nosso_numero(1234))
    barcode = make_barcode("999", 123456, date(2026, 3, 15), free_field)
    line = digitable_line(barcode)
    assert parse_digitable_line(line, reference=date(2026, 3, 8)) == (
        "999",
        123456,
        date(2026, 3, 15),
        free_field,
    )


# --- round trips ---------------------------------------------------------------------------------------

digit_strings = st.text(alphabet="0123456789", min_size=25, max_size=25)
banks = st.text(alphabet="0123456789", min_size=3, max_size=3)
amounts = st.integers(min_value=0, max_value=MAX_AMOUNT_CENTS)
dues = st.dates(min_value=date(2000, 7, 3), max_value=date(2060, 12, 31))


@settings(max_examples=300, deadline=None)
@given(bank=banks, amount_cents=amounts, due=dues, free_field=digit_strings)
def test_round_trip_barcode_and_line(bank: str, amount_cents: int, due: date, free_field: str) -> None:
    barcode = make_barcode(bank, amount_cents, due, free_field)
    assert len(barcode) == 44 and barcode.isdigit()
    line = digitable_line(barcode)
    assert len(line) == 54 and len(_digits(line)) == 47
    assert barcode_from_digitable_line(line) == barcode
    assert barcode_from_digitable_line(_digits(line)) == barcode
    assert parse_digitable_line(line, reference=due) == (bank, amount_cents, due, free_field)
    assert parse_barcode(barcode, reference=due) == (bank, amount_cents, due, free_field)


@settings(max_examples=200, deadline=None)
@given(
    bank=banks,
    amount_cents=amounts,
    due=dues,
    free_field=digit_strings,
    position=st.integers(min_value=0, max_value=31),
    delta=st.integers(min_value=1, max_value=9),
)
def test_any_single_digit_error_in_fields_1_to_3_is_caught(
    bank: str, amount_cents: int, due: date, free_field: str, position: int, delta: int
) -> None:
    digits = _digits(digitable_line(make_barcode(bank, amount_cents, due, free_field)))
    corrupted = _replace_digit(digits, position, str((int(digits[position]) + delta) % 10))
    with pytest.raises(InvalidBoletoLine) as caught:
        barcode_from_digitable_line(corrupted)
    assert caught.value.reason == REASON_FIELD_CHECK_DIGIT
    assert caught.value.field == (1 if position < 10 else 2 if position < 21 else 3)


# --- invalid lines, each with its reason -------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "reason", "fragment"),
    [
        (_digits(ITAU_LINE)[:-1], REASON_LENGTH, "47 dígitos, foram informados 46"),
        (_digits(ITAU_LINE) + "0", REASON_LENGTH, "47 dígitos, foram informados 48"),
        ("", REASON_LENGTH, "foram informados 0"),
        (ITAU_LINE.replace("34191", "3419X", 1), REASON_NON_DIGIT, "caractere inválido 'X' na posição 5"),
        (ITAU_LINE.replace("-", "") + "-", REASON_NON_DIGIT, "caractere inválido '-'"),
    ],
)
def test_malformed_lines_are_rejected_with_reason(line: str, reason: str, fragment: str) -> None:
    with pytest.raises(InvalidBoletoLine) as caught:
        parse_digitable_line(line, reference=ITAU_DUE)
    assert caught.value.reason == reason
    assert fragment in str(caught.value)
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize(
    ("check_digit_index", "field", "message"),
    [
        (9, 1, "campo 1: dígito verificador 8 esperado, 9 informado"),
        (20, 2, "campo 2: dígito verificador 6 esperado, 7 informado"),
        (31, 3, "campo 3: dígito verificador 1 esperado, 2 informado"),
    ],
)
def test_wrong_field_check_digit_is_named(check_digit_index: int, field: int, message: str) -> None:
    digits = _digits(ITAU_LINE)
    corrupted = _replace_digit(digits, check_digit_index, _other_digit(digits[check_digit_index]))
    with pytest.raises(InvalidBoletoLine) as caught:
        parse_digitable_line(corrupted, reference=ITAU_DUE)
    assert caught.value.reason == REASON_FIELD_CHECK_DIGIT
    assert caught.value.field == field
    assert str(caught.value) == message


def test_wrong_general_check_digit_is_named() -> None:
    corrupted = ITAU_LINE.replace(" 9 ", " 8 ")
    with pytest.raises(InvalidBoletoLine) as caught:
        parse_digitable_line(corrupted, reference=ITAU_DUE)
    assert caught.value.reason == REASON_GENERAL_CHECK_DIGIT
    assert caught.value.field == 4
    assert "dígito verificador geral" in str(caught.value)
    assert "9 esperado, 8 informado" in str(caught.value)


def test_wrong_amount_is_caught_by_general_check_digit() -> None:
    # Field 5 has no check digit of its own: a typo there is caught by the general digit.
    corrupted = ITAU_LINE.replace("43950000002980", "43950000002990")
    with pytest.raises(InvalidBoletoLine) as caught:
        parse_digitable_line(corrupted, reference=ITAU_DUE)
    assert caught.value.reason == REASON_GENERAL_CHECK_DIGIT


def _line_from_parts(bank_and_currency: str, factor: str, amount: str, free_field: str) -> str:
    """A linha with consistent check digits around arbitrary content, to reach the content checks."""
    body = bank_and_currency + factor + amount + free_field
    barcode = body[:4] + general_check_digit(body) + body[4:]
    field1 = barcode[0:4] + barcode[19:24]
    field2, field3 = barcode[24:34], barcode[34:44]
    return (
        field1
        + mod10_check_digit(field1)
        + field2
        + mod10_check_digit(field2)
        + field3
        + mod10_check_digit(field3)
        + barcode[4]
        + barcode[5:19]
    )


def test_foreign_currency_is_rejected() -> None:
    line = _line_from_parts("3410", "4395", "0000002980", ITAU_FREE_FIELD)
    with pytest.raises(InvalidBoletoLine) as caught:
        parse_digitable_line(line, reference=ITAU_DUE)
    assert caught.value.reason == REASON_CURRENCY


def test_boleto_without_due_date_is_rejected() -> None:
    line = _line_from_parts("3419", "0000", "0000002980", ITAU_FREE_FIELD)
    with pytest.raises(InvalidBoletoLine) as caught:
        parse_digitable_line(line, reference=ITAU_DUE)
    assert caught.value.reason == REASON_DUE_FACTOR


@pytest.mark.parametrize(
    ("barcode", "reason"),
    [
        (ITAU_BARCODE[:-1], REASON_LENGTH),
        (ITAU_BARCODE + "1", REASON_LENGTH),
        (ITAU_BARCODE[:10] + "a" + ITAU_BARCODE[11:], REASON_NON_DIGIT),
        (ITAU_BARCODE[:4] + "8" + ITAU_BARCODE[5:], REASON_GENERAL_CHECK_DIGIT),
        (ITAU_BARCODE[:20] + "7" + ITAU_BARCODE[21:], REASON_GENERAL_CHECK_DIGIT),
    ],
)
def test_invalid_barcodes_are_rejected(barcode: str, reason: str) -> None:
    with pytest.raises(InvalidBoletoLine) as caught:
        parse_barcode(barcode, reference=ITAU_DUE)
    assert caught.value.reason == reason
    with pytest.raises(InvalidBoletoLine):
        digitable_line(barcode)


@pytest.mark.parametrize(("bank", "printed"), [("001", "9"), ("341", "7"), ("237", "2"), ("033", "7"), ("104", "0")])
def test_a_banks_code_has_its_printed_check_digit(bank, printed):
    from models.boleto import bank_code_check_digit

    assert bank_code_check_digit(bank) == printed
