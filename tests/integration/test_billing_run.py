"""The daily run, day by day (time travel through `run_day`, the same scans and handlers the
fanned-out run uses), against real PostgreSQL and the sandbox gateway process."""

from __future__ import annotations

from datetime import date, timedelta

import pytest
from sqlalchemy import func, select

from jobs.billing_day import run_day
from jobs.context import runtime
from models.schema import Boleto, Charge, Invoice, Notification, Subscription
from tests.integration.factories import (
    ANNUAL_PRICE,
    MONTHLY_PRICE,
    make_organization,
    make_subscription,
    noon,
    seed_plans,
)

pytestmark = pytest.mark.usefixtures("ledger_checked")


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
    from jobs.boletos import record_boleto_payment

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


def renewal_invoices(session, subscription_id: int) -> list[Invoice]:
    return list(
        session.scalars(
            select(Invoice)
            .where(Invoice.subscription_id == subscription_id, Invoice.kind == "renewal")
            .order_by(Invoice.period_start)
            .execution_options(populate_existing=True)
        )
    )


def kinds(session) -> list[str]:
    return [row.kind for row in session.scalars(select(Notification).order_by(Notification.id))]


def annual_boleto(session, anchor: date) -> Subscription:
    seed_plans(session)
    organization = make_organization(session, card_token=None)
    subscription = make_subscription(session, organization, cycle="annual", method="boleto", anchor=anchor)
    session.commit()
    return subscription


def pay(session, sandbox_gateway, boleto: Boleto, on: date) -> None:
    from jobs.boletos import record_boleto_payment

    sandbox_gateway.pay_boleto(boleto.gateway_id, paid_on=on)
    record_boleto_payment(session, boleto.gateway_id, amount_cents=boleto.amount_cents, paid_on=on, now=noon(on))
    session.commit()


def test_annual_boleto_paid_late_is_suspended_then_reactivated(session, billing_gateway, sandbox_gateway):
    subscription = annual_boleto(session, date(2027, 3, 10))
    renewal = date(2028, 3, 10)  # a Friday: payable that day, overdue on Saturday the 11th

    travel(session, billing_gateway, renewal - timedelta(days=7), renewal)
    session.refresh(subscription)
    assert subscription.status == "active" and subscription.current_period_start == renewal
    travel(session, billing_gateway, renewal + timedelta(days=1), renewal + timedelta(days=1))
    session.refresh(subscription)
    assert subscription.status == "past_due"
    boleto = session.scalars(select(Boleto)).one()
    assert (boleto.status, boleto.overdue_on) == ("overdue", date(2028, 3, 11))
    travel(session, billing_gateway, date(2028, 3, 12), date(2028, 3, 14))
    session.refresh(subscription)
    assert subscription.status == "past_due"  # three business days after the 11th: Mon, Tue, Wed
    travel(session, billing_gateway, date(2028, 3, 15), date(2028, 3, 15))
    session.refresh(subscription)
    assert subscription.status == "suspended"

    pay(session, sandbox_gateway, boleto, date(2028, 3, 20))
    session.refresh(subscription)
    assert subscription.status == "active"
    # Suspended since the 15th: the year paid starts on the payment date, which becomes the anchor.
    assert (subscription.current_period_start, subscription.current_period_end) == (
        date(2028, 3, 20),
        date(2029, 3, 20),
    )
    assert subscription.billing_anchor == date(2028, 3, 20)
    assert kinds(session) == [
        "boleto_issued",
        "renewal_notice",
        "boleto_reminder",
        "boleto_overdue",
        "subscription_suspended",
        "subscription_reactivated",
    ]


