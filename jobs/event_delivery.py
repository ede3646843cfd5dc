"""Pushing events to the main application's endpoints: signed per the Standard Webhooks specification
(`webhook-id`, `webhook-timestamp`, `webhook-signature`), at least once, in order per subscription,
retried with exponential backoff for up to three days.

A delivery is claimed with a lease (its `next_attempt_at` moved past the time it may take), committed,
sent with no transaction open, and its outcome recorded: a worker killed mid-send leaves a lease that
expires, and the delivery is sent again (receivers dedupe by the event id). A delivery waits while an
earlier event of the same subscription (or, without one, organization) is still pending for the same
endpoint, so a receiver never sees `subscription.reactivated` before the `subscription.suspended`
it undoes. The scheduler's tick sends `deliver_events` while any delivery is due.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

import dramatiq
import httpx
from sqlalchemy import and_, exists, select, tuple_, update
from sqlalchemy.orm import Session, aliased
from standardwebhooks.webhooks import Webhook

import jobs
from jobs.audit import record
from jobs.clock import wall_clock
from jobs.context import current_session, runtime
from jobs.events import VISIBLE, Backoff, event_body, public_id
from jobs.retries import STANDARD
from models.schema import Event, EventDelivery, WebhookEndpoint

jobs.require_broker()

DELIVERY_WINDOW: Final = timedelta(days=3)
LEASE: Final = timedelta(minutes=2)
TIMEOUT_SECONDS: Final = 10.0
MAX_RESPONSE_CHARS: Final = 500
CLAIM_BATCH: Final = 50
# One message delivers for at most this long, then leaves the rest to the next tick.
ROUND_SECONDS: Final = 30.0
USER_AGENT: Final = "Renova-Webhooks/1"


def due_deliveries(session: Session, now: datetime) -> bool:
    query = (
        select(EventDelivery.id)
        .join(Event, Event.id == EventDelivery.event_id)
        .join(WebhookEndpoint, WebhookEndpoint.id == EventDelivery.endpoint_id)
        .where(and_(*_eligible(now)))
        .limit(1)
    )
    return session.scalar(query) is not None


def _eligible(now: datetime) -> list[Any]:
    earlier = aliased(EventDelivery)
    earlier_event = aliased(Event)
    return [
        EventDelivery.status == "pending",
        EventDelivery.next_attempt_at <= now,
        Event.id == EventDelivery.event_id,
        VISIBLE,
        WebhookEndpoint.id == EventDelivery.endpoint_id,
        WebhookEndpoint.enabled,
        ~exists().where(
            earlier.endpoint_id == EventDelivery.endpoint_id,
            earlier.ordering_key == EventDelivery.ordering_key,
            earlier.status == "pending",
            earlier_event.id == earlier.event_id,
            tuple_(earlier_event.txid, earlier_event.id) < tuple_(Event.txid, Event.id),
        ),
    ]


def claim_deliveries(session: Session, now: datetime, limit: int = CLAIM_BATCH) -> list[int]:
    """Due deliveries, each the next of its subscription for its endpoint, leased until `now + LEASE`."""
    due = (
        select(EventDelivery.id)
        .join(Event, Event.id == EventDelivery.event_id)
        .join(WebhookEndpoint, WebhookEndpoint.id == EventDelivery.endpoint_id)
        .where(and_(*_eligible(now)))
        .order_by(Event.txid, Event.id)
        .limit(limit)
        .with_for_update(of=EventDelivery, skip_locked=True)
    )
    claimed = session.scalars(
        update(EventDelivery)
        .where(EventDelivery.id.in_(due.scalar_subquery()))
        .values(next_attempt_at=now + LEASE)
        .returning(EventDelivery.id)
    )
    return sorted(claimed)


@dataclass(frozen=True)
class Attempt:
    status_code: int | None
    response: str
    error: str

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def signed_request(endpoint: WebhookEndpoint, event: Event, sent_at: datetime) -> tuple[bytes, dict[str, str]]:
    """The body and headers of one delivery; the signature covers `id.timestamp.body`."""
    body = json.dumps(event_body(event), ensure_ascii=False, separators=(",", ":"), default=str)
    message_id = public_id(event.id)
    headers = {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "webhook-id": message_id,
        "webhook-timestamp": str(int(sent_at.timestamp())),
        "webhook-signature": Webhook(endpoint.secret).sign(message_id, sent_at, body),
    }
    return body.encode(), headers


def send(client: httpx.Client, endpoint: WebhookEndpoint, event: Event) -> Attempt:
    body, headers = signed_request(endpoint, event, wall_clock())
    try:
        response = client.post(endpoint.url, content=body, headers=headers, timeout=TIMEOUT_SECONDS)
    except httpx.HTTPError as exc:
        return Attempt(None, "", f"{type(exc).__name__}: {exc}"[:MAX_RESPONSE_CHARS])
    return Attempt(response.status_code, response.text[:MAX_RESPONSE_CHARS], "")


def record_attempt(
    session: Session, delivery: EventDelivery, event: Event, attempt: Attempt, now: datetime, backoff: Backoff
) -> None:
    delivery.attempts += 1
    delivery.last_attempt_at = now
    delivery.last_status_code = attempt.status_code
    delivery.last_response = attempt.response
    delivery.last_error = attempt.error or (None if attempt.ok else f"HTTP {attempt.status_code}")
    if attempt.ok:
        delivery.status = "delivered"
        delivery.delivered_at = now
    elif now + backoff.after(delivery.attempts) > event.created_at + DELIVERY_WINDOW:
        delivery.status = "failed"
    else:
        delivery.next_attempt_at = now + backoff.after(delivery.attempts)


def deliver_due(
    session: Session,
    client: httpx.Client,
    *,
    backoff: Backoff,
    clock: Callable[[], datetime] = wall_clock,
    round_seconds: float = ROUND_SECONDS,
) -> int:
    """Claim, send and record due deliveries until none is due or the round is over; returns how
    many were attempted. Commits after the claim and after each outcome."""
    attempted = 0
    started = time.monotonic()
    while time.monotonic() - started < round_seconds:
        claimed = claim_deliveries(session, clock())
        session.commit()
        if not claimed:
            break
        for delivery_id in claimed:
            delivery = session.get_one(EventDelivery, delivery_id)
            event = session.get_one(Event, delivery.event_id)
            endpoint = session.get_one(WebhookEndpoint, delivery.endpoint_id)
            session.commit()  # nothing is held while the receiver answers
            attempt = send(client, endpoint, event)
            record_attempt(session, delivery, event, attempt, clock(), backoff)
            session.commit()
            attempted += 1
    return attempted


def redeliver(session: Session, delivery_id: int, *, actor: str, reason: str, now: datetime) -> EventDelivery | None:
    """Send a delivery again (failed, or delivered and lost by the receiver) as soon as its turn comes."""
    delivery = session.get(EventDelivery, delivery_id, with_for_update=True)
    if delivery is None:
        return None
    previous = delivery.status
    delivery.status = "pending"
    delivery.next_attempt_at = now
    record(
        session,
        actor=actor,
        action="event_delivery.redeliver",
        target_type="event_delivery",
        target_id=str(delivery.id),
        reason=reason,
        details={"event": public_id(delivery.event_id), "endpoint_id": delivery.endpoint_id, "was": previous},
    )
    return delivery


def delivery_log(
    session: Session, endpoint_id: int, *, status: str | None = None, limit: int = 50
) -> list[tuple[EventDelivery, Event]]:
    query = (
        select(EventDelivery, Event)
        .join(Event, Event.id == EventDelivery.event_id)
        .where(EventDelivery.endpoint_id == endpoint_id)
        .order_by(EventDelivery.id.desc())
        .limit(limit)
    )
    if status:
        query = query.where(EventDelivery.status == status)
    return [(delivery, event) for delivery, event in session.execute(query).all()]


@dramatiq.actor(queue_name="events", **STANDARD)
def deliver_events() -> None:
    with httpx.Client(headers={"user-agent": USER_AGENT}, follow_redirects=False) as client:
        deliver_due(current_session(), client, backoff=Backoff(first=runtime().event_retry_first))
