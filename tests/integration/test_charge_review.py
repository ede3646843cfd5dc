"""On-call review of failed and ambiguous charges, and its audited actions, as the functions the CLI
and the ops console share: real PostgreSQL, the sandbox gateway process, the real daily run
(`run_day`), and a clean ledger check after each scenario.

Prices (tests.integration.factories): monthly R$ 49,90, annual R$ 479,00.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, date, datetime, timedelta

import pytest
from sqlalchemy import func, select, update

from jobs.audit import list_audit
from jobs.billing_day import TASKS, due_ids, run_day
from jobs.changes import submit_request
from jobs.charge_actions import mark_uncollectible, reconcile_now, retry_charge_now
from jobs.charge_review import NotFound, OnCallError, charge_detail, list_charges, local_midnight
from jobs.context import runtime
from jobs.run_review import list_runs, run_detail
from models.schema import AuditEvent, Boleto, Card, Charge, Invoice, Notification, Subscription
from tests.integration.factories import ANNUAL_PRICE, MONTHLY_PRICE, make_organization, make_subscription, noon
from tests.integration.test_billing_run import travel
from tests.integration.test_changes import payload
from tests.integration.test_money_edges import annual_boleto, boletos_of, renewal_of

pytestmark = pytest.mark.usefixtures("ledger_checked")

DAY = date(2027, 3, 15)  # a Monday: the renewal date of the monthly subscriptions below
ANCHOR = date(2027, 2, 15)


def config():
    return runtime().config


def declined_renewal(session, gateway, organization_id: int = 1, token: str = "tok_insufficient_funds"):
    """A monthly card subscription whose renewal on DAY was declined: (subscription, its charge)."""
    from tests.integration.factories import seed_plans

    if organization_id == 1:
        seed_plans(session)
    organization = make_organization(session, organization_id, card_token=token, name=f"Org {organization_id} Ltda")
    subscription = make_subscription(session, organization, cycle="monthly", method="card", anchor=ANCHOR)
    session.commit()
    run_day(session, gateway, DAY, noon(DAY), config())
    charge = session.scalars(
        select(Charge)
        .join(Invoice, Invoice.id == Charge.invoice_id)
        .where(Invoice.subscription_id == subscription.id, Invoice.kind == "renewal")
        .execution_options(populate_existing=True)
    ).one()
    return subscription, charge


def replace_card(session, organization_id: int, token: str = "tok_ok") -> None:
    session.execute(update(Card).where(Card.organization_id == organization_id).values(token=token, last4="5454"))
    session.commit()


def audit_events(session) -> list[AuditEvent]:
    return list(session.scalars(select(AuditEvent).order_by(AuditEvent.id).execution_options(populate_existing=True)))


def refreshed(session, model, row_id):
    return session.get_one(model, row_id, populate_existing=True)


class refused:
    """`with refused("invoice_paid"):` — the block raises an OnCallError with that code."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, traceback) -> bool:
        assert isinstance(error, OnCallError), f"expected a refusal {self.code!r}, got {error!r}"
        assert error.code == self.code, f"expected {self.code!r}, got {error.code!r}: {error.message}"
        return True


# --- listing ---------------------------------------------------------------------------------------