def test_annual_boleto_never_paid_stays_suspended_and_is_not_renewed(session, billing_gateway, sandbox_gateway):
    subscription = annual_boleto(session, date(2027, 3, 10))
    travel(session, billing_gateway, date(2028, 3, 1), date(2029, 4, 10))
    session.refresh(subscription)
    assert subscription.status == "suspended"
    invoices = renewal_invoices(session, subscription.id)
    assert [(invoice.period_start, invoice.status) for invoice in invoices] == [(date(2028, 3, 10), "open")]
    assert len(session.scalars(select(Boleto)).all()) == 1

    # Paid a year later: the customer pays for a fresh year from the payment date, not for the
    # time they were suspended.
    pay(session, sandbox_gateway, session.scalars(select(Boleto)).one(), date(2029, 4, 10))
    session.refresh(subscription)
    (invoice,) = renewal_invoices(session, subscription.id)
    assert (invoice.status, invoice.period_start, invoice.period_end) == ("paid", date(2029, 4, 10), date(2030, 4, 10))
    assert (subscription.status, subscription.billing_anchor) == ("active", date(2029, 4, 10))
    assert (subscription.current_period_start, subscription.current_period_end) == (
        date(2029, 4, 10),
        date(2030, 4, 10),
    )


def card_annual(session, anchor: date, token: str = "tok_ok") -> Subscription:
    seed_plans(session)
    organization = make_organization(session, card_token=token)
    subscription = make_subscription(session, organization, cycle="annual", method="card", anchor=anchor)
    session.commit()
    return subscription


def test_card_to_boleto_switched_early_is_billed_by_boleto_seven_days_ahead(session, billing_gateway):
    subscription = card_annual(session, date(2027, 6, 1))
    renewal = date(2028, 6, 1)
    subscription.pending_payment_method = "boleto"
    session.commit()

    travel(session, billing_gateway, renewal - timedelta(days=8), renewal)
    boleto = session.scalars(select(Boleto)).one()
    assert boleto.due_date == renewal
    assert session.scalar(select(Invoice.created_at).where(Invoice.id == boleto.invoice_id)) is not None
    session.refresh(subscription)
    assert (subscription.payment_method, subscription.pending_payment_method) == ("boleto", None)
    assert session.scalar(select(Charge)) is None
    assert "payment_method_switch_applied" in kinds(session)


def test_card_to_boleto_inside_the_window_is_due_three_days_later(session, billing_gateway):
    subscription = card_annual(session, date(2027, 6, 1))
    renewal = date(2028, 6, 1)
    travel(session, billing_gateway, renewal - timedelta(days=8), renewal - timedelta(days=2))
    subscription.pending_payment_method = "boleto"  # requested on T − 1
    session.commit()
    travel(session, billing_gateway, renewal - timedelta(days=1), renewal + timedelta(days=1))
    boleto = session.scalars(select(Boleto)).one()
    assert boleto.due_date == renewal + timedelta(days=2)  # max(T, D + 3)
    assert session.scalar(select(Charge)) is None


def test_boleto_to_card_before_the_deadline_is_charged_at_renewal(session, billing_gateway, sandbox_gateway):
    seed_plans(session)
    organization = make_organization(session, card_token="tok_ok")
    subscription = make_subscription(session, organization, cycle="annual", method="boleto", anchor=date(2027, 6, 1))
    subscription.pending_payment_method = "card"
    session.commit()
    renewal = date(2028, 6, 1)

    travel(session, billing_gateway, renewal - timedelta(days=10), renewal)
    assert session.scalar(select(Boleto)) is None
    (invoice,) = renewal_invoices(session, subscription.id)
    assert (invoice.method, invoice.status, invoice.paid_on) == ("card", "paid", renewal)
    session.refresh(subscription)
    assert subscription.payment_method == "card"


