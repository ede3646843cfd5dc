"""A payment gateway's events (its webhooks), stored once by `POST /v1/webhooks/...` and applied here
once: a sandbox event says what happened to a boleto; a Pagar.me event only names a charge, which is
looked up at the gateway — one of Renova's boletos (`jobs.boletos`), one of its card charges
(`jobs.reversals`), or none of Renova's (ignored)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date, datetime
from typing import Any

import dramatiq
from sqlalchemy import select
from sqlalchemy.orm import Session

import jobs
from gateways.base import Gateway
from jobs import clock
from jobs.boletos import record_boleto_expired, record_boleto_payment, record_reported_boleto
from jobs.context import BillingConfig, current_session, runtime
from jobs.retries import STANDARD
from jobs.reversals import record_reported_card_charge
from jobs.work_attempts import GATEWAY_EVENT, failures_recorded
from models.calendar import local_today
from models.schema import Boleto, Charge, GatewayEvent

jobs.require_broker()


def record_gateway_event(
    session: Session, event_id: str, *, now: datetime, config: BillingConfig, gateway: Gateway | None = None
) -> str:
    """Apply one stored gateway event, once (a redelivered event is a no-op). The sandbox's events are
    signed and say what happened; a Pagar.me event only says which charge to look at (`gateway`)."""
    event = session.scalar(select(GatewayEvent).where(GatewayEvent.event_id == event_id).with_for_update())
    if event is None:
        raise LookupError(f"gateway event {event_id} was not stored")
    if event.processed_at is not None:
        return "duplicate"
    data = event.payload.get("data", {})
    today = local_today(now, config.timezone)
    if event.type == "boleto.paid":
        paid_on = date.fromisoformat(data["paid_on"]) if data.get("paid_on") else today
        outcome = record_boleto_payment(
            session,
            str(data["boleto_id"]),
            amount_cents=int(data["amount_cents"]),
            paid_on=paid_on,
            now=now,
            via="Pix" if data.get("via") == "pix" else "boleto",
        )
    elif event.type == "boleto.expired":
        outcome = record_boleto_expired(session, str(data["boleto_id"]), on=today)
    elif event.type.startswith(PAGARME_EVENT_PREFIX):
        outcome = record_reported_charge(
            session, _pagarme_charge_id(event.type, data), gateway, today=today, now=now, config=config
        )
    else:
        outcome = "ignored"
    event.processed_at = now
    return outcome


PAGARME_EVENT_PREFIX = "pagarme:"


def _pagarme_charge_id(event_type: str, data: Mapping[str, Any]) -> str | None:
    """The charge a Pagar.me event is about: a charge event's `data`, or an order event's only charge."""
    if event_type.startswith(f"{PAGARME_EVENT_PREFIX}charge."):
        return str(data.get("id") or "") or None
    charges = data.get("charges")
    if isinstance(charges, list) and len(charges) == 1 and isinstance(charges[0], dict):
        return str(charges[0].get("id") or "") or None
    return None


def record_reported_charge(
    session: Session,
    gateway_id: str | None,
    gateway: Gateway | None,
    *,
    today: date,
    now: datetime,
    config: BillingConfig,
) -> str:
    """A webhook said something happened to a charge at the gateway: one of our boletos (paid, or no
    longer payable), one of our card charges (taken back?), or none of ours (ignored)."""
    if gateway_id is None:
        return "ignored"
    if session.scalar(select(Boleto.id).where(Boleto.gateway_id == gateway_id)) is not None:
        return record_reported_boleto(session, gateway_id, gateway, today=today, now=now, config=config)
    charge = session.scalar(select(Charge).where(Charge.gateway_id == gateway_id))
    if charge is not None:
        return record_reported_card_charge(session, charge, gateway, now=now)
    return "ignored"


@dramatiq.actor(queue_name="payments", **STANDARD)
def process_gateway_event(event_id: str) -> None:
    session = current_session()
    config = runtime().config
    now = clock.now(session, config)
    # A failure is recorded on the event (the tick backs off, then leaves it to an operator) and raised.
    with failures_recorded(session, GATEWAY_EVENT, event_id, now):
        record_gateway_event(session, event_id, now=now, config=config, gateway=runtime().gateway_factory())
