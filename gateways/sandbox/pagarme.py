"""The sandbox speaking Pagar.me's API v5 (`renova gateway --flavor pagarme`), for tests and development.

Serves, under `/core/v5` as api.pagar.me does, the subset of the API that `gateways.pagarme` uses, in
its documented shapes: `POST /orders` (one credit-card or boleto payment; `Idempotency-Key`), `GET
/orders?code=`, `GET /orders/{id}`, `GET /charges/{id}`, `DELETE /charges/{id}` (cancel: a refund,
whole or `{"amount"}` in part, or an unpaid boleto). Requests authenticate with HTTP Basic, the secret
key as the user name and an empty password. Ids look like Pagar.me's (`or_…`, `ch_…`, `tran_…`,
`hook_…`), amounts are cents, times are ISO 8601 in UTC.

Underneath it is the same store as the sandbox's own API: the same test cards (`tok_ok`,
`tok_insufficient_funds`, … given as `card_id` or `card_token`, with or without a `customer_id`: the
emulator's test cards stand for a test customer's saved cards) with the same outcomes, the same faults,
ledger, idempotency (24 h) and the `/sandbox` control routes (pay or expire a boleto, faults, ledger).
Where the sandbox answers 402 to a decline, Pagar.me answers 200 with a `failed` order whose
transaction carries the acquirer's return code; where the sandbox answers 503 "not processed", this
flavor answers 429 (Pagar.me's rate limit: nothing was processed). A paid or expired boleto posts a
Pagar.me webhook (`charge.paid`, `charge.underpaid`, `charge.overpaid`, `charge.payment_failed`), a
refund `charge.refunded` or `charge.partial_canceled`, and a chargeback (`/sandbox/charges/{id}/chargeback`)
`charge.chargedback`, with the Basic credentials configured for the endpoint, as Pagar.me does.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import sqlite3
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import Annotated, Any, Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import APIRouter, Body, Depends, Header, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator
from starlette.concurrency import run_in_threadpool

from gateways.pagarme_webhooks import basic_credentials, new_signing_key
from gateways.sandbox.models import (
    BANK_CODE,
    MAX_CHARGE_CENTS,
    ApiError,
    BoletoIn,
    ChargeIn,
    Faults,
    PayerIn,
    RefundIn,
    Reply,
    SandboxConfig,
    _new_id,
    fingerprint,
)
from gateways.sandbox.schema import _SELECT_CHARGE
from gateways.sandbox.store import Store
from gateways.sandbox.webhooks import EventWriter, record_delivery
from models.boleto import MAX_AMOUNT_CENTS, due_factor

PREFIX = "/core/v5"
BOLETO_ID_PREFIX = "ch"  # a Pagar.me boleto is a charge: its id is what Renova keeps and cancels
REFUND_ID_PREFIX = "tran"  # a refund is the charge's cancelling transaction
ACCOUNT = {"id": "acc_renovaEmulator01", "name": "Renova (emulador Pagar.me)"}

# What the acquirer answers for each of the sandbox's declines (ABECS return codes, as Pagar.me shows
# them in `acquirer_return_code`); an approval is "00".
ACQUIRER_RETURN_CODES: dict[str, tuple[str, str]] = {
    "insufficient_funds": ("51", "Saldo/limite insuficiente"),
    "do_not_honor": ("05", "Transação não autorizada"),
    "expired_card": ("54", "Cartão vencido"),
    "stolen_card": ("43", "Cartão roubado"),
}
APPROVED = ("00", "Transação aprovada com sucesso")


# --- errors in Pagar.me's shape -----------------------------------------------------------------------


def error_body(message: str, errors: dict[str, list[str]] | None = None) -> dict[str, Any]:
    return {"message": message, **({"errors": errors} if errors else {})}


def invalid(errors: dict[str, list[str]]) -> ApiError:
    """A 422 as Pagar.me answers a request that fails validation: the message and, per field, what is wrong."""
    return PagarmeError(422, error_body("The request is invalid.", errors))


class PagarmeError(ApiError):
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        Exception.__init__(self, body.get("message", ""))
        self.status = status
        self.body = body


def validation_errors(exc: ValidationError, root: str) -> dict[str, list[str]]:
    errors: dict[str, list[str]] = {}
    for error in exc.errors():
        location = ".".join(
            f"[{part}]" if isinstance(part, int) else str(part) for part in error["loc"] if part != "body"
        ).replace(".[", "[")
        errors.setdefault(f"{root}.{location}" if location else root, []).append(error["msg"])
    return errors


# --- request bodies ---------------------------------------------------------------------------------


class _Lenient(BaseModel):
    # Pagar.me takes many more fields than the emulator uses; those are accepted and ignored.
    model_config = ConfigDict(extra="ignore")


class ItemIn(_Lenient):
    amount: StrictInt = Field(gt=0, le=MAX_CHARGE_CENTS)
    description: str = Field(min_length=1, max_length=256)
    quantity: StrictInt = Field(1, ge=1, le=1000)
    code: str | None = Field(None, max_length=52)


class CustomerIn(_Lenient):
    name: str = Field(min_length=1, max_length=64)
    email: str | None = Field(None, max_length=64)
    document: str | None = Field(None, min_length=11, max_length=18)
    type: Literal["individual", "company"] | None = None
    document_type: Literal["CPF", "CNPJ", "PASSPORT"] | None = None


class CreditCardIn(_Lenient):
    card_id: str | None = Field(None, min_length=1, max_length=200)
    card_token: str | None = Field(None, min_length=1, max_length=200)
    installments: StrictInt = Field(1, ge=1, le=24)
    statement_descriptor: str | None = Field(None, max_length=22)
    operation_type: Literal["auth_and_capture", "auth_only", "pre_auth"] = "auth_and_capture"

    @property
    def reference(self) -> str | None:
        return self.card_id or self.card_token


class BoletoPaymentIn(_Lenient):
    due_at: datetime
    instructions: str | None = Field(None, max_length=256)
    document_number: str | None = Field(None, max_length=16)
    type: Literal["DM", "BDP"] = "DM"
    bank: str | None = None

    @field_validator("due_at")
    @classmethod
    def _encodable(cls, value: datetime) -> datetime:
        due_factor(value.date())  # a date the barcode cannot carry is refused, as a bank would
        return value


class PaymentIn(_Lenient):
    payment_method: Literal["credit_card", "boleto"]
    amount: StrictInt | None = Field(None, gt=0)
    credit_card: CreditCardIn | None = None
    boleto: BoletoPaymentIn | None = None


class OrderIn(_Lenient):
    code: str | None = Field(None, max_length=52)
    customer_id: str | None = Field(None, max_length=64)
    customer: CustomerIn | None = None
    items: list[ItemIn] = Field(min_length=1, max_length=100)
    payments: list[PaymentIn] = Field(min_length=1, max_length=1)  # the emulator takes one payment
    closed: bool = True
    metadata: dict[str, str] = Field(default_factory=dict)

    @property
    def amount(self) -> int:
        return sum(item.amount * item.quantity for item in self.items)


class CancelIn(_Lenient):
    amount: StrictInt | None = Field(None, gt=0, le=MAX_CHARGE_CENTS)


# --- shapes ---------------------------------------------------------------------------------------


def iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def paid_at(paid_on: str) -> str:
    # Noon in São Paulo (15:00 UTC): the payment's instant falls on the day it was paid there.
    return datetime.combine(date.fromisoformat(paid_on), time(15, 0), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _token(object_id: str) -> str:
    return object_id.split("_", 1)[1]


def _digits(object_id: str, length: int) -> str:
    return str(int(hashlib.sha256(object_id.encode()).hexdigest(), 16))[:length]


def customer_json(order: sqlite3.Row) -> dict[str, Any]:
    customer = json.loads(order["customer"])
    document = customer.get("document") or ""
    return {
        "id": customer.get("id") or f"cus_{hashlib.sha256(document.encode()).hexdigest()[:16]}",
        "name": customer.get("name", ""),
        "email": customer.get("email"),
        "document": document,
        "type": customer.get("type") or ("company" if len(document) == 14 else "individual"),
        "delinquent": False,
        "created_at": iso(order["created"]),
        "updated_at": iso(order["created"]),
    }


def _card_transaction(charge: sqlite3.Row, order: sqlite3.Row) -> dict[str, Any]:
    approved = charge["status"] == "succeeded"
    code, message = APPROVED if approved else ACQUIRER_RETURN_CODES[charge["failure_code"]]
    reference = charge["card_token"]
    return {
        "id": f"tran_{_token(charge['id'])}",
        "transaction_type": "credit_card",
        "gateway_id": _digits(charge["id"], 10),
        "amount": charge["amount_cents"],
        "status": "captured" if approved else "not_authorized",
        "success": approved,
        "installments": 1,
        "statement_descriptor": json.loads(order["payment"]).get("statement_descriptor") or "CONECTA",
        "acquirer_name": "simulator",
        "acquirer_tid": _digits(charge["id"], 12),
        "acquirer_nsu": _digits(charge["id"], 6),
        "acquirer_auth_code": _digits(charge["id"], 6) if approved else None,
        "acquirer_message": message,
        "acquirer_return_code": code,
        "operation_type": "auth_and_capture",
        "card": {"id": reference if reference.startswith("card_") else None, "last_four_digits": "0010"},
        "gateway_response": {"code": "200", "errors": []},
        "antifraud_response": {},
        "created_at": iso(charge["created"]),
        "updated_at": iso(charge["created"]),
    }


def _refund_transaction(refund: sqlite3.Row, charge: sqlite3.Row, left_cents: int) -> dict[str, Any]:
    return {
        "id": refund["id"],
        "transaction_type": "credit_card",
        "gateway_id": _digits(refund["id"], 10),
        "amount": refund["amount_cents"],
        "status": "refunded" if left_cents == 0 else "partial_refunded",
        "success": True,
        "operation_type": "cancel",
        "acquirer_name": "simulator",
        "acquirer_tid": _digits(charge["id"], 12),
        "acquirer_return_code": "00",
        "acquirer_message": "Transação cancelada com sucesso",
        "gateway_response": {"code": "200", "errors": []},
        "created_at": iso(refund["created"]),
        "updated_at": iso(refund["created"]),
    }


BOLETO_CHARGE_STATUS = {"issued": "pending", "canceled": "canceled", "expired": "failed"}


def _boleto_charge_status(boleto: sqlite3.Row) -> str:
    if boleto["status"] != "paid":
        return BOLETO_CHARGE_STATUS[boleto["status"]]
    paid, owed = boleto["paid_amount_cents"], boleto["amount_cents"]
    return "paid" if paid == owed else ("underpaid" if paid < owed else "overpaid")


def _boleto_transaction(boleto: sqlite3.Row, order: sqlite3.Row, config: SandboxConfig) -> dict[str, Any]:
    payment = json.loads(order["payment"])
    status = {"pending": "generated", "failed": "voided"}.get(charge_status := _boleto_charge_status(boleto))
    link = f"https://emulator.pagar.me/boletos/{_token(boleto['id'])}"
    return {
        "id": f"tran_{_token(boleto['id'])}",
        "transaction_type": "boleto",
        "gateway_id": _digits(boleto["id"], 10),
        "amount": boleto["amount_cents"],
        "status": status or charge_status,
        "success": True,
        "url": link,
        "pdf": f"{link}/pdf",
        "line": boleto["digitable_line"],
        "barcode": f"{link}/barcode",
        "qr_code": f"{link}/qrcode",  # an image, as Pagar.me documents it (no Pix payload)
        "nosso_numero": boleto["nosso_numero"],
        "bank": BANK_CODE,
        "document_number": payment.get("document_number") or boleto["nosso_numero"],
        "instructions": payment.get("instructions") or "",
        "type": payment.get("type") or "DM",
        "due_at": f"{boleto['due_date']}T00:00:00Z",
        "paid_at": paid_at(boleto["paid_on"]) if boleto["paid_on"] else None,
        "paid_amount": boleto["paid_amount_cents"],
        "gateway_response": {"code": "200", "errors": []},
        "antifraud_response": {},
        "created_at": iso(boleto["created"]),
        "updated_at": iso(boleto["updated"]),
    }


def charge_json(db: sqlite3.Connection, order: sqlite3.Row, config: SandboxConfig) -> dict[str, Any]:
    """The order's charge as Pagar.me shows it now (`GET /charges/{id}`, and inside its order)."""
    card = db.execute(f"{_SELECT_CHARGE} WHERE id = ?", (order["charge_id"],)).fetchone()
    base = {"id": order["charge_id"], "code": order["code"], "currency": "BRL", "customer": customer_json(order)}
    if card is not None:
        refunded = card["amount_refunded_cents"]
        left = card["amount_cents"] - refunded
        charged_back = db.execute("SELECT 1 FROM chargebacks WHERE charge_id = ?", (card["id"],)).fetchone()
        status = (
            "failed"
            if card["status"] == "failed"
            else "chargedback"
            if charged_back
            else "canceled"
            if left == 0
            else "paid"
        )
        last_refund = db.execute(
            "SELECT * FROM refunds WHERE charge_id = ? ORDER BY created DESC, rowid DESC LIMIT 1", (card["id"],)
        ).fetchone()
        return {
            **base,
            "gateway_id": _digits(card["id"], 10),
            "amount": card["amount_cents"],
            "paid_amount": card["amount_cents"] if card["status"] == "succeeded" else 0,
            "canceled_amount": refunded,
            "status": status,
            "payment_method": "credit_card",
            "paid_at": iso(card["created"]) if card["status"] == "succeeded" else None,
            "canceled_at": iso(last_refund["created"]) if last_refund is not None and left == 0 else None,
            "created_at": iso(card["created"]),
            "updated_at": iso(last_refund["created"] if last_refund is not None else card["created"]),
            "last_transaction": (
                _refund_transaction(last_refund, card, left)
                if last_refund is not None
                else _card_transaction(card, order)
            ),
            "metadata": json.loads(order["metadata"]),
        }
    boleto = db.execute("SELECT * FROM boletos WHERE id = ?", (order["charge_id"],)).fetchone()
    status = _boleto_charge_status(boleto)
    return {
        **base,
        "gateway_id": _digits(boleto["id"], 10),
        "amount": boleto["amount_cents"],
        "paid_amount": boleto["paid_amount_cents"] or 0,
        "canceled_amount": boleto["amount_cents"] if status == "canceled" else 0,
        "status": status,
        "payment_method": "boleto",
        "due_at": f"{boleto['due_date']}T00:00:00Z",
        "paid_at": paid_at(boleto["paid_on"]) if boleto["paid_on"] else None,
        "canceled_at": iso(boleto["updated"]) if status == "canceled" else None,
        "created_at": iso(boleto["created"]),
        "updated_at": iso(boleto["updated"]),
        "last_transaction": _boleto_transaction(boleto, order, config),
        "metadata": json.loads(order["metadata"]),
    }


