"""The change-request contract shared by the queue (`submit_change_request` on `changes`) and the HTTP API.

One JSON object: the common fields (`organization_id`, `subscription_id`, `requested_by`,
`idempotency_key`), a `kind` and that kind's parameters, all at the top level. Unknown fields are
refused rather than ignored: a misspelled parameter must not silently become a default.

Pure pydantic: no database, no broker, so the main application's engineers can read it as the spec.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Annotated, Any, Final, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StringConstraints,
    TypeAdapter,
    field_validator,
)
from stdnum import luhn

from models.states import Cycle, PaymentMethod

KINDS: Final = ("subscribe", "billing_cycle", "payment_method", "card", "cancel", "resume", "reissue_boleto")

# PostgreSQL's bigint: an id beyond it is refused as input, never sent to the database.
MAX_ID: Final = 2**63 - 1
PositiveId = Annotated[StrictInt, Field(gt=0, le=MAX_ID)]
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _without_control_characters(value: str) -> str:
    # PostgreSQL refuses a NUL in text and jsonb; the other control characters have no place in a name.
    if has_control_characters(value):
        raise ValueError("contém caracteres de controle")
    return value


# Any free text taken from outside: names, e-mails, documents, keys.
PlainText = Annotated[str, AfterValidator(_without_control_characters)]
IdempotencyKey = Annotated[PlainText, StringConstraints(strip_whitespace=True, min_length=1, max_length=255)]
# models.states' vocabularies, as plain strings: the JSON schema lists them as an enum of strings.
CycleName = Literal[tuple(member.value for member in Cycle)]  # "monthly", "annual"
MethodName = Literal[tuple(member.value for member in PaymentMethod)]  # "card", "boleto"

# A card number (PAN) has 12 to 19 digits, possibly grouped by spaces or dashes. Renova stores only
# gateway tokens: anything shaped like a PAN is refused and never stored or echoed back.
_PAN_LIKE = re.compile(r"^[\d \-]{12,25}$")
# "/" joins a PSP's customer and card ids where a stored card needs both (Pagar.me: cus_…/card_…).
_TOKEN = re.compile(r"^[A-Za-z0-9_.:/\-]{4,255}$")
_SENSITIVE_KEYS: Final = frozenset({"number", "card_number", "pan", "cvv", "cvc", "cvv2", "security_code"})
REDACTED: Final = "[redacted]"
# Card brands as the gateways name them.
BRANDS: Final = frozenset(
    {"visa", "mastercard", "amex", "elo", "hipercard", "hiper", "diners", "discover", "jcb", "aura", "cabal"}
)


def looks_like_card_number(value: str) -> bool:
    digits = re.sub(r"[ \-]", "", value)
    return bool(_PAN_LIKE.match(value)) and digits.isdigit() and 12 <= len(digits) <= 19


# 13 to 19 digits, each group separated by at most one space or dash, anywhere in a text.
_DIGIT_RUN = re.compile(r"\d(?:[ \-]?\d){12,18}")


def card_numbers_in(text: str) -> list[str]:
    """The runs of 13–19 digits in `text` that pass the Luhn check: card numbers, as far as a text can
    tell (a CNPJ may pass too, so documents are not checked with this)."""
    found = []
    for match in _DIGIT_RUN.finditer(text):
        digits = re.sub(r"[ \-]", "", match.group())
        if luhn.is_valid(digits):
            found.append(match.group())
    return found


def mask_card_numbers(text: str) -> str:
    for number in card_numbers_in(text):
        text = text.replace(number, REDACTED)
    return text


def _no_card_number(value: str) -> str:
    if card_numbers_in(value):
        # The message never includes the value.
        raise ValueError("parece conter um número de cartão; ele não é aceito aqui")
    return value


# A name: free text that never holds a card number (refused, not stored).
NameText = Annotated[PlainText, AfterValidator(_no_card_number)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)

    organization_id: PositiveId = Field(description="The organization's id in the main application.")
    requested_by: PositiveId = Field(description="Id of the member who asked (checked: owner, admin or financial).")
    idempotency_key: IdempotencyKey | None = Field(
        None,
        description="Unique per organization and user action. Required in a queue message; over HTTP it "
        "comes from the Idempotency-Key header (if also given here it must be equal).",
    )


class _OnSubscription(_Request):
    subscription_id: PositiveId


class Subscribe(_Request):
    """Subscribe to a product: the first invoice is charged now (card) or its boleto issued now."""

    kind: Literal["subscribe"]
    subscription_id: None = Field(None, description="Absent (or null): the subscription does not exist yet.")
    product: Annotated[str, StringConstraints(pattern=r"^[a-z0-9_\-]{1,64}$")] = "conecta"
    cycle: CycleName
    payment_method: MethodName


class BillingCycleChange(_OnSubscription):
    """Change the billing cycle with proration; boleto only for annual, monthly is card-only."""

    kind: Literal["billing_cycle"]
    to_cycle: CycleName
    payment_method: MethodName | None = Field(
        None, description="Method of the new cycle; default: card for monthly, the current method for annual."
    )


class PaymentMethodSwitch(_OnSubscription):
    """Switch the payment method from the next renewal on; asking for the current one cancels a pending switch."""

    kind: Literal["payment_method"]
    to: MethodName


class CardUpdate(_Request):
    """Replace the organization's one card (for all its subscriptions); past-due card invoices are retried."""

    kind: Literal["card"]
    subscription_id: PositiveId | None = Field(None, description="Optional: the card is the organization's.")
    token: str = Field(description="The payment gateway's card token (never a card number).")
    brand: str = Field(description=f"The card's brand, one of: {', '.join(sorted(BRANDS))} (any case).")
    last4: Annotated[str, StringConstraints(pattern=r"^[0-9]{4}$")]
    exp_month: Annotated[StrictInt, Field(ge=1, le=12)]
    exp_year: Annotated[StrictInt, Field(ge=2000, le=2100)]

    @field_validator("brand")
    @classmethod
    def _known_brand(cls, value: str) -> str:
        # A closed list: a card number (or anything else) sent as the brand is never stored, echoed or e-mailed.
        brand = value.strip().lower()
        if brand not in BRANDS:
            raise ValueError(f"bandeira desconhecida; use uma de: {', '.join(sorted(BRANDS))}")
        return brand

    @field_validator("token")
    @classmethod
    def _gateway_token(cls, value: str) -> str:
        # The messages never include the value: it might be a card number.
        if looks_like_card_number(value):
            raise ValueError("parece um número de cartão; envie somente o token do gateway de pagamento")
        if not _TOKEN.match(value):
            raise ValueError("token do gateway inválido (4 a 255 letras, dígitos ou _ . : / -)")
        return value


