"""`GET /metrics` for operations: queues, workers, the daily run, charges, notices, change requests and
refunds, in the Prometheus text format (README "Metrics and alerts").

Every value is read when Prometheus scrapes (a collector, no gauges kept in the process), so any number
of web processes answer the same numbers. A scrape is cheap and bounded: one Redis pipeline, a
handful of PostgreSQL statements on a connection of its own with a connect and a statement timeout.
A component that cannot be read leaves its metrics out and sets `renova_up{component}` to 0; the
scrape itself still answers 200, so the other numbers and that 0 reach Prometheus.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from datetime import time as clock_time
from functools import lru_cache
from typing import Any

import redis
from prometheus_client import generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import CollectorRegistry
from sqlalchemy import Engine, create_engine, func, or_, select, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from models.schema import BillingRun, ChangeRequest, Charge, Notification, Refund
from models.states import (
    UNRESOLVED_CHARGE,
    ChangeRequestStatus,
    ChargeStatus,
    NotificationStatus,
    RefundMethod,
    RefundStatus,
    RunStatus,
)
from workers.queues import NAMESPACE, QUEUES
from workers.settings import Settings

logger = logging.getLogger(__name__)

# Dramatiq's Redis broker counts a worker dead after 60 s without a heartbeat (its
# DEFAULT_HEARTBEAT_TIMEOUT) and gives its messages to others: "alive" means the same here.
HEARTBEAT_TIMEOUT_MS = 60_000
HEARTBEATS_KEY = f"{NAMESPACE}:__heartbeats__"
# Bounds of one scrape (Prometheus' default scrape timeout is 10 s).
REDIS_TIMEOUT_SECONDS = 1.0
DATABASE_CONNECT_TIMEOUT_SECONDS = 3
STATEMENT_TIMEOUT_MS = 2_000
# What `generate_latest` writes (names and labels here are plain ASCII), in the media type every
# Prometheus version reads; newer clients label the same text "version=1.0.0".
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True)
class Metric:
    name: str
    help: str
    labels: tuple[str, ...] = ()


# Every metric /metrics exports, in order. Alert rules may only name these (tests/unit/test_alert_rules.py),
# and a scrape returns exactly these families (tests/integration/test_metrics.py).
METRICS: tuple[Metric, ...] = (
    Metric("renova_up", "1 when this scrape could read the component (postgres, redis), else 0.", ("component",)),
    Metric("renova_metrics_scrape_duration_seconds", "Time this scrape took to read Redis and PostgreSQL."),
    # Queues, from Dramatiq's Redis keys (its own metrics expose no depth).
    Metric("renova_queue_ready_messages", "Messages waiting in the queue for a worker.", ("queue",)),
    Metric(
        "renova_queue_delayed_messages",
        "Delayed messages (retries waiting for their backoff), including those a worker holds until due.",
        ("queue",),
    ),
    Metric("renova_queue_dead_messages", "Messages in the queue's dead-letter queue (kept a week).", ("queue",)),
    Metric(
        "renova_queue_oldest_ready_age_seconds",
        "How long the oldest ready message has waited: since it was sent, or since its last failure for a "
        "retry; 0 when the queue is empty.",
        ("queue",),
    ),
    Metric("renova_dead_letter_messages", "Dead letters in all queues."),
    Metric("renova_workers_alive", "Worker processes whose last heartbeat is less than 60 s old."),
    Metric(
        "renova_worker_heartbeat_age_seconds",
        "Seconds since the most recent heartbeat of any worker process (absent when none was ever seen).",
    ),
    # The daily billing run: the latest run (by business date), and the run that is due now.
    Metric(
        "renova_billing_run_info",
        "The latest billing run: its business date and status (always 1).",
        ("run_date", "status"),
    ),
    Metric("renova_billing_run_running", "1 while the latest billing run is running, 0 once it is done."),
    Metric("renova_billing_run_age_seconds", "Seconds since the latest billing run started."),
    Metric(
        "renova_billing_run_due_items", "Items (subscriptions, charges, boletos) due at the latest run's first scan."
    ),
    Metric("renova_billing_run_done_items", "Items the latest run has handled."),
    Metric(
        "renova_billing_run_failed_items", "Items of the latest run that failed in their chunk (each retried alone)."
    ),
    Metric(
        "renova_billing_run_task_due_items",
        "Items still due per task at the latest run's last scan (0 once done, unless closed after its last scan).",
        ("task",),
    ),
    Metric(
        "renova_billing_run_task_done_items",
        "Items handled per task in the current billing run.",
        ("task",),
    ),
    Metric("renova_billing_last_run_finished_age_seconds", "Seconds since a billing run last finished."),
    Metric(
        "renova_billing_today_run_done",
        "1 when the run of today's business date is done (before BILLING_RUN_AT: yesterday's, the latest due).",
    ),
    Metric(
        "renova_billing_today_run_late_seconds",
        "Seconds since today's run became due (BILLING_RUN_AT, local) while it is not done; 0 once done.",
    ),
    # Charges.
    Metric("renova_charges", "Card charge attempts by status.", ("status",)),
    Metric(
        "renova_charges_resolved_today",
        "Card charge attempts resolved today (business date) by outcome: succeeded or failed.",
        ("status",),
    ),
    Metric(
        "renova_charges_unreconciled",
        "Charges whose outcome is unknown, and pending ones older than the reconcile window (2 min).",
        ("status",),
    ),
    Metric(
        "renova_charges_unreconciled_oldest_age_seconds",
        "Age of the oldest unreconciled charge (since it was recorded); 0 when none.",
    ),
    # Notices, change requests, refunds.
    Metric("renova_notifications", "Notices not sent: pending (still to send) and failed (given up).", ("status",)),
    Metric("renova_notifications_pending_oldest_age_seconds", "Age of the oldest pending notice; 0 when none."),
    Metric("renova_change_requests_pending", "Change requests not decided yet."),
    Metric(
        "renova_change_requests_pending_oldest_age_seconds", "Age of the oldest pending change request; 0 when none."
    ),
    Metric(
        "renova_refunds_open",
        "Refunds not settled: pending (a card refund not confirmed yet, a payout waiting for on-call) or unknown.",
        ("method", "status"),
    ),
    Metric(
        "renova_needs_attention",
        "Rows that failed too often and are no longer retried until an operator acts (renova attention).",
        ("kind",),
    ),
    Metric(
        "renova_charge_reversals_reported",
        "Card payments the PSP reported taken back (chargeback, or a refund made outside Renova), ever; only grows.",
        ("kind",),
    ),
)
METRIC_NAMES: tuple[str, ...] = tuple(metric.name for metric in METRICS)
_BY_NAME = {metric.name: metric for metric in METRICS}


# --- access --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    status: int
    code: str
    message: str


def refusal(settings: Settings, authorization: str | None) -> Refusal | None:
    """Who may scrape: with METRICS_TOKEN, whoever presents it as a Bearer token. Without one, anyone in
    development and test; nobody in production, where the numbers (volumes, failures) are not public."""
    token = settings.metrics_token
    if token is None:
        if settings.renova_env == "production":
            return Refusal(404, "not_found", "metrics are off: set METRICS_TOKEN to serve them in production")
        return None
    scheme, _, presented = (authorization or "").partition(" ")
    expected = token.get_secret_value().encode()
    if scheme.lower() != "bearer" or not hmac.compare_digest(presented.strip().encode(), expected):
        return Refusal(401, "unauthorized", "missing or invalid metrics token (Authorization: Bearer <METRICS_TOKEN>)")
    return None


# --- where the numbers come from ---------------------------------------------------------------------


@dataclass(frozen=True)
class MetricsSource:
    """The servers a scrape reads (a FastAPI dependency, so tests can point it elsewhere)."""

    database_url: str
    redis_url: str


def metrics_source() -> MetricsSource:
    from workers.db import resolved_urls

    database_url, redis_url = resolved_urls()
    return MetricsSource(database_url, redis_url)


@lru_cache(maxsize=4)
def _engine(database_url: str) -> Engine:
    """A small pool of its own: a scrape never waits behind API requests, and a PostgreSQL that does not
    answer costs a connect timeout, not the operating system's (minutes)."""
    return create_engine(
        database_url,
        pool_size=1,
        max_overflow=1,
        pool_timeout=DATABASE_CONNECT_TIMEOUT_SECONDS,
        pool_pre_ping=True,
        connect_args={"connect_timeout": DATABASE_CONNECT_TIMEOUT_SECONDS, "application_name": "renova-metrics"},
    )


