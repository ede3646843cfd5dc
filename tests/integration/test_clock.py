"""The test clock (development and test only): `renova clock set|advance|reset|show` freezes "now" in
the database for every process — change requests (queue and API), the scheduler's tick, `run-day`,
`/healthz`, `renova doctor` — and production refuses it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

from sqlalchemy import select

from jobs import clock
from jobs.changes import submit_change_request
from jobs.context import BillingConfig
from models.calendar import add_cycle, local_today
from models.schema import AuditEvent, BillingRun, ChangeRequest, ClockSetting
from tests.integration.conftest import ROOT, wait_until
from tests.integration.test_api import change, client  # noqa: F401 - the `client` fixture
from tests.integration.test_changes import payload, request_by_key, setup_organization, subscription_for
from tests.integration.test_cli import renova
from workers.db import get_session_factory

SAO_PAULO = ZoneInfo("America/Sao_Paulo")
# Far from the real date, so that nothing here can pass by reading the wall clock.
FAR = date(2028, 3, 10)


def clock_row() -> datetime | None:
    with get_session_factory()() as fresh:
        return fresh.scalar(select(ClockSetting.now))


def at_local(day: date, hour: int, minute: int = 0) -> datetime:
    return datetime(day.year, day.month, day.day, hour, minute, tzinfo=SAO_PAULO).astimezone(UTC)


def set_clock_to(instant: datetime) -> None:
    with get_session_factory()() as own:
        clock.set_clock(own, instant, BillingConfig())
        own.commit()


# --- the commands ------------------------------------------------------------------------------


def test_set_advance_show_and_reset(session):
    shown = renova("clock", "show")
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "clock: real" in shown.stdout

    # A date alone: that business date, one minute after the run hour (06:00 São Paulo).
    result = renova("clock", "set", "2027-11-22", "--actor", "ana")
    assert result.returncode == 0, result.stdout + result.stderr
    assert clock_row() == at_local(date(2027, 11, 22), 6, 1)
    shown = renova("clock", "show")
    assert "clock: test" in shown.stdout
    assert "2027-11-22 06:01:00 America/Sao_Paulo" in shown.stdout
    assert "business date 2027-11-22" in shown.stdout

    assert renova("clock", "set", "2027-11-22T09:30").returncode == 0
    assert clock_row() == at_local(date(2027, 11, 22), 9, 30)

    for step, expected in (("1d", timedelta(days=1)), ("12h", timedelta(hours=12)), ("2w", timedelta(weeks=2))):
        before = clock_row()
        assert before is not None
        advanced = renova("clock", "advance", step)
        assert advanced.returncode == 0, advanced.stdout + advanced.stderr
        assert clock_row() == before + expected
    assert clock_row() == at_local(date(2027, 12, 7), 21, 30)
    assert "business date 2027-12-07" in renova("clock", "show").stdout

    reset = renova("clock", "reset")
    assert reset.returncode == 0, reset.stdout + reset.stderr
    assert "test clock removed" in reset.stdout
    assert clock_row() is None
    assert "clock: real" in renova("clock", "show").stdout
    actions = session.scalars(select(AuditEvent.action).order_by(AuditEvent.id)).all()
    assert actions == ["clock.set", "clock.set", "clock.advance", "clock.advance", "clock.advance", "clock.reset"]


def test_bad_input_is_refused_and_changes_nothing(session):
    assert renova("clock", "set", "2027-11-22").returncode == 0
    before = clock_row()
    for args, words in (
        (("set", "2027-13-01"), "is not a date"),
        (("set", "next tuesday"), "is not a date"),
        (("advance", "1y"), "is not a duration"),
        (("advance", "0d"), "is not a duration"),
        (("advance", "soon"), "is not a duration"),
        (("advance", "99999999999d"), "too long a duration"),
        (("advance", "9000000w"), "stays before 2200-01-01"),
        (("set", "9999-12-31T23:59"), "out of range"),
        (("set", "2200-01-01"), "stays before 2200-01-01"),
    ):
        result = renova("clock", *args)
        assert result.returncode == 2, (args, result.stdout + result.stderr)
        assert words in result.stdout, (args, result.stdout)
        assert "Traceback" not in result.stdout + result.stderr
        assert clock_row() == before
    assert session.scalar(select(AuditEvent.id).where(AuditEvent.action != "clock.set")) is None


def test_advance_without_a_clock_starts_from_the_real_time(session):
    before = datetime.now(UTC)
    assert renova("clock", "advance", "1d").returncode == 0
    frozen = clock_row()
    assert frozen is not None
    assert before + timedelta(days=1) <= frozen <= datetime.now(UTC) + timedelta(days=1)


# --- production ---------------------------------------------------------------------------------


def test_production_refuses_the_clock(session):
    refused = renova("clock", "set", "2027-11-22", RENOVA_ENV="production")
    assert refused.returncode == 2
    assert "development and test only" in refused.stdout
    assert "Traceback" not in refused.stdout + refused.stderr
    assert clock_row() is None
    assert renova("clock", "advance", "1d", RENOVA_ENV="production").returncode == 2
    assert clock_row() is None

    # A clock left in the database: production ignores it when reading "now"…
    set_clock_to(at_local(FAR, 12))
    with get_session_factory()() as own:
        assert clock.now(own, BillingConfig(allow_future_dates=False)).date() == datetime.now(UTC).date()
        assert clock.now(own, BillingConfig(allow_future_dates=True)) == at_local(FAR, 12)
    # …and refuses to start with it, saying how to remove it.
    started = renova("scheduler", "--interval", "0.3", RENOVA_ENV="production")
    assert started.returncode == 2, started.stdout + started.stderr
    assert "test clock is set" in started.stdout
    assert "renova clock reset" in started.stdout
    doctor = renova("doctor", RENOVA_ENV="production")
    assert doctor.returncode == 1
    assert "renova clock reset" in doctor.stdout
    # Resetting is how it is removed, in production too.
    assert renova("clock", "reset", RENOVA_ENV="production").returncode == 0
    assert clock_row() is None


def test_doctor_shows_the_clock(session, broker):
    assert "clock: real" in renova("doctor").stdout
    set_clock_to(at_local(FAR, 12))
    doctor = renova("doctor")
    assert doctor.returncode == 0, doctor.stdout
    assert "clock: test" in doctor.stdout
    assert f"business date {FAR.isoformat()}" in doctor.stdout


def test_healthz_shows_the_clock(session, client):  # noqa: F811
    answer = client.get("/healthz").json()
    assert answer["clock"] == "real"
    assert "now" not in answer
    set_clock_to(at_local(FAR, 12))
    answer = client.get("/healthz").json()
    assert answer["clock"] == "test"
    assert datetime.fromisoformat(answer["now"]) == at_local(FAR, 12)


# --- every process reads it ----------------------------------------------------------------------


def test_a_change_request_is_dated_by_the_clock(session, worker, client, billing_gateway):  # noqa: F811
    """Boleto → card is refused from T − 7 and accepted at T − 8: moving the clock decides it, through
    the queue and through the API, and the preview prices on the clock's date."""
    organization = setup_organization(session)
    renewal = FAR
    subscription = subscription_for(session, organization, cycle="annual", method="boleto",
                                    start=add_cycle(renewal, "annual", -1), end=renewal)  # fmt: skip
    session.commit()

    set_clock_to(at_local(renewal - timedelta(days=7), 10))
    preview = client.post("/v1/change-requests/preview", json=_body(subscription.id)).json()
    assert preview["on"] == (renewal - timedelta(days=7)).isoformat()
    assert preview["outcome"] == "rejected"
    late = payload("payment_method", subscription.id, to="card")
    submit_change_request.send(late)
    refused = wait_until(lambda: request_by_key(late["idempotency_key"]), timeout=30)
    assert (refused.status, refused.error_code) == ("rejected", "boleto_already_issued")
    assert refused.created_at == at_local(renewal - timedelta(days=7), 10)
    shown = change(client, "api", payload("payment_method", subscription.id, to="card"))
    assert shown["error"]["code"] == "boleto_already_issued"

    set_clock_to(at_local(renewal - timedelta(days=8), 10))
    preview = client.post("/v1/change-requests/preview", json=_body(subscription.id)).json()
    assert (preview["on"], preview["outcome"]) == ((renewal - timedelta(days=8)).isoformat(), "applied")
    shown = change(client, "api", payload("payment_method", subscription.id, to="card"))
    assert shown["status"] == "applied", shown
    assert shown["result"]["effective_on"] == renewal.isoformat()
    applied = session.scalar(select(ChangeRequest).where(ChangeRequest.id == shown["id"]))
    assert applied is not None
    assert applied.created_at == at_local(renewal - timedelta(days=8), 10)