class Cancel(_OnSubscription):
    """Cancel at the end of the current period (`resume` undoes it before then)."""

    kind: Literal["cancel"]


class Resume(_OnSubscription):
    """Undo a scheduled cancellation before the renewal date."""

    kind: Literal["resume"]


class ReissueBoleto(_OnSubscription):
    """A segunda via: a new boleto for the subscription's open boleto invoice, due in BOLETO_DUE_DAYS
    (the current one is cancelled; overdue and suspension dates stay those of the original due date)."""

    kind: Literal["reissue_boleto"]


ChangeRequestIn = Annotated[
    Subscribe | BillingCycleChange | PaymentMethodSwitch | CardUpdate | Cancel | Resume | ReissueBoleto,
    Field(discriminator="kind"),
]
CHANGE_REQUEST: Final[TypeAdapter[Any]] = TypeAdapter(ChangeRequestIn)


AnyChangeRequest = Subscribe | BillingCycleChange | PaymentMethodSwitch | CardUpdate | Cancel | Resume | ReissueBoleto


def parse_change_request(payload: Any) -> AnyChangeRequest:
    """The validated request; pydantic.ValidationError when its shape is wrong."""
    return CHANGE_REQUEST.validate_python(payload)


def canonical_payload(request: BaseModel) -> dict[str, Any]:
    """What is stored and hashed: every field, defaults included, so `{}` and `{"product": "conecta"}` match."""
    return request.model_dump(mode="json")


def payload_hash(payload: Any) -> str:
    """SHA-256 of the canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def redact(value: Any) -> Any:
    """A copy of a raw (possibly invalid) payload safe to store: card numbers and security codes removed,
    control characters (which PostgreSQL's jsonb cannot all hold) replaced by U+FFFD, and a NaN or an
    infinity written as text."""
    if isinstance(value, dict):
        return {
            redact(str(key)): REDACTED if str(key).lower() in _SENSITIVE_KEYS else redact(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [redact(item) for item in value]
    if isinstance(value, str):
        if looks_like_card_number(value):
            return REDACTED
        return mask_card_numbers(_CONTROL_CHARACTERS.sub("\ufffd", value))
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON (and PostgreSQL's jsonb) has no NaN or Infinity
    return value


def has_control_characters(value: str) -> bool:
    return _CONTROL_CHARACTERS.search(value) is not None


# --- field errors ------------------------------------------------------------------------------

_MESSAGES_PT: Final = {
    "missing": "campo obrigatório",
    "extra_forbidden": "campo não permitido",
    "int_type": "deve ser um número inteiro",
    "string_type": "deve ser um texto",
    "bool_type": "deve ser verdadeiro ou falso",
    "none_required": "deve estar ausente",
    "union_tag_invalid": "tipo de solicitação desconhecido",
    "union_tag_not_found": "tipo de solicitação (kind) ausente",
    "model_attributes_type": "deve ser um objeto JSON",
    "model_type": "deve ser um objeto JSON",
    "dict_type": "deve ser um objeto JSON",
}


def field_errors(errors: list[Any], *, skip: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Pydantic errors as `{field, code, message}`, without the offending input (it may be a card number)."""
    fields = []
    for error in errors:
        loc = [part for part in error.get("loc", ()) if part not in skip]
        # A discriminated union puts the tag in the location (`billing_cycle.to_cycle`): drop it.
        if loc and loc[0] in KINDS:
            loc = loc[1:]
        code = str(error.get("type", "value_error"))
        if code in ("union_tag_invalid", "union_tag_not_found"):
            loc = ["kind"]  # the discriminator itself, which pydantic places on the whole object
        message = _MESSAGES_PT.get(code)
        if message is None:
            message = str(error.get("msg", "valor inválido")).removeprefix("Value error, ")
        fields.append({"field": ".".join(str(part) for part in loc) or "(body)", "code": code, "message": message})
    return fields


def describe_field_errors(fields: list[dict[str, Any]], limit: int = 5) -> str:
    """A pt-BR sentence naming the fields, for the request's error message and the rejection notice."""
    parts = [f"{item['field']} ({item['message']})" for item in fields[:limit]]
    more = f" e mais {len(fields) - limit}" if len(fields) > limit else ""
    return "Solicitação inválida. Verifique os campos: " + "; ".join(parts) + more + "."
