"""The daily run through the broker: real Redis, real Dramatiq workers, the sandbox gateway process.

`tick_once` is what the clock's `tick` message runs; the tests call it with explicit instants (the
scheduler is the only reader of the wall clock) and let real workers do the fanned-out work."""

from __future__ import annotations

import threading
import uuid
from datetime import date, datetime, time, timedelta

import pytest
from dramatiq.middleware import Middleware
from sqlalchemy import func, select, text

from gateways.base import ChargeRequest
from jobs.billing_day import TASKS, process_chunk, run_billing_day, scan_run
from jobs.context import runtime
from jobs.renewals import Work, renew
from jobs.tick import tick_once
from models.schema import BillingRun, Charge, Invoice, Subscription
from tests.integration.conftest import wait_until
from tests.integration.factories import make_organization, make_subscription, noon, seed_plans
from workers.db import get_session_factory

RUN_AT = time(6, 0)
DAY = date(2027, 3, 15)


def drive(now: datetime, until: date, timeout: float = 30.0) -> None:
    """Tick like the clock would (re-scanning at once) until the run for `until` is done."""

    def done() -> bool:
        with get_session_factory()() as session:
            tick_once(session, now, runtime().config, RUN_AT, rescan_after=timedelta(0))
            status = session.scalar(select(BillingRun.status).where(BillingRun.run_date == until))
        return status == "done"

    wait_until(done, timeout=timeout, interval=0.2)


def card_subscription(session, organization_id: int, renewal: date, token: str = "tok_ok") -> Subscription:
    organization = make_organization(session, organization_id, card_token=token)
    return make_subscription(
        session, organization, cycle="monthly", method="card", anchor=renewal.replace(month=renewal.month - 1)
    )


def snapshot(session) -> dict[str, list[tuple]]:
    """The billing state that must not depend on how often messages were delivered (named by
    organization and period, since concurrent workers may hand out ids in another order)."""
    queries = {
        "subscriptions": "SELECT organization_id, status, payment_method, current_period_start, current_period_end, "
        "balance_cents FROM subscriptions",
        "invoices": "SELECT organization_id, kind, period_start, total_cents, status FROM invoices",
        "charges": "SELECT i.organization_id, c.attempt, c.status, c.amount_cents, c.next_retry_on "
        "FROM charges c JOIN invoices i ON i.id = c.invoice_id",
        "boletos": "SELECT i.organization_id, b.amount_cents, b.due_date, b.status "
        "FROM boletos b JOIN invoices i ON i.id = b.invoice_id",
        "notifications": "SELECT organization_id, kind FROM notifications",
        "ledger": "SELECT s.organization_id, l.kind, l.amount_cents FROM ledger_entries l "
        "JOIN subscriptions s ON s.id = l.subscription_id",
    }
    return {name: sorted(session.execute(text(sql)).all()) for name, sql in queries.items()}


def test_tick_claims_the_day_and_workers_renew(session, worker, billing_gateway, sandbox_gateway):
    seed_plans(session)
    subscription = card_subscription(session, 1, DAY)
    session.commit()

    drive(noon(DAY), DAY)

    invoice = session.scalars(select(Invoice).where(Invoice.kind == "renewal")).one()
    assert invoice.status == "paid"
    assert invoice.paid_on == DAY
    charge = session.scalars(select(Charge)).one()
    assert charge.status == "succeeded"
    assert len(sandbox_gateway.ledger(idempotency_key=charge.idempotency_key)) == 1
    session.refresh(subscription)
    assert subscription.current_period_start == DAY
    run = session.scalars(select(BillingRun)).one()
    assert (run.run_date, run.status, run.due_count) == (DAY, "done", 1)
    assert run.done_count >= 1


def test_three_schedulers_at_once_give_one_run(session, worker, billing_gateway, sandbox_gateway):
    seed_plans(session)
    card_subscription(session, 1, DAY)
    session.commit()
    barrier = threading.Barrier(3)
    errors: list[BaseException] = []

    def scheduler() -> None:
        try:
            barrier.wait()
            with get_session_factory()() as own:
                tick_once(own, noon(DAY), runtime().config, RUN_AT)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=scheduler) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    drive(noon(DAY), DAY)
    assert session.scalar(select(func.count()).select_from(BillingRun)) == 1
    charge = session.scalars(select(Charge)).one()
    assert len(sandbox_gateway.ledger(idempotency_key=charge.idempotency_key)) == 1


