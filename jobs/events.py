"""Events to the main application (README "Events to the main application"): what changed, in order,
for pull (`GET /v1/events`) and push (signed webhooks to the endpoints, `jobs.event_delivery`).

The database writes them: triggers (migration 0008) insert an `events` row — type, object, a
snapshot of the row — and one `event_deliveries` row per enabled endpoint that wants the type, in the
transaction of the change itself, whatever path made it (one row through the ORM or 10,000 by a
set-based statement). So there is never an event for a change rolled back, nor a change without its
event. This module shapes the snapshots as the API shows the objects, reads events with a cursor
that never skips one, and keeps the endpoints.

Order. Events are read by `(txid, id)`, and only once every transaction older than the reader's
oldest running one has ended (`pg_snapshot_xmin`): an event committed late with a lower id can never
be passed by a cursor.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final
from urllib.parse import urlsplit

from sqlalchemy import delete, exists, func, select, text, tuple_
from sqlalchemy.orm import Session

from jobs.audit import record
from jobs.lookups import change_request_view
from models.schema import Event, EventDelivery, WebhookEndpoint

EVENT_TYPES: Final = (
    "subscription.created",
    "subscription.activated",
    "subscription.past_due",
    "subscription.suspended",
    "subscription.reactivated",
    "subscription.cycle_changed",
    "subscription.payment_method_changed",
    "subscription.cancel_scheduled",
    "subscription.canceled",
    "invoice.created",
    "invoice.paid",
    "invoice.voided",
    "invoice.uncollectible",
    "charge.succeeded",
    "charge.failed",
    "boleto.issued",
    "boleto.overdue",
    "change_request.applied",
    "change_request.rejected",
    "refund.created",
    "refund.paid",
)
RETENTION: Final = timedelta(days=30)
PAGE_LIMIT: Final = 100
ID_PREFIX: Final = "evt_"

# Transactions older than every transaction still running: their events can be read in order.
VISIBLE = text("events.txid < pg_snapshot_xmin(pg_current_snapshot())::text::bigint")


class EventError(ValueError):
    """Bad input for events or endpoints: `code` for the API, a readable message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def public_id(event_id: int) -> str:
    return f"{ID_PREFIX}{event_id}"


def parse_public_id(value: str) -> int:
    digits = value.removeprefix(ID_PREFIX)
    if not digits.isdigit() or len(digits) > 18:
        raise EventError("invalid_cursor", f"{value!r} is not an event id (evt_<number>)")
    return int(digits)


@dataclass(frozen=True)
class Backoff:
    """The wait before attempt n + 1 after n failed: `first` × 4^(n − 1), at most `longest`."""

    first: timedelta = timedelta(seconds=5)
    longest: timedelta = timedelta(hours=12)

    def after(self, attempts: int) -> timedelta:
        return min(self.first * 4 ** max(0, attempts - 1), self.longest)


# --- bodies ----------------------------------------------------------------------------------------------


def event_body(event: Event) -> dict[str, Any]:
    """An event as pushed and as pulled: the Standard Webhooks payload shape."""
    return {
        "id": public_id(event.id),
        "type": event.type,
        "timestamp": _utc(event.occurred_at),
        "organization_id": event.organization_id,
        "subscription_id": event.subscription_id,
        "data": {"object": object_body(event.object_type, event.snapshot)},
    }


def object_body(object_type: str, row: dict[str, Any]) -> dict[str, Any]:
    """A row snapshot as the API shows the object (the same names, money in cents, UTC instants)."""
    shape = _SHAPES[object_type]
    return {"object": object_type, **shape(row)}


def _subscription(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "organization_id": row["organization_id"],
        "product": row["product"],
        "status": row["status"],
        "cycle": row["cycle"],
        "payment_method": row["payment_method"],
        "pending_payment_method": row.get("pending_payment_method"),
        "effective_payment_method": row.get("pending_payment_method") or row["payment_method"],
        "billing_anchor": row["billing_anchor"],
        "current_period_start": row["current_period_start"],
        "current_period_end": row["current_period_end"],
        "renewal_date": row["current_period_end"],
        "balance_cents": row["balance_cents"],
        "cancel_at_period_end": row["cancel_at_period_end"],
        "canceled_at": _utc(row.get("canceled_at")),
    }


def _invoice(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "subscription_id": row["subscription_id"],
        "organization_id": row["organization_id"],
        **{
            name: row[name]
            for name in (
                "kind",
                "cycle",
                "period_start",
                "period_end",
                "amount_cents",
                "discount_cents",
                "total_cents",
                "status",
                "method",
                "due_date",
                "paid_on",
            )
        },
    }


def _charge(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "invoice_id": row["invoice_id"],
        "subscription_id": row["subscription_id"],
        "organization_id": row["organization_id"],
        "attempt": row["attempt"],
        "amount_cents": row["amount_cents"],
        "status": row["status"],
        "card_last4": row.get("card_last4"),
        "decline_code": row.get("gateway_code") if row["status"] == "failed" else None,
        "hard_decline": row.get("hard_decline", False),
        "next_retry_on": row.get("next_retry_on"),
    }


def _boleto(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "invoice_id": row["invoice_id"],
        "subscription_id": row["subscription_id"],
        "organization_id": row["organization_id"],
        "digitable_line": row["digitable_line"],
        "barcode": row["barcode"],
        "due_date": row["due_date"],
        "amount_cents": row["amount_cents"],
        "status": row["status"],
    }