@lru_cache(maxsize=4)
def _redis(redis_url: str) -> redis.Redis:
    # retry=None: a scrape while Redis is down says so within the timeout (redis-py would retry for seconds).
    return redis.Redis.from_url(
        redis_url, socket_timeout=REDIS_TIMEOUT_SECONDS, socket_connect_timeout=REDIS_TIMEOUT_SECONDS, retry=None
    )


@dataclass
class Readings:
    """The samples of one scrape, by metric name; a name not declared in METRICS is a KeyError."""

    samples: dict[str, list[tuple[tuple[str, ...], float]]] = field(
        default_factory=lambda: {name: [] for name in METRIC_NAMES}
    )

    def set(self, name: str, value: float, *labels: str) -> None:
        if len(labels) != len(_BY_NAME[name].labels):
            raise ValueError(f"{name} takes labels {_BY_NAME[name].labels}, got {labels}")
        self.samples[name].append((labels, float(value)))

    def value(self, name: str, *labels: str) -> float | None:
        """The sample of `name` with these labels, or None when it was not read."""
        return next((value for found, value in self.samples[name] if found == labels), None)

    def by_label(self, name: str) -> dict[str, float]:
        """A one-label metric's samples by their label's value."""
        return {labels[0]: value for labels, value in self.samples[name]}

    def families(self) -> Iterator[GaugeMetricFamily]:
        for metric in METRICS:
            family = GaugeMetricFamily(metric.name, metric.help, labels=metric.labels)
            for labels, value in self.samples[metric.name]:
                family.add_metric(list(labels), value)
            yield family