def test_listing_filters_by_status_date_code_and_organization(session, billing_gateway):
    subscription, soft = declined_renewal(session, billing_gateway, 1)
    _, other = declined_renewal(session, billing_gateway, 2, token="tok_do_not_honor")
    _, fine = declined_renewal(session, billing_gateway, 3, token="tok_ok")
    assert (soft.status, other.status, fine.status) == ("failed", "failed", "succeeded")
    # Charge 2 was made long ago, on Jan 10 (the listing's dates are the attempts' local dates).
    made = local_midnight(date(2020, 1, 10), runtime().config.timezone) + timedelta(hours=1)
    session.execute(update(Charge).where(Charge.id == other.id).values(created_at=made))
    session.commit()

    rows = list_charges(session)
    assert [row.id for row in rows] == [soft.id, other.id]  # newest first; the succeeded one is not for review
    row = rows[0]
    assert (row.organization_id, row.organization_name, row.subscription_id) == (1, "Org 1 Ltda", subscription.id)
    assert (row.invoice_kind, row.invoice_status, row.amount_cents, row.attempt) == (
        "renewal",
        "open",
        MONTHLY_PRICE,
        1,
    )
    assert (row.gateway_code, row.hard_decline, row.next_retry_on) == ("insufficient_funds", False, DAY + timedelta(1))

    assert [r.id for r in list_charges(session, decline_code="do_not_honor")] == [other.id]
    assert [r.id for r in list_charges(session, organization_id=1)] == [soft.id]
    assert [r.id for r in list_charges(session, since=date(2020, 1, 10), until=date(2020, 1, 10))] == [other.id]
    assert [r.id for r in list_charges(session, since=date(2020, 1, 11))] == [soft.id]
    assert [r.id for r in list_charges(session, until=date(2020, 1, 9))] == []
    assert [r.id for r in list_charges(session, statuses=["succeeded"])] == [fine.id]
    assert [r.id for r in list_charges(session, limit=1)] == [soft.id]
    assert [r.id for r in list_charges(session, limit=1, offset=1)] == [other.id]

    # A pending attempt is listed once it is stale — by the instant given, else the database's clock.
    pending = retry_charge_now(session, soft.id, actor="ana", reason="customer asked", now=noon(DAY), config=config())
    assert pending.status == "pending"
    assert pending.charge_id not in [r.id for r in list_charges(session)]  # sent just now: being charged
    assert pending.charge_id in [r.id for r in list_charges(session, now=noon(DAY))]
    assert [r.id for r in list_charges(session, statuses=["pending"], now=noon(DAY))] == [pending.charge_id]
    later = datetime.now().astimezone() + timedelta(minutes=3)
    assert [r.id for r in list_charges(session, statuses=["pending"], now=later)] == [pending.charge_id]

    with refused("invalid_status"):
        list_charges(session, statuses=["declined"])
    with refused("invalid_limit"):
        list_charges(session, limit=0)
    with refused("invalid_dates"):
        list_charges(session, since=date(2027, 3, 2), until=date(2027, 3, 1))
    # Settle the attempt left in flight, as the janitor would, so the scenario ends resolved.
    assert reconcile_now(session, billing_gateway, pending.charge_id, actor="ana", reason="tidy", now=noon(DAY),
                         config=config()).status == "failed"  # fmt: skip


# --- detail ----------------------------------------------------------------------------------------


def test_detail_has_every_attempt_and_the_timeline_in_time_order(session, billing_gateway, sandbox_gateway):
    subscription, declined = declined_renewal(session, billing_gateway)
    # A change request is stamped by the business clock, the rest by the database's: in a test that
    # replays 2027, the request is made "now" so that both clocks agree, as they do in production.
    body = payload("billing_cycle", subscription.id, to_cycle="annual")
    rejected = submit_request(session, billing_gateway, body, now=datetime.now(UTC), config=config())
    assert rejected is not None
    assert (rejected.status, rejected.error_code) == ("rejected", "outstanding_invoice")
    replace_card(session, 1)
    retry = retry_charge_now(
        session, declined.id, actor="ana", reason="cliente trocou o cartão", now=noon(DAY), config=config(),
        gateway=billing_gateway,
    )  # fmt: skip
    assert retry.status == "succeeded"

    detail = charge_detail(session, declined.id)
    assert detail.charge.id == declined.id and detail.charge.status == "failed"
    assert [(a.attempt, a.status, a.card_last4) for a in detail.attempts] == [
        (1, "failed", "4242"),
        (2, "succeeded", "5454"),
    ]
    assert detail.attempts[0].gateway_code == "insufficient_funds"
    assert detail.attempts[1].gateway_id
    assert (detail.invoice.id, detail.invoice.status, detail.invoice.total_cents) == (
        declined.invoice_id,
        "paid",
        MONTHLY_PRICE,
    )
    assert (detail.subscription.status, detail.subscription.cycle, detail.subscription.payment_method) == (
        "active",
        "monthly",
        "card",
    )
    assert detail.subscription.card is not None and detail.subscription.card.last4 == "5454"

    timeline = detail.timeline
    assert [entry.at for entry in timeline] == sorted(entry.at for entry in timeline)
    labels = [(entry.source, entry.kind) for entry in timeline]
    failed_notice = labels.index(("notice", "charge_failed"))
    change = labels.index(("change_request", "billing_cycle"))
    audited = labels.index(("audit", "charge.retry"))
    payment = labels.index(("ledger", "payment"))
    receipt = labels.index(("notice", "charge_succeeded"))
    assert labels[0] == ("ledger", "credit_granted")  # the factory's opening trail comes first
    assert failed_notice < change < audited < payment < receipt
    assert timeline[change].error_code == "outstanding_invoice" and timeline[change].status == "rejected"
    assert (timeline[audited].actor, timeline[audited].reason) == ("ana", "cliente trocou o cartão")
    assert timeline[payment].amount_cents == MONTHLY_PRICE
    # Notices say what and when, never to whom; change requests never carry their payload.
    assert "@" not in repr(detail)

    with pytest.raises(NotFound):
        charge_detail(session, 10**9)