def _change_request(row: dict[str, Any]) -> dict[str, Any]:
    view = change_request_view(_Row(row))
    return {**view, "created_at": _utc(view["created_at"]), "processed_at": _utc(view["processed_at"])}


def _refund(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "subscription_id": row["subscription_id"],
        "organization_id": row["organization_id"],
        "method": row["method"],
        "amount_cents": row["amount_cents"],
        "status": row["status"],
        "reason": row.get("reason", ""),
    }


_SHAPES = {
    "subscription": _subscription,
    "invoice": _invoice,
    "charge": _charge,
    "boleto": _boleto,
    "change_request": _change_request,
    "refund": _refund,
}


class _Row:
    """A snapshot read by attribute, as the API's views read ORM rows (instants parsed back)."""

    def __init__(self, row: dict[str, Any]) -> None:
        self._row = row

    def __getattr__(self, name: str) -> Any:
        value = self._row.get(name)
        if name.endswith("_at") and isinstance(value, str):
            return datetime.fromisoformat(value)
        return value


def _utc(value: datetime | str | None) -> str | None:
    if value is None:
        return None
    instant = datetime.fromisoformat(value) if isinstance(value, str) else value
    return instant.astimezone(UTC).isoformat().replace("+00:00", "Z")


# --- reading ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EventPage:
    events: list[Event]
    has_more: bool


def list_events(session: Session, *, after: str | None = None, limit: int = PAGE_LIMIT) -> EventPage:
    """Events in order, after the one whose id is `after` (from the first kept when None)."""
    query = select(Event).where(VISIBLE)
    if after is not None:
        position = session.execute(select(Event.txid, Event.id).where(Event.id == parse_public_id(after))).one_or_none()
        if position is None:
            raise EventError("invalid_cursor", f"no event {after}: it never existed or is older than 30 days")
        query = query.where(tuple_(Event.txid, Event.id) > tuple_(*position))
    rows = list(session.scalars(query.order_by(Event.txid, Event.id).limit(limit + 1)))
    return EventPage(rows[:limit], has_more=len(rows) > limit)


def forget_old_events(session: Session, now: datetime, limit: int = 1_000) -> int:
    """Events older than the retention whose deliveries are all settled (their deliveries go with them)."""
    old = (
        select(Event.id)
        .where(
            Event.created_at < now - RETENTION,
            ~exists().where(EventDelivery.event_id == Event.id, EventDelivery.status == "pending"),
        )
        .limit(limit)
    )
    ids = list(session.scalars(old))
    if ids:
        session.execute(delete(EventDelivery).where(EventDelivery.event_id.in_(ids)))
        session.execute(delete(Event).where(Event.id.in_(ids)))
    return len(ids)


# --- endpoints -------------------------------------------------------------------------------------------


def new_secret() -> str:
    """A Standard Webhooks signing secret: `whsec_` and 24 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def add_endpoint(
    session: Session,
    url: str,
    event_types: Sequence[str] = (),
    *,
    description: str = "",
    require_https: bool,
    actor: str = "system",
) -> WebhookEndpoint:
    """A new endpoint, with its own new secret; it receives the events recorded from now on."""
    endpoint = WebhookEndpoint(
        url=check_url(url, require_https=require_https),
        secret=new_secret(),
        event_types=check_event_types(event_types),
        description=description.strip()[:200],
    )
    session.add(endpoint)
    session.flush()
    record(
        session,
        actor=actor,
        action="webhook_endpoint.add",
        target_type="webhook_endpoint",
        target_id=str(endpoint.id),
        details={"url": endpoint.url, "event_types": endpoint.event_types},
    )
    return endpoint


def set_endpoint_enabled(
    session: Session, endpoint_id: int, enabled: bool, *, actor: str, reason: str
) -> WebhookEndpoint:
    """Stop (or resume) sending to an endpoint. While disabled, its events are not even recorded for
    it; its pending deliveries wait, and go out in order once it is enabled again."""
    endpoint = session.get(WebhookEndpoint, endpoint_id, with_for_update=True)
    if endpoint is None:
        raise EventError("not_found", f"no endpoint {endpoint_id}")
    endpoint.enabled = enabled
    record(
        session,
        actor=actor,
        action="webhook_endpoint.enable" if enabled else "webhook_endpoint.disable",
        target_type="webhook_endpoint",
        target_id=str(endpoint.id),
        reason=reason,
    )
    return endpoint


def check_url(url: str, *, require_https: bool) -> str:
    url = url.strip()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or len(url) > 2_000:
        raise EventError("invalid_url", f"{url!r} is not an http(s) URL")
    if require_https and parts.scheme != "https":
        raise EventError("invalid_url", f"{url!r}: production endpoints must use https")
    return url


def check_event_types(event_types: Sequence[str]) -> list[str]:
    unknown = sorted(set(event_types) - set(EVENT_TYPES))
    if unknown:
        raise EventError("invalid_event_type", f"unknown event type(s) {', '.join(unknown)}; see README")
    return sorted(set(event_types))


def endpoints(session: Session) -> list[WebhookEndpoint]:
    return list(session.scalars(select(WebhookEndpoint).order_by(WebhookEndpoint.id)))


def delivery_counts(session: Session) -> dict[int, dict[str, int]]:
    """Per endpoint, its deliveries by status."""
    counts: dict[int, dict[str, int]] = {}
    for endpoint_id, status, count in session.execute(
        select(EventDelivery.endpoint_id, EventDelivery.status, func.count()).group_by(
            EventDelivery.endpoint_id, EventDelivery.status
        )
    ):
        counts.setdefault(endpoint_id, {})[status] = count
    return counts