def _age_seconds(now: datetime, then: datetime | None) -> float:
    """Never negative: a timestamp a little ahead of this host's clock is "just now"."""
    return 0.0 if then is None else max(0.0, (now - then).total_seconds())


# --- Redis: queues and workers ---------------------------------------------------------------------

# The head of a queue's list is the next message a worker takes (Dramatiq pushes right, pops left); its
# body is read in the same script so a worker taking it in between cannot make the pair disagree.
_HEAD_BODY = """
local head = redis.call('lindex', KEYS[1], 0)
if not head then return false end
return redis.call('hget', KEYS[2], head)
"""


def _ready_since_ms(body: bytes | None) -> int | None:
    """When the message became ready: `message_timestamp`, or for a retry the later `requeue_timestamp`
    (Dramatiq's Retries sets it at the failure; the backoff that follows is not waiting for a worker)."""
    if not body:
        return None
    try:
        message = json.loads(body)
        options = message.get("options") or {}
        stamps = [message.get("message_timestamp"), options.get("requeue_timestamp")]
        return max(int(stamp) for stamp in stamps if isinstance(stamp, int | float))
    except (ValueError, TypeError, AttributeError):
        return None  # not Dramatiq's JSON: a worker will dead-letter it; its depth still shows


def read_redis(client: redis.Redis, readings: Readings, now_ms: int, queues: tuple[str, ...] = QUEUES) -> None:
    """One pipeline: per queue LLEN, HLEN of the delayed bodies, ZCARD of the dead letters and the head's
    body; the heartbeats' ZCOUNT and newest score."""
    head_body = client.register_script(_HEAD_BODY)
    with client.pipeline(transaction=False) as pipe:
        for queue in queues:
            key = f"{NAMESPACE}:{queue}"
            pipe.llen(key)
            pipe.hlen(f"{key}.DQ.msgs")
            pipe.zcard(f"{key}.XQ")
            head_body(keys=[key, f"{key}.msgs"], client=pipe)
        pipe.zcount(HEARTBEATS_KEY, now_ms - HEARTBEAT_TIMEOUT_MS, "+inf")
        pipe.zrevrange(HEARTBEATS_KEY, 0, 0, withscores=True)
        replies = pipe.execute()
    dead_total = 0
    for index, queue in enumerate(queues):
        ready, delayed, dead, body = replies[4 * index : 4 * index + 4]
        readings.set("renova_queue_ready_messages", ready, queue)
        readings.set("renova_queue_delayed_messages", delayed, queue)
        readings.set("renova_queue_dead_messages", dead, queue)
        since = _ready_since_ms(body)
        readings.set("renova_queue_oldest_ready_age_seconds", max(0, now_ms - since) / 1000 if since else 0, queue)
        dead_total += dead
    readings.set("renova_dead_letter_messages", dead_total)
    alive, newest = replies[-2:]
    readings.set("renova_workers_alive", alive)
    if newest:
        readings.set("renova_worker_heartbeat_age_seconds", max(0.0, now_ms - newest[0][1]) / 1000)


