"""Pix "copia e cola": the BR Code (an EMV QR Code payload, per BACEN's Manual de Padrões para Iniciação
do Pix) that a boleto híbrido carries so it can be paid instantly, any day.

A payload is a sequence of TLV fields (two-digit id, two-digit length, value), ending with the CRC16
(CCITT-FALSE: polynomial 0x1021, initial 0xFFFF) of everything before it, `6304` included.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Final

GUI: Final = "br.gov.bcb.pix"
MAX_NAME: Final = 25
MAX_CITY: Final = 15
MAX_TXID: Final = 25
_TXID = re.compile(r"^[A-Za-z0-9]{1,25}$")


class InvalidBrCode(ValueError):
    """A payload that is not a well-formed BR Code (bad TLV, missing field or wrong CRC)."""


def crc16(data: str) -> str:
    """CRC16/CCITT-FALSE of `data`, four uppercase hex digits."""
    crc = 0xFFFF
    for byte in data.encode():
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return f"{crc:04X}"


def _field(tag: str, value: str) -> str:
    if len(value) > 99:
        raise ValueError(f"field {tag} is longer than 99 characters")
    return f"{tag}{len(value):02d}{value}"


def _plain(text: str, limit: int) -> str:
    """Upper-case ASCII without accents, as the payload's name and city fields expect."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return re.sub(r"[^A-Za-z0-9 .\-]", "", ascii_text).upper().strip()[:limit] or "NA"


def br_code(*, key: str, name: str, city: str, amount_cents: int, txid: str) -> str:
    """A static BR Code paying `amount_cents` to the Pix `key`, identified by `txid`."""
    if amount_cents <= 0:
        raise ValueError("a Pix amount must be positive")
    if not _TXID.match(txid):
        raise ValueError("a txid is 1 to 25 letters or digits")
    account = _field("00", GUI) + _field("01", key)
    payload = (
        _field("00", "01")
        + _field("26", account)
        + _field("52", "0000")
        + _field("53", "986")
        + _field("54", f"{amount_cents // 100}.{amount_cents % 100:02d}")
        + _field("58", "BR")
        + _field("59", _plain(name, MAX_NAME))
        + _field("60", _plain(city, MAX_CITY))
        + _field("62", _field("05", txid))
        + "6304"
    )
    return payload + crc16(payload)


@dataclass(frozen=True)
class BrCode:
    key: str
    name: str
    city: str
    amount_cents: int
    txid: str


def _fields(payload: str) -> dict[str, str]:
    found: dict[str, str] = {}
    position = 0
    while position < len(payload):
        tag, length = payload[position : position + 2], payload[position + 2 : position + 4]
        if not (tag.isdigit() and length.isdigit()) or position + 4 + int(length) > len(payload):
            raise InvalidBrCode(f"malformed field at {position}")
        found[tag] = payload[position + 4 : position + 4 + int(length)]
        position += 4 + int(length)
    return found


def parse_br_code(payload: str) -> BrCode:
    """The fields of a BR Code, once its CRC is checked."""
    if len(payload) < 8 or payload[-8:-4] != "6304" or crc16(payload[:-4]) != payload[-4:].upper():
        raise InvalidBrCode("the CRC16 does not match")
    fields = _fields(payload[:-8])
    try:
        account = _fields(fields["26"])
        additional = _fields(fields["62"])
        if fields["00"] != "01" or account["00"] != GUI or fields["53"] != "986":
            raise InvalidBrCode("not a Pix payload in reais")
        whole, _, cents = fields["54"].partition(".")
        return BrCode(
            key=account["01"],
            name=fields["59"],
            city=fields["60"],
            amount_cents=int(whole) * 100 + int(cents.ljust(2, "0")[:2]),
            txid=additional["05"],
        )
    except (KeyError, ValueError) as exc:
        if isinstance(exc, InvalidBrCode):
            raise
        raise InvalidBrCode(f"missing or bad field: {exc}") from None