def test_a_declining_card_is_retried_then_suspended(session, billing_gateway, sandbox_gateway):
    seed_plans(session)
    organization = make_organization(session, card_token="tok_insufficient_funds")
    subscription = make_subscription(session, organization, cycle="monthly", method="card", anchor=date(2027, 4, 10))
    session.commit()
    renewal = date(2027, 5, 10)

    travel(session, billing_gateway, renewal, renewal + timedelta(days=6))
    session.refresh(subscription)
    assert subscription.status == "past_due"
    travel(session, billing_gateway, renewal + timedelta(days=7), date(2027, 7, 1))
    charges = session.scalars(select(Charge).order_by(Charge.attempt)).all()
    attempt_days = [
        session.scalar(select(Notification.created_at).where(Notification.dedupe_key == f"charge_failed:{c.id}"))
        for c in charges
    ]
    assert [charge.attempt for charge in charges] == [1, 2, 3, 4, 5]
    assert all(charge.status == "failed" and charge.gateway_code == "insufficient_funds" for charge in charges)
    assert all(day is not None for day in attempt_days)
    assert [charge.next_retry_on for charge in charges] == [None] * 5
    session.refresh(subscription)
    assert subscription.status == "suspended"
    assert len(renewal_invoices(session, subscription.id)) == 1  # June 10 was not renewed
    assert kinds(session).count("charge_failed") == 5
    assert kinds(session).count("subscription_suspended") == 1

    # A new card (the owner's change request) is charged at once and reactivates the subscription.
    from jobs.changes import submit_request

    new_card = {
        "organization_id": organization.id,
        "requested_by": organization.id * 100 + 1,
        "idempotency_key": "new-card-1",
        "kind": "card",
        "token": "tok_ok",
        "brand": "mastercard",
        "last4": "5454",
        "exp_month": 8,
        "exp_year": 2031,
    }
    request = submit_request(session, billing_gateway, new_card, now=noon(date(2027, 7, 2)), config=runtime().config)
    assert request is not None and request.status == "applied"
    session.expire_all()
    (invoice,) = renewal_invoices(session, subscription.id)
    assert (invoice.status, invoice.paid_on) == ("paid", date(2027, 7, 2))
    session.refresh(subscription)
    assert subscription.status == "active"
    # The period it paid for (May 10 – Jun 10) ended while suspended: a fresh month from the payment.
    assert (subscription.current_period_start, subscription.current_period_end) == (date(2027, 7, 2), date(2027, 8, 2))
    assert session.scalars(select(Charge).order_by(Charge.attempt)).all()[-1].status == "succeeded"
    assert {"subscription_reactivated", "charge_succeeded", "card_updated"} <= set(kinds(session))


def test_retry_dates_follow_the_dunning_schedule(session, billing_gateway):
    seed_plans(session)
    organization = make_organization(session, card_token="tok_do_not_honor")
    make_subscription(session, organization, cycle="monthly", method="card", anchor=date(2027, 4, 10))
    session.commit()
    renewal = date(2027, 5, 10)
    attempted_on: list[date] = []
    for day in days(renewal, renewal + timedelta(days=8)):
        before = session.scalar(select(func.count()).select_from(Charge))
        run_day(session, billing_gateway, day, noon(day), runtime().config)
        if session.scalar(select(func.count()).select_from(Charge)) > before:
            attempted_on.append(day)
    assert attempted_on == [renewal + timedelta(days=n) for n in (0, 1, 3, 5, 7)]


def test_a_hard_decline_waits_for_a_new_card_then_suspends(session, billing_gateway):
    seed_plans(session)
    organization = make_organization(session, card_token="tok_expired")
    subscription = make_subscription(session, organization, cycle="monthly", method="card", anchor=date(2027, 4, 10))
    session.commit()
    renewal = date(2027, 5, 10)
    travel(session, billing_gateway, renewal, renewal + timedelta(days=6))
    charge = session.scalars(select(Charge)).one()
    assert (charge.hard_decline, charge.next_retry_on) == (True, None)
    session.refresh(subscription)
    assert subscription.status == "past_due"
    travel(session, billing_gateway, renewal + timedelta(days=7), renewal + timedelta(days=7))
    session.refresh(subscription)
    assert subscription.status == "suspended"
    assert session.scalar(select(func.count()).select_from(Charge)) == 1