# --- PostgreSQL: the run, charges, notices, change requests, refunds ---------------------------------


@dataclass(frozen=True)
class Clocks:
    """Two "now"s, because rows are stamped by two clocks. Columns the database fills (`created_at` of
    charges, notices and refunds, a run's `started_at`) follow the real clock; columns the flows fill
    with the business "now" (a run's `finished_at`, a charge's `resolved_at`, a change request's
    `created_at`) follow the test clock when one is set. In production both are the real clock."""

    real: datetime
    business: datetime


def read_database(session: Session, readings: Readings, settings: Settings, real_now: datetime) -> None:
    from jobs import clock
    from workers.broker import billing_config

    # SET LOCAL ends with the transaction: safe behind a transaction-pooling PgBouncer.
    session.execute(text(f"SET LOCAL statement_timeout = {STATEMENT_TIMEOUT_MS}"))
    clocks = Clocks(real=real_now, business=clock.now(session, billing_config(settings)))
    _billing_runs(session, readings, settings, clocks)
    _charges(session, readings, settings, clocks)
    _notifications(session, readings, clocks)
    _change_requests(session, readings, clocks)
    _refunds(session, readings)
    _needs_attention(session, readings)
    _reversals(session, readings)


def _billing_runs(session: Session, readings: Readings, settings: Settings, clocks: Clocks) -> None:
    from models.calendar import latest_due_run_date, local_run_instant

    latest = session.execute(select(BillingRun).order_by(BillingRun.run_date.desc()).limit(1)).scalar_one_or_none()
    if latest is not None:
        readings.set("renova_billing_run_info", 1, latest.run_date.isoformat(), latest.status)
        readings.set("renova_billing_run_running", latest.status != RunStatus.DONE)
        readings.set("renova_billing_run_age_seconds", _age_seconds(clocks.real, latest.started_at))
        readings.set("renova_billing_run_due_items", latest.due_count)
        readings.set("renova_billing_run_done_items", latest.done_count)
        readings.set("renova_billing_run_failed_items", latest.failed_count)
        counts: dict[str, Any] = latest.counts or {}
        for metric, key in (
            ("renova_billing_run_task_due_items", "last_scan"),
            ("renova_billing_run_task_done_items", "done"),
        ):
            for task, count in sorted((counts.get(key) or {}).items()):
                readings.set(metric, count, task)
    # billing_runs holds one row per business date: these stay small reads.
    finished = session.scalar(select(func.max(BillingRun.finished_at)))
    if finished is not None:
        readings.set("renova_billing_last_run_finished_age_seconds", _age_seconds(clocks.business, finished))
    due_date = latest_due_run_date(clocks.business, settings.billing_run_at, settings.billing_timezone)
    status = session.scalar(select(BillingRun.status).where(BillingRun.run_date == due_date))
    done = status == RunStatus.DONE
    readings.set("renova_billing_today_run_done", done)
    due_at = local_run_instant(due_date, settings.billing_run_at, settings.billing_timezone)
    readings.set("renova_billing_today_run_late_seconds", 0 if done else _age_seconds(clocks.business, due_at))


