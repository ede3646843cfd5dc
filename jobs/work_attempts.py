"""Failed attempts at stored work — change requests, gateway events, notices — and when to try again.

The one place for the rule. The scheduler's tick re-enqueues such rows when their message may have
been lost; without a memory of failures, a row that fails for a reason no retry can fix (a bug, bad
data) would become a new dead letter every minute, for ever. So a failed attempt is recorded on the
row (`record_failure`): `attempts` + 1, `last_error` (one short line), and `next_attempt_at` after an
exponential backoff; the tick's finders take only rows `due_for_retry`. After `MAX_ATTEMPTS` failures
the row *needs attention* (`needs_attention_at`) and is never re-enqueued again until an operator
puts it back (`retry_now`, audited; `renova attention list|retry`).

Transient failures (`jobs.retries.is_transient`: database, Redis, SMTP, gateway unavailable) are
counted and back off too, but park a row only after `MAX_TRANSIENT_ATTEMPTS`: an outage of a few
minutes must not park every notice at once (Dramatiq's own retries count as attempts), while a row
that keeps failing "transiently" for hours still stops.
"""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

from dramatiq import Actor
from sqlalchemy import ColumnElement, and_, func, or_, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from jobs import audit
from jobs.errors import cause
from jobs.outbox import send_after_commit
from jobs.retries import is_transient
from models.schema import ChangeRequest, GatewayEvent, Notification
from models.states import ChangeRequestStatus, NotificationStatus

logger = logging.getLogger(__name__)

# Failures before a row needs attention; transient ones (outages) get more room, see the module's doc.
MAX_ATTEMPTS: Final = 5
MAX_TRANSIENT_ATTEMPTS: Final = 50
# The tick retries 1, 2, 4, 8 … minutes after a failure, never waiting longer than MAX_BACKOFF.
FIRST_BACKOFF: Final = timedelta(minutes=1)
MAX_BACKOFF: Final = timedelta(minutes=15)
MAX_ERROR_LENGTH: Final = 200

CHANGE_REQUEST: Final = "change_request"
GATEWAY_EVENT: Final = "gateway_event"
NOTIFICATION: Final = "notification"

Work = ChangeRequest | GatewayEvent | Notification


@dataclass(frozen=True)
class WorkKind:
    name: str
    model: type[Work]
    # SQL: the row is still to be done (a finished row is never retried nor listed).
    unfinished: ColumnElement[bool]
    # What the kind's message carries to name the row (a gateway event is named by the gateway's id).
    message_key: InstrumentedAttribute[Any]
    # "module:actor"; resolved when a message is sent, since the actor modules import this one.
    actor: str


KINDS: Final[dict[str, WorkKind]] = {
    kind.name: kind
    for kind in (
        WorkKind(
            CHANGE_REQUEST,
            ChangeRequest,
            ChangeRequest.status == ChangeRequestStatus.PENDING.value,
            ChangeRequest.id,
            "jobs.changes.processing:process_change_request",
        ),
        WorkKind(
            GATEWAY_EVENT,
            GatewayEvent,
            GatewayEvent.processed_at.is_(None),
            GatewayEvent.event_id,
            "jobs.gateway_events:process_gateway_event",
        ),
        WorkKind(
            NOTIFICATION,
            Notification,
            Notification.status == NotificationStatus.PENDING.value,
            Notification.id,
            "jobs.notifications:send_notification",
        ),
    )
}


class AttentionError(ValueError):
    """An operator's action that does not apply: unknown kind or row, a row already done, no reason."""


def kind_of(name: str) -> WorkKind:
    try:
        return KINDS[name]
    except KeyError:
        raise AttentionError(f"unknown kind {name!r}; use one of {', '.join(KINDS)}") from None


def _kind_of_row(row: Work) -> WorkKind:
    return next(kind for kind in KINDS.values() if isinstance(row, kind.model))


# --- the rule ------------------------------------------------------------------------------------


def backoff(attempts: int) -> timedelta:
    """How long the tick waits after the `attempts`-th failure: 1, 2, 4, 8 … minutes, capped."""
    exponent = min(max(attempts - 1, 0), 16)  # 2**16 minutes is far past the cap already
    return min(FIRST_BACKOFF * 2**exponent, MAX_BACKOFF)


# Best effort against personal data and secrets in an error's text: e-mail addresses, gateway tokens,
# and runs of 11+ digits (card numbers, CPF/CNPJ). The full error stays in the worker's log.
_EMAIL = re.compile(r"[^\s@'\"<>(),;:\[\]{}]+@[^\s@'\"<>(),;:\[\]{}]+")
_TOKEN = re.compile(r"\btok_\w+|\b(?:card|pm|src)_(?=\w*\d)\w+")
_LONG_NUMBER = re.compile(r"\d(?:[ .\-/]?\d){10,}")


def describe_error(error: BaseException) -> str:
    """One short line for `last_error`: the error's type and the first line of its message (under a
    neutral `jobs.errors` error, the protocol's own), masked."""
    error = cause(error)
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    text = _LONG_NUMBER.sub("***", _TOKEN.sub("tok_***", _EMAIL.sub("<e-mail>", text)))
    text = " ".join(text.split())
    return text if len(text) <= MAX_ERROR_LENGTH else text[: MAX_ERROR_LENGTH - 1] + "…"