# --- retry -----------------------------------------------------------------------------------------


def test_retry_after_the_card_was_replaced_charges_once_and_reactivates(session, billing_gateway, sandbox_gateway):
    subscription, declined = declined_renewal(session, billing_gateway)
    assert refreshed(session, Subscription, subscription.id).status == "past_due"
    replace_card(session, 1)
    before = sandbox_gateway.ledger()

    result = retry_charge_now(
        session, declined.id, actor="ana", reason="customer replaced the card", now=noon(DAY), config=config(),
        gateway=billing_gateway,
    )  # fmt: skip

    assert (result.attempt, result.status, result.invoice_status, result.subscription_status) == (
        2,
        "succeeded",
        "paid",
        "active",
    )
    new = [line for line in sandbox_gateway.ledger() if line not in before]
    assert [(line["idempotency_key"], line["amount_cents"]) for line in new] == [
        (f"charge:{declined.invoice_id}:2", MONTHLY_PRICE)
    ]
    assert refreshed(session, Charge, declined.id).next_retry_on is None  # dunning's retry is not made as well
    events = audit_events(session)
    assert [(e.actor, e.action, e.target_type, e.target_id, e.reason) for e in events] == [
        ("ana", "charge.retry", "charge", str(declined.id), "customer replaced the card")
    ]
    assert events[0].details["new_charge_id"] == result.charge_id

    # The next day's run has nothing left to retry, and a second retry is refused: the invoice is paid.
    run_day(session, billing_gateway, DAY + timedelta(1), noon(DAY + timedelta(1)), config())
    with refused("invoice_paid"):
        retry_charge_now(session, declined.id, actor="ana", reason="again", now=noon(DAY), config=config())
    assert session.scalar(select(func.count()).select_from(Charge)) == 2
    assert len(audit_events(session)) == 1


def test_retry_is_refused_while_an_attempt_is_in_flight_and_without_a_reason(session, billing_gateway):
    _, declined = declined_renewal(session, billing_gateway)
    with refused("reason_required"):
        retry_charge_now(session, declined.id, actor="ana", reason="   ", now=noon(DAY), config=config())
    with pytest.raises(NotFound):
        retry_charge_now(session, 10**9, actor="ana", reason="x", now=noon(DAY), config=config())

    # Without a gateway: phase 1 only, committed with its audit event; the call is for after the commit.
    started = retry_charge_now(session, declined.id, actor="ana", reason="first", now=noon(DAY), config=config())
    assert started.status == "pending"
    assert started.prepared.request.idempotency_key == f"charge:{declined.invoice_id}:2"
    assert refreshed(session, Charge, started.charge_id).status == "pending"

    with refused("charge_in_flight"):
        retry_charge_now(session, declined.id, actor="bia", reason="second", now=noon(DAY), config=config())
    with refused("charge_in_flight"):
        retry_charge_now(session, started.charge_id, actor="bia", reason="second", now=noon(DAY), config=config())
    assert [e.reason for e in audit_events(session)] == ["first"]

    # The attempt in flight is resolved by its key (the same card still declines).
    settled = reconcile_now(
        session, billing_gateway, started.charge_id, actor="bia", reason="janitor, by hand", now=noon(DAY),
        config=config(),
    )  # fmt: skip
    assert (settled.status_before, settled.status) == ("pending", "failed")
    assert [e.action for e in audit_events(session)] == ["charge.retry", "charge.reconcile"]