def _today_bounds(settings: Settings, now: datetime) -> tuple[datetime, datetime]:
    from models.calendar import local_run_instant, local_today

    today = local_today(now, settings.billing_timezone)
    midnight = clock_time(0, 0)
    return (
        local_run_instant(today, midnight, settings.billing_timezone),
        local_run_instant(today + timedelta(days=1), midnight, settings.billing_timezone),
    )


# What a resolved attempt became; an unknown one is not resolved (no `resolved_at`) until reconciled.
_OUTCOMES: tuple[ChargeStatus, ...] = (ChargeStatus.SUCCEEDED, ChargeStatus.FAILED)


def _charges(session: Session, readings: Readings, settings: Settings, clocks: Clocks) -> None:
    from jobs.payments import STALE_PENDING

    # The one statement that reads the whole table (no index serves a count by status): one pass
    # gives both the totals and today's outcomes, under the statement timeout.
    start, end = _today_bounds(settings, clocks.business)
    resolved_today = func.count().filter(Charge.resolved_at >= start, Charge.resolved_at < end)
    rows = session.execute(select(Charge.status, func.count(), resolved_today).group_by(Charge.status)).all()
    by_status = {status: (total, today) for status, total, today in rows}
    for status in ChargeStatus:
        total, today = by_status.get(status.value, (0, 0))
        readings.set("renova_charges", total, status.value)
        if status in _OUTCOMES:
            readings.set("renova_charges_resolved_today", today, status.value)
    # What the janitor reconciles (jobs.payments.unresolved_charge_ids), by the partial index
    # ix_charges_unresolved; `created_at` is the database's, so the real clock.
    stale = or_(Charge.status == ChargeStatus.UNKNOWN, Charge.created_at < clocks.real - STALE_PENDING)
    unresolved = session.execute(
        select(Charge.status, func.count(), func.min(Charge.created_at))
        .where(Charge.status.in_([status.value for status in UNRESOLVED_CHARGE]), stale)
        .group_by(Charge.status)
    ).all()
    found = {status: count for status, count, _ in unresolved}
    for status in UNRESOLVED_CHARGE:
        readings.set("renova_charges_unreconciled", found.get(status.value, 0), status.value)
    oldest = min((first for _, _, first in unresolved), default=None)
    readings.set("renova_charges_unreconciled_oldest_age_seconds", _age_seconds(clocks.real, oldest))


def _notifications(session: Session, readings: Readings, clocks: Clocks) -> None:
    # Pending by the partial index ix_notifications_unsent; failed ones are few but unindexed.
    pending, oldest = session.execute(
        select(func.count(), func.min(Notification.created_at)).where(Notification.status == NotificationStatus.PENDING)
    ).one()
    failed = session.scalar(select(func.count()).where(Notification.status == NotificationStatus.FAILED))
    readings.set("renova_notifications", pending, NotificationStatus.PENDING.value)
    readings.set("renova_notifications", failed or 0, NotificationStatus.FAILED.value)
    readings.set("renova_notifications_pending_oldest_age_seconds", _age_seconds(clocks.real, oldest))


