"""FEBRABAN boleto codes: the 44-digit barcode and the 47-digit linha digitável.

Barcode layout (positions 1-based):
    1-3   bank code
    4     currency code ("9" = real)
    5     general check digit (mod 11 over the other 43 digits)
    6-9   due-date factor
    10-19 amount in cents
    20-44 free field (bank-specific, 25 digits)

Linha digitável: the same data regrouped for people to type, in five fields:
    field 1: bank + currency + free[0:5] + mod-10 digit      -> "AAAAA.AAAAA"
    field 2: free[5:15] + mod-10 digit                       -> "BBBBB.BBBBBB"
    field 3: free[15:25] + mod-10 digit                      -> "CCCCC.CCCCCC"
    field 4: the general check digit
    field 5: factor + amount                                 -> 14 digits

Error messages are in pt-BR because operations in Brazil read them next to the bank's own wording.
"""

from __future__ import annotations

from datetime import date, timedelta
from typing import NamedTuple

CURRENCY_REAL = "9"
BARCODE_LENGTH = 44
DIGITABLE_LINE_LENGTH = 47
FREE_FIELD_LENGTH = 25
MAX_AMOUNT_CENTS = 9_999_999_999  # the barcode holds the amount in 10 digits

FACTOR_BASE_DATE = date(1997, 10, 7)
MIN_FACTOR = 1000
MAX_FACTOR = 9999
# Factors cycle through 1000..9999; the first cycle started at factor 1000 on 2000-07-03 and the
# second at 1000 again on 2025-02-22. Dates before the first 1000 used factors below 1000, which
# this formula cannot express, so they are refused instead of silently mis-encoded.
FACTOR_CYCLE_DAYS = MAX_FACTOR - MIN_FACTOR + 1
FIRST_ENCODABLE_DUE_DATE = FACTOR_BASE_DATE + timedelta(days=MIN_FACTOR)

# Reasons carried by InvalidBoletoLine, so callers (API, console) can react without parsing text.
REASON_LENGTH = "length"
REASON_NON_DIGIT = "non_digit"
REASON_FIELD_CHECK_DIGIT = "field_check_digit"
REASON_GENERAL_CHECK_DIGIT = "general_check_digit"
REASON_CURRENCY = "currency"
REASON_DUE_FACTOR = "due_factor"

_LINE_SEPARATORS = str.maketrans("", "", " .\t\n\r\u00a0")