def test_cancel_at_period_end_ends_the_subscription_without_charging(session, billing_gateway):
    seed_plans(session)
    organization = make_organization(session)
    subscription = make_subscription(session, organization, cycle="monthly", method="card", anchor=date(2027, 4, 10))
    subscription.cancel_at_period_end = True
    session.commit()
    travel(session, billing_gateway, date(2027, 5, 9), date(2027, 6, 15))
    session.refresh(subscription)
    assert subscription.status == "canceled"
    assert renewal_invoices(session, subscription.id) == []
    assert session.scalar(select(Charge)) is None
    assert kinds(session) == ["subscription_canceled"]


def test_credit_balance_is_discounted_and_zero_invoices_are_paid_without_a_charge(session, billing_gateway):
    seed_plans(session)
    organization = make_organization(session)
    subscription = make_subscription(
        session, organization, cycle="monthly", method="card", anchor=date(2027, 4, 10), balance_cents=6_000
    )
    session.commit()
    travel(session, billing_gateway, date(2027, 5, 10), date(2027, 6, 10))
    first, second = renewal_invoices(session, subscription.id)
    assert (first.discount_cents, first.total_cents, first.status) == (MONTHLY_PRICE, 0, "paid")
    assert (second.discount_cents, second.total_cents, second.status) == (
        6_000 - MONTHLY_PRICE,
        2 * MONTHLY_PRICE - 6_000,
        "paid",
    )
    charges = session.scalars(select(Charge)).all()
    assert [(c.invoice_id, c.amount_cents) for c in charges] == [(second.id, 2 * MONTHLY_PRICE - 6_000)]
    session.refresh(subscription)
    assert subscription.balance_cents == 0


def year_of_mixed_billing(session, gateway, *, runs_per_day: int) -> None:
    seed_plans(session)
    paying = make_organization(session, 1)
    make_subscription(session, paying, cycle="monthly", method="card", anchor=date(2027, 1, 31))
    declining = make_organization(session, 2, card_token="tok_do_not_honor")
    make_subscription(session, declining, cycle="monthly", method="card", anchor=date(2027, 2, 15))
    boleto = make_organization(session, 3, card_token=None)
    make_subscription(session, boleto, cycle="annual", method="boleto", anchor=date(2026, 7, 1))
    card = make_organization(session, 4)
    make_subscription(session, card, cycle="annual", method="card", anchor=date(2026, 9, 30))
    session.commit()
    for day in days(date(2027, 2, 1), date(2027, 12, 31)):
        for _ in range(runs_per_day):
            run_day(session, gateway, day, noon(day), runtime().config)


def test_running_every_day_twice_ends_exactly_as_once(session, billing_gateway, sandbox_gateway):
    from tests.integration.conftest import _reset_between
    from tests.integration.test_daily_run import snapshot

    before = len(sandbox_gateway.ledger(kind="charge"))
    year_of_mixed_billing(session, billing_gateway, runs_per_day=1)
    once = snapshot(session)
    charged_once = len(sandbox_gateway.ledger(kind="charge")) - before
    _reset_between(session)
    year_of_mixed_billing(session, billing_gateway, runs_per_day=2)
    twice = snapshot(session)
    charged_twice = len(sandbox_gateway.ledger(kind="charge")) - before - charged_once
    assert twice == once
    assert charged_twice == charged_once == 11 + 1  # 11 monthly renewals, 1 annual card renewal


def test_a_boleto_paid_after_we_cancelled_it_becomes_credit(session, billing_gateway, sandbox_gateway):
    from jobs.boletos import record_boleto_payment
    from models.schema import LedgerEntry

    subscription = annual_boleto(session, date(2027, 3, 10))
    travel(session, billing_gateway, date(2028, 3, 3), date(2028, 3, 3))
    boleto = session.scalars(select(Boleto)).one()
    boleto.status = "canceled"
    session.get(Invoice, boleto.invoice_id).status = "void"
    session.commit()

    outcome = record_boleto_payment(
        session, boleto.gateway_id, amount_cents=ANNUAL_PRICE, paid_on=date(2028, 3, 5), now=noon(date(2028, 3, 5))
    )
    session.commit()
    assert outcome == "credited"
    session.refresh(subscription)
    assert subscription.balance_cents == ANNUAL_PRICE
    entry = session.scalars(select(LedgerEntry).where(LedgerEntry.kind == "payment_to_credit")).one()
    assert entry.amount_cents == ANNUAL_PRICE
    again = record_boleto_payment(
        session, boleto.gateway_id, amount_cents=ANNUAL_PRICE, paid_on=date(2028, 3, 5), now=noon(date(2028, 3, 5))
    )
    assert again == "already_paid"