def _change_requests(session: Session, readings: Readings, clocks: Clocks) -> None:
    pending, oldest = session.execute(
        select(func.count(), func.min(ChangeRequest.created_at)).where(
            ChangeRequest.status == ChangeRequestStatus.PENDING
        )
    ).one()
    readings.set("renova_change_requests_pending", pending)
    # Recorded with the business "now" (jobs.changes.recording).
    readings.set("renova_change_requests_pending_oldest_age_seconds", _age_seconds(clocks.business, oldest))


_OPEN_REFUNDS: tuple[RefundStatus, ...] = (RefundStatus.PENDING, RefundStatus.UNKNOWN)


def _refunds(session: Session, readings: Readings) -> None:
    rows = session.execute(
        select(Refund.method, Refund.status, func.count())
        .where(Refund.status.in_([status.value for status in _OPEN_REFUNDS]))
        .group_by(Refund.method, Refund.status)
    ).all()
    found = {(method, status): count for method, status, count in rows}
    for method in RefundMethod:
        for status in _OPEN_REFUNDS:
            if method == RefundMethod.PAYOUT and status == RefundStatus.UNKNOWN:
                continue  # a payout is never sent to the gateway: its outcome is never unknown
            readings.set("renova_refunds_open", found.get((method.value, status.value), 0), method.value, status.value)


def _needs_attention(session: Session, readings: Readings) -> None:
    from jobs.work_attempts import count_needing_attention

    # Counted through the partial indexes on needs_attention_at.
    for kind, count in count_needing_attention(session).items():
        readings.set("renova_needs_attention", count, kind)


def _reversals(session: Session, readings: Readings) -> None:
    from jobs.reversals import count_reported

    for kind, count in count_reported(session).items():
        readings.set("renova_charge_reversals_reported", count, kind)


# --- the scrape --------------------------------------------------------------------------------------


class RenovaCollector:
    """Reads everything at `collect` time (prometheus_client's custom-collector protocol)."""

    def __init__(self, source: MetricsSource, settings: Settings) -> None:
        self.source = source
        self.settings = settings

    def describe(self) -> Iterable[GaugeMetricFamily]:
        # Lets the registry know the names without reading anything.
        return Readings().families()

    def collect(self) -> Iterable[GaugeMetricFamily]:
        return self.read().families()

    def read(self) -> Readings:
        """Every figure of one scrape (what `/metrics` exports and the console's overview shows)."""
        started = time.monotonic()
        readings = Readings()
        readings.set("renova_up", self._read_redis(readings), "redis")
        readings.set("renova_up", self._read_database(readings), "postgres")
        readings.set("renova_metrics_scrape_duration_seconds", time.monotonic() - started)
        return readings

    def _read_redis(self, readings: Readings) -> bool:
        partial = Readings()  # only a complete reading is kept
        try:
            read_redis(_redis(self.source.redis_url), partial, int(time.time() * 1000))
        except (redis.RedisError, OSError) as exc:
            logger.warning("metrics: Redis not readable: %s", type(exc).__name__)
            return False
        _merge(readings, partial)
        return True

    def _read_database(self, readings: Readings) -> bool:
        partial = Readings()
        try:
            with Session(_engine(self.source.database_url)) as session, session.begin():
                read_database(session, partial, self.settings, datetime.now(UTC))
        except (SQLAlchemyError, OSError) as exc:
            logger.warning("metrics: PostgreSQL not readable: %s", type(exc).__name__)
            return False
        _merge(readings, partial)
        return True


def _merge(into: Readings, partial: Readings) -> None:
    for name, samples in partial.samples.items():
        into.samples[name].extend(samples)


def scrape(source: MetricsSource, settings: Settings) -> tuple[bytes, str]:
    """The body and content type of one scrape (a registry per scrape: nothing outlives it)."""
    registry = CollectorRegistry()
    registry.register(RenovaCollector(source, settings))
    return generate_latest(registry), CONTENT_TYPE