ORDER_STATUS = {
    "paid": "paid",
    "underpaid": "paid",
    "overpaid": "paid",
    "chargedback": "paid",
    "failed": "failed",
    "canceled": "canceled",
}


def order_json(db: sqlite3.Connection, order: sqlite3.Row, config: SandboxConfig) -> dict[str, Any]:
    charge = charge_json(db, order, config)
    return {
        "id": order["id"],
        "code": order["code"],
        "amount": order["amount"],
        "currency": "BRL",
        "closed": True,
        "items": json.loads(order["items"]),
        "customer": charge["customer"],
        "status": ORDER_STATUS.get(charge["status"], "pending"),
        "created_at": iso(order["created"]),
        "updated_at": charge["updated_at"],
        "closed_at": iso(order["created"]),
        "charges": [charge],
        "metadata": json.loads(order["metadata"]),
    }


def charge_with_order(db: sqlite3.Connection, order: sqlite3.Row, config: SandboxConfig) -> dict[str, Any]:
    whole = order_json(db, order, config)
    return {**whole["charges"][0], "order": {k: v for k, v in whole.items() if k != "charges"}}


# --- state: orders over the sandbox's charges and boletos ------------------------------------------------


def _order_for_charge(db: sqlite3.Connection, charge_id: str) -> sqlite3.Row | None:
    return db.execute("SELECT * FROM orders WHERE charge_id = ?", (charge_id,)).fetchone()


