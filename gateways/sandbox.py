"""The sandbox payment gateway: a real HTTP server that behaves like a careful PSP.

Used in development, tests, the demo and benchmarks. State lives in SQLite (WAL) under the data
folder, so a killed and restarted sandbox still knows every charge, replays stored idempotent
responses and resumes pending webhook deliveries.

API conventions (shaped like Stripe's):
- every /v1 and /sandbox route needs `Authorization: Bearer <api_key>`;
- POST /v1/charges, POST /v1/charges/{id}/refunds and POST /v1/boletos need an `Idempotency-Key`: the
  same key with the same body replays the stored response (header `Idempotent-Replayed: true`), with
  another body (or another charge, for a refund) → 409
  (error type "idempotency_error"). Stored responses are kept 24 h; refusals (400, 503) are never
  stored, so a retry is processed;
- errors are `{"error": {"type", "code", "message", ...}}`; a 503 with `"processed": false` (type
  "unavailable") promises the request was not processed;
- a charge can be refunded in parts, never beyond its amount; GET /sandbox/ledger lists each refund as
  a negative line next to the charge it gives back from;
- faults per process (`serve` options, POST /sandbox/config) or per request (headers
  `Sandbox-Latency-Ms`, `Sandbox-Timeout-Rate`, `Sandbox-Unavailable-Rate`, `Sandbox-Stall-Ms`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import random
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import httpx
import uvicorn
from fastapi import APIRouter, Body, Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator
from starlette.concurrency import run_in_threadpool

from gateways.webhooks import SIGNATURE_HEADER, sign
from models.boleto import (
    MAX_AMOUNT_CENTS,
    digitable_line,
    due_factor,
    free_field_for,
    make_barcode,
    nosso_numero,
)

log = logging.getLogger("renova.gateway.sandbox")

BANK_CODE = "999"  # fictitious: no real bank's boletos can be confused with the sandbox's
MAX_CHARGE_CENTS = 100_000_000  # R$ 1.000.000,00 per card charge
IDEMPOTENCY_TTL_SECONDS = 24 * 3600
PURGE_EVERY_SECONDS = 60.0
DEFAULT_STALL_MS = 30_000
WEBHOOK_RETRY_CAP_SECONDS = 3600.0
WEBHOOK_TIMEOUT_SECONDS = 5.0
# With the default 1 s base, 12 attempts span about 34 minutes (waits of 1, 2, 4 … 1024 s), long
# enough to ride out a Renova deploy or restart in development before an event is given up.
DEFAULT_WEBHOOK_MAX_ATTEMPTS = 12
STATE_FILE = "sandbox.sqlite3"


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

    def public(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("api_key", "webhook_secret")}


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


_DOCUMENT_SEPARATORS = re.compile(r"[.\-/\s]")
# CPF: 11 digits. CNPJ: 14, whose first 12 may be letters from July 2026 (alphanumeric CNPJ).
_DOCUMENT = re.compile(r"\d{11}|[0-9A-Z]{12}\d{2}")


class PayerIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    document: str = Field(min_length=11, max_length=20)
    email: str | None = Field(None, max_length=254)

    @field_validator("document")
    @classmethod
    def _cpf_or_cnpj(cls, value: str) -> str:
        cleaned = _DOCUMENT_SEPARATORS.sub("", value).upper()
        if not _DOCUMENT.fullmatch(cleaned):
            raise ValueError("must be a CPF (11 digits) or a CNPJ (14 characters)")
        return cleaned


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


# --- errors and replies ---------------------------------------------------------------------------


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


def _fingerprint(method: str, path: str, payload: BaseModel) -> str:
    canonical = json.dumps(payload.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"{method} {path}\n{canonical}".encode()).hexdigest()


def _new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


# --- state ----------------------------------------------------------------------------------------

# Money in is positive, money given back (refunds) negative; `charge_id` ties a charge's lines together.
LEDGER_TABLE = """
CREATE TABLE IF NOT EXISTS ledger (
    entry INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL CHECK (kind IN ('charge', 'boleto_payment', 'refund')),
    ref TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    amount_cents INTEGER NOT NULL CHECK ((kind = 'refund') = (amount_cents < 0)),
    card_token TEXT,
    charge_id TEXT,
    created REAL NOT NULL,
    UNIQUE (kind, ref)
);
"""

# The ledger is spliced in so that _migrate can rebuild it from the very same definition.
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS idempotency (
    key TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    status_code INTEGER NOT NULL,
    body TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS idempotency_by_created ON idempotency (created);
CREATE TABLE IF NOT EXISTS charges (
    id TEXT PRIMARY KEY,
    idempotency_key TEXT NOT NULL UNIQUE,
    card_token TEXT NOT NULL,
    amount_cents INTEGER NOT NULL,
    description TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('succeeded', 'failed')),
    failure_code TEXT,
    failure_message TEXT,
    hard_decline INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS refusals (
    idempotency_key TEXT PRIMARY KEY,
    count INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS sequences (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS boletos (
    id TEXT PRIMARY KEY,
    idempotency_key TEXT NOT NULL UNIQUE,
    invoice_id INTEGER NOT NULL,
    amount_cents INTEGER NOT NULL,
    description TEXT NOT NULL,
    payer TEXT NOT NULL,
    due_date TEXT NOT NULL,
    nosso_numero TEXT NOT NULL UNIQUE,
    barcode TEXT NOT NULL,
    digitable_line TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('issued', 'paid', 'canceled', 'expired')),
    paid_on TEXT,
    paid_amount_cents INTEGER,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS refunds (
    id TEXT PRIMARY KEY,
    idempotency_key TEXT NOT NULL UNIQUE,
    charge_id TEXT NOT NULL REFERENCES charges (id),
    amount_cents INTEGER NOT NULL CHECK (amount_cents > 0),
    status TEXT NOT NULL CHECK (status IN ('succeeded')),
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS refunds_by_charge ON refunds (charge_id);
{LEDGER_TABLE.strip()}
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    type TEXT NOT NULL,
    url TEXT NOT NULL,
    body TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'delivered', 'failed', 'disabled')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL,
    last_status_code INTEGER,
    last_error TEXT,
    created REAL NOT NULL,
    delivered_at REAL
);
CREATE INDEX IF NOT EXISTS webhook_deliveries_due ON webhook_deliveries (status, next_attempt_at);
"""


