"""The sandbox's vocabulary: limits, test cards, configuration, request bodies, errors and replies."""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import asdict, dataclass
from datetime import date
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator

from models.boleto import MAX_AMOUNT_CENTS, due_factor
from models.policy import RuleViolation, normalize_document

BANK_CODE = "999"  # fictitious: no real bank's boletos can be confused with the sandbox's
MAX_CHARGE_CENTS = 100_000_000  # R$ 1.000.000,00 per card charge
DEFAULT_STALL_MS = 30_000
# With the default 1 s base, 12 attempts span about 34 minutes (waits of 1, 2, 4 … 1024 s), long
# enough to ride out a Renova deploy or restart in development before an event is given up.
DEFAULT_WEBHOOK_MAX_ATTEMPTS = 12


# --- test cards -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CardBehaviour:
    succeeds: bool
    code: str | None = None
    message: str | None = None
    hard: bool = False
    stall: bool = False  # charged, then answers later than any sane client waits
    refusals: int = 0  # 503-not-processed answers per idempotency key before processing


TEST_CARDS: dict[str, CardBehaviour] = {
    "tok_ok": CardBehaviour(True),
    "tok_insufficient_funds": CardBehaviour(False, "insufficient_funds", "Saldo insuficiente."),
    "tok_do_not_honor": CardBehaviour(False, "do_not_honor", "Transação não autorizada pelo emissor."),
    "tok_expired": CardBehaviour(False, "expired_card", "Cartão vencido.", hard=True),
    "tok_stolen": CardBehaviour(False, "stolen_card", "Cartão com restrição de roubo ou furto.", hard=True),
    "tok_timeout": CardBehaviour(True, stall=True),
    "tok_flaky": CardBehaviour(True, refusals=2),
}


Flavor = Literal["sandbox", "pagarme"]
FLAVORS: tuple[Flavor, ...] = ("sandbox", "pagarme")

# --- configuration --------------------------------------------------------------------------------


@dataclass(slots=True)
class SandboxConfig:
    api_key: str
    webhook_secret: str
    webhook_url: str = ""  # empty: events are recorded but not delivered
    latency_ms: int = 0
    timeout_rate: float = 0.0
    unavailable_rate: float = 0.0
    stall_ms: int = DEFAULT_STALL_MS
    webhook_max_attempts: int = DEFAULT_WEBHOOK_MAX_ATTEMPTS
    webhook_retry_base_s: float = 1.0
    # Which PSP's API is served: "sandbox" (/v1, signed webhooks) or "pagarme" (Pagar.me v5 under
    # /core/v5, webhooks with the Basic credentials below).
    flavor: Flavor = "sandbox"
    webhook_username: str = ""
    webhook_password: str = ""

    def public(self) -> dict[str, Any]:
        secret = ("api_key", "webhook_secret", "webhook_password")
        return {k: v for k, v in asdict(self).items() if k not in secret}


class ConfigUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    latency_ms: StrictInt | None = Field(None, ge=0, le=600_000)
    timeout_rate: float | None = Field(None, ge=0, le=1)
    unavailable_rate: float | None = Field(None, ge=0, le=1)
    stall_ms: StrictInt | None = Field(None, ge=0, le=600_000)
    webhook_url: str | None = Field(None, max_length=2000)
    webhook_max_attempts: StrictInt | None = Field(None, ge=1, le=100)
    webhook_retry_base_s: float | None = Field(None, gt=0, le=3600)


@dataclass(frozen=True, slots=True)
class Faults:
    latency_ms: int
    timeout_rate: float
    unavailable_rate: float
    stall_ms: int


# --- request bodies -------------------------------------------------------------------------------


class ChargeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    card_token: str = Field(min_length=1, max_length=200)
    amount_cents: StrictInt = Field(gt=0, le=MAX_CHARGE_CENTS)
    description: str = Field("", max_length=500)


class PayerIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    document: str = Field(min_length=11, max_length=20)
    email: str | None = Field(None, max_length=254)

    @field_validator("document")
    @classmethod
    def _cpf_or_cnpj(cls, value: str) -> str:
        # The same check digits as everywhere in Renova (python-stdnum), under the sandbox's own message.
        try:
            return normalize_document(value)
        except RuleViolation:
            raise ValueError("must be a CPF (11 digits) or a CNPJ (14 characters)") from None


class BoletoIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    invoice_id: StrictInt = Field(gt=0)
    amount_cents: StrictInt = Field(gt=0, le=MAX_AMOUNT_CENTS)
    description: str = Field("", max_length=500)
    payer: PayerIn
    due_date: date

    @field_validator("due_date")
    @classmethod
    def _encodable(cls, value: date) -> date:
        due_factor(value)  # raises ValueError for dates the barcode cannot carry
        return value


class RefundIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    amount_cents: StrictInt = Field(gt=0, le=MAX_CHARGE_CENTS)


class PayIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    paid_on: date | None = None
    amount_cents: StrictInt | None = Field(None, gt=0, le=MAX_AMOUNT_CENTS)
    # `pix`: paid with the boleto's Pix code, credited the same day, any day (weekends included).
    via: Literal["boleto", "pix"] = "boleto"


# --- errors, replies and ids ----------------------------------------------------------------------


def _error(type_: str, code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"type": type_, "code": code, "message": message, **extra}}


def _not_processed(message: str) -> dict[str, Any]:
    return _error("unavailable", "service_unavailable", message, processed=False)


class ApiError(Exception):
    def __init__(self, status: int, type_: str, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.body = _error(type_, code, message)


class NotProcessed(Exception):
    """Raised by the front door to refuse a request before it is looked at."""


@dataclass(slots=True)
class Reply:
    status: int
    body: dict[str, Any]
    processed: bool = False  # newly processed: stored for replay, and a timeout fault may follow
    stall: bool = False
    replayed: bool = False


def fingerprint(method: str, path: str, payload: BaseModel) -> str:
    """What makes two requests under one idempotency key "the same request", whatever the flavor."""
    canonical = json.dumps(payload.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"{method} {path}\n{canonical}".encode()).hexdigest()


def _new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"