def _items_json(order: OrderIn, now: float) -> str:
    return json.dumps(
        [
            {
                "id": f"oi_{_new_id('x')[2:18]}",
                "code": item.code,
                "description": item.description,
                "amount": item.amount,
                "quantity": item.quantity,
                "status": "active",
                "created_at": iso(now),
                "updated_at": iso(now),
            }
            for item in order.items
        ]
    )


def _customer(order: OrderIn, payer: PayerIn | None) -> dict[str, Any]:
    if payer is not None:
        return {"name": payer.name, "email": payer.email, "document": payer.document}
    if order.customer is not None:
        return order.customer.model_dump(mode="json")
    return {"id": order.customer_id, "name": ""}


def create_order(store: Store, config: SandboxConfig, key: str, fingerprint: str, order: OrderIn) -> Reply:
    """Process an order once per key: its charge through the sandbox's store, the answer in Pagar.me's shape."""
    payment = order.payments[0]
    amount = payment.amount or order.amount
    if amount != order.amount:
        raise invalid({"order.payments[0].amount": ["The payments' amount must equal the items' total."]})
    payer = _payer(order) if payment.payment_method == "boleto" else None
    if payment.payment_method == "credit_card":
        card = payment.credit_card
        if card is None or card.reference is None:
            raise invalid({"order.payments[0].credit_card": ["A card_id, card_token or card is required."]})
    elif payment.boleto is None:
        raise invalid({"order.payments[0].boleto": ["The boleto field is required."]})

    def process(db: sqlite3.Connection, now: float) -> Reply:
        if payment.payment_method == "credit_card":
            assert payment.credit_card is not None and payment.credit_card.reference is not None
            description = order.items[0].description
            answer = store.process_charge(
                db,
                now,
                key,
                ChargeIn(card_token=payment.credit_card.reference, amount_cents=amount, description=description),
            )
        else:
            assert payment.boleto is not None and payer is not None
            if amount > MAX_AMOUNT_CENTS:
                return Reply(422, error_body("The request is invalid.", {"order.amount": ["Too large for a boleto."]}))
            answer = store.process_boleto(
                db,
                now,
                key,
                BoletoIn.model_construct(
                    invoice_id=_invoice_id(order),
                    amount_cents=amount,
                    description=order.items[0].description,
                    payer=payer,
                    due_date=payment.boleto.due_at.date(),
                ),
            )
        if not answer.processed:
            return _refusal(answer)
        charge_id = answer.body["id"] if answer.status == 200 else answer.body["error"]["charge"]["id"]
        order_id = f"or_{_token(charge_id)}"
        payment_details = (payment.credit_card or payment.boleto).model_dump(mode="json")  # type: ignore[union-attr]
        db.execute(
            "INSERT INTO orders (id, code, charge_id, amount, customer, items, payment, metadata, created) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                order_id,
                order.code or order_id,
                charge_id,
                amount,
                json.dumps(_customer(order, payer)),
                _items_json(order, now),
                json.dumps(payment_details),
                json.dumps(order.metadata),
                now,
            ),
        )
        row = db.execute("SELECT * FROM orders WHERE id = ?", (order_id,)).fetchone()
        return Reply(200, order_json(db, row, config), processed=True, stall=answer.stall)

    return _in_pagarme_words(store.idempotent(key, fingerprint, process))