class InvalidBoletoLine(ValueError):
    """A barcode or linha digitável that is malformed or whose check digits do not match."""

    def __init__(self, message: str, *, reason: str, field: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.field = field


class BoletoFields(NamedTuple):
    """What a barcode carries; unpacks as (bank, amount_cents, due, free_field)."""

    bank: str
    amount_cents: int
    due: date
    free_field: str


# --- check digits -------------------------------------------------------------------------------


def mod10_check_digit(digits: str) -> str:
    """Check digit of a linha digitável field: weights 2,1,2,1… from the right, summing product digits."""
    _require_digits(digits, "campo")
    total = 0
    for position, char in enumerate(reversed(digits)):
        product = int(char) * (2 if position % 2 == 0 else 1)
        total += product // 10 + product % 10
    return str((10 - total % 10) % 10)


def _mod11_weighted_sum(digits: str) -> int:
    # Weights 2..9 restart from 2 after 9, counted from the rightmost digit.
    return sum(int(char) * (2 + position % 8) for position, char in enumerate(reversed(digits)))


def general_check_digit(barcode_without_check_digit: str) -> str:
    """The barcode's general digit over the 43 other digits; results 0, 10 and 11 become 1."""
    _require_digits(barcode_without_check_digit, "código de barras")
    if len(barcode_without_check_digit) != BARCODE_LENGTH - 1:
        received = len(barcode_without_check_digit)
        raise ValueError(f"o dígito geral é calculado sobre 43 dígitos, recebidos {received}")
    check = 11 - _mod11_weighted_sum(barcode_without_check_digit) % 11
    return "1" if check in (0, 10, 11) else str(check)


def bank_code_check_digit(bank: str) -> str:
    """The digit printed after a bank's code in a boleto's header (`001-9`): mod 11, weights 2..9 from
    the right; 10 and 11 become 0 (Caixa's 104-0)."""
    _require_digits(bank, "código do banco")
    check = 11 - _mod11_weighted_sum(bank) % 11
    return "0" if check in (10, 11) else str(check)


def nosso_numero_check_digit(digits: str) -> str:
    """Mod-11 digit (weights 2..9 from the right) of a nosso número; 10 and 11 become 0."""
    _require_digits(digits, "nosso número")
    check = 11 - _mod11_weighted_sum(digits) % 11
    return "0" if check >= 10 else str(check)


# --- due-date factor ----------------------------------------------------------------------------


def due_factor(d: date) -> int:
    """FEBRABAN due-date factor: days since 1997-10-07, restarting at 1000 after 9999 (2025-02-22)."""
    if d < FIRST_ENCODABLE_DUE_DATE:
        raise ValueError(f"vencimento {d:%d/%m/%Y} anterior a {FIRST_ENCODABLE_DUE_DATE:%d/%m/%Y} não é representável")
    return ((d - FACTOR_BASE_DATE).days - MIN_FACTOR) % FACTOR_CYCLE_DAYS + MIN_FACTOR


def due_from_factor(factor: int, reference: date) -> date:
    """The date with this factor nearest to `reference` (ties go to the later date).

    A factor repeats every 9000 days (~24.6 years), so the reference (today, or the issue date)
    decides which cycle is meant.
    """
    if not MIN_FACTOR <= factor <= MAX_FACTOR:
        raise ValueError(f"fator de vencimento {factor} fora do intervalo {MIN_FACTOR}..{MAX_FACTOR}")
    first = FIRST_ENCODABLE_DUE_DATE + timedelta(days=factor - MIN_FACTOR)
    cycles_before_reference = max(0, (reference - first).days // FACTOR_CYCLE_DAYS)
    candidates = [
        first + timedelta(days=FACTOR_CYCLE_DAYS * cycles)
        for cycles in (cycles_before_reference, cycles_before_reference + 1)
    ]
    return min(candidates, key=lambda candidate: (abs((candidate - reference).days), -candidate.toordinal()))


# --- building ------------------------------------------------------------------------------------


def make_barcode(bank: str, amount_cents: int, due: date, free_field: str) -> str:
    """The 44-digit barcode for a boleto in reais."""
    if len(bank) != 3 or not bank.isascii() or not bank.isdigit():
        raise ValueError(f"código do banco deve ter 3 dígitos, recebido {bank!r}")
    if len(free_field) != FREE_FIELD_LENGTH or not free_field.isascii() or not free_field.isdigit():
        raise ValueError(f"campo livre deve ter 25 dígitos, recebido {free_field!r}")
    _require_amount(amount_cents)
    body = f"{bank}{CURRENCY_REAL}{due_factor(due):04d}{amount_cents:010d}{free_field}"
    return body[:4] + general_check_digit(body) + body[4:]


def digitable_line(barcode: str) -> str:
    """The formatted linha digitável, e.g. "34191.09008 00015.710296 30132.800001 9 43950000002980"."""
    barcode = _validated_barcode(barcode)
    field1 = barcode[0:4] + barcode[19:24]
    field2 = barcode[24:34]
    field3 = barcode[34:44]
    field1 += mod10_check_digit(field1)
    field2 += mod10_check_digit(field2)
    field3 += mod10_check_digit(field3)
    return f"{field1[:5]}.{field1[5:]} {field2[:5]}.{field2[5:]} {field3[:5]}.{field3[5:]} {barcode[4]} {barcode[5:19]}"


def nosso_numero(sequence: int, width: int = 10) -> str:
    """Our number for a boleto: `sequence` zero-padded to `width` digits plus a mod-11 check digit."""
    if isinstance(sequence, bool) or not isinstance(sequence, int):
        raise TypeError("a sequência do nosso número deve ser um inteiro")
    if width < 1 or sequence < 0 or sequence >= 10**width:
        raise ValueError(f"sequência {sequence} não cabe em {width} dígitos")
    digits = f"{sequence:0{width}d}"
    return digits + nosso_numero_check_digit(digits)


def is_valid_nosso_numero(value: str) -> bool:
    """True when `value` is digits whose last one is the mod-11 check digit of the others."""
    if len(value) < 2 or not value.isascii() or not value.isdigit():
        return False
    return nosso_numero_check_digit(value[:-1]) == value[-1]


def free_field_for(nosso_numero: str, agency: str = "0001", account: str = "1234567") -> str:
    """25-digit free field of the sandbox bank: agency (4) + account (7) + nosso número (14, zero-padded)."""
    parts = (("agência", agency, 4), ("conta", account, 7), ("nosso número", nosso_numero, 14))
    for label, value, max_width in parts:
        if not value or not value.isascii() or not value.isdigit() or len(value) > max_width:
            raise ValueError(f"{label} deve ter de 1 a {max_width} dígitos, recebido {value!r}")
    return f"{agency:0>4}{account:0>7}{nosso_numero:0>14}"


# --- parsing -------------------------------------------------------------------------------------


def barcode_from_digitable_line(line: str) -> str:
    """The 44-digit barcode behind a linha digitável, after checking all of its digits."""
    digits = _clean(line, DIGITABLE_LINE_LENGTH, "linha digitável")
    fields = ((1, digits[0:9], digits[9]), (2, digits[10:20], digits[20]), (3, digits[21:31], digits[31]))
    for number, payload, informed in fields:
        expected = mod10_check_digit(payload)
        if informed != expected:
            raise InvalidBoletoLine(
                f"campo {number}: dígito verificador {expected} esperado, {informed} informado",
                reason=REASON_FIELD_CHECK_DIGIT,
                field=number,
            )
    barcode = digits[0:4] + digits[32] + digits[33:47] + digits[4:9] + digits[10:20] + digits[21:31]
    _check_barcode_content(barcode, general_label="dígito verificador geral (campo 4)")
    return barcode


def parse_digitable_line(line: str, reference: date) -> BoletoFields:
    """Decode a linha digitável (formatted or digits only); the due date is the one nearest `reference`."""
    return _fields(barcode_from_digitable_line(line), reference)


def parse_barcode(barcode: str, reference: date) -> BoletoFields:
    """Decode a 44-digit barcode; the due date is the one nearest `reference`."""
    return _fields(_validated_barcode(barcode), reference)


def _fields(barcode: str, reference: date) -> BoletoFields:
    return BoletoFields(
        bank=barcode[0:3],
        amount_cents=int(barcode[9:19]),
        due=due_from_factor(int(barcode[5:9]), reference),
        free_field=barcode[19:44],
    )


def _validated_barcode(barcode: str) -> str:
    digits = _clean(barcode, BARCODE_LENGTH, "código de barras")
    _check_barcode_content(digits, general_label="código de barras: dígito verificador geral")
    return digits


def _check_barcode_content(barcode: str, *, general_label: str) -> None:
    expected = general_check_digit(barcode[:4] + barcode[5:])
    if barcode[4] != expected:
        raise InvalidBoletoLine(
            f"{general_label}: {expected} esperado, {barcode[4]} informado",
            reason=REASON_GENERAL_CHECK_DIGIT,
            field=4,
        )
    if barcode[3] != CURRENCY_REAL:
        raise InvalidBoletoLine(
            f"código de moeda {barcode[3]} não suportado (somente {CURRENCY_REAL} = real)",
            reason=REASON_CURRENCY,
        )
    factor = int(barcode[5:9])
    if factor < MIN_FACTOR:
        # Factor 0000 marks a boleto without a due date; Renova never issues nor accepts those.
        raise InvalidBoletoLine(
            f"fator de vencimento {barcode[5:9]} inválido (boleto sem vencimento não é aceito)",
            reason=REASON_DUE_FACTOR,
        )


def _clean(text: str, expected_length: int, label: str) -> str:
    digits = text.strip().translate(_LINE_SEPARATORS)
    for index, char in enumerate(digits, start=1):
        if not ("0" <= char <= "9"):
            raise InvalidBoletoLine(
                f"{label}: caractere inválido {char!r} na posição {index}; use apenas dígitos",
                reason=REASON_NON_DIGIT,
            )
    if len(digits) != expected_length:
        raise InvalidBoletoLine(
            f"{label} deve ter {expected_length} dígitos, foram informados {len(digits)}",
            reason=REASON_LENGTH,
        )
    return digits


def _require_digits(digits: str, label: str) -> None:
    if not digits or not digits.isascii() or not digits.isdigit():
        raise ValueError(f"{label} deve conter apenas dígitos, recebido {digits!r}")


def _require_amount(amount_cents: int) -> None:
    if isinstance(amount_cents, bool) or not isinstance(amount_cents, int):
        raise TypeError("o valor deve ser um inteiro em centavos")
    if amount_cents < 0:
        raise ValueError(f"valor negativo não cabe em um boleto: {amount_cents} centavos")
    if amount_cents > MAX_AMOUNT_CENTS:
        raise ValueError(f"valor {amount_cents} centavos excede os 10 dígitos do código de barras")
