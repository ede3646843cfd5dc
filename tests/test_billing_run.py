"""The daily run, day by day (time travel through `run_day`, the same scans and handlers the
fanned-out run uses), against real PostgreSQL and the sandbox gateway process."""

from __future__ import annotations

from datetime import date, timedelta

from sqlalchemy import select

from jobs.billing_day import run_day
from jobs.context import runtime
from models.schema import Boleto, Charge, Invoice, Notification, Subscription
from tests.factories import ANNUAL_PRICE, MONTHLY_PRICE, make_organization, make_subscription, noon, seed_plans


def days(start: date, end: date):
    day = start
    while day <= end:
        yield day
        day += timedelta(days=1)


def travel(session, gateway, start: date, end: date) -> None:
    for day in days(start, end):
        run_day(session, gateway, day, noon(day), runtime().config)


def test_monthly_card_anchored_jan_31_renews_on_month_ends_without_drift(session, billing_gateway, sandbox_gateway):
    seed_plans(session)
    organization = make_organization(session)
    subscription = make_subscription(session, organization, cycle="monthly", method="card", anchor=date(2027, 1, 31))
    session.commit()

    travel(session, billing_gateway, date(2027, 1, 31), date(2028, 3, 31))

    invoices = session.scalars(
        select(Invoice)
        .where(Invoice.subscription_id == subscription.id, Invoice.kind == "renewal")
        .order_by(Invoice.period_start)
    ).all()
    assert [invoice.period_start for invoice in invoices] == [
        date(2027, 2, 28),
        date(2027, 3, 31),
        date(2027, 4, 30),
        date(2027, 5, 31),
        date(2027, 6, 30),
        date(2027, 7, 31),
        date(2027, 8, 31),
        date(2027, 9, 30),
        date(2027, 10, 31),
        date(2027, 11, 30),
        date(2027, 12, 31),
        date(2028, 1, 31),
        date(2028, 2, 29),
        date(2028, 3, 31),
    ]
    assert all(invoice.status == "paid" and invoice.total_cents == MONTHLY_PRICE for invoice in invoices)
    session.refresh(subscription)
    assert (subscription.current_period_start, subscription.current_period_end) == (
        date(2028, 3, 31),
        date(2028, 4, 30),
    )
    assert subscription.status == "active"
    keys = [f"charge:{invoice.id}:1" for invoice in invoices]
    ledger = sandbox_gateway.ledger()
    charged = [entry for entry in ledger if entry.get("idempotency_key") in keys]
    assert sorted(entry["idempotency_key"] for entry in charged) == sorted(keys)
    receipts = session.scalars(select(Notification).where(Notification.kind == "charge_succeeded")).all()
    assert len(receipts) == len(invoices)


def test_annual_boleto_paid_on_time(session, billing_gateway, sandbox_gateway):
    seed_plans(session)
    organization = make_organization(session, card_token=None)
    subscription = make_subscription(session, organization, cycle="annual", method="boleto", anchor=date(2027, 3, 10))
    session.commit()
    renewal = date(2028, 3, 10)

    travel(session, billing_gateway, date(2028, 2, 25), renewal - timedelta(days=8))
    assert session.scalar(select(Invoice).where(Invoice.kind == "renewal")) is None
    travel(session, billing_gateway, renewal - timedelta(days=7), renewal - timedelta(days=7))
    boleto = session.scalars(select(Boleto)).one()
    assert boleto.due_date == renewal
    assert boleto.amount_cents == ANNUAL_PRICE
    sandbox_gateway.pay_boleto(boleto.gateway_id, paid_on=renewal - timedelta(days=2))
    from jobs.payments import record_boleto_payment

    record_boleto_payment(
        session,
        boleto.gateway_id,
        amount_cents=ANNUAL_PRICE,
        paid_on=renewal - timedelta(days=2),
        now=noon(renewal - timedelta(days=2)),
    )
    session.commit()
    travel(session, billing_gateway, renewal - timedelta(days=6), renewal + timedelta(days=20))
    session.refresh(subscription)
    assert subscription.status == "active"
    assert subscription.current_period_end == date(2029, 3, 10)
    assert session.scalar(select(Charge)) is None
    assert len(session.scalars(select(Boleto)).all()) == 1