def test_a_boleto_the_gateway_refuses_does_not_block_its_neighbours(session, billing_gateway, caplog):
    seed_plans(session)
    no_document = make_organization(session, 1, card_token=None)
    no_document.document = None
    fine = make_organization(session, 2, card_token=None)
    first = make_subscription(session, no_document, cycle="annual", method="boleto", anchor=date(2027, 3, 10))
    second = make_subscription(session, fine, cycle="annual", method="boleto", anchor=date(2027, 3, 10))
    session.commit()

    run_day(session, billing_gateway, date(2028, 3, 3), noon(date(2028, 3, 3)), runtime().config)

    boletos = session.scalars(select(Boleto)).all()
    assert [session.get(Invoice, b.invoice_id).subscription_id for b in boletos] == [second.id]
    refused = session.scalars(select(Invoice).where(Invoice.subscription_id == first.id)).all()
    assert [(i.kind, i.status) for i in refused if i.kind == "renewal"] == [("renewal", "open")]
    assert "refused the boleto" in caplog.text


def test_plain_card_renewals_are_handled_as_a_set_and_the_rest_one_by_one(session, billing_gateway):
    from jobs.renewals import Work, renew_many

    seed_plans(session)
    anchor = date(2027, 4, 10)
    plain = make_subscription(session, make_organization(session, 1), cycle="monthly", method="card", anchor=anchor)
    partly_credited = make_subscription(
        session, make_organization(session, 2), cycle="monthly", method="card", anchor=anchor, balance_cents=1_000
    )
    switching = make_subscription(
        session, make_organization(session, 3), cycle="annual", method="card", anchor=anchor.replace(year=2026, month=5)
    )
    switching.pending_payment_method = "boleto"
    ending = make_subscription(session, make_organization(session, 4), cycle="monthly", method="card", anchor=anchor)
    ending.cancel_at_period_end = True
    cardless = make_subscription(
        session, make_organization(session, 5, card_token=None), cycle="monthly", method="card", anchor=anchor
    )
    covered = make_subscription(
        session,
        make_organization(session, 6),
        cycle="monthly",
        method="card",
        anchor=anchor,
        balance_cents=MONTHLY_PRICE,
    )
    session.commit()
    ids = [plain.id, partly_credited.id, switching.id, ending.id, cardless.id, covered.id]
    on = date(2027, 5, 10)
    work = Work(on=on, now=noon(on), config=runtime().config, gateway=billing_gateway)

    left = renew_many(session, ids, work)
    session.commit()

    # Covered entirely by credit (an active subscription) is renewed as a set too: paid without a charge.
    assert left == [switching.id, ending.id, cardless.id]
    assert sorted(charge.request.amount_cents for charge in work.charges) == [MONTHLY_PRICE - 1_000, MONTHLY_PRICE]
    for subscription in (plain, partly_credited):
        session.refresh(subscription)
        assert (subscription.current_period_start, subscription.current_period_end) == (on, date(2027, 6, 10))
    assert partly_credited.balance_cents == 0
    from models.schema import LedgerEntry

    credit = session.scalars(
        select(LedgerEntry).where(
            LedgerEntry.subscription_id == partly_credited.id,
            LedgerEntry.kind == "credit_applied",
            LedgerEntry.invoice_id.in_(select(Invoice.id).where(Invoice.period_start == on)),
        )
    ).one()
    assert (credit.kind, credit.amount_cents) == ("credit_applied", -1_000)
    assert renew_many(session, ids, work) == ids  # a duplicate finds nothing left to renew as a set