def test_a_scheduler_down_three_days_catches_up_in_order(session, worker, billing_gateway, sandbox_gateway):
    seed_plans(session)
    first = card_subscription(session, 1, DAY - timedelta(days=3))
    second = card_subscription(session, 2, DAY - timedelta(days=1))
    session.add(BillingRun(run_date=DAY - timedelta(days=4), status="done"))
    session.commit()

    drive(noon(DAY), DAY, timeout=60)

    runs = session.scalars(select(BillingRun).order_by(BillingRun.run_date)).all()
    assert [run.run_date for run in runs] == [DAY - timedelta(days=n) for n in (4, 3, 2, 1, 0)]
    # Each date was claimed only once the one before it was done: claims (ids) follow the dates.
    assert [run.id for run in runs] == sorted(run.id for run in runs)
    assert all(run.status == "done" for run in runs)
    paid_on = dict(
        session.execute(select(Invoice.subscription_id, Invoice.paid_on).where(Invoice.kind == "renewal")).all()
    )
    assert paid_on == {first.id: DAY - timedelta(days=3), second.id: DAY - timedelta(days=1)}


def test_a_run_refuses_a_future_date_outside_development(session):
    from dataclasses import replace

    from jobs.billing_day import FutureDateRefused

    production = replace(runtime().config, allow_future_dates=False)
    with pytest.raises(FutureDateRefused):
        scan_run(session, date.today() + timedelta(days=2), noon(date.today()), production)


class DeliverTwice(Middleware):
    """Every message enqueued is enqueued again as a distinct message: at-least-once, worst case."""

    def after_enqueue(self, broker, message, delay):
        if message.options.get("duplicate"):
            return
        copy = message.copy(message_id=str(uuid.uuid4()), options={**message.options, "duplicate": True})
        broker.enqueue(copy, delay=delay)


def busy_day(session) -> None:
    seed_plans(session)
    card_subscription(session, 1, DAY)
    card_subscription(session, 2, DAY, token="tok_insufficient_funds")
    organization = make_organization(session, 3, card_token=None)
    make_subscription(
        session, organization, cycle="annual", method="boleto", anchor=DAY + timedelta(days=5) - timedelta(days=365)
    )
    session.commit()


def run_scenario(session, *, twice: bool) -> dict[str, list[tuple]]:
    from tests.integration.conftest import _broker

    duplicator = DeliverTwice()
    if twice:
        _broker.middleware.insert(0, duplicator)
    try:
        busy_day(session)
        drive(noon(DAY), DAY)
        if twice:  # the day's run delivered twice over again, straight to the actors
            run_billing_day.send(DAY.isoformat(), noon(DAY).isoformat())
            for name in TASKS:
                process_chunk.send(name, DAY.isoformat(), [1, 2, 3], noon(DAY).isoformat())
            wait_until(lambda: _broker.client.llen("dramatiq:billing") == 0)
        drive(noon(DAY + timedelta(days=1)), DAY + timedelta(days=1))
    finally:
        if twice:
            _broker.middleware.remove(duplicator)
    session.expire_all()
    return snapshot(session)


def test_every_message_delivered_twice_changes_nothing(session, worker, billing_gateway, sandbox_gateway, broker):
    from tests.integration.conftest import _reset_between

    before = len(sandbox_gateway.ledger(kind="charge"))
    once = run_scenario(session, twice=False)
    charged_once = len(sandbox_gateway.ledger(kind="charge")) - before
    _reset_between(session)
    twice = run_scenario(session, twice=True)
    charged_twice = len(sandbox_gateway.ledger(kind="charge")) - before - charged_once
    assert twice == once
    assert charged_twice == charged_once == 1
    assert once["boletos"] and once["charges"] and once["notifications"]


def test_worker_killed_before_calling_the_gateway(session, worker, billing_gateway, sandbox_gateway):
    seed_plans(session)
    subscription = card_subscription(session, 1, DAY)
    session.commit()
    work = Work(on=DAY, now=noon(DAY), config=runtime().config, gateway=billing_gateway)
    renew(session, subscription.id, work)
    session.commit()  # phase 1 committed, then the worker dies: no phase 2
    charge = session.scalars(select(Charge)).one()
    assert charge.status == "pending"

    later = noon(DAY) + timedelta(minutes=10)
    with get_session_factory()() as own:
        tick_once(own, later, runtime().config, RUN_AT)
    wait_until(lambda: status_of(charge.id) == "succeeded")
    assert len(sandbox_gateway.ledger(idempotency_key=charge.idempotency_key)) == 1