def _in_pagarme_words(reply: Reply) -> Reply:
    """`Store.idempotent`'s own refusal (a key reused with another request) in Pagar.me's shape; a
    processed or replayed answer is already in it."""
    if reply.processed or reply.replayed or "error" not in reply.body:
        return reply
    return _refusal(reply)


def _payer(order: OrderIn) -> PayerIn:
    customer = order.customer
    if customer is None or not customer.document:
        raise invalid({"order.customer.document": ["A boleto needs the customer's CPF or CNPJ."]})
    try:
        return PayerIn(name=customer.name, document=customer.document, email=customer.email)
    except ValidationError as exc:
        raise invalid(validation_errors(exc, "order.customer")) from None


def _invoice_id(order: OrderIn) -> int:
    raw = order.metadata.get("invoice_id", "")
    return int(raw) if raw.isdigit() else 0


def _refusal(answer: Reply) -> Reply:
    """The sandbox's refusal (nothing processed) in Pagar.me's words."""
    error = answer.body.get("error", {})
    if answer.status == 503:
        return Reply(429, error_body("Too many requests; the request was not processed."))
    if error.get("type") == "idempotency_error":
        return Reply(409, error_body(error.get("message", "Idempotency-Key conflict.")))
    if error.get("code") == "invalid_card_token":
        return Reply(422, error_body("The request is invalid.", {"order.payments[0].credit_card": ["Card not found."]}))
    status = 422 if answer.status == 400 else answer.status
    return Reply(status, error_body(error.get("message", "The request is invalid.")))