def test_chunks_add_their_counts_per_task_and_keep_the_latest_failed_ids(session):
    from jobs.billing_day import FAILED_IDS_KEPT, claim_run, record_chunk
    from jobs.run_review import run_detail

    on = date(2027, 3, 15)
    claim_run(session, on)
    session.commit()
    record_chunk(session, on, "renew", done=3, failed_ids=[])
    record_chunk(session, on, "renew", done=2, failed_ids=[41, 42])
    record_chunk(session, on, "retry_charges", done=0, failed_ids=list(range(1, FAILED_IDS_KEPT + 11)))
    session.commit()

    detail = run_detail(session, on)
    tasks = {task.task: task for task in detail.tasks if task.done is not None}
    assert (detail.run.done_count, detail.run.failed_count) == (5, 2 + FAILED_IDS_KEPT + 10)
    assert (tasks["renew"].done, tasks["renew"].failed, tasks["renew"].failed_ids) == (5, 2, (41, 42))
    kept = tasks["retry_charges"].failed_ids
    assert len(kept) == FAILED_IDS_KEPT and kept[0] == 11 and kept[-1] == FAILED_IDS_KEPT + 10


def test_boletos_are_issued_as_a_set_each_invoice_getting_its_own_outcome(session, billing_gateway):
    from gateways.base import GatewayRejected
    from jobs.boletos import issue_boletos

    seed_plans(session)
    anchor = date(2027, 3, 10)
    organizations = [make_organization(session, n, card_token=None) for n in (1, 2, 3, 4)]
    organizations[3].document = None  # the gateway refuses a boleto without CPF/CNPJ
    live, voided, expired, refused = (
        make_subscription(session, organization, cycle="annual", method="boleto", anchor=anchor)
        for organization in organizations
    )
    session.commit()
    on = date(2028, 3, 3)
    run_day(session, billing_gateway, on, noon(on), runtime().config)

    def invoice_of(subscription: Subscription) -> Invoice:
        return session.scalars(
            select(Invoice).where(Invoice.subscription_id == subscription.id, Invoice.kind == "renewal")
        ).one()

    first = {s.id: session.scalars(select(Boleto).join(Invoice).where(Invoice.subscription_id == s.id)).all()
             for s in (live, voided, expired, refused)}  # fmt: skip
    assert [len(first[s.id]) for s in (live, voided, expired, refused)] == [1, 1, 1, 0]
    invoice_of(voided).status = "void"
    gone = first[expired.id][0]
    gone.status, gone.replaced_on = "expired", date(2028, 3, 20)
    session.commit()
    ids = [invoice_of(s).id for s in (live, voided, expired, refused)]
    notices_before = session.scalar(select(func.count()).select_from(Notification))

    outcomes = issue_boletos(session, billing_gateway, [*ids, ids[0]], config=runtime().config)

    assert list(outcomes) == ids
    assert outcomes[ids[0]].id == first[live.id][0].id  # already live: no second call
    assert outcomes[ids[1]] is None  # voided: needs none
    segunda_via = outcomes[ids[2]]
    assert (segunda_via.sequence, segunda_via.status) == (2, "issued")
    assert segunda_via.due_date == date(2028, 3, 20) + timedelta(days=runtime().config.boleto_due_days)
    assert isinstance(outcomes[ids[3]], GatewayRejected)
    kinds = session.scalars(select(Notification.dedupe_key).order_by(Notification.id).offset(notices_before)).all()
    assert kinds == [f"boleto_issued:{segunda_via.id}"]

    # Again: nothing more is issued or announced.
    again = issue_boletos(session, billing_gateway, ids, config=runtime().config)
    assert again[ids[2]].id == segunda_via.id
    assert session.scalar(select(func.count()).select_from(Boleto)) == 4
    assert session.scalar(select(func.count()).select_from(Notification)) == notices_before + 1
