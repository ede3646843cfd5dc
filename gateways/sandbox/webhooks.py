"""The sandbox's webhook events: written to an outbox with the change they announce, then delivered
signed by a background thread, retried with backoff until acknowledged."""

from __future__ import annotations

import base64
import json
import logging
import sqlite3
import threading
import time
from datetime import date
from typing import TYPE_CHECKING, Protocol

import httpx

from gateways.pagarme_webhooks import SIGNATURE_HEADER as PAGARME_SIGNATURE_HEADER
from gateways.pagarme_webhooks import sign as pagarme_sign
from gateways.sandbox.models import SandboxConfig, _new_id
from gateways.webhooks import SIGNATURE_HEADER, sign

if TYPE_CHECKING:  # the store writes events with enqueue_event below
    from cryptography.hazmat.primitives.asymmetric import rsa

    from gateways.sandbox.store import Store

SIGNING_KEY_ID = "renova-emulator-1"  # the kid of the pagarme flavor's signing key

log = logging.getLogger("renova.gateway.sandbox")

WEBHOOK_TIMEOUT_SECONDS = 5.0


class EventWriter(Protocol):
    def __call__(
        self,
        db: sqlite3.Connection,
        now: float,
        type_: str,
        boleto: sqlite3.Row,
        amount_cents: int,
        paid_on: date | None,
        webhook_url: str,
        *,
        via: str | None = None,
    ) -> str: ...


def record_delivery(
    db: sqlite3.Connection, now: float, event_id: str, type_: str, body: bytes, webhook_url: str
) -> None:
    """Queue one webhook for delivery (disabled when no URL is set), in the caller's transaction."""
    db.execute(
        "INSERT INTO webhook_deliveries (event_id, type, url, body, status, next_attempt_at, created) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        (event_id, type_, webhook_url, body.decode(), "pending" if webhook_url else "disabled", now, now),
    )


def enqueue_event(
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
    """Record an event for delivery; called in the same transaction as the change it announces (an outbox)."""
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
            **({"via": via} if via else {}),
        },
    }
    record_delivery(db, now, event_id, type_, json.dumps(event, separators=(",", ":")).encode(), webhook_url)
    return event_id


class WebhookDispatcher:
    """Delivers pending events in a background thread until a 2xx, with exponential backoff.

    Delivery is at least once: a process killed mid-request sends that event again after restart,
    so receivers deduplicate by event id (the body, and so the id, is identical on every attempt;
    only the signature's timestamp changes).
    """

    def __init__(self, store: Store, config: SandboxConfig, signing_key: rsa.RSAPrivateKey | None = None) -> None:
        self._signing_key = signing_key
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

    def _authentication(self, body: bytes, event_id: str) -> dict[str, str]:
        config = self._config
        if config.flavor == "pagarme":
            # Pagar.me's RS256 signature (keys at the emulator's /.well-known/jwks.json) and, when the
            # endpoint has them, its Basic credentials.
            assert self._signing_key is not None, "the pagarme flavor signs its webhooks"
            headers = {PAGARME_SIGNATURE_HEADER: pagarme_sign(self._signing_key, SIGNING_KEY_ID, body)}
            if config.webhook_username:
                credentials = f"{config.webhook_username}:{config.webhook_password}".encode()
                headers["Authorization"] = "Basic " + base64.b64encode(credentials).decode()
            return headers
        return {
            # Signed at send time, so a retry hours later still falls inside the receiver's window.
            SIGNATURE_HEADER: sign(config.webhook_secret, body, int(time.time())),
            "Renova-Event-Id": event_id,
        }

    def _attempt(self, client: httpx.Client, delivery: sqlite3.Row) -> None:
        body = delivery["body"].encode()
        headers = {"Content-Type": "application/json", **self._authentication(body, delivery["event_id"])}
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