def cancel_charge(
    store: Store, config: SandboxConfig, key: str, fingerprint: str, charge_id: str, amount: int | None
) -> Reply:
    """`DELETE /charges/{id}`: refund a card charge (whole, or `amount` of it), or cancel an unpaid boleto."""

    def process(db: sqlite3.Connection, now: float) -> Reply:
        order = _order_for_charge(db, charge_id)
        if order is None:
            return Reply(404, error_body("Charge not found."))
        card = db.execute(f"{_SELECT_CHARGE} WHERE id = ?", (charge_id,)).fetchone()
        if card is None:
            return _cancel_boleto(db, now, order)
        left = card["amount_cents"] - card["amount_refunded_cents"]
        if card["status"] == "succeeded" and left == 0:
            return Reply(422, error_body("The charge is already canceled."))
        answer = store.process_refund(db, now, key, charge_id, RefundIn(amount_cents=amount or max(left, 1)))
        if not answer.processed:
            return _refusal(answer)
        charge = charge_with_order(db, order, config)
        event = "charge.refunded" if charge["status"] == "canceled" else "charge.partial_canceled"
        write_charge_event(db, now, event, charge, config.webhook_url)
        return Reply(200, charge, processed=True)

    def _cancel_boleto(db: sqlite3.Connection, now: float, order: sqlite3.Row) -> Reply:
        boleto = db.execute("SELECT * FROM boletos WHERE id = ?", (charge_id,)).fetchone()
        if boleto["status"] == "paid":
            return Reply(422, error_body("The charge is paid: it cannot be canceled."))
        if boleto["status"] == "issued":
            db.execute("UPDATE boletos SET status = 'canceled', updated = ? WHERE id = ?", (now, charge_id))
        return Reply(200, charge_with_order(db, order, config), processed=True)

    return _in_pagarme_words(store.idempotent(key, fingerprint, process))