# Charges are always read with what has been refunded of them so far.
_SELECT_CHARGE = (
    "SELECT charges.*, (SELECT COALESCE(SUM(refunds.amount_cents), 0) FROM refunds "
    "WHERE refunds.charge_id = charges.id) AS amount_refunded_cents FROM charges"
)


def _charge_json(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "id": row["id"],
        "object": "charge",
        "status": row["status"],
        "amount_cents": row["amount_cents"],
        "amount_refunded_cents": row["amount_refunded_cents"],
        "currency": "BRL",
        "idempotency_key": row["idempotency_key"],
        "card_token": row["card_token"],
        "description": row["description"],
        "failure_code": row["failure_code"],
        "failure_message": row["failure_message"],
        "hard_decline": bool(row["hard_decline"]),
        "created": int(row["created"]),
    }


def _refund_json(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "id": row["id"],
        "object": "refund",
        "status": row["status"],
        "charge_id": row["charge_id"],
        "amount_cents": row["amount_cents"],
        "currency": "BRL",
        "idempotency_key": row["idempotency_key"],
        "created": int(row["created"]),
    }


def _boleto_json(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "id": row["id"],
        "object": "boleto",
        "status": row["status"],
        "invoice_id": row["invoice_id"],
        "amount_cents": row["amount_cents"],
        "description": row["description"],
        "payer": json.loads(row["payer"]),
        "due_date": row["due_date"],
        "nosso_numero": row["nosso_numero"],
        "bank_code": BANK_CODE,
        "barcode": row["barcode"],
        "digitable_line": row["digitable_line"],
        "paid_on": row["paid_on"],
        "paid_amount_cents": row["paid_amount_cents"],
        "idempotency_key": row["idempotency_key"],
        "created": int(row["created"]),
    }


def _delivery_json(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "id": row["id"],
        "event_id": row["event_id"],
        "type": row["type"],
        "url": row["url"],
        "status": row["status"],
        "attempts": row["attempts"],
        "next_attempt_at": row["next_attempt_at"],
        "last_status_code": row["last_status_code"],
        "last_error": row["last_error"],
        "created": row["created"],
        "delivered_at": row["delivered_at"],
        "event": json.loads(row["body"]),
    }


