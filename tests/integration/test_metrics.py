"""`GET /metrics` on `renova web`, read back with Prometheus' own parser: who may scrape, the queues as
Redis holds them (real messages, no worker consuming), a billing run driven by real workers, failed
and unknown charges, a Redis or PostgreSQL that does not answer; and Dramatiq's message metrics served
by a real `renova worker` on WORKER_METRICS_PORT."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time as clock
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import dramatiq
import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from sqlalchemy import text

from jobs import clock as business_clock
from jobs.context import runtime
from jobs.health import ping
from tests.integration.conftest import ROOT, wait_until
from tests.integration.factories import noon, seed_plans
from tests.integration.gateway_fixtures import free_port
from tests.integration.test_daily_run import card_subscription, drive
from workers.db import resolved_urls
from workers.metrics import METRIC_NAMES, MetricsSource, metrics_source
from workers.settings import get_settings

TOKEN = "metrics-token-for-tests"
DAY = date(2027, 3, 15)
ZONE = ZoneInfo("America/Sao_Paulo")


@dataclass
class Scraper:
    client: TestClient
    app: FastAPI

    def get(self, token: str | None = TOKEN) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return self.client.get("/metrics", headers=headers)

    def scrape(self) -> dict[str, list[Sample]]:
        response = self.get()
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        return {family.name: family.samples for family in text_string_to_metric_families(response.text)}


@pytest.fixture
def scraper(monkeypatch: pytest.MonkeyPatch, clean_database: None) -> Iterator[Scraper]:
    monkeypatch.setenv("METRICS_TOKEN", TOKEN)
    get_settings.cache_clear()
    from workers.api import create_app

    try:
        app = create_app()
        with TestClient(app) as client:
            yield Scraper(client, app)
    finally:
        monkeypatch.delenv("METRICS_TOKEN")
        get_settings.cache_clear()


def value(families: dict[str, list[Sample]], name: str, **labels: str) -> float:
    """The one sample of `name` with exactly these labels."""
    found = [sample.value for sample in families[name] if sample.labels == labels]
    assert len(found) == 1, f"{name}{labels}: {families[name]}"
    return found[0]


def set_business_clock(instant: datetime) -> None:
    from workers.db import get_session_factory

    with get_session_factory()() as session:
        business_clock.set_clock(session, instant, runtime().config)
        session.commit()


def test_the_metrics_settings(monkeypatch):
    from workers.settings import SettingsError, load_settings

    monkeypatch.setenv("METRICS_TOKEN", "")
    monkeypatch.setenv("WORKER_METRICS_PORT", "")
    settings = load_settings()
    assert (settings.metrics_token, settings.worker_metrics_port) == (None, None)
    monkeypatch.setenv("METRICS_TOKEN", "s3cret")
    monkeypatch.setenv("WORKER_METRICS_PORT", "9191")
    settings = load_settings()
    assert settings.metrics_token is not None and settings.metrics_token.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(settings)
    assert settings.worker_metrics_port == 9191
    monkeypatch.setenv("WORKER_METRICS_PORT", "70000")
    with pytest.raises(SettingsError, match="WORKER_METRICS_PORT"):
        load_settings()


# --- who may scrape ----------------------------------------------------------------------------------


def test_the_token_is_required_when_set(scraper):
    for token in (None, "wrong-token"):
        response = scraper.get(token)
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
        error = response.json()["error"]
        assert error["code"] == "unauthorized"
        assert "METRICS_TOKEN" in error["message"]
    assert scraper.client.get("/metrics", headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
    assert scraper.get().status_code == 200


def test_without_a_token_open_in_test_refused_in_production(scraper):
    settings = get_settings()
    open_in_test = settings.model_copy(update={"metrics_token": None})
    scraper.app.dependency_overrides[get_settings] = lambda: open_in_test
    assert scraper.get(None).status_code == 200

    production = settings.model_copy(update={"metrics_token": None, "renova_env": "production"})
    scraper.app.dependency_overrides[get_settings] = lambda: production
    response = scraper.get(None)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    assert "METRICS_TOKEN" in response.json()["error"]["message"]

    # In production with a token: served, and only with it.
    guarded = settings.model_copy(update={"renova_env": "production"})
    scraper.app.dependency_overrides[get_settings] = lambda: guarded
    assert scraper.get(None).status_code == 401
    assert scraper.get().status_code == 200


# --- what a scrape holds --------------------------------------------------------------------------


def test_a_scrape_returns_exactly_the_declared_metrics(scraper, broker):
    response = scraper.get()
    assert response.status_code == 200
    families = list(text_string_to_metric_families(response.text))
    assert [family.name for family in families] == list(METRIC_NAMES)
    for family in families:
        assert family.type == "gauge"
        assert family.documentation.strip(), f"{family.name} has no HELP"
    by_name = {family.name: family.samples for family in families}
    assert value(by_name, "renova_up", component="postgres") == 1
    assert value(by_name, "renova_up", component="redis") == 1
    assert 0 <= value(by_name, "renova_metrics_scrape_duration_seconds") < 5


def test_queue_depths_and_the_oldest_ready_message(scraper, broker):
    families = scraper.scrape()
    for queue in ("billing", "changes", "payments", "notifications"):
        assert value(families, "renova_queue_ready_messages", queue=queue) == 0
        assert value(families, "renova_queue_oldest_ready_age_seconds", queue=queue) == 0
    assert value(families, "renova_workers_alive") == 0
    assert families["renova_worker_heartbeat_age_seconds"] == []

    # Two change requests waiting (the first sent two minutes ago), a delayed ping, no worker consuming.
    sent_ms = int(clock.time() * 1000)
    for age_ms in (120_000, 0):
        broker.enqueue(
            dramatiq.Message(
                queue_name="changes",
                actor_name="submit_change_request",
                args=({"organization_id": 1, "idempotency_key": str(uuid.uuid4())},),
                kwargs={},
                options={},
                message_timestamp=sent_ms - age_ms,
            )
        )
    ping.send_with_options(args=("later",), delay=3_600_000)
    families = scraper.scrape()
    assert value(families, "renova_queue_ready_messages", queue="changes") == 2
    assert 120 <= value(families, "renova_queue_oldest_ready_age_seconds", queue="changes") < 180
    assert value(families, "renova_queue_delayed_messages", queue="billing") == 1
    assert value(families, "renova_queue_ready_messages", queue="billing") == 0

    # A message taken by a consumer and rejected lands in the dead-letter queue, as a worker would do it;
    # the consumer's fetch is also a heartbeat.
    ping.send("doomed")
    consumer = broker.consume("billing", prefetch=1, timeout=1000)
    message = next(message for message in consumer if message is not None)
    consumer.nack(message)
    consumer.close()
    families = scraper.scrape()
    assert value(families, "renova_queue_dead_messages", queue="billing") == 1
    assert value(families, "renova_dead_letter_messages") == 1
    assert value(families, "renova_workers_alive") == 1
    assert 0 <= value(families, "renova_worker_heartbeat_age_seconds") < 60
    assert value(families, "renova_queue_ready_messages", queue="changes") == 2


def test_a_billing_run_after_the_workers_did_it(scraper, session, worker, billing_gateway, sandbox_gateway):
    seed_plans(session)
    card_subscription(session, 1, DAY)
    session.commit()
    set_business_clock(noon(DAY))

    drive(noon(DAY), DAY)

    families = scraper.scrape()
    assert value(families, "renova_billing_run_info", run_date=DAY.isoformat(), status="done") == 1
    assert value(families, "renova_billing_run_running") == 0
    assert value(families, "renova_billing_run_due_items") == 1
    assert value(families, "renova_billing_run_done_items") >= 1
    assert value(families, "renova_billing_run_failed_items") == 0
    assert value(families, "renova_billing_run_task_due_items", task="renew") == 0
    assert value(families, "renova_billing_run_task_done_items", task="renew") == 1  # the workers' chunk
    assert value(families, "renova_billing_run_age_seconds") >= 0
    assert value(families, "renova_billing_last_run_finished_age_seconds") == 0  # the test clock stands still
    assert value(families, "renova_billing_today_run_done") == 1
    assert value(families, "renova_billing_today_run_late_seconds") == 0
    assert value(families, "renova_charges", status="succeeded") == 1
    assert value(families, "renova_charges_resolved_today", status="succeeded") == 1

    # The next day at 10:00 local, nothing run yet: today's run is four hours late (due at 06:00).
    set_business_clock(datetime.combine(DAY + timedelta(days=1), time(10), ZONE).astimezone(UTC))
    families = scraper.scrape()
    assert value(families, "renova_billing_today_run_done") == 0
    assert value(families, "renova_billing_today_run_late_seconds") == 4 * 3600
    assert value(families, "renova_charges_resolved_today", status="succeeded") == 0
    assert value(families, "renova_charges", status="succeeded") == 1


def test_failed_and_unknown_charges(scraper, session, billing_gateway, sandbox_gateway):
    from jobs.billing_day import run_day

    seed_plans(session)
    card_subscription(session, 1, DAY, token="tok_insufficient_funds")
    card_subscription(session, 2, DAY, token="tok_timeout")
    session.commit()
    set_business_clock(noon(DAY))
    with sandbox_gateway.configured(stall_ms=3000):
        run_day(session, billing_gateway, DAY, noon(DAY), runtime().config)

    families = scraper.scrape()
    assert value(families, "renova_charges", status="failed") == 1
    assert value(families, "renova_charges", status="unknown") == 1
    assert value(families, "renova_charges_resolved_today", status="failed") == 1
    assert {sample.labels["status"] for sample in families["renova_charges_resolved_today"]} == {"succeeded", "failed"}
    assert value(families, "renova_charges_unreconciled", status="unknown") == 1
    assert value(families, "renova_charges_unreconciled", status="pending") == 0
    assert 0 <= value(families, "renova_charges_unreconciled_oldest_age_seconds") < 120

    # A pending attempt counts once it is older than the reconcile window (a worker killed mid-charge).
    session.execute(
        text(
            "UPDATE charges SET status = 'pending', created_at = now() - interval '10 minutes' WHERE status = 'unknown'"
        )
    )
    session.commit()
    families = scraper.scrape()
    assert value(families, "renova_charges_unreconciled", status="unknown") == 0
    assert value(families, "renova_charges_unreconciled", status="pending") == 1
    assert 600 <= value(families, "renova_charges_unreconciled_oldest_age_seconds") < 700


def test_notices_change_requests_and_refunds_waiting(scraper, session):
    from models.schema import ChangeRequest, Notification, Refund
    from tests.integration.factories import make_organization, make_subscription

    organization = make_organization(session, 1)
    subscription = make_subscription(session, organization, cycle="monthly", method="card", anchor=DAY)
    session.add_all(
        [
            Notification(organization_id=1, kind="charge_failed", dedupe_key="a", status="pending"),
            Notification(organization_id=1, kind="charge_failed", dedupe_key="b", status="failed"),
            Notification(organization_id=1, kind="charge_failed", dedupe_key="c", status="sent"),
            ChangeRequest(
                organization_id=1,
                idempotency_key="k",
                kind="cancel",
                payload={},
                payload_hash="h",
                created_at=noon(DAY) - timedelta(minutes=5),
            ),
            Refund(subscription_id=subscription.id, organization_id=1, method="payout", amount_cents=100),
        ]
    )
    session.commit()
    set_business_clock(noon(DAY))

    families = scraper.scrape()
    assert value(families, "renova_notifications", status="pending") == 1
    assert value(families, "renova_notifications", status="failed") == 1
    assert 0 <= value(families, "renova_notifications_pending_oldest_age_seconds") < 60
    assert value(families, "renova_change_requests_pending") == 1
    assert value(families, "renova_change_requests_pending_oldest_age_seconds") == 300
    assert value(families, "renova_refunds_open", method="payout", status="pending") == 1
    assert value(families, "renova_refunds_open", method="card", status="pending") == 0


def test_work_parked_for_an_operator_is_counted_by_kind(scraper, session):
    from models.schema import ChangeRequest
    from tests.integration.factories import make_organization

    make_organization(session, 1)
    session.add_all(
        [
            ChangeRequest(
                organization_id=1,
                idempotency_key=f"k{n}",
                kind="cancel",
                payload={},
                payload_hash="h",
                attempts=5,
                needs_attention_at=noon(DAY) if n < 2 else None,
            )
            for n in range(3)
        ]
    )
    session.commit()

    families = scraper.scrape()
    assert value(families, "renova_needs_attention", kind="change_request") == 2
    assert value(families, "renova_needs_attention", kind="notification") == 0
    assert value(families, "renova_needs_attention", kind="gateway_event") == 0


# --- a component down ---------------------------------------------------------------------------------


def test_redis_down_still_answers_with_redis_up_0(scraper):
    database_url, _ = resolved_urls()
    closed = f"redis://127.0.0.1:{free_port()}/0"
    scraper.app.dependency_overrides[metrics_source] = lambda: MetricsSource(database_url, closed)
    families = scraper.scrape()
    assert value(families, "renova_up", component="redis") == 0
    assert value(families, "renova_up", component="postgres") == 1
    assert families["renova_queue_ready_messages"] == []
    assert families["renova_workers_alive"] == []
    assert value(families, "renova_change_requests_pending") == 0


def test_postgres_down_still_answers_with_postgres_up_0(scraper, broker):
    _, redis_url = resolved_urls()
    closed = f"postgresql+psycopg://renova@127.0.0.1:{free_port()}/renova"
    scraper.app.dependency_overrides[metrics_source] = lambda: MetricsSource(closed, redis_url)
    started = clock.monotonic()
    families = scraper.scrape()
    assert clock.monotonic() - started < 5
    assert value(families, "renova_up", component="postgres") == 0
    assert value(families, "renova_up", component="redis") == 1
    assert families["renova_charges"] == []
    assert value(families, "renova_queue_ready_messages", queue="changes") == 0


# --- Dramatiq's own metrics from the workers -----------------------------------------------------


def test_worker_metrics_are_off_by_default(broker):
    from workers.worker_metrics import WorkerMetrics

    assert get_settings().worker_metrics_port is None
    assert not any(isinstance(middleware, WorkerMetrics) for middleware in broker.middleware)


def test_a_worker_serves_dramatiq_metrics_on_worker_metrics_port(broker, clean_database):
    from workers.worker_metrics import FOLDERS

    port = free_port()
    environment = {
        **os.environ,
        "WORKER_METRICS_PORT": str(port),
        "dramatiq_prom_host": "127.0.0.1",
        "dramatiq_worker_timeout": "100",
    }
    # `renova worker` imports the broker itself, then execs `dramatiq workers.broker` (same pid).
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "renova"), "worker", "--processes", "1", "--threads", "1"],
        cwd=ROOT,
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        ping.send("counted")

        def pings_counted() -> float:
            try:
                body = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
            except httpx.HTTPError:
                return 0.0
            return sum(
                sample.value
                for family in text_string_to_metric_families(body)
                for sample in family.samples
                if sample.name == "dramatiq_messages_total" and sample.labels.get("actor_name") == "ping"
            )

        assert wait_until(pings_counted, timeout=45, interval=0.5) == 1
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(FOLDERS / f"{port}-{process.pid}", ignore_errors=True)


def test_the_scrape_reads_by_index_but_for_two_counts(session):
    """Cheap at any size: every statement but the charges' count by status and the failed notices' count
    (no index serves them; the statement timeout bounds them) reads through an index."""
    from sqlalchemy import event

    from tests.integration.factories import make_organization, make_subscription
    from workers.metrics import RenovaCollector, _engine

    organization = make_organization(session, 1)
    subscription = make_subscription(session, organization, cycle="monthly", method="card", anchor=DAY, trail="gateway")
    invoice_id = session.scalar(text("SELECT id FROM invoices"))
    rows = {
        "charges": "INSERT INTO charges (invoice_id, attempt, idempotency_key, amount_cents, card_token, status, "
        f"resolved_at) SELECT {invoice_id}, g + 1, 'k' || g, 4990, 'tok_ok', 'succeeded', now() "
        "FROM generate_series(1, 20000) g",
        "notifications": "INSERT INTO notifications (organization_id, kind, dedupe_key, status) "
        "SELECT 1, 'charge_succeeded', 'n' || g, 'sent' FROM generate_series(1, 20000) g",
        "change_requests": "INSERT INTO change_requests (organization_id, idempotency_key, kind, payload, payload_hash, "
        "status) SELECT 1, 'c' || g, 'cancel', '{}', 'h', 'applied' FROM generate_series(1, 20000) g",
        "refunds": "INSERT INTO refunds (subscription_id, organization_id, method, amount_cents, status) "
        f"SELECT {subscription.id}, 1, 'payout', 1, 'paid' FROM generate_series(1, 20000) g",
    }
    for statement in rows.values():
        session.execute(text(statement))
    session.commit()
    session.execute(text("ANALYZE"))
    session.commit()

    database_url, redis_url = resolved_urls()
    engine = _engine(database_url)
    statements: list[tuple[str, object]] = []

    def capture(connection, cursor, statement, parameters, context, executemany) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            statements.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", capture)
    try:
        families = list(RenovaCollector(MetricsSource(database_url, redis_url), get_settings()).collect())
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    assert {family.name for family in families} == set(METRIC_NAMES)
    assert len(statements) >= 8  # every group of the scrape was read

    scans: dict[str, int] = dict.fromkeys(rows, 0)
    with engine.connect() as connection:
        for statement, parameters in statements:
            plan = connection.exec_driver_sql(f"EXPLAIN {statement}", parameters).scalars().all()
            for table in rows:
                scans[table] += any(f"Seq Scan on {table}" in line for line in plan)
    assert scans == {"charges": 1, "notifications": 1, "change_requests": 0, "refunds": 0}


def test_payments_taken_back_at_the_psp_are_counted_by_kind(scraper, session):
    from jobs import audit
    from jobs.reversals import ACTION, ACTOR

    for kind in ("chargeback", "chargeback", "refund"):
        audit.record(session, actor=ACTOR, action=ACTION, target_type="charge", target_id="1", details={"kind": kind})
    audit.record(session, actor="ana", action="charge.retry", target_type="charge", target_id="1")
    session.commit()

    families = scraper.scrape()
    assert value(families, "renova_charge_reversals_reported", kind="chargeback") == 2
    assert value(families, "renova_charge_reversals_reported", kind="refund") == 1