def test_a_hard_decline_is_retried_only_with_a_new_card(session, billing_gateway):
    _, declined = declined_renewal(session, billing_gateway, token="tok_expired")
    assert declined.hard_decline and declined.next_retry_on is None
    with refused("hard_decline"):
        retry_charge_now(session, declined.id, actor="ana", reason="try anyway", now=noon(DAY), config=config())
    replace_card(session, 1)
    result = retry_charge_now(
        session, declined.id, actor="ana", reason="new card", now=noon(DAY), config=config(), gateway=billing_gateway
    )
    assert (result.status, result.invoice_status) == ("succeeded", "paid")
    assert len(audit_events(session)) == 1


def test_retry_is_refused_for_a_charge_that_succeeded(session, billing_gateway):
    _, charge = declined_renewal(session, billing_gateway, token="tok_ok")
    with refused("charge_not_failed"):
        retry_charge_now(session, charge.id, actor="ana", reason="x", now=noon(DAY), config=config())
    assert audit_events(session) == []


# --- reconcile -------------------------------------------------------------------------------------


def test_reconcile_finds_a_timed_out_charge_at_the_gateway(session, billing_gateway, sandbox_gateway):
    with sandbox_gateway.configured(stall_ms=3000):
        subscription, charge = declined_renewal(session, billing_gateway, token="tok_timeout")
        assert charge.status == "unknown"
        assert [row.id for row in list_charges(session, statuses=["unknown"])] == [charge.id]
        with refused("reason_required"):
            reconcile_now(session, billing_gateway, charge.id, actor="ana", reason="", now=noon(DAY), config=config())

        result = reconcile_now(
            session, billing_gateway, charge.id, actor="ana", reason="gateway timed out", now=noon(DAY),
            config=config(),
        )  # fmt: skip
    assert (result.status_before, result.status, result.invoice_status) == ("unknown", "succeeded", "paid")
    assert len(sandbox_gateway.ledger(idempotency_key=charge.idempotency_key)) == 1
    assert session.scalar(select(func.count()).select_from(Charge)) == 1  # found, not charged again
    assert refreshed(session, Subscription, subscription.id).status == "active"
    with refused("charge_resolved"):
        reconcile_now(session, billing_gateway, charge.id, actor="ana", reason="again", now=noon(DAY), config=config())
    events = audit_events(session)
    assert [(e.actor, e.action, e.target_id, e.reason) for e in events] == [
        ("ana", "charge.reconcile", str(charge.id), "gateway timed out")
    ]
    assert events[0].details["status_before"] == "unknown"


# --- uncollectible ---------------------------------------------------------------------------------


def test_uncollectible_card_invoice_ends_dunning_and_suspends(session, billing_gateway):
    subscription, declined = declined_renewal(session, billing_gateway)
    assert declined.next_retry_on == DAY + timedelta(1)
    with refused("reason_required"):
        mark_uncollectible(session, declined.invoice_id, actor="ana", reason=" ", now=noon(DAY), config=config())

    result = mark_uncollectible(
        session, declined.invoice_id, actor="ana", reason="empresa encerrou as atividades", now=noon(DAY),
        config=config(), gateway=billing_gateway,
    )  # fmt: skip

    assert (result.subscription_status_before, result.subscription_status) == ("past_due", "suspended")
    assert result.retries_cancelled == (declined.id,)
    assert refreshed(session, Invoice, declined.invoice_id).status == "uncollectible"
    assert refreshed(session, Charge, declined.id).next_retry_on is None
    notice = session.scalars(select(Notification).where(Notification.kind == "subscription_suspended")).one()
    assert notice.context["reason"] == "uncollectible"
    from jobs.notifications import render

    text = render(notice, "Org 1 Ltda").text
    assert "não será mais cobrada" in text
    assert "faremos uma nova tentativa" not in text and "reativada automaticamente" not in text

    # The following days: no retry is scanned or made, no suspension, and no renewal while suspended.
    for task in ("retry_charges", "suspend_cards"):
        assert due_ids(session, TASKS[task], DAY + timedelta(7), config()) == []
    travel(session, billing_gateway, DAY + timedelta(1), DAY + timedelta(35))
    assert session.scalar(select(func.count()).select_from(Charge)) == 1
    assert session.scalar(select(func.count()).where(Invoice.kind == "renewal")) == 1
    assert refreshed(session, Subscription, subscription.id).status == "suspended"
    assert run_detail(session, DAY + timedelta(1)).run.status == "done"

    with refused("invoice_uncollectible"):
        mark_uncollectible(session, declined.invoice_id, actor="ana", reason="again", now=noon(DAY), config=config())
    events = audit_events(session)
    assert [(e.actor, e.action, e.target_type, e.target_id, e.reason) for e in events] == [
        ("ana", "invoice.uncollectible", "invoice", str(declined.invoice_id), "empresa encerrou as atividades")
    ]