# --- webhooks -----------------------------------------------------------------------------------------


def webhook_writer(config: SandboxConfig) -> EventWriter:
    """The store's event writer for this flavor: a paid or expired boleto becomes Pagar.me's charge event."""

    def write(
        db: sqlite3.Connection,
        now: float,
        type_: str,
        boleto: sqlite3.Row,
        amount_cents: int,
        paid_on: date | None,
        webhook_url: str,
        *,
        via: str | None = None,
    ) -> str:
        order = _order_for_charge(db, boleto["id"])
        assert order is not None, "every emulator boleto has its order"
        charge = charge_with_order(db, order, config)
        event_type = "charge.payment_failed" if type_ == "boleto.expired" else f"charge.{charge['status']}"
        return write_charge_event(db, now, event_type, charge, webhook_url)

    return write


def write_charge_event(db: sqlite3.Connection, now: float, event_type: str, charge: dict[str, Any], url: str) -> str:
    """Queue Pagar.me's webhook about a charge (`data` is the charge as it is now), in the caller's transaction."""
    hook_id = f"hook_{_new_id('x')[2:18]}"
    body = {"id": hook_id, "account": ACCOUNT, "type": event_type, "created_at": iso(now), "data": charge}
    record_delivery(db, now, hook_id, event_type, json.dumps(body, separators=(",", ":")).encode(), url)
    return hook_id