def _body(subscription_id: int) -> dict[str, object]:
    body = payload("payment_method", subscription_id, to="card")
    del body["idempotency_key"]
    return body


def test_the_scheduler_ticks_at_the_clock_and_follows_it(session, worker):
    """A real `renova scheduler` under the test clock claims the clock's business date, then the next
    one once the clock is advanced; `run-day` without --date runs the clock's date."""
    assert renova("clock", "set", FAR.isoformat()).returncode == 0
    scheduler = subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "scheduler", "--interval", "0.3"],
        cwd=ROOT,
        env={**os.environ},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:

        def runs() -> list[tuple[date, str]]:
            with get_session_factory()() as own:
                return [
                    (run.run_date, run.status) for run in own.scalars(select(BillingRun).order_by(BillingRun.run_date))
                ]

        wait_until(lambda: runs() == [(FAR, "done")], timeout=30)
        assert renova("clock", "advance", "1d").returncode == 0
        wait_until(lambda: runs() == [(FAR, "done"), (FAR + timedelta(days=1), "done")], timeout=30)
    finally:
        scheduler.send_signal(signal.SIGTERM)
        output, _ = scheduler.communicate(timeout=10)
    assert scheduler.returncode == 0, output
    assert local_today(datetime.now(UTC)) < FAR

    day = renova("run-day")
    assert day.returncode == 0, day.stdout + day.stderr
    assert f"run {(FAR + timedelta(days=1)).isoformat()}" in day.stdout
