"""The Redis broker with Renova's middleware and actors. `dramatiq workers.broker` imports this in
every worker process; any other process that sends messages imports it too."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta
from functools import wraps
from typing import TypeVar

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import (
    AgeLimit,
    Callbacks,
    CurrentMessage,
    Middleware,
    Pipelines,
    Retries,
    ShutdownNotifications,
    TimeLimit,
)

import jobs
from gateways.base import Gateway
from jobs.boleto_pdf import Beneficiary
from jobs.context import BillingConfig, Mailer, Runtime, configure
from workers.db import get_session_factory, resolved_urls
from workers.mail import mailer_from_settings
from workers.middleware import DatabaseSession, DeadLetterErrors, RefuseUnsafeProduction, ScrubbedLogs
from workers.queues import QUEUES
from workers.settings import Settings, get_settings

T = TypeVar("T")

# Dramatiq's default is 20 retries over about a month; billing work is retried briefly and then
# parked in the dead-letter queue for a person to look at. Actors narrow this further.
DEFAULT_MAX_RETRIES = 5
DEFAULT_MIN_BACKOFF_MS = 1_000
DEFAULT_MAX_BACKOFF_MS = 300_000
TIME_LIMIT_MS = 10 * 60 * 1000


def billing_config(settings: Settings) -> BillingConfig:
    return BillingConfig(
        timezone=settings.billing_timezone,
        boleto_lead_days=settings.boleto_lead_days,
        boleto_due_days=settings.boleto_due_days,
        dunning_retry_days=settings.dunning_retry_days,
        boleto_grace_business_days=settings.boleto_grace_business_days,
        allow_future_dates=settings.allows_future_dates,
    )


def init_sentry(settings: Settings) -> None:
    """Before the broker is built: Sentry's Dramatiq integration patches `Broker.__init__`."""
    if settings.sentry_dsn is None:
        return
    import sentry_sdk
    from sentry_sdk.integrations.dramatiq import DramatiqIntegration

    from workers.observability import scrub_event

    sentry_sdk.init(
        dsn=settings.sentry_dsn.get_secret_value(),
        environment=settings.renova_env,
        integrations=[DramatiqIntegration()],
        before_send=scrub_event,
        send_default_pii=False,
        # A frame's local variables hold message arguments, payloads and SQL parameters.
        include_local_variables=False,
    )


def build_broker(
    redis_url: str, worker_metrics_port: int | None = None, settings: Settings | None = None
) -> RedisBroker:
    middleware: list[Middleware] = [
        RefuseUnsafeProduction(),
        ScrubbedLogs(),
        AgeLimit(),
        TimeLimit(time_limit=TIME_LIMIT_MS),
        ShutdownNotifications(),
        Callbacks(),
        Pipelines(),
        # "after" hooks run in reverse order: listed before Retries, it sees Retries' verdict.
        DeadLetterErrors(),
        Retries(
            max_retries=DEFAULT_MAX_RETRIES,
            min_backoff=DEFAULT_MIN_BACKOFF_MS,
            max_backoff=DEFAULT_MAX_BACKOFF_MS,
        ),
        CurrentMessage(),
        DatabaseSession(get_session_factory()),
    ]
    if worker_metrics_port is not None:
        # Dramatiq's message metrics, served by each `renova worker` (workers/worker_metrics.py).
        from workers.worker_metrics import WorkerMetrics

        middleware.append(WorkerMetrics(worker_metrics_port))
    settings = settings or get_settings()
    broker = RedisBroker(
        url=redis_url,
        middleware=middleware,
        heartbeat_timeout=settings.worker_heartbeat_timeout_ms,
        maintenance_chance=settings.redis_maintenance_chance,
    )
    for queue in QUEUES:
        broker.declare_queue(queue)
    return broker


def _once(build: Callable[[], T]) -> Callable[[], T]:
    """`build`'s result, built by the first caller only: a worker's threads all start at once, and
    `lru_cache` would let each of them build its own (a gateway is an SSL context, connection pools and
    an event loop: building one costs tens of milliseconds, and two of them would not share the bound
    on charges in flight)."""
    lock = threading.Lock()
    built: list[T] = []

    @wraps(build)
    def get() -> T:
        if not built:
            with lock:
                if not built:
                    built.append(build())
        return built[0]

    return get


@_once
def gateway_factory() -> Gateway:
    """One gateway client per process: its connection pools and batch loop (GATEWAY_MAX_IN_FLIGHT) are shared."""
    settings = get_settings()
    if settings.gateway == "pagarme":
        from gateways.pagarme import PagarmeGateway

        return PagarmeGateway.from_settings(settings)
    from gateways.http import HttpGateway

    return HttpGateway.from_settings(settings)


@_once
def mailer_factory() -> Mailer:
    """One mailer per process, built at its first notice (it keeps no connection: each delivery, or
    batch of notices, opens its own)."""
    return mailer_from_settings(get_settings())


def setup() -> RedisBroker:
    settings = get_settings()
    init_sentry(settings)
    _, redis_url = resolved_urls()
    broker = build_broker(redis_url, settings.worker_metrics_port, settings)
    dramatiq.set_broker(broker)
    configure(
        Runtime(
            get_session_factory(),
            gateway_factory,
            billing_config(settings),
            mailer_factory=mailer_factory,
            mail_from=settings.mail_from,
            event_retry_first=timedelta(seconds=settings.event_retry_first_seconds),
            beneficiary=Beneficiary(
                name=settings.beneficiary_name,
                document=settings.beneficiary_cnpj,
                address=settings.beneficiary_address,
                agency_code=settings.beneficiary_agency_code,
                wallet=settings.beneficiary_wallet,
            ),
        )
    )
    jobs.register_actors()
    return broker


broker = setup()