def charge_back(store: Store, config: SandboxConfig, charge_id: str) -> dict[str, Any]:
    """What a cardholder's bank does weeks later: the paid card charge is charged back (`chargedback`),
    with its `charge.chargedback` webhook. Not Pagar.me's API: the emulator's control (`/sandbox`)."""
    now = datetime.now(UTC).timestamp()
    with store.transaction() as db:
        card = db.execute(f"{_SELECT_CHARGE} WHERE id = ?", (charge_id,)).fetchone()
        order = _order_for_charge(db, charge_id)
        if card is None or order is None:
            raise ApiError(404, "invalid_request_error", "resource_missing", f"No card charge {charge_id!r}.")
        if card["status"] != "succeeded" or card["amount_refunded_cents"] >= card["amount_cents"]:
            raise ApiError(409, "invalid_request_error", "not_chargeable_back", "Only a paid charge is charged back.")
        if db.execute("SELECT 1 FROM chargebacks WHERE charge_id = ?", (charge_id,)).fetchone():
            raise ApiError(409, "invalid_request_error", "already_charged_back", "The charge was charged back.")
        db.execute("INSERT INTO chargebacks (charge_id, created) VALUES (?, ?)", (charge_id, now))
        charge = charge_with_order(db, order, config)
        event_id = write_charge_event(db, now, "charge.chargedback", charge, config.webhook_url)
        return {"charge": charge, "event_id": event_id}


def signing_key(data_dir: Path) -> rsa.RSAPrivateKey:
    """The emulator's webhook signing key, made once and kept in its data folder."""
    path = data_dir / "webhook-signing-key.pem"
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        assert isinstance(key, rsa.RSAPrivateKey)
        return key
    key = new_signing_key()
    data_dir.mkdir(parents=True, exist_ok=True)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    temporary = path.with_suffix(".tmp")
    temporary.write_bytes(pem)
    temporary.replace(path)
    return key


# --- routes -------------------------------------------------------------------------------------------


def basic_secret_key(authorization: str | None) -> str | None:
    """The secret key of a Basic `Authorization` header (user name; the password is empty), or None."""
    credentials = basic_credentials(authorization)
    return credentials[0] if credentials else None