def record_failure(session: Session, row: Work, error: BaseException, now: datetime, *, counted: bool = False) -> bool:
    """Record a failed attempt on a row the caller holds (locked) and flush; True when the row now
    needs attention. `now` is the instant the tick compares with (`jobs.clock.now`). `counted`: the
    attempt was already counted when it started (notices count every delivery attempt)."""
    if not counted:
        row.attempts = (row.attempts or 0) + 1
    row.last_error = describe_error(error)
    row.next_attempt_at = now + backoff(row.attempts)
    limit = MAX_TRANSIENT_ATTEMPTS if is_transient(error) else MAX_ATTEMPTS
    if row.attempts >= limit and row.needs_attention_at is None:
        row.needs_attention_at = now
        logger.warning(
            "%s %s needs attention after %s failed attempts: %s",
            _kind_of_row(row).name,
            row.id,
            row.attempts,
            row.last_error,
        )
    session.flush()
    return row.needs_attention_at is not None


def due_for_retry(model: type[Work], now: datetime) -> ColumnElement[bool]:
    """SQL for the tick's finders: not parked, and its backoff (if any) has passed."""
    return and_(
        model.needs_attention_at.is_(None),
        or_(model.next_attempt_at.is_(None), model.next_attempt_at <= now),
    )


@contextmanager
def failures_recorded(session: Session, kind: str, key: Any, now: datetime) -> Iterator[None]:
    """Around the processing of one stored row, named by its message's `key`. When processing raises,
    the session is rolled back (its work, and the row lock it held), the failed attempt is recorded
    in a new transaction of the same session, and the error is raised again, so that Dramatiq's
    own retries still apply to transient errors. A row finished meanwhile (by a duplicate message,
    or before a later step failed) is left alone."""
    try:
        yield
    except Exception as exc:
        record_apart(session, kind, key, exc, now)
        raise


def record_apart(session: Session, kind: str, key: Any, error: BaseException, now: datetime) -> None:
    """Roll back, then record `error` as a failed attempt of the row named `key` and commit. Never
    raises: the caller is already failing with `error`, which matters more."""
    work = KINDS[kind]
    session.rollback()
    try:
        row = session.scalar(select(work.model).where(work.message_key == key, work.unfinished).with_for_update())
        if row is not None:
            record_failure(session, row, error, now)
        session.commit()
    except Exception:
        session.rollback()
        logger.exception("could not record the failed attempt of %s %s", kind, key)


# --- operators -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stuck:
    kind: str
    id: int
    key: str  # what its message carries (a gateway event's own id)
    attempts: int
    last_error: str | None
    since: datetime


def list_needing_attention(session: Session, kind: str | None = None) -> list[Stuck]:
    """Rows still to be done that need attention, longest waiting first."""
    kinds = [kind_of(kind)] if kind is not None else list(KINDS.values())
    stuck: list[Stuck] = []
    for work in kinds:
        # Read afresh: the session may hold these rows from before their last failure.
        rows = session.scalars(
            select(work.model)
            .where(work.unfinished, work.model.needs_attention_at.is_not(None))
            .execution_options(populate_existing=True)
        )
        for row in rows:
            key = str(getattr(row, work.message_key.key))
            assert row.needs_attention_at is not None  # the query's condition
            stuck.append(Stuck(work.name, row.id, key, row.attempts, row.last_error, row.needs_attention_at))
    return sorted(stuck, key=lambda item: (item.since, item.kind, item.id))


def count_needing_attention(session: Session) -> dict[str, int]:
    """Per kind, how many rows need attention (for health checks and metrics)."""
    return {
        work.name: session.scalar(
            select(func.count())
            .select_from(work.model)
            .where(work.unfinished, work.model.needs_attention_at.is_not(None))
        )
        or 0
        for work in KINDS.values()
    }


def clear_attention(
    session: Session, row: Work, actor: str, reason: str, now: datetime, *, action: str = "attention.clear"
) -> None:
    """Put a row back in play: not parked, due at `now` (the next tick re-enqueues it), audited.

    `attempts` is kept, not reset: it stays the row's true history, and since it is at the limit
    already, one more failure for a non-transient reason parks the row again at once — an
    operator's retry is one more attempt, not a new series that would fill the dead letters again.
    """
    if not reason.strip():
        raise AttentionError("say why (the reason is kept in the audit log)")
    work = _kind_of_row(row)
    audit.record(
        session,
        actor=actor,
        action=action,
        target_type=work.name,
        target_id=str(row.id),
        reason=reason.strip(),
        details={
            "attempts": row.attempts,
            "last_error": row.last_error,
            "needed_attention_since": row.needs_attention_at.isoformat() if row.needs_attention_at else None,
        },
    )
    row.needs_attention_at = None
    row.next_attempt_at = now


def retry_now(session: Session, kind: str, row_id: int, actor: str, reason: str, now: datetime) -> Work:
    """An operator retries one row now: attention cleared (audited) and its message sent once the
    caller commits. Refused (AttentionError) for an unknown kind or row, or a row already done."""
    work = kind_of(kind)
    row = session.scalar(select(work.model).where(work.model.id == row_id, work.unfinished).with_for_update())
    if row is None:
        if session.scalar(select(work.model.id).where(work.model.id == row_id)) is None:
            raise AttentionError(f"no {work.name} with id {row_id}")
        raise AttentionError(f"{work.name} {row_id} is already done: nothing to retry")
    clear_attention(session, row, actor, reason, now, action="attention.retry")
    send_after_commit(session, _actor(work), getattr(row, work.message_key.key))
    return row


def _actor(work: WorkKind) -> Actor[Any, Any]:
    module, _, name = work.actor.partition(":")
    actor: Actor[Any, Any] = getattr(importlib.import_module(module), name)
    return actor