def test_worker_killed_after_the_gateway_charged(session, worker, billing_gateway, sandbox_gateway):
    seed_plans(session)
    subscription = card_subscription(session, 1, DAY)
    session.commit()
    work = Work(on=DAY, now=noon(DAY), config=runtime().config, gateway=billing_gateway)
    renew(session, subscription.id, work)
    session.commit()
    request: ChargeRequest = work.charges[0].request
    billing_gateway.charge(request.card_token, request.amount_cents, request.idempotency_key, request.description)
    # ... and the worker dies before recording the outcome.

    with get_session_factory()() as own:
        tick_once(own, noon(DAY) + timedelta(minutes=10), runtime().config, RUN_AT)
    charge_id = work.charges[0].charge_id
    wait_until(lambda: status_of(charge_id) == "succeeded")
    assert len(sandbox_gateway.ledger(idempotency_key=request.idempotency_key)) == 1
    invoice = session.scalars(select(Invoice).where(Invoice.kind == "renewal")).one()
    session.refresh(invoice)
    assert invoice.status == "paid"


def test_gateway_timeout_after_charging_is_reconciled_not_charged_again(
    session, worker, billing_gateway, sandbox_gateway
):
    seed_plans(session)
    card_subscription(session, 1, DAY, token="tok_timeout")
    session.commit()
    with sandbox_gateway.configured(stall_ms=3000):
        from jobs.billing_day import run_day

        run_day(session, billing_gateway, DAY, noon(DAY), runtime().config)
        charge = session.scalars(select(Charge)).one()
        assert charge.status == "unknown"
        assert session.scalar(select(Invoice.status).where(Invoice.kind == "renewal")) == "open"

        with get_session_factory()() as own:
            tick_once(own, noon(DAY) + timedelta(minutes=1), runtime().config, RUN_AT)
        wait_until(lambda: status_of(charge.id) == "succeeded")
    assert session.scalar(select(func.count()).select_from(Charge)) == 1
    assert len(sandbox_gateway.ledger(idempotency_key=charge.idempotency_key)) == 1
    assert (
        session.scalar(
            select(Invoice.status).where(Invoice.kind == "renewal").execution_options(populate_existing=True)
        )
        == "paid"
    )


def test_an_outcome_recorded_meanwhile_by_another_worker_is_not_recorded_again(
    session, billing_gateway, sandbox_gateway
):
    """Seen in the demo: a renewal's phase 3 and the janitor record the same success. The second
    one had the charge in its session from before the lock and read it as still unresolved."""
    from gateways.base import ChargeResult
    from jobs.payments import reconcile_charge, record_charge_outcome
    from models.schema import LedgerEntry

    seed_plans(session)
    card_subscription(session, 1, DAY, token="tok_timeout")
    session.commit()
    with sandbox_gateway.configured(stall_ms=3000):
        from jobs.billing_day import run_day

        run_day(session, billing_gateway, DAY, noon(DAY), runtime().config)
    charge = session.scalars(select(Charge)).one()  # held by this session: unknown
    assert charge.status == "unknown"
    session.commit()

    with get_session_factory()() as janitor:
        reconcile_charge(janitor, billing_gateway, charge.id, now=noon(DAY), config=runtime().config)
        janitor.commit()
    assert status_of(charge.id) == "succeeded"

    late = ChargeResult(
        gateway_id="ch_late",
        status="succeeded",
        amount_cents=charge.amount_cents,
        idempotency_key=charge.idempotency_key,
    )
    assert (
        record_charge_outcome(session, charge.id, late, on=DAY, now=noon(DAY), config=runtime().config) == "succeeded"
    )
    session.commit()
    kinds = session.scalars(select(LedgerEntry.kind).where(LedgerEntry.invoice_id == charge.invoice_id)).all()
    assert sorted(kinds) == ["payment"]


def status_of(charge_id: int) -> str:
    with get_session_factory()() as own:
        return own.scalar(select(Charge.status).where(Charge.id == charge_id))


