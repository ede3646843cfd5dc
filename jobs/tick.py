"""The clock's `tick`, sent by the scheduler at every interval (several schedulers may run).

It starts the next due billing run (one date at a time, in order, each claimed once across every
scheduler), re-scans an unfinished run so that a message lost mid-run is redone the same day, and
re-enqueues stale work whose message may have been lost: a flow registers its finder with
`@stale_work(name)`. Change requests, gateway events and notices are re-enqueued only when due for
another attempt (`jobs.work_attempts`: a failed row waits out its backoff, and one that needs
attention waits for an operator), so a row that always fails never loops.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import Any

import dramatiq
from sqlalchemy import select, update
from sqlalchemy.orm import Session

import jobs
from jobs import clock
from jobs.billing_day import claim_run, run_billing_day
from jobs.changes import pending_change_request_ids, process_change_request
from jobs.context import BillingConfig, current_session, runtime
from jobs.event_delivery import deliver_events, due_deliveries
from jobs.events import forget_old_events
from jobs.gateway_events import process_gateway_event
from jobs.notifications import enqueue_delivery, pending_notification_ids
from jobs.outbox import send_after_commit
from jobs.payments import claim_unresolved_charges, reconcile_charges
from jobs.refunds import process_refund, stale_refund_ids
from jobs.retries import STANDARD
from jobs.work_attempts import due_for_retry
from models.calendar import latest_due_run_date
from models.schema import BillingRun, GatewayEvent
from models.states import RunStatus

jobs.require_broker()

# A run is re-scanned when this long has passed since its last scan and work is still due.
RESCAN_AFTER = timedelta(minutes=5)
# Work whose message is this old and still not done is presumed lost and re-enqueued.
STALE_WORK = timedelta(minutes=1)


@dataclass(frozen=True)
class TickResult:
    claimed: date | None
    rescanned: date | None
    requeued: dict[str, int]


def tick_once(
    session: Session, now: datetime, config: BillingConfig, run_at: time, *, rescan_after: timedelta = RESCAN_AFTER
) -> TickResult:
    """Start the next due run (one date at a time, in order), re-scan an unfinished one, and
    re-enqueue stale work whose message may have been lost."""
    latest_due = latest_due_run_date(now, run_at, config.timezone)
    last = session.scalar(select(BillingRun).order_by(BillingRun.run_date.desc()).limit(1))
    claimed: date | None = None
    rescanned: date | None = None
    if last is None or (last.status == RunStatus.DONE and last.run_date < latest_due):
        candidate = latest_due if last is None else last.run_date + timedelta(days=1)
        if claim_run(session, candidate):
            claimed = candidate
            send_after_commit(session, run_billing_day, candidate.isoformat(), now.isoformat())
    elif last.status != RunStatus.DONE:
        # Only one of several schedulers wins the re-scan of a run.
        won = session.scalar(
            update(BillingRun)
            .where(
                BillingRun.id == last.id,
                (BillingRun.last_scan_at.is_(None)) | (BillingRun.last_scan_at <= now - rescan_after),
            )
            .values(last_scan_at=now)
            .returning(BillingRun.id)
        )
        if won is not None:
            rescanned = last.run_date
            send_after_commit(session, run_billing_day, last.run_date.isoformat(), now.isoformat())
    requeued = requeue_stale_work(session, now)
    session.commit()
    return TickResult(claimed, rescanned, requeued)


STALE_WORK_FINDERS: dict[str, Callable[[Session, datetime], int]] = {}


def stale_work(name: str) -> Callable[[Callable[[Session, datetime], int]], Callable[[Session, datetime], int]]:
    def register(finder: Callable[[Session, datetime], int]) -> Callable[[Session, datetime], int]:
        STALE_WORK_FINDERS[name] = finder
        return finder

    return register


def requeue_stale_work(session: Session, now: datetime) -> dict[str, int]:
    return {name: finder(session, now) for name, finder in STALE_WORK_FINDERS.items()}


@stale_work("charges")
def _requeue_charges(session: Session, now: datetime) -> int:
    ids = claim_unresolved_charges(session, now)
    if ids:
        send_after_commit(session, reconcile_charges, ids, now.isoformat())
    return len(ids)


def _send_each(session: Session, actor: dramatiq.Actor[Any, Any], ids: Sequence[Any]) -> int:
    """One message per id, after the tick's commit; returns how many."""
    for item_id in ids:
        send_after_commit(session, actor, item_id)
    return len(ids)


@stale_work("notifications")
def _requeue_notifications(session: Session, now: datetime) -> int:
    # In batches (one message, one SMTP connection per BATCH_SIZE notices), not one message each.
    ids = pending_notification_ids(session, older_than=now - STALE_WORK, now=now)
    enqueue_delivery(session, ids)
    return len(ids)


@stale_work("gateway_events")
def _requeue_gateway_events(session: Session, now: datetime) -> int:
    ids = session.scalars(
        select(GatewayEvent.event_id)
        .where(GatewayEvent.processed_at.is_(None), GatewayEvent.received_at < now - STALE_WORK)
        .where(due_for_retry(GatewayEvent, now))
        .order_by(GatewayEvent.received_at)
        .limit(500)
    ).all()
    return _send_each(session, process_gateway_event, ids)


@stale_work("refunds")
def _requeue_refunds(session: Session, now: datetime) -> int:
    return _send_each(session, process_refund, stale_refund_ids(session, now))


@stale_work("event_deliveries")
def _deliver_events(session: Session, now: datetime) -> int:
    """Deliveries due (by the wall clock: retries wait for real receivers, not for the test clock);
    events past their retention forgotten."""
    forget_old_events(session, clock.wall_clock())
    if not due_deliveries(session, clock.wall_clock()):
        return 0
    send_after_commit(session, deliver_events)
    return 1


@stale_work("change_requests")
def _requeue_change_requests(session: Session, now: datetime) -> int:
    ids = pending_change_request_ids(session, older_than=now - STALE_WORK, now=now)
    return _send_each(session, process_change_request, ids)


@dramatiq.actor(queue_name="billing", **STANDARD)
def tick(now: str, run_at: str = "06:00") -> None:
    tick_once(current_session(), datetime.fromisoformat(now), runtime().config, time.fromisoformat(run_at))