def test_uncollectible_boleto_invoice_cancels_its_boleto_at_the_gateway(session, billing_gateway, sandbox_gateway):
    subscription = annual_boleto(session)
    renewal = date(2028, 3, 10)  # a Friday: payable that day, past due from the next
    travel(session, billing_gateway, renewal - timedelta(days=7), renewal)
    invoice = renewal_of(session, subscription.id, renewal)
    (boleto,) = boletos_of(session, subscription.id)
    with refused("invoice_not_past_due"):
        mark_uncollectible(session, invoice.id, actor="ana", reason="x", now=noon(renewal), config=config())

    on = renewal + timedelta(days=3)
    travel(session, billing_gateway, renewal + timedelta(1), on)
    assert refreshed(session, Subscription, subscription.id).status == "past_due"
    result = mark_uncollectible(
        session, invoice.id, actor="ana", reason="cliente não vai pagar", now=noon(on), config=config(),
        gateway=billing_gateway,
    )  # fmt: skip

    assert result.boletos_canceled == (boleto.gateway_id,)
    assert refreshed(session, Boleto, boleto.id).status == "canceled"
    assert sandbox_gateway.boleto(boleto.gateway_id)["status"] == "canceled"
    assert (result.subscription_status, result.total_cents) == ("suspended", ANNUAL_PRICE)
    notice = session.scalars(select(Notification).where(Notification.kind == "subscription_suspended")).one()
    assert notice.context.get("digitable_line") is None  # no boleto to pay is offered

    # No segunda via, no further dunning, nothing renewed.
    travel(session, billing_gateway, on + timedelta(1), on + timedelta(20))
    assert len(boletos_of(session, subscription.id)) == 1
    assert refreshed(session, Invoice, invoice.id).status == "uncollectible"
    assert len(audit_events(session)) == 1


def test_uncollectible_is_refused_for_paid_and_unknown_invoices_and_while_a_charge_is_in_flight(
    session, billing_gateway
):
    subscription, declined = declined_renewal(session, billing_gateway)
    paid = session.scalars(
        select(Invoice).where(Invoice.subscription_id == subscription.id, Invoice.status == "paid")
    ).one()
    with refused("invoice_paid"):
        mark_uncollectible(session, paid.id, actor="ana", reason="x", now=noon(DAY), config=config())
    with pytest.raises(NotFound):
        mark_uncollectible(session, 10**9, actor="ana", reason="x", now=noon(DAY), config=config())

    in_flight = retry_charge_now(session, declined.id, actor="ana", reason="retry", now=noon(DAY), config=config())
    with refused("charge_in_flight"):
        mark_uncollectible(session, declined.invoice_id, actor="ana", reason="x", now=noon(DAY), config=config())
    assert [e.action for e in audit_events(session)] == ["charge.retry"]
    assert refreshed(session, Invoice, declined.invoice_id).status == "open"
    reconcile_now(session, billing_gateway, in_flight.charge_id, actor="ana", reason="settle", now=noon(DAY),
                  config=config())  # fmt: skip


