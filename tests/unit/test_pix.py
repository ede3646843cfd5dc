"""The Pix "copia e cola" (BR Code): BACEN's EMV layout and CRC16/CCITT-FALSE, built and parsed back."""

from __future__ import annotations

import pytest

from models.pix import InvalidBrCode, br_code, crc16, parse_br_code


def test_the_crc_of_the_bacen_manual_example():
    payload = (
        "00020126580014br.gov.bcb.pix0136123e4567-e12b-12d1-a456-426655440000"
        "5204000053039865802BR5913Fulano de Tal6008BRASILIA62070503***6304"
    )
    assert crc16(payload) == "1D3D"


def test_a_code_says_what_it_pays_and_to_whom():
    code = br_code(key="pix@conecta.example", name="Conecta Tecnologia Ltda", city="São Paulo",
                   amount_cents=47_900, txid="bol123ABC")  # fmt: skip

    parsed = parse_br_code(code)

    assert (parsed.key, parsed.amount_cents, parsed.txid) == ("pix@conecta.example", 47_900, "bol123ABC")
    assert (parsed.name, parsed.city) == ("CONECTA TECNOLOGIA LTDA", "SAO PAULO")  # ASCII, no accents
    assert "5406479.00" in code and code.startswith("000201") and code[-8:-4] == "6304"


@pytest.mark.parametrize("cents, text", [(1, "0.01"), (4_990, "49.90"), (100_000, "1000.00")])
def test_amounts_are_reais_with_two_decimals(cents, text):
    code = br_code(key="k", name="n", city="c", amount_cents=cents, txid="t1")
    assert f"54{len(text):02d}{text}" in code
    assert parse_br_code(code).amount_cents == cents


def test_a_changed_character_fails_the_crc():
    code = br_code(key="pix@conecta.example", name="Conecta", city="Sao Paulo", amount_cents=4_990, txid="t1")
    with pytest.raises(InvalidBrCode):
        parse_br_code(code.replace("49.90", "19.90"))
    with pytest.raises(InvalidBrCode):
        parse_br_code(code[:-1] + ("0" if code[-1] != "0" else "1"))


def test_bad_input_is_refused():
    with pytest.raises(ValueError):
        br_code(key="k", name="n", city="c", amount_cents=0, txid="t1")
    with pytest.raises(ValueError):
        br_code(key="k", name="n", city="c", amount_cents=100, txid="not-alphanumeric")
    with pytest.raises(ValueError):
        br_code(key="k", name="n", city="c", amount_cents=100, txid="x" * 26)
