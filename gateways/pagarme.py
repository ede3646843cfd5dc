"""The gateway port over Pagar.me's API v5 (`GATEWAY=pagarme`), on the HTTP adapter's transport.

Pagar.me calls a payment an order (`POST /orders`) holding one charge (`ch_…`). Renova sends one order
per charge or boleto with `code` = Renova's idempotency key and the same key in `Idempotency-Key`
(Pagar.me keeps it 24 h), so `find_charge` is a search by code (`GET /orders?code=`): no order means
the request never arrived. A refund cancels (part of) a charge (`DELETE /charges/{id}` with
`{"amount"}`), and so does cancelling an unpaid boleto. Requests authenticate with HTTP Basic, the
secret key as user name and an empty password.

What an answer means (the rest is `HttpGateway`'s rule: anything that failed after sending is
ambiguous):
- 200 with a `paid` charge is a charge; 200 with a `failed` one is a decline, soft or hard by the
  acquirer's return code (`DECLINES`); `pending`/`processing` is not known yet (`Ambiguous`);
- 401/403 `AuthenticationFailed`; 408/429 `Unavailable` (rate limited: nothing was done); 409
  `IdempotencyConflict` (the key was used for another request); 400/404/412/422 `GatewayRejected`;
  5xx `Ambiguous` (or `Unavailable` for a lookup).

The stored card reference is `cus_…/card_…`: the Pagar.me customer and the card saved on it (a
`token_…` from the checkout is single-use and could not renew). A reference without a customer is sent
as a `card_id` alone, which only the emulator's test cards accept.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, Literal
from urllib.parse import quote

import httpx

from gateways.base import (
    Ambiguous,
    AuthenticationFailed,
    BoletoIssue,
    BoletoIssued,
    ChargeRequest,
    ChargeResult,
    Declined,
    GatewayError,
    GatewayRejected,
    IdempotencyConflict,
    RefundResult,
    Unavailable,
)
from gateways.http import HttpGateway, _parse
from models.boleto import barcode_from_digitable_line

PRODUCTION_URL = "https://api.pagar.me/core/v5"
STATEMENT_DESCRIPTOR = "CONECTA"  # on the card statement (at most 13 characters for PSP accounts)
MAX_CODE_LENGTH = 52  # an order's `code`


@dataclass(frozen=True, slots=True)
class Decline:
    code: str  # Renova's decline code (what notices and on-call show)
    hard: bool  # no retry with this card can succeed: the customer must give another


# The acquirer's return codes (`acquirer_return_code`): ABECS's (Normativo 21, which Pagar.me v5 returns
# since 28 Aug 2026) and the four-digit Stone codes it returned before. "Hard" is ABECS's irreversible
# class: the brands forbid retrying those with the same card. Any other code is a soft decline.
DECLINES: Mapping[str, Decline] = {
    # reversible: dunning retries
    "04": Decline("try_again", False),
    "05": Decline("do_not_honor", False),
    "06": Decline("call_issuer", False),
    "38": Decline("pin_tries_exceeded", False),
    "51": Decline("insufficient_funds", False),
    "55": Decline("incorrect_pin", False),
    "59": Decline("suspected_fraud", False),
    "61": Decline("amount_limit_exceeded", False),
    "62": Decline("restricted_card", False),
    "65": Decline("withdrawal_count_exceeded", False),
    "75": Decline("pin_tries_exceeded", False),
    "78": Decline("card_blocked", False),
    "1000": Decline("do_not_honor", False),
    "1002": Decline("suspected_fraud", False),
    "1006": Decline("pin_tries_exceeded", False),
    "1007": Decline("call_issuer", False),
    "1016": Decline("insufficient_funds", False),
    "1017": Decline("incorrect_pin", False),
    "1025": Decline("card_blocked", False),
    # irreversible: never retried, the customer is asked for another card
    "12": Decline("card_error", True),
    "13": Decline("invalid_amount", True),
    "14": Decline("invalid_card", True),
    "19": Decline("acquirer_error", True),
    "41": Decline("lost_card", True),
    "43": Decline("stolen_card", True),
    "46": Decline("account_closed", True),
    "54": Decline("expired_card", True),
    "56": Decline("invalid_card", True),
    "57": Decline("transaction_not_allowed", True),
    "63": Decline("security_violation", True),
    "1001": Decline("expired_card", True),
    "1004": Decline("restricted_card", True),
    "1011": Decline("invalid_card", True),
    "1019": Decline("transaction_not_allowed", True),
    "1022": Decline("security_violation", True),
    "1029": Decline("suspected_counterfeit", True),
    "1032": Decline("stolen_card", True),
    "1819": Decline("expired_card", True),
    "1820": Decline("card_error", True),
}
UNKNOWN_DECLINE = Decline("declined", False)

# A charge Pagar.me took money for (`canceled`: since refunded; under/overpaid: a boleto).
_CHARGED = frozenset({"paid", "overpaid", "underpaid", "canceled", "chargedback"})
_UNSETTLED = frozenset({"pending", "processing"})


def decline_for(return_code: str | None) -> Decline:
    return DECLINES.get((return_code or "").strip(), UNKNOWN_DECLINE)


BoletoGatewayStatus = Literal["issued", "paid", "canceled", "expired"]


@dataclass(frozen=True, slots=True)
class BoletoState:
    """A boleto as the gateway holds it now: what a webhook is checked against before anything is done."""

    gateway_id: str
    status: BoletoGatewayStatus
    amount_cents: int
    paid_amount_cents: int | None
    paid_at: datetime | None


CardGatewayStatus = Literal["paid", "refunded", "chargedback", "other"]


@dataclass(frozen=True, slots=True)
class CardChargeState:
    """A card charge as the gateway holds it now: whether money Renova took has gone back since.

    `reversed_cents` is what left the merchant: the refunds (`canceled_amount`), or the whole charge
    once it was charged back."""

    gateway_id: str
    status: CardGatewayStatus
    amount_cents: int
    reversed_cents: int


class PagarmeGateway(HttpGateway):
    """A `Gateway` over Pagar.me v5; the base URL is `https://api.pagar.me/core/v5` (or the emulator's)."""

    @staticmethod
    def _auth_headers(api_key: str) -> dict[str, str]:
        return {"Authorization": "Basic " + base64.b64encode(f"{api_key}:".encode()).decode()}

    # --- cards -------------------------------------------------------------------------------------

    def _charge_call(self, request: ChargeRequest) -> tuple[str, dict[str, Any]]:
        customer_id, card_id = card_reference(request.card_token)
        body: dict[str, Any] = {
            "code": order_code(request.idempotency_key),
            "closed": True,
            "items": [{"amount": request.amount_cents, "description": request.description[:256], "quantity": 1}],
            "payments": [
                {
                    "payment_method": "credit_card",
                    "amount": request.amount_cents,
                    "credit_card": {
                        "card_id": card_id,
                        "installments": 1,
                        "statement_descriptor": STATEMENT_DESCRIPTOR,
                        "operation_type": "auth_and_capture",
                        # A merchant-initiated renewal of a stored card, as the brands ask it to be flagged.
                        "recurrence_cycle": "subsequent",
                    },
                }
            ],
            "metadata": {"renova_key": request.idempotency_key},
        }
        if customer_id is not None:
            body["customer_id"] = customer_id
        return "/orders", body

    def _charge_outcome(self, response: httpx.Response, request: ChargeRequest) -> ChargeResult:
        result = _parse(lambda order: _charge_result(order, request.idempotency_key), response)
        if result.status == "failed":
            raise Declined(result.code or "declined", result.message or "", result.hard, result.gateway_id)
        return result

    def find_charge(self, idempotency_key: str) -> ChargeResult | None:
        code = order_code(idempotency_key)
        response = self._send("GET", "/orders", params={"code": code, "size": "10"}, read_only=True)
        orders = _parse(
            lambda body: [order for order in body["data"] if order["code"] == code], response, read_only=True
        )
        if not orders:
            return None
        if len(orders) > 1:
            # One key, one order: two would mean someone else used our code. Do not guess.
            raise Unavailable(f"{len(orders)} orders have the code {code!r}: reconcile by hand")
        try:
            return _charge_result(orders[0], idempotency_key)
        except Ambiguous as exc:  # still processing: ask again later
            raise Unavailable(str(exc)) from exc
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise Unavailable(f"unreadable order for {code!r}: {exc!r}") from exc

    # --- boletos -----------------------------------------------------------------------------------

    def _boleto_call(self, issue: BoletoIssue) -> tuple[str, dict[str, Any]]:
        invoice, payer = issue.invoice, issue.payer
        document = re.sub(r"[^0-9A-Za-z]", "", payer.document).upper()
        company = len(document) == 14
        return "/orders", {
            "code": order_code(issue.idempotency_key),
            "closed": True,
            "customer": {
                "name": payer.name[:64],
                "email": payer.email,
                "document": document,
                "document_type": "CNPJ" if company else "CPF",
                "type": "company" if company else "individual",
            },
            "items": [
                {
                    "amount": invoice.amount_cents,
                    "description": invoice.description[:256] or f"Fatura {invoice.invoice_id}",
                    "quantity": 1,
                    "code": str(invoice.invoice_id),
                }
            ],
            "payments": [
                {
                    "payment_method": "boleto",
                    "amount": invoice.amount_cents,
                    "boleto": {
                        "due_at": f"{issue.due_date.isoformat()}T23:59:59Z",
                        "instructions": boleto_instructions(issue),
                        "document_number": str(invoice.invoice_id)[-16:],
                        "type": "DM",
                    },
                }
            ],
            "metadata": {"invoice_id": str(invoice.invoice_id), "renova_key": issue.idempotency_key},
        }

    def _boleto_outcome(self, response: httpx.Response, issue: BoletoIssue) -> BoletoIssued:
        return _parse(_boleto_issued, response)

    def cancel_boleto(self, boleto_ref: str) -> None:
        try:
            self._send("DELETE", f"/charges/{quote(boleto_ref, safe='')}")
        except GatewayRejected:
            # Already cancelled or expired is what was asked; a paid one is a real refusal.
            if self.boleto_state(boleto_ref).status in ("canceled", "expired"):
                return
            raise

    def boleto_state(self, boleto_ref: str) -> BoletoState:
        """The boleto's charge as Pagar.me holds it now (`GET /charges/{id}`): how a webhook is verified."""
        return _parse(_boleto_state, self._charge_now(boleto_ref), read_only=True)

    def card_charge_state(self, charge_ref: str) -> CardChargeState:
        """A card charge as Pagar.me holds it now: refunded or charged back since Renova took it?"""
        return _parse(_card_charge_state, self._charge_now(charge_ref), read_only=True)

    def _charge_now(self, charge_ref: str) -> httpx.Response:
        return self._send("GET", f"/charges/{quote(charge_ref, safe='')}", read_only=True)

    # --- refunds -----------------------------------------------------------------------------------

    def refund(self, gateway_charge_id: str, amount_cents: int, idempotency_key: str) -> RefundResult:
        path = f"/charges/{quote(gateway_charge_id, safe='')}"
        response = self._send("DELETE", path, json={"amount": amount_cents}, idempotency_key=idempotency_key)
        return _parse(lambda charge: _refund_result(charge, amount_cents, idempotency_key), response)

    # --- errors ------------------------------------------------------------------------------------

    def _refusal(
        self, response: httpx.Response, method: str, path: str, *, read_only: bool, not_found_ok: bool
    ) -> GatewayError | None:
        status = response.status_code
        message = _error_message(response)
        if status in (401, 403):
            return AuthenticationFailed(f"Pagar.me refused the credentials (HTTP {status}): {message}")
        if status in (408, 429):
            return Unavailable(f"Pagar.me refused {method} {path} without processing it (HTTP {status}): {message}")
        if status >= 500 or status < 400:
            if read_only:
                return Unavailable(f"Pagar.me lookup failed: HTTP {status}")
            return Ambiguous(f"{method} {path} answered HTTP {status}: {message}")
        if status == 409:
            return IdempotencyConflict("idempotency_conflict", message, status)
        code = {404: "not_found", 412: "business_rule"}.get(status, "invalid_request")
        return GatewayRejected(code, message, status)


# --- requests -------------------------------------------------------------------------------------


def card_reference(reference: str) -> tuple[str | None, str]:
    """(customer id, card id) of a stored card reference `cus_…/card_…` (or a bare card id)."""
    customer, separator, card = reference.partition("/")
    if separator and customer and card:
        return customer, card
    return None, reference


def order_code(idempotency_key: str) -> str:
    if len(idempotency_key) > MAX_CODE_LENGTH:
        raise ValueError(f"idempotency key longer than an order code ({MAX_CODE_LENGTH}): {idempotency_key!r}")
    return idempotency_key


def boleto_instructions(issue: BoletoIssue) -> str:
    due = issue.due_date.strftime("%d/%m/%Y")
    return (
        f"Fatura {issue.invoice.invoice_id}. Pagável até {due} sem encargos; não cobrar multa nem juros "
        "após o vencimento."
    )


# --- answers --------------------------------------------------------------------------------------


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.reason_phrase or f"HTTP {response.status_code}"
    if not isinstance(body, dict):
        return response.reason_phrase
    message = str(body.get("message") or response.reason_phrase)
    errors = body.get("errors")
    if isinstance(errors, dict) and errors:
        details = "; ".join(f"{field}: {', '.join(map(str, problems))}" for field, problems in errors.items())
        message = f"{message} {details}"
    return message[:500]


def _only_charge(order: dict[str, Any]) -> dict[str, Any]:
    charges = order["charges"]
    if not isinstance(charges, list) or len(charges) != 1:
        raise ValueError(f"expected one charge in order {order.get('id')!r}, got {charges!r}")
    return charges[0]


def _charge_result(order: dict[str, Any], idempotency_key: str) -> ChargeResult:
    """An order's card charge as the port's result; `Ambiguous` while it is still being processed."""
    if order["code"] != order_code(idempotency_key):
        raise ValueError(f"the order's code {order['code']!r} is not the request's")
    charge = _only_charge(order)
    status, amount = charge["status"], charge["amount"]
    if not isinstance(amount, int):
        raise TypeError("amount is not an integer")
    if status in _UNSETTLED:
        raise Ambiguous(f"charge {charge['id']} is {status}: its outcome is not known yet")
    if status in _CHARGED:
        return ChargeResult(str(charge["id"]), "succeeded", amount, idempotency_key)
    if status != "failed":
        raise ValueError(f"unknown charge status {status!r}")
    transaction = charge.get("last_transaction") or {}
    return_code = transaction.get("acquirer_return_code")
    decline = decline_for(return_code)
    message = str(transaction.get("acquirer_message") or "Transação não autorizada")
    if return_code:
        message = f"{message} (código {return_code})"
    return ChargeResult(str(charge["id"]), "failed", amount, idempotency_key, decline.code, message, decline.hard)


def _boleto_issued(order: dict[str, Any]) -> BoletoIssued:
    charge = _only_charge(order)
    if charge["status"] == "failed":
        # The bank did not register it: nothing to pay, and the same request will not do better.
        raise GatewayRejected("boleto_failed", f"Pagar.me could not issue the boleto of order {order['id']}")
    transaction = charge["last_transaction"]
    line = re.sub(r"\D", "", transaction["line"])
    qr_code = transaction.get("qr_code")
    return BoletoIssued(
        gateway_id=str(charge["id"]),
        nosso_numero=str(transaction["nosso_numero"]),
        barcode=barcode_from_digitable_line(line),  # Pagar.me gives the barcode as an image's URL
        digitable_line=transaction["line"],
        due_date=_date(transaction["due_at"]),
        amount_cents=int(charge["amount"]),
        # Pagar.me documents `qr_code` as an image's URL; an account whose boletos carry Pix may put the
        # EMV payload there, and only that is a copia-e-cola code.
        pix_code=qr_code if isinstance(qr_code, str) and qr_code.startswith("000201") else None,
    )


_BOLETO_STATES: dict[str, BoletoGatewayStatus] = {
    "pending": "issued",
    "processing": "issued",
    "paid": "paid",
    "underpaid": "paid",
    "overpaid": "paid",
    "canceled": "canceled",
    "failed": "expired",
}


def _boleto_state(charge: dict[str, Any]) -> BoletoState:
    if charge["payment_method"] != "boleto":
        raise ValueError(f"charge {charge['id']} is not a boleto")
    status = _BOLETO_STATES[charge["status"]]
    paid_at = _instant(charge["paid_at"]) if charge.get("paid_at") else None
    return BoletoState(
        gateway_id=str(charge["id"]),
        status=status,
        amount_cents=int(charge["amount"]),
        paid_amount_cents=int(charge["paid_amount"]) if status == "paid" else None,
        paid_at=paid_at,
    )


def _card_charge_state(charge: dict[str, Any]) -> CardChargeState:
    if charge["payment_method"] != "credit_card":
        raise ValueError(f"charge {charge['id']} is not a card charge")
    amount, canceled = int(charge["amount"]), int(charge.get("canceled_amount") or 0)
    status: CardGatewayStatus = {"paid": "paid", "canceled": "refunded", "chargedback": "chargedback"}.get(
        charge["status"], "other"
    )
    if status == "paid" and canceled:
        status = "refunded"  # a part of it
    return CardChargeState(
        gateway_id=str(charge["id"]),
        status=status,
        amount_cents=amount,
        reversed_cents=amount if status == "chargedback" else canceled,
    )


def _refund_result(charge: dict[str, Any], amount_cents: int, idempotency_key: str) -> RefundResult:
    transaction = charge["last_transaction"]
    if transaction.get("status") not in ("refunded", "partial_refunded", "voided", "partial_void"):
        # e.g. `pending_refund`: not money known to be back; the same key asks again later.
        raise ValueError(f"refund transaction is {transaction.get('status')!r}")
    if int(transaction["amount"]) != amount_cents:
        raise ValueError(f"refunded {transaction['amount']}, asked {amount_cents}")
    return RefundResult(
        gateway_id=str(transaction["id"]),
        charge_gateway_id=str(charge["id"]),
        amount_cents=amount_cents,
        idempotency_key=idempotency_key,
        status="succeeded",
    )


def _instant(value: str) -> datetime:
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    # Pagar.me's timestamps are UTC; some (its webhook samples) omit the offset.
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _date(value: str) -> date:
    return _instant(value).date() if "T" in value else date.fromisoformat(value)
