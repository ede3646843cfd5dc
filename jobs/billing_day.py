"""The daily billing run: the scan of what is due on a business date, and the fan-out of that work in
chunks. The clock's `tick`, which starts runs and re-scans unfinished ones, is `jobs.tick`.

Everything a run does is derived from the database: the scan finds due rows with indexed set
queries using `<=` (a missed day is caught up by the next run), handlers re-check each row under a
lock (a duplicated message finds nothing to do), and `tick` re-scans until nothing is left.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

import dramatiq
from sqlalchemy import Select, func, literal, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session, aliased

import jobs
from gateways.base import Gateway
from jobs import dunning, renewals
from jobs.boletos import awaiting_boleto
from jobs.context import BillingConfig, current_session, runtime
from jobs.outbox import send_after_commit
from jobs.payments import awaiting_outcome_or_retry
from jobs.renewals import Work
from jobs.retries import STANDARD
from models.calendar import local_today
from models.dunning import latest_renewal_out_of_retries, overdue_on, suspend_on
from models.schema import BillingRun, Boleto, Charge, Invoice, Notification, Subscription
from models.states import (
    BoletoStatus,
    Cycle,
    InvoiceKind,
    InvoiceStatus,
    PaymentMethod,
    RunStatus,
    SubscriptionStatus,
)

jobs.require_broker()
logger = logging.getLogger(__name__)

CHUNK_SIZE = 200
# Dramatiq runs lower numbers first among the messages a worker holds: a renewal backlog's chunks
# yield to change requests, notices and payments (all at the default 0).
BACKLOG_PRIORITY = 100
# After this many scans a run is closed even if some rows keep failing (they stay visible and
# due, so later runs pick them up again), so that one bad row never blocks the next dates.
MAX_SCANS = 12

Handler = Callable[[Session, int, Work], None]


@dataclass(frozen=True)
class Task:
    name: str
    scan: Callable[[date, BillingConfig], Select[Any]]
    handle: Handler
    # Python-side refinement of a scan whose rule the SQL cannot express (business days).
    keep: Callable[[Session, list[int], date, BillingConfig], list[int]] | None = None
    # Set-based handling of a chunk's common case; returns the ids left for `handle`.
    handle_many: Callable[[Session, Sequence[int], Work], list[int]] | None = None


# --- scans -----------------------------------------------------------------------------------------

aliased_boleto = aliased(Boleto)


def scan_boletos_to_issue(on: date, config: BillingConfig) -> Select[Any]:
    # The renewals whose boleto invoice is due: `models.policy.renewal_boleto_due` (which the handler
    # re-checks) as an indexed scan. Its conditions are written to match the partial index
    # ix_subscriptions_boleto_due (`status <> 'canceled'`, `cycle = 'annual'`, the effective method as
    # `coalesce(pending_payment_method, payment_method)`); keep both in step.
    renewal_invoiced = (
        select(Invoice.id)
        .where(
            Invoice.subscription_id == Subscription.id,
            Invoice.kind == InvoiceKind.RENEWAL,
            Invoice.period_start == Subscription.current_period_end,
            Invoice.status != InvoiceStatus.VOID,
        )
        .exists()
    )
    due_renewals = select(Subscription.id).where(
        Subscription.status != SubscriptionStatus.CANCELED,
        Subscription.status != SubscriptionStatus.SUSPENDED,
        Subscription.cycle == Cycle.ANNUAL,
        func.coalesce(Subscription.pending_payment_method, Subscription.payment_method) == PaymentMethod.BOLETO,
        Subscription.cancel_at_period_end.is_(False),
        Subscription.current_period_end <= on + timedelta(days=config.boleto_lead_days),
        ~renewal_invoiced,
    )
    # Open boleto invoices without a live boleto: an interrupted issue, or a replacement (segunda via).
    interrupted_issues = select(Invoice.subscription_id).where(*awaiting_boleto())
    return due_renewals.union(interrupted_issues)


def scan_renewals(on: date, config: BillingConfig) -> Select[Any]:
    return select(Subscription.id).where(
        Subscription.status != SubscriptionStatus.CANCELED,
        Subscription.current_period_end <= on,
        (Subscription.status != SubscriptionStatus.SUSPENDED) | Subscription.cancel_at_period_end,
    )


def scan_card_retries(on: date, config: BillingConfig) -> Select[Any]:
    return select(Charge.invoice_id).where(Charge.next_retry_on.is_not(None), Charge.next_retry_on <= on).distinct()


# Dunning follows an invoice's latest boleto, and its dates the invoice's original due date: a
# replacement (segunda via) or an expiry never moves them.
_latest_boleto = (
    ~select(Boleto.id)
    .where(Boleto.invoice_id == aliased_boleto.invoice_id, Boleto.sequence > aliased_boleto.sequence)
    .exists()
)


def scan_boletos_overdue(on: date, config: BillingConfig) -> Select[Any]:
    return (
        select(aliased_boleto.id)
        .join(Invoice, Invoice.id == aliased_boleto.invoice_id)
        .where(
            aliased_boleto.status.in_([BoletoStatus.ISSUED, BoletoStatus.EXPIRED]),
            aliased_boleto.overdue_on.is_(None),
            Invoice.status == InvoiceStatus.OPEN,
            Invoice.due_date < on,
            _latest_boleto,
        )
    )


def keep_overdue(session: Session, ids: list[int], on: date, config: BillingConfig) -> list[int]:
    rows = session.execute(
        select(Boleto.id, Invoice.due_date).join(Invoice, Invoice.id == Boleto.invoice_id).where(Boleto.id.in_(ids))
    ).all()
    due_dates = {boleto_id: due_date for boleto_id, due_date in rows}
    return [boleto_id for boleto_id in ids if overdue_on(due_dates[boleto_id]) <= on]


def scan_boleto_suspensions(on: date, config: BillingConfig) -> Select[Any]:
    return select(aliased_boleto.id).where(
        aliased_boleto.status.in_([BoletoStatus.OVERDUE, BoletoStatus.EXPIRED]),
        aliased_boleto.overdue_on.is_not(None),
        aliased_boleto.overdue_on < on,
        _latest_boleto,
    )


def keep_suspensions(session: Session, ids: list[int], on: date, config: BillingConfig) -> list[int]:
    rows = session.execute(
        select(Boleto.id, Boleto.overdue_on, Invoice.status)
        .join(Invoice, Invoice.id == Boleto.invoice_id)
        .join(Subscription, Subscription.id == Invoice.subscription_id)
        .where(Boleto.id.in_(ids), Subscription.status != SubscriptionStatus.SUSPENDED)
    ).all()
    return [
        boleto_id
        for boleto_id, overdue_day, invoice_status in rows
        if invoice_status == InvoiceStatus.OPEN
        and overdue_day is not None
        and suspend_on(overdue_day, config.boleto_grace_business_days) <= on
    ]


def scan_card_suspensions(on: date, config: BillingConfig) -> Select[Any]:
    in_flight_or_scheduled = (
        select(Charge.id).where(Charge.invoice_id == Invoice.id, awaiting_outcome_or_retry()).exists()
    )
    return (
        select(Invoice.id)
        .join(Subscription, Subscription.id == Invoice.subscription_id)
        .where(
            Invoice.status == InvoiceStatus.OPEN,
            Invoice.method == PaymentMethod.CARD,
            Invoice.kind == InvoiceKind.RENEWAL,
            Invoice.due_date <= latest_renewal_out_of_retries(on, config.dunning_retry_days),
            Subscription.status == SubscriptionStatus.PAST_DUE,
            ~in_flight_or_scheduled,
        )
    )


def _not_notified(prefix: str, *keys: Any) -> Any:
    dedupe_key = literal(prefix)
    for key in keys:
        dedupe_key = dedupe_key + key
    return ~select(Notification.id).where(Notification.dedupe_key == dedupe_key).exists()


def scan_boleto_reminders(on: date, config: BillingConfig) -> Select[Any]:
    return select(Boleto.id).where(
        Boleto.status == BoletoStatus.ISSUED,
        Boleto.due_date >= on,
        Boleto.due_date <= on + timedelta(days=renewals.BOLETO_REMINDER_DAYS),
        _not_notified("boleto_reminder:", func.cast(Boleto.id, literal("").type)),
    )


def scan_renewal_notices(on: date, config: BillingConfig) -> Select[Any]:
    # No notice for a subscription that will not renew: canceled, ending, or suspended. The
    # `!= 'canceled'` predicate stays as written, so the partial index serves the scan.
    return select(Subscription.id).where(
        Subscription.status != SubscriptionStatus.CANCELED,
        Subscription.status != SubscriptionStatus.SUSPENDED,
        Subscription.cycle == Cycle.ANNUAL,
        Subscription.cancel_at_period_end.is_(False),
        Subscription.current_period_end > on,
        Subscription.current_period_end <= on + timedelta(days=renewals.RENEWAL_NOTICE_DAYS),
        _not_notified(
            "renewal_notice:",
            func.cast(Subscription.id, literal("").type),
            literal(":"),
            func.to_char(Subscription.current_period_end, "YYYY-MM-DD"),
        ),
    )


# Order matters within a run's first pass: boletos before renewals, renewals before dunning.
TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task(
            "issue_boletos",
            scan_boletos_to_issue,
            renewals.issue_renewal_boleto,
            handle_many=renewals.issue_renewal_boletos,
        ),
        Task("renew", scan_renewals, renewals.renew, handle_many=renewals.renew_many),
        Task("retry_charges", scan_card_retries, renewals.retry_charge),
        Task("boletos_overdue", scan_boletos_overdue, dunning.mark_boleto_overdue, keep_overdue),
        Task("suspend_boletos", scan_boleto_suspensions, dunning.suspend_for_boleto, keep_suspensions),
        Task("suspend_cards", scan_card_suspensions, dunning.suspend_for_card),
        Task("boleto_reminders", scan_boleto_reminders, renewals.send_boleto_reminder),
        Task("renewal_notices", scan_renewal_notices, renewals.send_renewal_notice),
    )
}


def due_ids(session: Session, task: Task, on: date, config: BillingConfig) -> list[int]:
    ids = sorted(session.scalars(task.scan(on, config)).all())
    if ids and task.keep is not None:
        ids = task.keep(session, ids, on, config)
    return ids


def scan(session: Session, on: date, config: BillingConfig) -> dict[str, list[int]]:
    return {name: due_ids(session, task, on, config) for name, task in TASKS.items()}


# --- processing a chunk ------------------------------------------------------------------------------


@dataclass
class ChunkResult:
    done: int
    failed: list[int]


def process_ids(
    session: Session,
    task_name: str,
    ids: Sequence[int],
    *,
    on: date,
    now: datetime,
    gateway: Gateway,
    config: BillingConfig,
) -> ChunkResult:
    """Run a task's handler over ids in one transaction. A failing id is rolled back and reported,
    never failing its neighbours: the chunk first runs straight through, and only if some id fails
    is it run again with a savepoint per id. Gateway work (the chunk's card charges as one
    concurrent batch, its boletos) happens after that transaction commits."""
    task = TASKS[task_name]
    work = Work(on=on, now=now, config=config, gateway=gateway)
    try:
        remaining = task.handle_many(session, ids, work) if task.handle_many else ids
        for item_id in remaining:
            task.handle(session, item_id, work)
        session.commit()
        failed: list[int] = []
    except Exception:
        session.rollback()
        if len(ids) == 1:
            raise
        work = Work(on=on, now=now, config=config, gateway=gateway)
        failed = handle_one_by_one(session, task, ids, work)
    renewals.settle_gateway_work(session, work)
    return ChunkResult(work.done, failed)


def handle_one_by_one(session: Session, task: Task, ids: Sequence[int], work: Work) -> list[int]:
    failed: list[int] = []
    for item_id in ids:
        savepoint = session.begin_nested()
        try:
            task.handle(session, item_id, work)
            savepoint.commit()
        except Exception:
            savepoint.rollback()
            logger.exception("%s failed for id %s on %s; retried on its own", task.name, item_id, work.on)
            failed.append(item_id)
    session.commit()
    return failed


@dramatiq.actor(queue_name="billing", priority=BACKLOG_PRIORITY, **STANDARD)
def process_chunk(task_name: str, run_date: str, ids: list[int], now: str) -> None:
    session = current_session()
    on = date.fromisoformat(run_date)
    result = process_ids(
        session,
        task_name,
        ids,
        on=on,
        now=datetime.fromisoformat(now),
        gateway=runtime().gateway_factory(),
        config=runtime().config,
    )
    for failed_id in result.failed:
        process_chunk.send(task_name, run_date, [failed_id], now)
    record_chunk(session, on, task_name, done=result.done, failed_ids=list(result.failed))


# Per task: rows done, attempts failed, and the ids that failed (the latest FAILED_IDS_KEPT), added in one
# statement so that chunks finishing at the same time never lose each other's counts.
FAILED_IDS_KEPT = 200
_RECORD_CHUNK = text(
    """
    UPDATE billing_runs SET
      done_count = done_count + chunk.done,
      failed_count = failed_count + chunk.failed,
      counts = counts || jsonb_build_object(
        'done', coalesce(counts->'done', '{}'::jsonb)
          || jsonb_build_object(chunk.task, coalesce((counts->'done'->>chunk.task)::int, 0) + chunk.done),
        'failed', coalesce(counts->'failed', '{}'::jsonb)
          || jsonb_build_object(chunk.task, coalesce((counts->'failed'->>chunk.task)::int, 0) + chunk.failed),
        'failed_ids', coalesce(counts->'failed_ids', '{}'::jsonb)
          || jsonb_build_object(chunk.task, (
               SELECT coalesce(jsonb_agg(id ORDER BY n), '[]'::jsonb) FROM (
                 SELECT id, n
                 FROM jsonb_array_elements(coalesce(counts->'failed_ids'->chunk.task, '[]'::jsonb) || chunk.ids)
                   WITH ORDINALITY AS kept(id, n)
                 ORDER BY n DESC LIMIT chunk.kept
               ) latest))
      )
    FROM (
      SELECT CAST(:task AS text) AS task, CAST(:done AS int) AS done, CAST(:failed AS int) AS failed,
             CAST(:failed_ids AS jsonb) AS ids, CAST(:kept AS int) AS kept
    ) AS chunk
    WHERE run_date = :on
    """
)


def record_chunk(session: Session, on: date, task: str, *, done: int, failed_ids: list[int]) -> None:
    """Add a chunk's outcome to its run, per task (what the console and `/metrics` show as progress)."""
    session.execute(
        _RECORD_CHUNK,
        {
            "on": on,
            "task": task,
            "done": done,
            "failed": len(failed_ids),
            "failed_ids": json.dumps(failed_ids),
            "kept": FAILED_IDS_KEPT,
        },
    )