class Store:
    """All sandbox state. One connection behind a lock: every operation is a short serialized
    transaction, which also serializes concurrent requests with the same idempotency key."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode survives a killed process (only an OS crash may lose the last commits).
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._migrate()
        self._lock = threading.Lock()
        self._last_purge = 0.0

    def _migrate(self) -> None:
        """Bring a state file written before refunds existed up to SCHEMA, keeping every entry.

        CREATE TABLE IF NOT EXISTS leaves an old ledger as it was, and SQLite cannot change a CHECK
        constraint in place: the table is rebuilt, in one transaction so a kill leaves either form.
        """
        row = self._db.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'ledger'").fetchone()
        if "'refund'" in row["sql"]:
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.execute("ALTER TABLE ledger RENAME TO ledger_before_refunds")
            self._db.execute(LEDGER_TABLE)
            self._db.execute(
                "INSERT INTO ledger (entry, kind, ref, idempotency_key, amount_cents, card_token, charge_id, created) "
                "SELECT entry, kind, ref, idempotency_key, amount_cents, card_token, "
                "CASE WHEN kind = 'charge' THEN ref END, created FROM ledger_before_refunds"
            )
            self._db.execute("DROP TABLE ledger_before_refunds")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # idempotency

    def idempotent(self, key: str, fingerprint: str, process: Callable[[sqlite3.Connection, float], Reply]) -> Reply:
        now = time.time()
        with self.transaction() as db:
            if now - self._last_purge > PURGE_EVERY_SECONDS:
                db.execute("DELETE FROM idempotency WHERE created < ?", (now - IDEMPOTENCY_TTL_SECONDS,))
                self._last_purge = now
            row = db.execute("SELECT fingerprint, status_code, body FROM idempotency WHERE key = ?", (key,)).fetchone()
            if row is not None:
                if not hmac.compare_digest(row["fingerprint"], fingerprint):
                    return Reply(
                        409,
                        _error(
                            "idempotency_error",
                            "idempotency_key_reused",
                            "Idempotency-Key already used with a different request.",
                        ),
                    )
                return Reply(row["status_code"], json.loads(row["body"]), replayed=True)
            reply = process(db, now)
            if reply.processed:
                db.execute(
                    "INSERT INTO idempotency (key, fingerprint, status_code, body, created) VALUES (?, ?, ?, ?, ?)",
                    (key, fingerprint, reply.status, json.dumps(reply.body), now),
                )
            return reply

    @staticmethod
    def _expired_key(db: sqlite3.Connection, table: str, key: str) -> Reply | None:
        # The stored response was purged but the object is still here: refuse rather than redo it.
        if db.execute(f"SELECT 1 FROM {table} WHERE idempotency_key = ?", (key,)).fetchone() is None:
            return None
        return Reply(
            409,
            _error(
                "idempotency_error",
                "idempotency_key_expired",
                "Idempotency-Key was used more than 24 h ago; look the object up instead.",
            ),
        )

    # charges

    def create_charge(self, key: str, fingerprint: str, payload: ChargeIn) -> Reply:
        def process(db: sqlite3.Connection, now: float) -> Reply:
            card = TEST_CARDS.get(payload.card_token)
            if card is None:
                return Reply(
                    400,
                    _error(
                        "invalid_request_error",
                        "invalid_card_token",
                        f"Unknown card token {payload.card_token!r}.",
                    ),
                )
            expired = self._expired_key(db, "charges", key)
            if expired is not None:
                return expired
            if card.refusals:
                row = db.execute("SELECT count FROM refusals WHERE idempotency_key = ?", (key,)).fetchone()
                refused = row["count"] if row else 0
                if refused < card.refusals:
                    db.execute(
                        "INSERT INTO refusals (idempotency_key, count) VALUES (?, 1) "
                        "ON CONFLICT (idempotency_key) DO UPDATE SET count = count + 1",
                        (key,),
                    )
                    return Reply(503, _not_processed("Temporarily unavailable; the charge was not processed."))
            charge_id = _new_id("ch")
            db.execute(
                "INSERT INTO charges (id, idempotency_key, card_token, amount_cents, description, status, "
                "failure_code, failure_message, hard_decline, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    charge_id,
                    key,
                    payload.card_token,
                    payload.amount_cents,
                    payload.description,
                    "succeeded" if card.succeeds else "failed",
                    card.code,
                    card.message,
                    int(card.hard),
                    now,
                ),
            )
            charge = _charge_json(db.execute(f"{_SELECT_CHARGE} WHERE id = ?", (charge_id,)).fetchone())
            if not card.succeeds:
                assert card.code is not None and card.message is not None
                body = _error("card_error", card.code, card.message, hard=card.hard, charge=charge)
                return Reply(402, body, processed=True)
            db.execute(
                "INSERT INTO ledger (kind, ref, idempotency_key, amount_cents, card_token, charge_id, created) "
                "VALUES ('charge', ?, ?, ?, ?, ?, ?)",
                (charge_id, key, payload.amount_cents, payload.card_token, charge_id, now),
            )
            return Reply(200, charge, processed=True, stall=card.stall)

        return self.idempotent(key, fingerprint, process)

    def find_charge(self, *, key: str | None = None, charge_id: str | None = None) -> dict[str, Any] | None:
        column, value = ("idempotency_key", key) if key is not None else ("id", charge_id)
        with self.transaction() as db:
            row = db.execute(f"{_SELECT_CHARGE} WHERE {column} = ?", (value,)).fetchone()
        return _charge_json(row) if row else None

    # refunds

    def create_refund(self, key: str, fingerprint: str, charge_id: str, payload: RefundIn) -> Reply:
        def process(db: sqlite3.Connection, now: float) -> Reply:
            expired = self._expired_key(db, "refunds", key)
            if expired is not None:
                return expired
            # Refusals below are not stored under the key (like a charge's 400): nothing was processed.
            charge = db.execute(f"{_SELECT_CHARGE} WHERE id = ?", (charge_id,)).fetchone()
            if charge is None:
                return Reply(404, _error("invalid_request_error", "charge_not_found", f"No charge {charge_id!r}."))
            if charge["status"] != "succeeded":
                return Reply(
                    400,
                    _error(
                        "invalid_request_error",
                        "charge_not_refundable",
                        f"Charge {charge_id!r} did not succeed: there is no money to refund.",
                    ),
                )
            left = charge["amount_cents"] - charge["amount_refunded_cents"]
            if payload.amount_cents > left:
                return Reply(
                    400,
                    _error(
                        "invalid_request_error",
                        "amount_exceeds_refundable",
                        f"Cannot refund {payload.amount_cents} cents: {left} of the charge's "
                        f"{charge['amount_cents']} cents are left to refund.",
                        refundable_cents=left,
                    ),
                )
            refund_id = _new_id("re")
            db.execute(
                "INSERT INTO refunds (id, idempotency_key, charge_id, amount_cents, status, created) "
                "VALUES (?, ?, ?, ?, 'succeeded', ?)",
                (refund_id, key, charge_id, payload.amount_cents, now),
            )
            db.execute(
                "INSERT INTO ledger (kind, ref, idempotency_key, amount_cents, card_token, charge_id, created) "
                "VALUES ('refund', ?, ?, ?, ?, ?, ?)",
                (refund_id, key, -payload.amount_cents, charge["card_token"], charge_id, now),
            )
            row = db.execute("SELECT * FROM refunds WHERE id = ?", (refund_id,)).fetchone()
            return Reply(200, _refund_json(row), processed=True)

        return self.idempotent(key, fingerprint, process)

    # boletos

    def create_boleto(self, key: str, fingerprint: str, payload: BoletoIn) -> Reply:
        def process(db: sqlite3.Connection, now: float) -> Reply:
            expired = self._expired_key(db, "boletos", key)
            if expired is not None:
                return expired
            sequence = db.execute(
                "INSERT INTO sequences (name, value) VALUES ('nosso_numero', 1) "
                "ON CONFLICT (name) DO UPDATE SET value = value + 1 RETURNING value"
            ).fetchone()["value"]
            number = nosso_numero(sequence)
            barcode = make_barcode(BANK_CODE, payload.amount_cents, payload.due_date, free_field_for(number))
            boleto_id = _new_id("bol")
            db.execute(
                "INSERT INTO boletos (id, idempotency_key, invoice_id, amount_cents, description, payer, "
                "due_date, nosso_numero, barcode, digitable_line, status, created, updated) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'issued', ?, ?)",
                (
                    boleto_id,
                    key,
                    payload.invoice_id,
                    payload.amount_cents,
                    payload.description,
                    json.dumps(payload.payer.model_dump(mode="json")),
                    payload.due_date.isoformat(),
                    number,
                    barcode,
                    digitable_line(barcode),
                    now,
                    now,
                ),
            )
            row = db.execute("SELECT * FROM boletos WHERE id = ?", (boleto_id,)).fetchone()
            return Reply(200, _boleto_json(row), processed=True)

        return self.idempotent(key, fingerprint, process)

    def get_boleto(self, boleto_id: str) -> dict[str, Any] | None:
        with self.transaction() as db:
            row = db.execute("SELECT * FROM boletos WHERE id = ?", (boleto_id,)).fetchone()
        return _boleto_json(row) if row else None

    def cancel_boleto(self, boleto_id: str) -> dict[str, Any]:
        with self.transaction() as db:
            row = self._boleto_row(db, boleto_id)
            if row["status"] == "paid":
                raise ApiError(409, "invalid_request_error", "boleto_already_paid", "The boleto was already paid.")
            if row["status"] == "issued":
                db.execute(
                    "UPDATE boletos SET status = 'canceled', updated = ? WHERE id = ?",
                    (time.time(), boleto_id),
                )
            # Already canceled or expired: nothing can pay it any more, which is what cancel asks.
            return _boleto_json(self._boleto_row(db, boleto_id))

    def pay_boleto(self, boleto_id: str, paid_on: date, amount_cents: int | None, webhook_url: str) -> dict[str, Any]:
        now = time.time()
        with self.transaction() as db:
            row = self._require_issued(db, boleto_id)
            amount = row["amount_cents"] if amount_cents is None else amount_cents
            db.execute(
                "UPDATE boletos SET status = 'paid', paid_on = ?, paid_amount_cents = ?, updated = ? WHERE id = ?",
                (paid_on.isoformat(), amount, now, boleto_id),
            )
            db.execute(
                "INSERT INTO ledger (kind, ref, idempotency_key, amount_cents, card_token, created) "
                "VALUES ('boleto_payment', ?, ?, ?, NULL, ?)",
                (boleto_id, row["idempotency_key"], amount, now),
            )
            event_id = self._enqueue_event(db, now, "boleto.paid", row, amount, paid_on, webhook_url)
            return {"boleto": _boleto_json(self._boleto_row(db, boleto_id)), "event_id": event_id}

    def expire_boleto(self, boleto_id: str, webhook_url: str) -> dict[str, Any]:
        now = time.time()
        with self.transaction() as db:
            row = self._require_issued(db, boleto_id)
            db.execute("UPDATE boletos SET status = 'expired', updated = ? WHERE id = ?", (now, boleto_id))
            event_id = self._enqueue_event(db, now, "boleto.expired", row, row["amount_cents"], None, webhook_url)
            return {"boleto": _boleto_json(self._boleto_row(db, boleto_id)), "event_id": event_id}

    @staticmethod
    def _boleto_row(db: sqlite3.Connection, boleto_id: str) -> sqlite3.Row:
        row = db.execute("SELECT * FROM boletos WHERE id = ?", (boleto_id,)).fetchone()
        if row is None:
            raise ApiError(404, "invalid_request_error", "resource_missing", f"No boleto {boleto_id!r}.")
        return row

    def _require_issued(self, db: sqlite3.Connection, boleto_id: str) -> sqlite3.Row:
        row = self._boleto_row(db, boleto_id)
        if row["status"] != "issued":
            raise ApiError(
                409,
                "invalid_request_error",
                f"boleto_{row['status']}",
                f"The boleto is {row['status']}, not issued.",
            )
        return row

    # webhooks: written in the same transaction as the change they announce (an outbox)

    @staticmethod
    def _enqueue_event(
        db: sqlite3.Connection,
        now: float,
        type_: str,
        boleto: sqlite3.Row,
        amount_cents: int,
        paid_on: date | None,
        webhook_url: str,
    ) -> str:
        event_id = _new_id("evt")
        event = {
            "id": event_id,
            "object": "event",
            "type": type_,
            "created": int(now),
            "data": {
                "boleto_id": boleto["id"],
                "nosso_numero": boleto["nosso_numero"],
                "invoice_id": boleto["invoice_id"],
                "amount_cents": amount_cents,
                "paid_on": paid_on.isoformat() if paid_on else None,
            },
        }
        db.execute(
            "INSERT INTO webhook_deliveries (event_id, type, url, body, status, next_attempt_at, created) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                event_id,
                type_,
                webhook_url,
                json.dumps(event, separators=(",", ":")),
                "pending" if webhook_url else "disabled",
                now,
                now,
            ),
        )
        return event_id

    def due_deliveries(self, now: float, limit: int = 50) -> list[sqlite3.Row]:
        with self.transaction() as db:
            return db.execute(
                "SELECT * FROM webhook_deliveries WHERE status = 'pending' AND next_attempt_at <= ? "
                "ORDER BY next_attempt_at, id LIMIT ?",
                (now, limit),
            ).fetchall()

    def next_delivery_at(self) -> float | None:
        with self.transaction() as db:
            row = db.execute(
                "SELECT MIN(next_attempt_at) AS at FROM webhook_deliveries WHERE status = 'pending'"
            ).fetchone()
        return row["at"] if row else None

    def record_attempt(
        self,
        delivery_id: int,
        *,
        ok: bool,
        status_code: int | None,
        error: str | None,
        max_attempts: int,
        retry_base_s: float,
    ) -> None:
        now = time.time()
        with self.transaction() as db:
            row = db.execute("SELECT attempts FROM webhook_deliveries WHERE id = ?", (delivery_id,)).fetchone()
            attempts = row["attempts"] + 1
            if ok:
                status, next_at, delivered_at = "delivered", None, now
            elif attempts >= max_attempts:
                status, next_at, delivered_at = "failed", None, None
            else:
                backoff = min(retry_base_s * 2 ** (attempts - 1), WEBHOOK_RETRY_CAP_SECONDS)
                # Jitter keeps a receiver that comes back from being hit by every retry at once.
                status, next_at, delivered_at = "pending", now + backoff * random.uniform(0.9, 1.1), None
            db.execute(
                "UPDATE webhook_deliveries SET status = ?, attempts = ?, next_attempt_at = ?, "
                "last_status_code = ?, last_error = ?, delivered_at = ? WHERE id = ?",
                (status, attempts, next_at, status_code, error, delivered_at, delivery_id),
            )

    def deliveries(self) -> list[dict[str, Any]]:
        with self.transaction() as db:
            rows = db.execute("SELECT * FROM webhook_deliveries ORDER BY id").fetchall()
        return [_delivery_json(row) for row in rows]

    # ledger

    def ledger(self, *, idempotency_key: str | None = None, kind: str | None = None) -> list[dict[str, Any]]:
        clauses, params = [], []
        if idempotency_key is not None:
            clauses.append("idempotency_key = ?")
            params.append(idempotency_key)
        if kind is not None:
            clauses.append("kind = ?")
            params.append(kind)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        with self.transaction() as db:
            rows = db.execute(f"SELECT * FROM ledger {where} ORDER BY entry", params).fetchall()
        return [
            {
                "entry": row["entry"],
                "id": row["ref"],
                "kind": row["kind"],
                "idempotency_key": row["idempotency_key"],
                "amount_cents": row["amount_cents"],
                "card_token": row["card_token"],
                "charge_id": row["charge_id"],
                "created": row["created"],
            }
            for row in rows
        ]


# --- webhook delivery -----------------------------------------------------------------------------


class WebhookDispatcher:
    """Delivers pending events in a background thread until a 2xx, with exponential backoff.

    Delivery is at least once: a process killed mid-request sends that event again after restart,
    so receivers deduplicate by event id (the body, and so the id, is identical on every attempt;
    only the signature's timestamp changes).
    """

    def __init__(self, store: Store, config: SandboxConfig) -> None:
        self._store = store
        self._config = config
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sandbox-webhooks", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = WEBHOOK_TIMEOUT_SECONDS + 1) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def notify(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        timeout = httpx.Timeout(WEBHOOK_TIMEOUT_SECONDS, connect=2.0)
        with httpx.Client(timeout=timeout, headers={"User-Agent": "renova-sandbox-gateway"}) as client:
            while not self._stop.is_set():
                self._wake.clear()
                try:
                    for delivery in self._store.due_deliveries(time.time()):
                        if self._stop.is_set():
                            return
                        self._attempt(client, delivery)
                    next_at = self._store.next_delivery_at()
                except Exception:
                    # The thread must outlive any bad row or database hiccup; the next pass retries.
                    log.exception("webhook delivery pass failed")
                    next_at = None
                wait = 1.0 if next_at is None else min(max(next_at - time.time(), 0.02), 1.0)
                self._wake.wait(wait)

    def _attempt(self, client: httpx.Client, delivery: sqlite3.Row) -> None:
        body = delivery["body"].encode()
        headers = {
            "Content-Type": "application/json",
            # Signed at send time, so a retry hours later still falls inside the receiver's window.
            SIGNATURE_HEADER: sign(self._config.webhook_secret, body, int(time.time())),
            "Renova-Event-Id": delivery["event_id"],
        }
        status_code: int | None = None
        error: str | None = None
        try:
            response = client.post(delivery["url"], content=body, headers=headers)
            status_code = response.status_code
            ok = response.is_success
            if not ok:
                error = response.text[:500]
        except httpx.HTTPError as exc:
            ok, error = False, repr(exc)[:500]
        self._store.record_attempt(
            delivery["id"],
            ok=ok,
            status_code=status_code,
            error=error,
            max_attempts=self._config.webhook_max_attempts,
            retry_base_s=self._config.webhook_retry_base_s,
        )


# --- the application ------------------------------------------------------------------------------


def _header_number(
    request: Request, name: str, cast: type[int] | type[float], default: Any, low: float, high: float
) -> Any:
    raw = request.headers.get(name)
    if raw is None:
        return default
    try:
        value = cast(raw)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise ApiError(
            400,
            "invalid_request_error",
            "invalid_sandbox_header",
            f"{name} must be a number between {low} and {high}.",
        )
    return value


def create_app(config: SandboxConfig, data_dir: Path, stopping: threading.Event | None = None) -> FastAPI:
    """The sandbox application; `stopping` is set when the server starts shutting down."""
    stopping = stopping or threading.Event()
    store = Store(Path(data_dir) / STATE_FILE)
    dispatcher = WebhookDispatcher(store, config)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        dispatcher.start()  # picks up deliveries left pending by a previous run
        try:
            yield
        finally:
            dispatcher.stop()
            store.close()

    app = FastAPI(title="Renova sandbox gateway", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.store = store
    app.state.config = config

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc'] if part != 'body')}: {error['msg']}"
            for error in exc.errors()
        )
        return JSONResponse(_error("invalid_request_error", "invalid_request", problems), status_code=400)

    def require_api_key(authorization: Annotated[str | None, Header()] = None) -> None:
        expected = f"Bearer {config.api_key}".encode()
        if authorization is None or not hmac.compare_digest(authorization.encode(), expected):
            raise ApiError(401, "authentication_error", "unauthorized", "Missing or invalid API key.")

    def faults(request: Request) -> Faults:
        return Faults(
            latency_ms=_header_number(request, "Sandbox-Latency-Ms", int, config.latency_ms, 0, 600_000),
            timeout_rate=_header_number(request, "Sandbox-Timeout-Rate", float, config.timeout_rate, 0, 1),
            unavailable_rate=_header_number(request, "Sandbox-Unavailable-Rate", float, config.unavailable_rate, 0, 1),
            stall_ms=_header_number(request, "Sandbox-Stall-Ms", int, config.stall_ms, 0, 600_000),
        )

    async def front_door(request: Request) -> Faults:
        """Latency and random refusals, before anything is looked at or processed."""
        found = faults(request)
        if found.latency_ms:
            await asyncio.sleep(found.latency_ms / 1000)
        if found.unavailable_rate and random.random() < found.unavailable_rate:
            raise NotProcessed
        return found

    async def respond(reply: Reply, found: Faults) -> JSONResponse:
        if reply.processed and (reply.stall or random.random() < found.timeout_rate):
            # Done and stored, but the answer comes too late: the client cannot know it was charged.
            # A shutdown cuts the stall short, so stopping the sandbox never waits for it.
            deadline = time.monotonic() + found.stall_ms / 1000
            while not stopping.is_set() and (remaining := deadline - time.monotonic()) > 0:
                await asyncio.sleep(min(remaining, 0.1))
        headers = {"Idempotent-Replayed": "true"} if reply.replayed else None
        return JSONResponse(reply.body, status_code=reply.status, headers=headers)

    def idempotency_key(key: str | None) -> str:
        if not key or len(key) > 255:
            raise ApiError(
                400,
                "invalid_request_error",
                "idempotency_key_required",
                "An Idempotency-Key header (1–255 characters) is required.",
            )
        return key

    @app.exception_handler(NotProcessed)
    async def _not_processed_handler(_: Request, __: NotProcessed) -> JSONResponse:
        return JSONResponse(
            _not_processed("Temporarily unavailable; the request was not processed."),
            status_code=503,
            headers={"Retry-After": "1"},
        )

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])

    @v1.post("/charges")
    async def create_charge(
        payload: ChargeIn,
        request: Request,
        key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
    ) -> JSONResponse:
        checked_key = idempotency_key(key)
        found = await front_door(request)
        fingerprint = _fingerprint("POST", "/v1/charges", payload)
        reply = await run_in_threadpool(store.create_charge, checked_key, fingerprint, payload)
        return await respond(reply, found)

    @v1.get("/charges")
    async def find_charge(
        request: Request, idempotency_key: Annotated[str, Query(min_length=1, max_length=255)]
    ) -> JSONResponse:
        await front_door(request)
        charge = await run_in_threadpool(lambda: store.find_charge(key=idempotency_key))
        if charge is None:
            raise ApiError(404, "invalid_request_error", "resource_missing", "No charge with that idempotency key.")
        return JSONResponse(charge)

    @v1.get("/charges/{charge_id}")
    async def get_charge(charge_id: str, request: Request) -> JSONResponse:
        await front_door(request)
        charge = await run_in_threadpool(lambda: store.find_charge(charge_id=charge_id))
        if charge is None:
            raise ApiError(404, "invalid_request_error", "resource_missing", f"No charge {charge_id!r}.")
        return JSONResponse(charge)

    @v1.post("/charges/{charge_id}/refunds")
    async def create_refund(
        charge_id: str,
        payload: RefundIn,
        request: Request,
        key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
    ) -> JSONResponse:
        checked_key = idempotency_key(key)
        found = await front_door(request)
        # The path is part of the fingerprint: one key cannot refund two different charges.
        fingerprint = _fingerprint("POST", f"/v1/charges/{charge_id}/refunds", payload)
        reply = await run_in_threadpool(store.create_refund, checked_key, fingerprint, charge_id, payload)
        return await respond(reply, found)

    @v1.post("/boletos")
    async def create_boleto(
        payload: BoletoIn,
        request: Request,
        key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
    ) -> JSONResponse:
        checked_key = idempotency_key(key)
        found = await front_door(request)
        fingerprint = _fingerprint("POST", "/v1/boletos", payload)
        reply = await run_in_threadpool(store.create_boleto, checked_key, fingerprint, payload)
        return await respond(reply, found)

    @v1.get("/boletos/{boleto_id}")
    async def get_boleto(boleto_id: str, request: Request) -> JSONResponse:
        await front_door(request)
        boleto = await run_in_threadpool(store.get_boleto, boleto_id)
        if boleto is None:
            raise ApiError(404, "invalid_request_error", "resource_missing", f"No boleto {boleto_id!r}.")
        return JSONResponse(boleto)

    @v1.post("/boletos/{boleto_id}/cancel")
    async def cancel_boleto(boleto_id: str, request: Request) -> JSONResponse:
        await front_door(request)
        return JSONResponse(await run_in_threadpool(store.cancel_boleto, boleto_id))

    sandbox = APIRouter(prefix="/sandbox", dependencies=[Depends(require_api_key)])

    @sandbox.post("/boletos/{boleto_id}/pay")
    async def pay_boleto(boleto_id: str, payload: Annotated[PayIn | None, Body()] = None) -> JSONResponse:
        payment = payload or PayIn()
        result = await run_in_threadpool(
            store.pay_boleto,
            boleto_id,
            payment.paid_on or date.today(),
            payment.amount_cents,
            config.webhook_url,
        )
        dispatcher.notify()
        return JSONResponse(result)

    @sandbox.post("/boletos/{boleto_id}/expire")
    async def expire_boleto(boleto_id: str) -> JSONResponse:
        result = await run_in_threadpool(store.expire_boleto, boleto_id, config.webhook_url)
        dispatcher.notify()
        return JSONResponse(result)

    @sandbox.get("/ledger")
    async def ledger(
        idempotency_key: str | None = None,
        kind: Annotated[str | None, Query(pattern="^(charge|boleto_payment|refund)$")] = None,
    ) -> JSONResponse:
        entries = await run_in_threadpool(lambda: store.ledger(idempotency_key=idempotency_key, kind=kind))
        return JSONResponse({"data": entries})

    @sandbox.get("/webhooks")
    async def webhooks() -> JSONResponse:
        return JSONResponse({"data": await run_in_threadpool(store.deliveries)})

    @sandbox.get("/config")
    async def get_config() -> JSONResponse:
        return JSONResponse(config.public())

    @sandbox.post("/config")
    async def set_config(update: ConfigUpdate) -> JSONResponse:
        for name, value in update.model_dump(exclude_unset=True).items():
            if value is not None:
                setattr(config, name, value)
        dispatcher.notify()
        return JSONResponse(config.public())

    app.include_router(v1)
    app.include_router(sandbox)
    return app


def serve(
    *,
    host: str = "127.0.0.1",
    port: int = 8700,
    latency_ms: int = 0,
    timeout_rate: float = 0.0,
    unavailable_rate: float = 0.0,
    data_dir: Path | str = Path(".renova/gateway"),
    webhook_url: str = "",
    webhook_secret: str = "whsec_sandbox",
    api_key: str = "sk_sandbox",
    stall_ms: int = DEFAULT_STALL_MS,
    webhook_max_attempts: int = DEFAULT_WEBHOOK_MAX_ATTEMPTS,
    webhook_retry_base_s: float = 1.0,
) -> None:
    """Run the sandbox until SIGINT/SIGTERM (uvicorn stops gracefully on both)."""
    if latency_ms < 0 or stall_ms < 0:
        raise ValueError("latency_ms and stall_ms must not be negative")
    if not (0 <= timeout_rate <= 1 and 0 <= unavailable_rate <= 1):
        raise ValueError("timeout_rate and unavailable_rate must be between 0 and 1")
    if not api_key or not webhook_secret:
        raise ValueError("api_key and webhook_secret must not be empty")
    config = SandboxConfig(
        api_key=api_key,
        webhook_secret=webhook_secret,
        webhook_url=webhook_url,
        latency_ms=latency_ms,
        timeout_rate=timeout_rate,
        unavailable_rate=unavailable_rate,
        stall_ms=stall_ms,
        webhook_max_attempts=webhook_max_attempts,
        webhook_retry_base_s=webhook_retry_base_s,
    )
    stopping = threading.Event()
    app = create_app(config, Path(data_dir), stopping)
    server = _Server(
        stopping,
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="warning",
            # Longer than clients keep idle connections, so the server never closes one under them.
            timeout_keep_alive=30,
            timeout_graceful_shutdown=5,
        ),
    )
    server.run()


class _Server(uvicorn.Server):
    """uvicorn's server, telling the app when a shutdown signal arrives (uvicorn only tells it after
    every in-flight request has finished, which a stalled response would delay)."""

    def __init__(self, stopping: threading.Event, config: uvicorn.Config) -> None:
        super().__init__(config)
        self._stopping = stopping

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._stopping.set()
        super().handle_exit(sig, frame)
