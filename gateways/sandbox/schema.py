"""The sandbox's SQLite tables, their migration, and the JSON shape in which the API shows their rows."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from gateways.sandbox.models import BANK_CODE

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

# The ledger is spliced in so that migrate can rebuild it from the very same definition.
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
CREATE TABLE IF NOT EXISTS chargebacks (
    charge_id TEXT PRIMARY KEY REFERENCES charges (id),
    created REAL NOT NULL
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
-- Pagar.me's flavor (gateways.sandbox.pagarme): the order around each charge or boleto.
CREATE TABLE IF NOT EXISTS orders (
    id TEXT PRIMARY KEY,
    code TEXT NOT NULL,
    charge_id TEXT NOT NULL UNIQUE,
    amount INTEGER NOT NULL,
    customer TEXT NOT NULL,
    items TEXT NOT NULL,
    payment TEXT NOT NULL,
    metadata TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS orders_by_code ON orders (code);
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


SANDBOX_PIX_KEY = "pix@sandbox.renova.example"


def sandbox_pix_code(boleto_id: str, amount_cents: int) -> str:
    from models.pix import br_code

    txid = "".join(char for char in boleto_id if char.isalnum())[:25]
    return br_code(key=SANDBOX_PIX_KEY, name="Renova Sandbox", city="Sao Paulo", amount_cents=amount_cents, txid=txid)


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
        # A boleto híbrido: the same amount payable by Pix, any day (static BR Code, txid from the id).
        "pix_code": sandbox_pix_code(row["id"], row["amount_cents"]),
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


def migrate(db: sqlite3.Connection) -> None:
    """Bring a state file written before refunds existed up to SCHEMA, keeping every entry.

    CREATE TABLE IF NOT EXISTS leaves an old ledger as it was, and SQLite cannot change a CHECK
    constraint in place: the table is rebuilt, in one transaction so a kill leaves either form.
    """
    row = db.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'ledger'").fetchone()
    if "'refund'" in row["sql"]:
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute("ALTER TABLE ledger RENAME TO ledger_before_refunds")
        db.execute(LEDGER_TABLE)
        db.execute(
            "INSERT INTO ledger (entry, kind, ref, idempotency_key, amount_cents, card_token, charge_id, created) "
            "SELECT entry, kind, ref, idempotency_key, amount_cents, card_token, "
            "CASE WHEN kind = 'charge' THEN ref END, created FROM ledger_before_refunds"
        )
        db.execute("DROP TABLE ledger_before_refunds")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
