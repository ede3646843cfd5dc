"""All sandbox state in one SQLite file (WAL): idempotency, charges, refunds, boletos, the ledger and the
webhook outbox, so a killed and restarted sandbox still knows every charge and resumes pending deliveries."""

from __future__ import annotations

import contextlib
import hmac
import json
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path
from typing import Any

from gateways.sandbox.models import (
    BANK_CODE,
    TEST_CARDS,
    ApiError,
    BoletoIn,
    ChargeIn,
    RefundIn,
    Reply,
    _error,
    _new_id,
    _not_processed,
)
from gateways.sandbox.schema import (
    _SELECT_CHARGE,
    SCHEMA,
    _boleto_json,
    _charge_json,
    _delivery_json,
    _refund_json,
    migrate,
)
from gateways.sandbox.webhooks import EventWriter, enqueue_event
from models.boleto import digitable_line, free_field_for, make_barcode, nosso_numero

STATE_FILE = "sandbox.sqlite3"
IDEMPOTENCY_TTL_SECONDS = 24 * 3600
PURGE_EVERY_SECONDS = 60.0
WEBHOOK_RETRY_CAP_SECONDS = 3600.0


class Store:
    """All sandbox state. One connection behind a lock: every operation is a short serialized
    transaction, which also serializes concurrent requests with the same idempotency key."""

    def __init__(
        self,
        path: Path,
        *,
        boleto_prefix: str = "bol",
        refund_prefix: str = "re",
        write_event: EventWriter = enqueue_event,
    ) -> None:
        """`boleto_prefix` and `refund_prefix` start those ids; `write_event` writes a boleto's paid or expired
        webhook in the flavor's shape (both set by the API flavor, see gateways.sandbox.pagarme)."""
        self.boleto_prefix, self.refund_prefix = boleto_prefix, refund_prefix
        self._write_event = write_event
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode survives a killed process (only an OS crash may lose the last commits).
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        migrate(self._db)
        self._lock = threading.Lock()
        self._last_purge = 0.0

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
        return self.idempotent(key, fingerprint, lambda db, now: self.process_charge(db, now, key, payload))

    def process_charge(self, db: sqlite3.Connection, now: float, key: str, payload: ChargeIn) -> Reply:
        """Charge a test card, inside `idempotent`'s transaction: the sandbox's answer (any flavor's
        API translates it)."""
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

    def find_charge(self, *, key: str | None = None, charge_id: str | None = None) -> dict[str, Any] | None:
        column, value = ("idempotency_key", key) if key is not None else ("id", charge_id)
        with self.transaction() as db:
            row = db.execute(f"{_SELECT_CHARGE} WHERE {column} = ?", (value,)).fetchone()
        return _charge_json(row) if row else None

    # refunds

    def create_refund(self, key: str, fingerprint: str, charge_id: str, payload: RefundIn) -> Reply:
        return self.idempotent(key, fingerprint, lambda db, now: self.process_refund(db, now, key, charge_id, payload))

    def process_refund(self, db: sqlite3.Connection, now: float, key: str, charge_id: str, payload: RefundIn) -> Reply:
        """Refund (part of) a charge, inside `idempotent`'s transaction."""
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
        refund_id = _new_id(self.refund_prefix)
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

    # boletos

    def create_boleto(self, key: str, fingerprint: str, payload: BoletoIn) -> Reply:
        return self.idempotent(key, fingerprint, lambda db, now: self.process_boleto(db, now, key, payload))

    def process_boleto(self, db: sqlite3.Connection, now: float, key: str, payload: BoletoIn) -> Reply:
        """Issue a boleto, inside `idempotent`'s transaction; its id starts with `boleto_prefix`."""
        expired = self._expired_key(db, "boletos", key)
        if expired is not None:
            return expired
        sequence = db.execute(
            "INSERT INTO sequences (name, value) VALUES ('nosso_numero', 1) "
            "ON CONFLICT (name) DO UPDATE SET value = value + 1 RETURNING value"
        ).fetchone()["value"]
        number = nosso_numero(sequence)
        barcode = make_barcode(BANK_CODE, payload.amount_cents, payload.due_date, free_field_for(number))
        boleto_id = _new_id(self.boleto_prefix)
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

    def pay_boleto(
        self, boleto_id: str, paid_on: date, amount_cents: int | None, webhook_url: str, via: str = "boleto"
    ) -> dict[str, Any]:
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
            event_id = self._write_event(db, now, "boleto.paid", row, amount, paid_on, webhook_url, via=via)
            return {"boleto": _boleto_json(self._boleto_row(db, boleto_id)), "event_id": event_id}

    def expire_boleto(self, boleto_id: str, webhook_url: str) -> dict[str, Any]:
        now = time.time()
        with self.transaction() as db:
            row = self._require_issued(db, boleto_id)
            db.execute("UPDATE boletos SET status = 'expired', updated = ? WHERE id = ?", (now, boleto_id))
            event_id = self._write_event(db, now, "boleto.expired", row, row["amount_cents"], None, webhook_url)
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

    # webhook deliveries

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
