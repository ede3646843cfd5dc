"""E-mail notices to the people who pay: written with the state change, delivered over SMTP once.

A notice is a `notifications` row (unique `dedupe_key`) inserted by `notify` — or, many at once, by
`notify_many` — in the same transaction as the change that causes it. After that transaction
commits, their delivery is enqueued as `send_notifications` messages of up to `BATCH_SIZE` ids
(through `jobs.outbox`, never before the rows exist); the scheduler's tick re-enqueues rows still
pending (`pending_notification_ids`) in batches too, so a lost message only delays a notice. A batch
is sent over one SMTP connection, each notice locked, sent and marked sent in a transaction of its
own, so a duplicated or retried message finds it sent and sends nothing (`jobs.notice_delivery`).
`send_notification(id)`, one notice per message, still delivers the messages of earlier versions
and operators' retries.

Failures (SMTP, or a notice that cannot be rendered): the attempt is recorded on the notice's row by
`jobs.work_attempts` (error, next attempt after a backoff, "needs attention" after too many) and
committed before the message fails, so it survives the rollback of the message's transaction; the
row stays `pending`, the message is retried with backoff when the error is transient (its retry
sends only what is still pending), and the tick re-enqueues it once its next attempt is due. Only
two outcomes are final failures, because retrying cannot help: no recipient at all, and every
recipient refused by the server with a permanent (5xx) code.

Context values are JSON-friendly: amounts in integer cents, dates as ISO `YYYY-MM-DD` strings.
Rendering lives in `jobs.notice_rendering`, sending in `jobs.notice_delivery`.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Final, TypeVar

import dramatiq
import jinja2
from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

import jobs
from jobs import clock
from jobs.context import NotConfigured, current_session, runtime
from jobs.notice_delivery import (
    NO_RECIPIENTS,
    BatchResult,
    DeliveryFailed,
    build_message,
    deliver_batch,
    deliver_notification,
    message_id,
    recipients_for,
)
from jobs.notice_rendering import DECLINE_REASONS, OPTIONAL_KEYS, TEMPLATES_DIR, RenderedEmail, render
from jobs.outbox import send_after_commit
from jobs.retries import STANDARD
from jobs.work_attempts import due_for_retry
from models.schema import Notification
from models.states import BoletoPurpose, NotificationStatus, RefundMethod

# Names that moved to jobs.notice_rendering / jobs.notice_delivery, still importable from here.
__all__ = [
    "BATCH_SIZE",
    "CONTEXT_KEYS",
    "DECLINE_REASONS",
    "KINDS",
    "NO_RECIPIENTS",
    "OPTIONAL_KEYS",
    "QUEUE",
    "TEMPLATES_DIR",
    "DeliveryFailed",
    "NoticeSpec",
    "RenderedEmail",
    "build_message",
    "deliver_batch",
    "deliver_notification",
    "enqueue_delivery",
    "message_id",
    "notify",
    "notify_many",
    "pending_notification_ids",
    "recipients_for",
    "render",
    "send_notification",
    "send_notifications",
    "validate_context",
]

jobs.require_broker()

_T = TypeVar("_T")

QUEUE: Final = "notifications"
# After the daily run's chunks (billing_day.BACKLOG_PRIORITY = 100; Dramatiq takes lower numbers first):
# on a worker with a renewal backlog, the money is recorded first and its e-mail follows.
PRIORITY: Final = 200
# Notices per `send_notifications` message: one SMTP connection each, and short enough to finish
# well inside the actor's time limit even against a slow server.
BATCH_SIZE: Final = 100
# Rows per INSERT statement of `notify_many` (PostgreSQL takes at most 65535 parameters).
INSERT_CHUNK: Final = 1000

# --- kinds and their context -------------------------------------------------------------------

_BOLETO_KEYS: Final = ("invoice_id", "amount_cents", "due_date", "digitable_line", "period_start", "period_end")

# Required context keys of each kind. Templates may also read the optional keys listed below.
CONTEXT_KEYS: Final[dict[str, tuple[str, ...]]] = {
    "boleto_issued": _BOLETO_KEYS,
    "boleto_reminder": _BOLETO_KEYS,
    "boleto_overdue": ("invoice_id", "amount_cents", "due_date", "digitable_line", "suspend_on"),
    "charge_succeeded": (
        "invoice_id",
        "amount_cents",
        "card_brand",
        "card_last4",
        "period_start",
        "period_end",
        "paid_on",
    ),
    "charge_failed": ("invoice_id", "amount_cents", "code", "reason", "hard", "next_retry_on", "card_last4"),
    "subscription_suspended": ("invoice_id", "amount_cents", "reason"),
    "subscription_reactivated": ("invoice_id", "period_start", "period_end"),
    "payment_method_switch_scheduled": ("from_method", "to_method", "effective_on"),
    "payment_method_switch_applied": ("from_method", "to_method", "renewal_date"),
    "cycle_changed": ("from_cycle", "to_cycle", "quote", "payment_method"),
    "card_updated": ("brand", "last4", "exp_month", "exp_year"),
    "change_request_rejected": ("kind", "code", "message"),
    "renewal_notice": ("renewal_date", "amount_cents", "cycle", "payment_method"),
    "subscribed": ("cycle", "payment_method", "period_start", "period_end", "amount_cents"),
    "cancellation_scheduled": ("ends_on",),
    "subscription_canceled": ("ended_on",),
    "cancellation_undone": ("renewal_date",),
    "refund_created": ("subscription_id", "amount_cents", "method"),
}
KINDS: Final[tuple[str, ...]] = tuple(CONTEXT_KEYS)

# What a boleto pays (boleto_issued `purpose`); notices written before the key existed were renewals.
BOLETO_PURPOSES: Final = tuple(BoletoPurpose)
# How a refund reaches the customer (refund_created `method`): a card refund (estorno) through the
# gateway, or a bank transfer for money that came by boleto.
REFUND_METHODS: Final = tuple(RefundMethod)

# Values a key may take, where the templates word each one differently.
ALLOWED_VALUES: Final[dict[str, dict[str, tuple[str, ...]]]] = {
    "boleto_issued": {"purpose": BOLETO_PURPOSES},
    "refund_created": {"method": REFUND_METHODS},
}

# Required keys that may hold null (e.g. no retry left, a receipt covered by credit without a card).
NULLABLE_KEYS: Final[dict[str, frozenset[str]]] = {
    "charge_succeeded": frozenset({"card_brand", "card_last4"}),
    "charge_failed": frozenset({"reason", "next_retry_on", "card_last4"}),
}
QUOTE_KEYS: Final = (
    "paid_cents",
    "unused_cents",
    "balance_cents",
    "credit_cents",
    "amount_due_cents",
    "new_period_start",
    "new_period_end",
    "balance_after_cents",
)
# Optional quote keys the cycle_changed template uses when present: quote.months / quote.extra_days
# (annual → monthly). Other kinds' optional keys are in OPTIONAL_KEYS.


def _missing_keys(kind: str, context: Mapping[str, Any]) -> list[str]:
    nullable = NULLABLE_KEYS.get(kind, frozenset())
    missing = [
        key for key in CONTEXT_KEYS[kind] if context.get(key) is None and not (key in context and key in nullable)
    ]
    if kind == "cycle_changed" and isinstance(context.get("quote"), Mapping):
        quote = context["quote"]
        missing += [f"quote.{key}" for key in QUOTE_KEYS if quote.get(key) is None]
    return missing


def _unexpected_values(kind: str, context: Mapping[str, Any]) -> list[str]:
    return [
        f"{key}={context[key]!r} (expected one of {', '.join(allowed)})"
        for key, allowed in ALLOWED_VALUES.get(kind, {}).items()
        if context.get(key) is not None and context[key] not in allowed
    ]


def validate_context(
    kind: str, context: Mapping[str, Any], *, rendered_shapes: set[Hashable] | None = None
) -> dict[str, Any]:
    """The context as stored (dates as ISO strings), or ValueError naming what is wrong with it.

    Besides the required keys, the notice is rendered once here, so a value of the wrong type is
    refused while the caller can still fix it instead of failing later in the worker. Given
    `rendered_shapes` (a batch's), a context of a shape already rendered — the same kind, keys and
    types of values — is not rendered again: a renewal day's receipts differ only in their values.
    """
    if kind not in CONTEXT_KEYS:
        raise ValueError(f"unknown notification kind {kind!r}; expected one of {', '.join(KINDS)}")
    stored = _json_friendly(dict(context))
    missing = _missing_keys(kind, stored)
    if missing:
        raise ValueError(f"{kind}: missing context keys: {', '.join(missing)}")
    unexpected = _unexpected_values(kind, stored)
    if unexpected:
        raise ValueError(f"{kind}: unexpected context values: {'; '.join(unexpected)}")
    shape = (kind, _shape(stored))
    if rendered_shapes is not None and shape in rendered_shapes:
        return stored
    try:
        render(Notification(kind=kind, context=stored, recipients=[]), "Organização")
    except (jinja2.TemplateError, TypeError, ValueError, AttributeError, KeyError) as exc:
        raise ValueError(f"{kind}: the context does not render: {exc}") from exc
    if rendered_shapes is not None:
        rendered_shapes.add(shape)
    return stored


def _shape(value: Any) -> Hashable:
    """What rendering can depend on besides the values themselves: keys, and the types of values."""
    if isinstance(value, Mapping):
        return tuple(sorted((str(key), _shape(item)) for key, item in value.items()))
    if isinstance(value, list | tuple):
        return ("list", tuple(_shape(item) for item in value))
    return type(value).__name__


def _json_friendly(value: Any) -> Any:
    if isinstance(value, datetime):
        raise ValueError("notification context dates must be dates, not datetimes")
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(key): _json_friendly(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_friendly(item) for item in value]
    return value


# --- writing -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class NoticeSpec:
    """One notice to write (see `notify`)."""

    organization_id: int
    kind: str
    dedupe_key: str
    context: Mapping[str, Any]
    subscription_id: int | None = None
    recipients: Sequence[str] | None = None


def _row(notice: NoticeSpec, rendered_shapes: set[Hashable]) -> dict[str, Any]:
    """The row to insert, or ValueError naming what is wrong with the notice."""
    if not notice.dedupe_key or len(notice.dedupe_key) > 255:
        raise ValueError("dedupe_key must be 1 to 255 characters")
    return {
        "organization_id": notice.organization_id,
        "subscription_id": notice.subscription_id,
        "kind": notice.kind,
        "dedupe_key": notice.dedupe_key,
        "recipients": [address.strip() for address in notice.recipients or [] if address and address.strip()],
        "context": validate_context(notice.kind, notice.context, rendered_shapes=rendered_shapes),
    }


def notify_many(session: Session, notices: Sequence[NoticeSpec]) -> list[int]:
    """Record notices in the caller's transaction; the ids of the new rows, in the order of
    `notices`, leaving out each one whose `dedupe_key` exists already (or repeats an earlier one).

    Every notice is validated before anything is written, so one bad notice writes none. Their
    delivery is enqueued in batches of BATCH_SIZE once that transaction commits (never before: the
    rows must exist), and the scheduler's tick re-enqueues any notice whose message was lost.
    """
    rendered_shapes: set[Hashable] = set()
    rows = [_row(notice, rendered_shapes) for notice in notices]
    # A key repeated within the call is the same notice: the first one is written, as across calls.
    unique: dict[str, dict[str, Any]] = {}
    for row in rows:
        unique.setdefault(row["dedupe_key"], row)
    rows = list(unique.values())
    written: dict[str, int] = {}
    for chunk in _chunks(rows, INSERT_CHUNK):
        statement = (
            insert(Notification)
            .values(chunk)
            .on_conflict_do_nothing(index_elements=[Notification.dedupe_key])
            .returning(Notification.id, Notification.dedupe_key)
        )
        written.update((key, notification_id) for notification_id, key in session.execute(statement))
    # RETURNING gives no order to rely on: put the ids back in the caller's order.
    ids = [written[row["dedupe_key"]] for row in rows if row["dedupe_key"] in written]
    enqueue_delivery(session, ids)
    return ids


def enqueue_delivery(session: Session, notification_ids: Sequence[int]) -> int:
    """Have these notices sent once the caller's transaction commits, BATCH_SIZE per message;
    returns how many messages."""
    batches = _chunks(list(notification_ids), BATCH_SIZE)
    for batch in batches:
        send_after_commit(session, send_notifications, batch)
    return len(batches)


def _chunks(items: Sequence[_T], size: int) -> list[list[_T]]:
    return [list(items[start : start + size]) for start in range(0, len(items), size)]


def notify(
    session: Session,
    *,
    organization_id: int,
    kind: str,
    dedupe_key: str,
    context: Mapping[str, Any],
    subscription_id: int | None = None,
    recipients: list[str] | None = None,
) -> int | None:
    """Record one notice in the caller's transaction (`notify_many` of one); the new row's id, or
    None if `dedupe_key` exists."""
    notice = NoticeSpec(organization_id, kind, dedupe_key, context, subscription_id, recipients)
    ids = notify_many(session, [notice])
    return ids[0] if ids else None


def pending_notification_ids(
    session: Session, older_than: datetime, limit: int = 1000, *, now: datetime | None = None
) -> list[int]:
    """Pending notices created before `older_than` and due for another attempt at `now` (default
    `older_than`; never one that needs attention), oldest first (served by ix_notifications_unsent)."""
    statement = (
        select(Notification.id)
        .where(Notification.status == NotificationStatus.PENDING.value, Notification.created_at < older_than)
        .where(due_for_retry(Notification, now or older_than))
        .order_by(Notification.created_at)
        .limit(limit)
    )
    return list(session.scalars(statement))


# --- delivery (jobs.notice_delivery) -------------------------------------------------------------


def _deliver(notification_ids: Sequence[int]) -> BatchResult:
    rt = runtime()
    if rt.mailer_factory is None:
        raise NotConfigured("the runtime has no mailer_factory")
    session = current_session()
    # The notices' Date is the real time; their next attempt is scheduled on the clock the tick reads.
    clock_now = clock.now(session, rt.config)
    result = deliver_batch(session, notification_ids, rt.mailer_factory(), rt.mail_from, clock_now=clock_now)
    error = result.error()
    if error is not None:
        # Each failure is recorded and committed on its own row already; failing the message gets it
        # retried when transient (the retry sends only what is still pending) or dead-lettered.
        raise error
    return result


@dramatiq.actor(queue_name=QUEUE, priority=PRIORITY, **STANDARD)
def send_notifications(notification_ids: list[int]) -> None:
    """Deliver a batch of notices over one SMTP connection, each at most once."""
    _deliver(notification_ids)


@dramatiq.actor(queue_name=QUEUE, priority=PRIORITY, **STANDARD)
def send_notification(notification_id: int) -> None:
    """Deliver one notice: the messages of earlier versions, and operators' retries."""
    _deliver([notification_id])