# --- a run -------------------------------------------------------------------------------------------


class FutureDateRefused(ValueError):
    """A business date after today, outside development and test."""


def claim_run(session: Session, on: date) -> bool:
    """Claim a business date's run, once across every scheduler: True for the claimer."""
    claimed = session.scalar(
        insert(BillingRun)
        .values(run_date=on)
        .on_conflict_do_nothing(index_elements=["run_date"])
        .returning(BillingRun.id)
    )
    return claimed is not None


def refuse_future_date(on: date, now: datetime, config: BillingConfig) -> None:
    """Running a date after today is a simulation: refused outside development and test."""
    if on > local_today(now, config.timezone) and not config.allow_future_dates:
        raise FutureDateRefused(f"{on.isoformat()} is after today: refused outside development and test")


def scan_run(session: Session, on: date, now: datetime, config: BillingConfig) -> dict[str, int]:
    """Scan what is due on `on` and fan it out in chunks (sent after commit); close the run when
    nothing is due, or after MAX_SCANS. Returns the due counts per task."""
    refuse_future_date(on, now, config)
    run = session.scalar(select(BillingRun).where(BillingRun.run_date == on).with_for_update())
    if run is None:
        claim_run(session, on)
        run = session.scalar(select(BillingRun).where(BillingRun.run_date == on).with_for_update())
        assert run is not None
    due = scan(session, on, config)
    counts = {name: len(ids) for name, ids in due.items()}
    total = sum(counts.values())
    run.scans += 1
    run.last_scan_at = now
    run.counts = {**run.counts, "last_scan": counts}
    if run.scans == 1:
        run.due_count = total
    if total == 0 or run.scans >= MAX_SCANS:
        run.status = RunStatus.DONE
        run.finished_at = now
        if total:
            logger.warning("run %s closed after %s scans with %s rows still due: %s", on, run.scans, total, counts)
    else:
        run.status = RunStatus.RUNNING
        for name, ids in due.items():
            for start in range(0, len(ids), CHUNK_SIZE):
                send_after_commit(
                    session, process_chunk, name, on.isoformat(), ids[start : start + CHUNK_SIZE], now.isoformat()
                )
    session.commit()
    return counts