def router(
    store: Store,
    config: SandboxConfig,
    front_door: Callable[[Request], Awaitable[Faults]],
    respond: Callable[[Reply, Faults], Awaitable[JSONResponse]],
) -> APIRouter:
    def require_secret_key(authorization: Annotated[str | None, Header()] = None) -> None:
        key = basic_secret_key(authorization)
        if key is None or not hmac.compare_digest(key.encode(), config.api_key.encode()):
            raise PagarmeError(401, error_body("Authorization has been denied for this request."))

    api = APIRouter(prefix=PREFIX, dependencies=[Depends(require_secret_key)])

    def checked_key(key: str | None) -> str:
        if key is None:
            return _new_id("idem")  # Pagar.me does not require one; each keyless request is new
        if not 1 <= len(key) <= 255:
            raise invalid({"Idempotency-Key": ["Must have 1 to 255 characters."]})
        return key

    @api.post("/orders")
    async def create(
        request: Request,
        payload: Annotated[Any, Body()] = None,
        key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
    ) -> JSONResponse:
        idempotency_key = checked_key(key)
        try:
            order = OrderIn.model_validate(payload)
        except ValidationError as exc:
            raise invalid(validation_errors(exc, "order")) from None
        found = await front_door(request)
        request_fingerprint = fingerprint("POST", f"{PREFIX}/orders", order)
        reply = await run_in_threadpool(create_order, store, config, idempotency_key, request_fingerprint, order)
        return await respond(reply, found)

    @api.get("/orders")
    async def search(
        request: Request,
        code: Annotated[str | None, Query(max_length=52)] = None,
        page: Annotated[int, Query(ge=1)] = 1,
        size: Annotated[int, Query(ge=1, le=100)] = 10,
    ) -> JSONResponse:
        await front_door(request)

        def read() -> dict[str, Any]:
            with store.transaction() as db:
                where, params = ("WHERE code = ?", [code]) if code is not None else ("", [])
                total = db.execute(f"SELECT COUNT(*) FROM orders {where}", params).fetchone()[0]
                rows = db.execute(
                    f"SELECT * FROM orders {where} ORDER BY created DESC, id LIMIT ? OFFSET ?",
                    [*params, size, (page - 1) * size],
                ).fetchall()
                return {"data": [order_json(db, row, config) for row in rows], "paging": {"total": total}}

        return JSONResponse(await run_in_threadpool(read))

    @api.get("/orders/{order_id}")
    async def get_order(order_id: str, request: Request) -> JSONResponse:
        await front_door(request)

        def read() -> dict[str, Any] | None:
            with store.transaction() as db:
                row = db.execute("SELECT * FROM orders WHERE id = ?", (order_id,)).fetchone()
                return order_json(db, row, config) if row else None

        found = await run_in_threadpool(read)
        if found is None:
            raise PagarmeError(404, error_body("Order not found."))
        return JSONResponse(found)

    @api.get("/charges/{charge_id}")
    async def get_charge(charge_id: str, request: Request) -> JSONResponse:
        await front_door(request)

        def read() -> dict[str, Any] | None:
            with store.transaction() as db:
                row = _order_for_charge(db, charge_id)
                return charge_with_order(db, row, config) if row else None

        found = await run_in_threadpool(read)
        if found is None:
            raise PagarmeError(404, error_body("Charge not found."))
        return JSONResponse(found)

    @api.delete("/charges/{charge_id}")
    async def cancel(
        charge_id: str,
        request: Request,
        payload: Annotated[Any, Body()] = None,
        key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
    ) -> JSONResponse:
        idempotency_key = checked_key(key)
        try:
            body = CancelIn.model_validate(payload or {})
        except ValidationError as exc:
            raise invalid(validation_errors(exc, "request")) from None
        found = await front_door(request)
        request_fingerprint = fingerprint("DELETE", f"{PREFIX}/charges/{charge_id}", body)
        reply = await run_in_threadpool(
            cancel_charge, store, config, idempotency_key, request_fingerprint, charge_id, body.amount
        )
        return await respond(reply, found)

    return api