def test_the_scans_use_their_indexes(session):
    seed_plans(session)
    session.execute(text("INSERT INTO organizations (id, name) SELECT g, 'org ' || g FROM generate_series(1, 20000) g"))
    session.execute(
        text(
            "INSERT INTO subscriptions (organization_id, cycle, payment_method, billing_anchor, current_period_start, "
            "current_period_end, status) SELECT g, CASE WHEN g % 3 = 0 THEN 'annual' ELSE 'monthly' END, "
            "CASE WHEN g % 6 = 0 THEN 'boleto' ELSE 'card' END, d, d, d + CASE WHEN g % 3 = 0 THEN 365 ELSE 30 END, "
            "CASE WHEN g % 50 = 0 THEN 'canceled' ELSE 'active' END "
            "FROM generate_series(1, 20000) g, LATERAL (SELECT DATE '2026-01-01' + (g % 700) AS d) dates"
        )
    )
    session.execute(
        text(
            "INSERT INTO invoices (id, subscription_id, organization_id, cycle, period_start, period_end, amount_cents, "
            "total_cents, method, due_date, status) SELECT id, id, organization_id, cycle, current_period_start, "
            "current_period_end, 4990, 4990, payment_method, current_period_start, "
            "CASE WHEN id % 100 = 0 THEN 'open' ELSE 'paid' END FROM subscriptions"
        )
    )
    session.execute(
        text(
            "INSERT INTO charges (invoice_id, attempt, idempotency_key, amount_cents, card_token, status, next_retry_on) "
            "SELECT id, 1, 'k' || id, 4990, 'tok_ok', CASE WHEN id % 100 = 0 THEN 'failed' ELSE 'succeeded' END, "
            "CASE WHEN id % 100 = 0 THEN period_start + 1 END FROM invoices WHERE method = 'card'"
        )
    )
    session.execute(
        text(
            "INSERT INTO boletos (invoice_id, gateway_id, nosso_numero, barcode, digitable_line, amount_cents, due_date, "
            "status) SELECT id, 'b' || id, id::text, '', '', 4990, due_date, "
            "CASE WHEN id % 100 = 0 THEN 'issued' ELSE 'paid' END FROM invoices WHERE method = 'boleto'"
        )
    )
    session.execute(text("ANALYZE"))
    config = runtime().config
    expected = {
        "issue_boletos": "ix_subscriptions_boleto_due",
        "renew": "ix_subscriptions_renewal_due",
        "retry_charges": "ix_charges_retry_due",
        "boletos_overdue": "ix_boletos_awaiting_overdue",
        "renewal_notices": "ix_subscriptions_renewal_notice",
    }
    on = date(2026, 1, 20)
    for name, index in expected.items():
        statement = TASKS[name].scan(on, config)
        compiled = statement.compile(session.get_bind(), compile_kwargs={"literal_binds": True})
        plan = session.execute(text(f"EXPLAIN {compiled}")).scalars().all()
        assert any(index in line for line in plan), f"{name} does not use {index}:\n" + "\n".join(plan)
        for table in ("subscriptions", "invoices", "charges"):
            assert not any(f"Seq Scan on {table}" in line for line in plan), "\n".join(plan)


def test_a_failing_subscription_never_fails_its_neighbours(session, worker, billing_gateway, sandbox_gateway, broker):
    from jobs.billing_day import process_ids
    from workers.queues import queue_depths

    seed_plans(session)
    good = [card_subscription(session, n, DAY) for n in (1, 2)]
    organization = make_organization(session, 3)
    broken = make_subscription(session, organization, cycle="monthly", method="card", anchor=DAY.replace(month=2))
    broken.product = "no-such-product"  # renewing it raises: there is no price
    session.commit()
    ids = sorted([good[0].id, broken.id, good[1].id])

    result = process_ids(session, "renew", ids, on=DAY, now=noon(DAY), gateway=billing_gateway, config=runtime().config)
    assert result.failed == [broken.id]
    paid = session.scalars(
        select(Invoice.subscription_id).where(Invoice.kind == "renewal", Invoice.status == "paid")
    ).all()
    assert sorted(paid) == sorted(s.id for s in good)

    # Through the broker the failed id is retried on its own message, then parked for operators.
    session.add(BillingRun(run_date=DAY))
    session.commit()
    process_chunk.send("renew", DAY.isoformat(), ids, noon(DAY).isoformat())
    from tests.integration.test_broker import broker_url

    wait_until(lambda: queue_depths(broker_url(broker), ("billing",))[0].dead == 1)
    run = session.scalars(select(BillingRun)).one()
    session.refresh(run)
    assert run.failed_count == 1


def test_one_outcome_that_cannot_be_recorded_leaves_the_others_recorded(session, billing_gateway):
    import uuid as uuid_module

    from jobs.payments import PreparedCharge, charge_and_record

    seed_plans(session)
    subscription = card_subscription(session, 1, DAY)
    session.commit()
    work = Work(on=DAY, now=noon(DAY), config=runtime().config, gateway=billing_gateway)
    renew(session, subscription.id, work)
    session.commit()
    (real,) = work.charges
    orphan = PreparedCharge(
        10**9, ChargeRequest("tok_ok", 100, f"orphan-{uuid_module.uuid4()}", "an attempt with no row")
    )

    statuses = charge_and_record(
        session, billing_gateway, [orphan, real], on=DAY, now=noon(DAY), config=runtime().config
    )

    assert statuses == {orphan.charge_id: "pending", real.charge_id: "succeeded"}
    assert session.scalar(select(Invoice.status).where(Invoice.kind == "renewal")) == "paid"
