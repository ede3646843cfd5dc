"""The payment-gateway port: what Renova asks of a PSP, and the outcomes it must tell apart.

The error types carry the one distinction that keeps money safe: `Unavailable` means the gateway
certainly did not process the request (retry freely), `Ambiguous` means it may have (look the
charge up with `find_charge`, or send the refund again with the same key, before doing anything
else). Everything else is a definite answer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Literal, Protocol, TypeVar, runtime_checkable

ChargeStatus = Literal["succeeded", "failed"]
# A refund the gateway refuses is an error (GatewayRejected), never a stored result: only successes exist.
RefundStatus = Literal["succeeded"]

Item = TypeVar("Item")
Result = TypeVar("Result")

# Declines that no retry can fix: the customer must give us another card.
HARD_DECLINE_CODES: frozenset[str] = frozenset({"invalid_card", "stolen_card", "lost_card", "expired_card"})


# --- requests ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChargeRequest:
    card_token: str
    amount_cents: int
    idempotency_key: str
    description: str


@dataclass(frozen=True, slots=True)
class BoletoRequest:
    invoice_id: int
    amount_cents: int
    description: str


@dataclass(frozen=True, slots=True)
class Payer:
    name: str
    document: str  # CPF or CNPJ (a CNPJ may be alphanumeric)
    email: str | None = None


@dataclass(frozen=True, slots=True)
class BoletoIssue:
    """One `issue_boleto` call, as an item of `issue_boleto_many`."""

    invoice: BoletoRequest
    payer: Payer
    due_date: date
    idempotency_key: str


# --- results -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChargeResult:
    gateway_id: str
    status: ChargeStatus
    amount_cents: int
    idempotency_key: str
    code: str | None = None
    message: str | None = None
    hard: bool = False

    @property
    def succeeded(self) -> bool:
        return self.status == "succeeded"


@dataclass(frozen=True, slots=True)
class RefundResult:
    gateway_id: str  # the refund's own id at the gateway
    charge_gateway_id: str  # the charge it gives money back from
    amount_cents: int
    idempotency_key: str
    status: RefundStatus


@dataclass(frozen=True, slots=True)
class BoletoIssued:
    gateway_id: str
    nosso_numero: str
    barcode: str
    digitable_line: str
    due_date: date
    amount_cents: int
    # A boleto híbrido's Pix "copia e cola" (BR Code), when the gateway issues one.
    pix_code: str | None = None


# --- errors --------------------------------------------------------------------------------------


class GatewayError(Exception):
    """Any failure talking to the gateway; the subclass says what is known about the request."""


class Declined(GatewayError):
    """The gateway processed the charge and the issuer refused it. Final for this idempotency key."""

    def __init__(self, code: str, message: str, hard: bool, gateway_id: str | None = None) -> None:
        # Passing every field to Exception keeps the error picklable (message brokers, process pools).
        super().__init__(code, message, hard, gateway_id)
        self.code = code
        self.message = message
        self.hard = hard
        self.gateway_id = gateway_id

    def __str__(self) -> str:
        kind = "hard" if self.hard else "soft"
        return f"declined ({kind}) {self.code}: {self.message}"


class Unavailable(GatewayError):
    """The request was certainly not processed (could not connect, or the gateway said so): retry."""


class AuthenticationFailed(Unavailable):
    """The gateway refused our credentials (401/403): nothing was processed. A configuration problem,
    not the customer's: it must never be recorded as a decline, and it is retryable once fixed."""


class Ambiguous(GatewayError):
    """The request may or may not have been processed. Never retry blindly: reconcile via find_charge."""


class GatewayRejected(GatewayError):
    """The gateway refused the request itself (bad token, bad input, bad credentials): nothing was
    processed, and sending the same request again will not help."""

    def __init__(self, code: str, message: str, status_code: int | None = None) -> None:
        super().__init__(code, message, status_code)
        self.code = code
        self.message = message
        self.status_code = status_code

    def __str__(self) -> str:
        status = f" (HTTP {self.status_code})" if self.status_code is not None else ""
        return f"rejected {self.code}{status}: {self.message}"


class IdempotencyConflict(GatewayRejected):
    """The idempotency key was already used for a different request: a bug in the caller's keys."""


# --- the port ------------------------------------------------------------------------------------


@runtime_checkable
class Gateway(Protocol):
    def charge(self, card_token: str, amount_cents: int, idempotency_key: str, description: str) -> ChargeResult:
        """Charge a card once per key. Raises Declined, Unavailable, Ambiguous or GatewayRejected."""
        ...

    def find_charge(self, idempotency_key: str) -> ChargeResult | None:
        """What the gateway recorded for this key: None when it never processed it; a decline is
        returned as a result with status "failed". Raises Unavailable when it cannot find out."""
        ...

    def issue_boleto(self, invoice: BoletoRequest, payer: Payer, due_date: date, idempotency_key: str) -> BoletoIssued:
        """Issue (once per key) a boleto. On Ambiguous, calling again with the same key is the lookup."""
        ...

    def cancel_boleto(self, boleto_ref: str) -> None:
        """Cancel an unpaid boleto; cancelling one already cancelled or expired is a no-op."""
        ...

    def refund(self, gateway_charge_id: str, amount_cents: int, idempotency_key: str) -> RefundResult:
        """Refund (part of) a succeeded charge, once per key. Raises Unavailable (not processed:
        retry), Ambiguous (maybe processed: call again with the same key, which is the lookup),
        GatewayRejected (e.g. amount above what is left to refund, unknown or failed charge: the
        same request will never succeed), IdempotencyConflict (key reused with another body)."""
        ...


def charge_many(gateway: Gateway, requests: Sequence[ChargeRequest]) -> list[ChargeResult | GatewayError]:
    """One outcome per request, in order: the result, or the GatewayError that request raised.

    Uses the gateway's own concurrent `charge_many` when it has one (the HTTP adapter does), so
    callers can take any `Gateway` (test doubles included) without caring.
    """
    concurrent = getattr(gateway, "charge_many", None)
    if concurrent is not None:
        return list(concurrent(requests))
    return _one_by_one(
        lambda request: gateway.charge(
            request.card_token, request.amount_cents, request.idempotency_key, request.description
        ),
        requests,
    )


def issue_boleto_many(gateway: Gateway, issues: Sequence[BoletoIssue]) -> list[BoletoIssued | GatewayError]:
    """`charge_many` for boletos: one outcome per issue, in order, concurrently where the gateway can."""
    concurrent = getattr(gateway, "issue_boleto_many", None)
    if concurrent is not None:
        return list(concurrent(issues))
    return _one_by_one(
        lambda issue: gateway.issue_boleto(issue.invoice, issue.payer, issue.due_date, issue.idempotency_key),
        issues,
    )


def _one_by_one(call: Callable[[Item], Result], items: Sequence[Item]) -> list[Result | GatewayError]:
    outcomes: list[Result | GatewayError] = []
    for item in items:
        try:
            outcomes.append(call(item))
        except GatewayError as exc:
            outcomes.append(exc)
    return outcomes