@dramatiq.actor(queue_name="billing", **STANDARD)
def run_billing_day(run_date: str, now: str) -> None:
    scan_run(current_session(), date.fromisoformat(run_date), datetime.fromisoformat(now), runtime().config)


def run_day(
    session: Session, gateway: Gateway, on: date, now: datetime, config: BillingConfig, *, max_passes: int = 5
) -> dict[str, int]:
    """A whole day's run in this thread, without the broker (simulations, replays, tests): the same
    scans and handlers as the fanned-out run, repeated until nothing is due."""
    claim_run(session, on)
    session.commit()
    totals: dict[str, int] = {name: 0 for name in TASKS}
    for _ in range(max_passes):
        due = scan(session, on, config)
        session.commit()
        if not any(due.values()):
            break
        for name, ids in due.items():
            if ids:
                result = process_ids(session, name, ids, on=on, now=now, gateway=gateway, config=config)
                totals[name] += result.done
    session.execute(
        update(BillingRun)
        .where(BillingRun.run_date == on)
        .values(status=RunStatus.DONE, finished_at=now, done_count=sum(totals.values()), counts={"done": totals})
    )
    session.commit()
    return totals


# --- an operator's re-run ----------------------------------------------------------------------------


def reopen_run(session: Session, on: date) -> None:
    """Before an operator re-runs `on` (`renova run-day`): mark its run running and unfinished again,
    counts kept, so that the scan that follows closes it anew when nothing is due. A date never run
    has no row yet (the scan claims it). Does not commit."""
    session.execute(
        update(BillingRun).where(BillingRun.run_date == on).values(status=RunStatus.RUNNING, finished_at=None)
    )