def test_uncollectible_takes_the_oldest_open_invoice_first(session, billing_gateway):
    # Retries far apart: still past due (not suspended) at the next renewal, which is invoiced too.
    patient = replace(config(), dunning_retry_days=(1, 3, 5, 40))
    subscription, declined = declined_renewal(session, billing_gateway)
    next_renewal = date(2027, 4, 15)
    for day in range(1, (next_renewal - DAY).days + 1):
        run_day(session, billing_gateway, DAY + timedelta(day), noon(DAY + timedelta(day)), patient)
    newer = renewal_of(session, subscription.id, next_renewal)
    assert newer is not None and newer.status == "open"
    assert refreshed(session, Subscription, subscription.id).status == "past_due"

    with refused("older_invoice_open"):
        mark_uncollectible(session, newer.id, actor="ana", reason="x", now=noon(next_renewal), config=patient)
    older = mark_uncollectible(
        session, declined.invoice_id, actor="ana", reason="old debt", now=noon(next_renewal), config=patient
    )
    assert older.subscription_status == "suspended"
    newest = mark_uncollectible(
        session, newer.id, actor="ana", reason="new debt", now=noon(next_renewal), config=patient
    )
    assert (newest.subscription_status_before, newest.subscription_status) == ("suspended", "suspended")
    assert [e.reason for e in audit_events(session)] == ["old debt", "new debt"]
    assert session.scalar(select(func.count()).where(Notification.kind == "subscription_suspended")) == 1


# --- runs and the audit log ------------------------------------------------------------------------


def test_runs_and_the_audit_log(session, billing_gateway):
    _, declined = declined_renewal(session, billing_gateway)
    run_day(session, billing_gateway, DAY + timedelta(1), noon(DAY + timedelta(1)), config())

    assert [(run.run_date, run.status) for run in list_runs(session, 10)] == [
        (DAY + timedelta(1), "done"),
        (DAY, "done"),
    ]
    detail = run_detail(session, DAY)
    tasks = {task.task: task for task in detail.tasks}
    assert tasks["renew"].done == 1 and list(tasks) == list(TASKS)
    assert run_detail(session, DAY + timedelta(1)).run.done_count == 1  # the retry on T + 1
    with pytest.raises(NotFound):
        run_detail(session, date(2030, 1, 1))

    replace_card(session, 1)
    retry_charge_now(
        session, declined.id, actor="ana", reason="r1", now=noon(DAY), config=config(), gateway=billing_gateway
    )
    session.add(AuditEvent(actor="bia", action="refund.mark_paid", target_type="refund", target_id="7", reason="r2"))
    session.add(AuditEvent(actor="bia", action="charges", target_type="charge", target_id="1", reason="not a family"))
    session.commit()

    assert [row.reason for row in list_audit(session)] == ["not a family", "r2", "r1"]
    assert [row.reason for row in list_audit(session, actor="ana")] == ["r1"]
    assert [row.reason for row in list_audit(session, action="charge")] == ["r1"]
    assert [row.reason for row in list_audit(session, action="charge.retry")] == ["r1"]
    assert [row.reason for row in list_audit(session, target_type="refund", target_id="7")] == ["r2"]
    assert [row.reason for row in list_audit(session, limit=1)] == ["not a family"]
    assert list_audit(session, since=datetime.now().astimezone() + timedelta(hours=1)) == []
    assert list_audit(session, actor="ana")[0].details["new_charge_id"] > declined.id


def test_an_unresolved_charge_is_owned_by_one_reconciliation_at_a_time(session, billing_gateway):
    from jobs.payments import RECONCILE_LEASE, claim_unresolved_charges
    from workers.db import get_session_factory

    _, charge = declined_renewal(session, billing_gateway)
    session.execute(update(Charge).where(Charge.id == charge.id).values(status="unknown"))
    session.commit()
    now = noon(DAY)
    with get_session_factory()() as first, get_session_factory()() as second:
        assert claim_unresolved_charges(first, now) == [charge.id]
        assert claim_unresolved_charges(second, now) == []  # being claimed by the first: skipped
        first.commit()
        assert claim_unresolved_charges(second, now + RECONCILE_LEASE / 2) == []  # leased to the first
        second.rollback()
    # The lease lapses (the message was lost, or the gateway could not answer): the next tick claims it.
    assert claim_unresolved_charges(session, now + RECONCILE_LEASE) == [charge.id]
    session.commit()
