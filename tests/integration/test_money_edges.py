"""Money is never kept or lost at the edges: paid periods that never started, expired boletos,
suspension then cancellation, charges in flight, refunds. Each scenario runs through the real daily
run (`run_day`: the same scans and handlers as the fanned-out run) and the change-request functions,
against real PostgreSQL and the sandbox gateway process, and ends with a clean ledger check.

Prices (tests.integration.factories): monthly R$ 49,90, annual R$ 479,00.
"""

from __future__ import annotations

from datetime import date, timedelta

import pytest
from sqlalchemy import select

from jobs.boletos import record_boleto_expired, record_boleto_payment
from jobs.changes import process_request
from jobs.payments import reconcile_charge
from jobs.refunds import execute_refund, mark_payout_paid
from models.proration import quote_cycle_change
from models.schema import AuditEvent, Boleto, ChangeRequest, Charge, Invoice, Notification, Refund, Subscription
from tests.integration.factories import (
    ANNUAL_PRICE,
    MONTHLY_PRICE,
    make_organization,
    make_subscription,
    noon,
    seed_plans,
)
from tests.integration.test_billing_run import travel
from tests.integration.test_changes import CONFIG, ledger_of, payload, setup_organization, submit, subscription_for

pytestmark = pytest.mark.usefixtures("ledger_checked")

ANCHOR = date(2027, 3, 10)
RENEWAL = date(2028, 3, 10)  # a Friday; the year before it has 366 days (Feb 29, 2028)


def annual_boleto(session, *, balance_cents: int = 0, card_token: str | None = "tok_ok") -> Subscription:
    organization = setup_organization(session, card_token=card_token)
    subscription = make_subscription(
        session, organization, cycle="annual", method="boleto", anchor=ANCHOR, balance_cents=balance_cents
    )
    session.commit()
    return subscription


def boletos_of(session, subscription_id: int) -> list[Boleto]:
    return list(
        session.scalars(
            select(Boleto)
            .join(Invoice, Invoice.id == Boleto.invoice_id)
            .where(Invoice.subscription_id == subscription_id)
            .order_by(Boleto.id)
            .execution_options(populate_existing=True)
        )
    )


def renewal_of(session, subscription_id: int, period_start: date) -> Invoice:
    return session.scalars(
        select(Invoice)
        .where(
            Invoice.subscription_id == subscription_id,
            Invoice.kind == "renewal",
            Invoice.period_start == period_start,
            Invoice.status != "void",
        )
        .order_by(Invoice.id.desc())
        .execution_options(populate_existing=True)
    ).first()


def pay(session, sandbox_gateway, boleto: Boleto, on: date, amount_cents: int | None = None) -> str:
    """The gateway's `boleto.paid`: paid at the sandbox, then recorded as its webhook would be."""
    amount = boleto.amount_cents if amount_cents is None else amount_cents
    sandbox_gateway.pay_boleto(boleto.gateway_id, paid_on=on, amount_cents=amount)
    outcome = record_boleto_payment(session, boleto.gateway_id, amount_cents=amount, paid_on=on, now=noon(on))
    session.commit()
    return outcome


def refunds_of(session, subscription_id: int) -> list[Refund]:
    return list(
        session.scalars(
            select(Refund)
            .where(Refund.subscription_id == subscription_id)
            .order_by(Refund.id)
            .execution_options(populate_existing=True)
        )
    )


def kinds_of(session, subscription_id: int) -> list[str]:
    return list(
        session.scalars(
            select(Notification.kind).where(Notification.subscription_id == subscription_id).order_by(Notification.id)
        )
    )


def expected_quote(*, paid: int, balance: int, on: date, start: date = ANCHOR, end: date = RENEWAL):
    return quote_cycle_change(
        from_cycle="annual",
        to_cycle="monthly",
        period_start=start,
        period_end=end,
        paid_cents=paid,
        balance_cents=balance,
        on=on,
        monthly_price_cents=MONTHLY_PRICE,
        annual_price_cents=ANNUAL_PRICE,
    )


# --- 1, 2: a paid period that never started is credit in full --------------------------------------


def test_renewal_paid_early_then_annual_to_monthly_returns_the_whole_year(session, billing_gateway, sandbox_gateway):
    subscription = annual_boleto(session)
    travel(session, billing_gateway, RENEWAL - timedelta(days=7), RENEWAL - timedelta(days=7))
    (boleto,) = boletos_of(session, subscription.id)
    assert pay(session, sandbox_gateway, boleto, date(2028, 3, 5)) == "paid"
    early = renewal_of(session, subscription.id, RENEWAL)
    assert early.status == "paid"

    on = date(2028, 3, 7)
    request = submit(session, billing_gateway, payload("billing_cycle", subscription.id, to_cycle="monthly"), on)

    assert request.status == "applied", request.error_message
    # 393 = round(47 900 × 3/366) of the current year, plus the whole paid renewal.
    assert request.result["credit_cents"] == 393 + ANNUAL_PRICE
    assert request.result["unused_paid_invoice_ids"] == [early.id]
    quote = expected_quote(paid=ANNUAL_PRICE, balance=ANNUAL_PRICE, on=on)
    session.refresh(subscription)
    assert (subscription.cycle, subscription.payment_method) == ("monthly", "card")
    assert subscription.current_period_end == quote.new_period_end == date(2028, 12, 28)
    assert subscription.balance_cents == quote.balance_after_cents == 3
    assert renewal_of(session, subscription.id, RENEWAL) is None  # voided: no paid year is left unused
    assert ("unused_period_credit", ANNUAL_PRICE, early.id) in ledger_of(session, subscription.id)

    # The voided year is never billed nor renewed; the next renewal is the extended date, by card.
    travel(session, billing_gateway, date(2028, 3, 8), date(2028, 3, 12))
    travel(session, billing_gateway, date(2028, 12, 28), date(2028, 12, 28))
    renewal = renewal_of(session, subscription.id, date(2028, 12, 28))
    assert (renewal.status, renewal.total_cents, renewal.discount_cents) == ("paid", MONTHLY_PRICE - 3, 3)


def test_renewal_covered_by_credit_then_annual_to_monthly_loses_no_credit(session, billing_gateway):
    subscription = annual_boleto(session, balance_cents=50_000)
    travel(session, billing_gateway, RENEWAL - timedelta(days=7), RENEWAL - timedelta(days=7))
    early = renewal_of(session, subscription.id, RENEWAL)
    assert (early.status, early.total_cents, early.discount_cents) == ("paid", 0, ANNUAL_PRICE)
    session.refresh(subscription)
    assert subscription.balance_cents == 50_000 - ANNUAL_PRICE
    assert boletos_of(session, subscription.id) == []  # nothing to pay: no boleto

    on = RENEWAL - timedelta(days=3)
    request = submit(session, billing_gateway, payload("billing_cycle", subscription.id, to_cycle="monthly"), on)

    assert request.status == "applied", request.error_message
    assert request.result["credit_cents"] == 393 + 50_000
    quote = expected_quote(paid=ANNUAL_PRICE, balance=50_000, on=on)
    session.refresh(subscription)
    assert subscription.current_period_end == quote.new_period_end
    assert subscription.balance_cents == quote.balance_after_cents
    assert renewal_of(session, subscription.id, RENEWAL) is None


# --- 3: cancel after the renewal was paid ----------------------------------------------------------


def test_cancel_after_the_renewal_boleto_was_paid_refunds_the_year(session, billing_gateway, sandbox_gateway):
    subscription = annual_boleto(session)
    travel(session, billing_gateway, RENEWAL - timedelta(days=7), RENEWAL - timedelta(days=7))
    (boleto,) = boletos_of(session, subscription.id)
    pay(session, sandbox_gateway, boleto, RENEWAL - timedelta(days=5))
    request = submit(session, billing_gateway, payload("cancel", subscription.id), RENEWAL - timedelta(days=3))
    assert request.status == "applied" and request.result["ends_on"] == RENEWAL.isoformat()

    travel(session, billing_gateway, RENEWAL - timedelta(days=2), RENEWAL + timedelta(days=1))

    session.refresh(subscription)
    assert (subscription.status, subscription.balance_cents) == ("canceled", 0)
    early = session.get_one(Invoice, boleto.invoice_id, populate_existing=True)
    assert early.status == "void"
    # Boleto money cannot go back through the gateway: a payout for on-call, announced to the payers.
    (refund,) = refunds_of(session, subscription.id)
    assert (refund.method, refund.status, refund.amount_cents, refund.charge_id) == (
        "payout",
        "pending",
        ANNUAL_PRICE,
        None,
    )
    entries = ledger_of(session, subscription.id)
    assert ("unused_period_credit", ANNUAL_PRICE, early.id) in entries
    assert ("refund", -ANNUAL_PRICE, None) in entries
    assert "refund_created" in kinds_of(session, subscription.id)
    canceled = session.scalars(select(Notification).where(Notification.kind == "subscription_canceled")).one()
    assert canceled.context["credit_cents"] == ANNUAL_PRICE  # "will be refunded", with the amount

    closed = mark_payout_paid(
        session, refund.id, reference="TED 123", reason="paid to the owner's account", actor="oncall", now=noon(RENEWAL)
    )
    session.commit()
    assert (closed.status, closed.reference) == ("paid", "TED 123")
    audit = session.scalars(select(AuditEvent).where(AuditEvent.action == "refund.mark_paid")).one()
    assert (audit.actor, audit.target_id, audit.reason) == ("oncall", str(refund.id), "paid to the owner's account")


def test_cancel_after_the_renewal_was_covered_by_credit_refunds_the_credit(session, billing_gateway):
    subscription = annual_boleto(session, balance_cents=50_000)
    travel(session, billing_gateway, RENEWAL - timedelta(days=7), RENEWAL - timedelta(days=7))
    submit(session, billing_gateway, payload("cancel", subscription.id), RENEWAL - timedelta(days=3))

    travel(session, billing_gateway, RENEWAL, RENEWAL)

    session.refresh(subscription)
    assert (subscription.status, subscription.balance_cents) == ("canceled", 0)
    assert renewal_of(session, subscription.id, RENEWAL) is None
    assert sum(refund.amount_cents for refund in refunds_of(session, subscription.id)) == 50_000


def test_resume_keeps_the_paid_renewal(session, billing_gateway, sandbox_gateway):
    """The neighbour of 3: a cancellation undone before T leaves the paid year in place."""
    subscription = annual_boleto(session)
    travel(session, billing_gateway, RENEWAL - timedelta(days=7), RENEWAL - timedelta(days=7))
    (boleto,) = boletos_of(session, subscription.id)
    pay(session, sandbox_gateway, boleto, RENEWAL - timedelta(days=5))
    submit(session, billing_gateway, payload("cancel", subscription.id), RENEWAL - timedelta(days=3))
    submit(session, billing_gateway, payload("resume", subscription.id), RENEWAL - timedelta(days=2))

    travel(session, billing_gateway, RENEWAL, RENEWAL)

    session.refresh(subscription)
    assert (subscription.status, subscription.current_period_start) == ("active", RENEWAL)
    assert renewal_of(session, subscription.id, RENEWAL).status == "paid"
    assert refunds_of(session, subscription.id) == []


# --- 4: an expired boleto never stops dunning ----------------------------------------------------------


def test_an_expired_boleto_gets_a_segunda_via_and_dunning_keeps_its_dates(session, billing_gateway, sandbox_gateway):
    subscription = annual_boleto(session)
    travel(session, billing_gateway, RENEWAL - timedelta(days=7), RENEWAL)
    (first,) = boletos_of(session, subscription.id)
    sandbox_gateway.expire_boleto(first.gateway_id)
    assert record_boleto_expired(session, first.gateway_id, on=RENEWAL + timedelta(days=1)) == "expired_reissuing"
    session.commit()

    travel(session, billing_gateway, RENEWAL + timedelta(days=1), RENEWAL + timedelta(days=1))
    first, second = boletos_of(session, subscription.id)
    assert (first.status, second.sequence, second.invoice_id) == ("expired", 2, first.invoice_id)
    # Due three days after the expiry; overdue from the original due date all the same.
    assert second.due_date == date(2028, 3, 14)
    assert (second.status, second.overdue_on) == ("overdue", date(2028, 3, 11))
    session.refresh(subscription)
    assert subscription.status == "past_due"
    reissued = session.scalars(
        select(Notification).where(Notification.dedupe_key == f"boleto_issued:{second.id}")
    ).one()
    assert reissued.context["purpose"] == "reissue"
    assert reissued.context["digitable_line"] == second.digitable_line

    travel(session, billing_gateway, date(2028, 3, 12), RENEWAL + timedelta(days=40))
    session.refresh(subscription)
    assert subscription.status == "suspended"
    assert subscription.suspended_at is not None and subscription.suspended_at.date() == date(2028, 3, 15)

    pay(session, sandbox_gateway, second, date(2028, 4, 25))
    session.refresh(subscription)
    assert subscription.status == "active"
    assert (subscription.current_period_start, subscription.current_period_end) == (
        date(2028, 4, 25),
        date(2029, 4, 25),
    )


def test_a_member_asks_for_a_segunda_via(session, billing_gateway, sandbox_gateway):
    subscription = annual_boleto(session)
    travel(session, billing_gateway, RENEWAL - timedelta(days=7), RENEWAL - timedelta(days=7))
    (first,) = boletos_of(session, subscription.id)

    on = RENEWAL - timedelta(days=2)
    request = submit(session, billing_gateway, payload("reissue_boleto", subscription.id), on)

    assert request.status == "applied", request.error_message
    first, second = boletos_of(session, subscription.id)
    assert (first.status, first.replaced_on) == ("canceled", on)
    assert (second.status, second.due_date, second.amount_cents) == ("issued", on + timedelta(days=3), ANNUAL_PRICE)
    assert request.result["boleto"]["digitable_line"] == second.digitable_line
    assert request.result["replaced_boleto_id"] == first.id
    # The renewal's due date (and so its dunning) is still T.
    assert renewal_of(session, subscription.id, RENEWAL).due_date == RENEWAL
    # A payment of the old boleto, should it still arrive, pays the invoice; the new one is cancelled.
    assert pay(session, sandbox_gateway, first, on) == "paid"
    assert [boleto.status for boleto in boletos_of(session, subscription.id)] == ["paid", "canceled"]


def test_a_segunda_via_without_an_open_boleto_is_refused(session, billing_gateway):
    organization = setup_organization(session)
    subscription = subscription_for(session, organization, cycle="annual", method="boleto", start=ANCHOR)
    session.commit()

    request = submit(session, billing_gateway, payload("reissue_boleto", subscription.id), date(2027, 6, 1))

    assert (request.status, request.error_code) == ("rejected", "no_open_boleto")
    assert "segunda via" in request.error_message


# --- 5: suspended, cancelled, and the old boleto paid a year later ---------------------------------------


def test_cancel_while_suspended_voids_the_debt_and_a_late_payment_is_refunded(
    session, billing_gateway, sandbox_gateway
):
    subscription = annual_boleto(session)
    travel(session, billing_gateway, RENEWAL - timedelta(days=7), RENEWAL - timedelta(days=7))
    travel(session, billing_gateway, date(2028, 3, 15), date(2028, 3, 15))  # caught up: suspended
    session.refresh(subscription)
    assert subscription.status == "suspended"
    (boleto,) = boletos_of(session, subscription.id)

    request = submit(session, billing_gateway, payload("cancel", subscription.id), date(2028, 4, 1))

    assert request.status == "applied" and request.result["ends_on"] == "2028-04-01"
    session.refresh(subscription)
    assert (subscription.status, subscription.balance_cents) == ("canceled", 0)
    invoice = session.get_one(Invoice, boleto.invoice_id, populate_existing=True)
    assert invoice.status == "void"  # nothing is owed for a year never served
    canceled = session.scalars(select(Notification).where(Notification.kind == "subscription_canceled")).one()
    assert canceled.context["voided_invoice_ids"] == [invoice.id]
    assert boletos_of(session, subscription.id)[0].status == "canceled"

    # A year later the old boleto is paid anyway (the gateway had not cancelled it yet): refunded.
    assert pay(session, sandbox_gateway, boleto, date(2029, 4, 10)) == "credited"
    session.refresh(subscription)
    assert (subscription.status, subscription.balance_cents) == ("canceled", 0)
    assert invoice.status == "void"
    (refund,) = refunds_of(session, subscription.id)
    assert (refund.method, refund.amount_cents, refund.status) == ("payout", ANNUAL_PRICE, "pending")


# --- 6: cancel while an upgrade charge is in flight ------------------------------------------------------


def test_cancel_waits_for_an_upgrade_charge_in_flight(session, billing_gateway, sandbox_gateway):
    organization = setup_organization(session, card_token="tok_timeout")
    subscription = subscription_for(session, organization, cycle="monthly", method="card", start=date(2025, 3, 1))
    session.commit()
    on = date(2025, 3, 31)
    upgrade = submit(session, billing_gateway, payload("billing_cycle", subscription.id, to_cycle="annual"), on)
    assert upgrade.status == "pending"
    charge = session.scalars(select(Charge).where(Charge.status == "unknown")).one()

    cancel = submit(session, billing_gateway, payload("cancel", subscription.id), on)
    assert (cancel.status, cancel.error_code) == ("pending", None)
    travel(session, billing_gateway, date(2025, 4, 1), date(2025, 4, 1))
    session.refresh(subscription)
    assert (subscription.status, subscription.cycle) == ("active", "monthly")  # neither ended nor renewed

    assert reconcile_charge(session, billing_gateway, charge.id, now=noon(on), config=CONFIG) == "succeeded"
    assert process_request(session, billing_gateway, cancel.id, on=on, now=noon(on), config=CONFIG) == "applied"
    session.expire_all()
    subscription = session.get_one(Subscription, subscription.id)
    # The year was paid (47 900 − the unused March credit): it is served, then ends.
    assert (subscription.cycle, subscription.cancel_at_period_end) == ("annual", True)
    assert session.get_one(ChangeRequest, cancel.id).result["ends_on"] == "2026-03-31"
    assert len(sandbox_gateway.ledger(idempotency_key=charge.idempotency_key)) == 1


# --- 7: a boleto issued for an invoice voided during the gateway call -------------------------------------


class VoidsDuringTheCall:
    """The sandbox gateway, with a cycle change to monthly landing while a boleto is being issued."""

    def __init__(self, gateway, subscription_id: int, on: date) -> None:
        self.gateway, self.subscription_id, self.on = gateway, subscription_id, on

    def __getattr__(self, name: str):
        return getattr(self.gateway, name)

    def issue_boleto_many(self, issues):
        issued = self.gateway.issue_boleto_many(issues)
        self._change_to_monthly()
        return issued

    def issue_boleto(self, *args, **kwargs):
        issued = self.gateway.issue_boleto(*args, **kwargs)
        self._change_to_monthly()
        return issued

    def _change_to_monthly(self) -> None:
        from workers.db import get_session_factory

        with get_session_factory()() as other:
            body = payload("billing_cycle", self.subscription_id, to_cycle="monthly")
            assert submit(other, self.gateway, body, self.on).status == "applied"


def test_a_boleto_issued_for_an_invoice_voided_meanwhile_is_cancelled_and_not_announced(
    session, worker, billing_gateway, sandbox_gateway
):
    from tests.integration.conftest import wait_until

    subscription = annual_boleto(session)
    on = RENEWAL - timedelta(days=7)
    racing = VoidsDuringTheCall(billing_gateway, subscription.id, on)

    travel(session, racing, on, on)

    (boleto,) = boletos_of(session, subscription.id)
    assert boleto.status == "canceled"
    assert session.get_one(Invoice, boleto.invoice_id, populate_existing=True).status == "void"
    assert "boleto_issued" not in kinds_of(session, subscription.id)
    wait_until(lambda: sandbox_gateway.boleto(boleto.gateway_id)["status"] == "canceled")


# --- 8, 9: reactivation from suspended restarts the period at the payment ----------------------------------


def test_a_subscribe_boleto_paid_after_its_period_ended_starts_a_new_year(session, billing_gateway, sandbox_gateway):
    setup_organization(session, card_token=None)
    session.commit()
    request = submit(session, billing_gateway, payload("subscribe", cycle="annual", payment_method="boleto"), ANCHOR)
    assert request.status == "applied"
    subscription = session.get_one(Subscription, request.subscription_id)
    travel(session, billing_gateway, date(2027, 3, 20), date(2027, 3, 20))
    session.refresh(subscription)
    assert subscription.status == "suspended"
    (boleto,) = boletos_of(session, subscription.id)

    paid_on = date(2028, 4, 10)
    assert pay(session, sandbox_gateway, boleto, paid_on) == "paid"
    travel(session, billing_gateway, paid_on, paid_on)

    session.refresh(subscription)
    assert subscription.status == "active"
    assert (subscription.current_period_start, subscription.current_period_end) == (paid_on, date(2029, 4, 10))
    assert subscription.billing_anchor == paid_on
    invoices = session.scalars(select(Invoice).where(Invoice.subscription_id == subscription.id)).all()
    assert [(invoice.kind, invoice.period_start, invoice.status) for invoice in invoices] == [
        ("subscribe", paid_on, "paid")
    ]  # no second year billed the same day


def test_reactivation_from_suspended_restarts_even_inside_the_period(session, billing_gateway, sandbox_gateway):
    seed_plans(session)
    organization = make_organization(session, card_token="tok_stolen")  # a hard decline: no retries
    subscription = make_subscription(session, organization, cycle="annual", method="card", anchor=ANCHOR)
    session.commit()
    travel(session, billing_gateway, RENEWAL, RENEWAL)
    travel(session, billing_gateway, RENEWAL + timedelta(days=7), RENEWAL + timedelta(days=7))
    session.refresh(subscription)
    assert subscription.status == "suspended" and subscription.current_period_end == date(2029, 3, 10)

    paid_on = date(2028, 5, 2)  # the year it was billed for has not ended
    body = payload("card", token="tok_ok", brand="visa", last4="4242", exp_month=12, exp_year=2035)
    assert submit(session, billing_gateway, body, paid_on).status == "applied"

    session.refresh(subscription)
    assert subscription.status == "active"
    assert (subscription.current_period_start, subscription.current_period_end) == (paid_on, date(2029, 5, 2))
    assert subscription.billing_anchor == paid_on


def test_a_past_due_payment_keeps_the_period(session, billing_gateway, sandbox_gateway):
    """The neighbour of 9: service never stopped, so the period stays anchored."""
    subscription = annual_boleto(session)
    travel(session, billing_gateway, RENEWAL - timedelta(days=7), RENEWAL + timedelta(days=1))
    session.refresh(subscription)
    assert subscription.status == "past_due"
    (boleto,) = boletos_of(session, subscription.id)
    pay(session, sandbox_gateway, boleto, date(2028, 3, 13))
    session.refresh(subscription)
    assert subscription.status == "active"
    assert (subscription.current_period_start, subscription.current_period_end) == (RENEWAL, date(2029, 3, 10))


# --- amounts paid that differ from the boleto ----------------------------------------------------------------


def test_an_overpaid_boleto_leaves_the_difference_as_credit(session, billing_gateway, sandbox_gateway):
    subscription = annual_boleto(session)
    travel(session, billing_gateway, RENEWAL - timedelta(days=7), RENEWAL - timedelta(days=7))
    (boleto,) = boletos_of(session, subscription.id)

    assert (
        pay(session, sandbox_gateway, boleto, RENEWAL - timedelta(days=1), amount_cents=ANNUAL_PRICE + 1_000)
        == "paid_over"
    )

    session.refresh(subscription)
    assert subscription.balance_cents == 1_000
    assert renewal_of(session, subscription.id, RENEWAL).status == "paid"


def test_an_underpaid_boleto_stays_open_for_the_rest_with_a_segunda_via(session, billing_gateway, sandbox_gateway):
    subscription = annual_boleto(session)
    travel(session, billing_gateway, RENEWAL - timedelta(days=7), RENEWAL - timedelta(days=7))
    (boleto,) = boletos_of(session, subscription.id)

    on = RENEWAL - timedelta(days=2)
    assert pay(session, sandbox_gateway, boleto, on, amount_cents=40_000) == "underpaid"
    travel(session, billing_gateway, RENEWAL - timedelta(days=1), RENEWAL - timedelta(days=1))

    invoice = renewal_of(session, subscription.id, RENEWAL)
    assert (invoice.status, invoice.total_cents) == ("open", ANNUAL_PRICE - 40_000)
    first, rest = boletos_of(session, subscription.id)
    assert (first.status, rest.status, rest.amount_cents) == ("paid", "issued", ANNUAL_PRICE - 40_000)
    assert rest.due_date == on + timedelta(days=3)
    assert pay(session, sandbox_gateway, rest, RENEWAL) == "paid"
    session.refresh(subscription)
    assert (subscription.status, subscription.balance_cents) == ("active", 0)


# --- refunds by card -------------------------------------------------------------------------------------------


def test_an_ended_balance_from_card_money_is_refunded_through_the_gateway(session, billing_gateway, sandbox_gateway):
    setup_organization(session)
    session.commit()
    subscribed = submit(session, billing_gateway, payload("subscribe", cycle="annual", payment_method="card"), ANCHOR)
    assert subscribed.status == "applied"
    subscription_id = subscribed.subscription_id
    change_on = date(2027, 3, 20)
    change = submit(session, billing_gateway, payload("billing_cycle", subscription_id, to_cycle="monthly"), change_on)
    assert change.status == "applied"
    quote = expected_quote(paid=ANNUAL_PRICE, balance=0, on=change_on, start=ANCHOR, end=date(2028, 3, 10))
    assert quote.balance_after_cents == 72  # the cents that buy no whole day
    submit(session, billing_gateway, payload("cancel", subscription_id), date(2027, 3, 21))

    travel(session, billing_gateway, quote.new_period_end, quote.new_period_end)

    (refund,) = refunds_of(session, subscription_id)
    charge = session.scalars(select(Charge).where(Charge.status == "succeeded")).one()
    assert (refund.method, refund.amount_cents, refund.charge_id, refund.status) == ("card", 72, charge.id, "pending")
    assert execute_refund(session, billing_gateway, refund.id, now=noon(quote.new_period_end)) == "succeeded"
    assert execute_refund(session, billing_gateway, refund.id, now=noon(quote.new_period_end)) == "succeeded"
    lines = sandbox_gateway.ledger(idempotency_key=f"refund:{refund.id}")
    assert [line["amount_cents"] for line in lines] == [-72]
    session.refresh(refund)
    assert refund.gateway_id


def ended_with_card_credit(session, gateway) -> tuple[int, date]:
    """Subscribed annual by card (charged through the sandbox), moved to monthly (72 cents buy no whole
    day), cancelled: it ends at the extended renewal date holding card money."""
    setup_organization(session)
    session.commit()
    subscribed = submit(session, gateway, payload("subscribe", cycle="annual", payment_method="card"), ANCHOR)
    subscription_id = subscribed.subscription_id
    change = submit(session, gateway, payload("billing_cycle", subscription_id, to_cycle="monthly"), date(2027, 3, 20))
    submit(session, gateway, payload("cancel", subscription_id), date(2027, 3, 21))
    return subscription_id, date.fromisoformat(change.result["renewal_date"])


def test_a_card_refund_the_gateway_refuses_becomes_a_payout(session, billing_gateway):
    subscription_id, ends_on = ended_with_card_credit(session, billing_gateway)
    charge = session.scalars(select(Charge).where(Charge.status == "succeeded")).one()
    charge.gateway_id = "ch_never_seen_by_the_gateway"  # the gateway cannot refund it
    session.commit()
    travel(session, billing_gateway, ends_on, ends_on)

    (card_refund,) = refunds_of(session, subscription_id)
    assert execute_refund(session, billing_gateway, card_refund.id, now=noon(ends_on)) == "failed"
    refused, payout = refunds_of(session, subscription_id)
    # The gateway's own word for "no such charge": the sandbox's, or Pagar.me's 404 (TEST_GATEWAY=pagarme).
    assert refused.status == "failed" and refused.gateway_code in ("charge_not_found", "not_found")
    assert (payout.method, payout.status, payout.amount_cents) == ("payout", "pending", refused.amount_cents)
    assert session.scalar(select(Notification.id).where(Notification.dedupe_key == f"refund_created:{payout.id}"))


def test_a_card_refund_whose_answer_is_lost_is_asked_again_never_refunded_twice(
    session, billing_gateway, sandbox_gateway
):
    from jobs.refunds import stale_refund_ids

    subscription_id, ends_on = ended_with_card_credit(session, billing_gateway)
    travel(session, billing_gateway, ends_on, ends_on)
    (refund,) = refunds_of(session, subscription_id)

    with sandbox_gateway.configured(timeout_rate=1.0, stall_ms=3000):  # refunded, then the answer is lost
        assert execute_refund(session, billing_gateway, refund.id, now=noon(ends_on)) == "unknown"
    assert stale_refund_ids(session, noon(ends_on) + timedelta(minutes=2)) == [refund.id]  # the tick's job
    assert execute_refund(session, billing_gateway, refund.id, now=noon(ends_on)) == "succeeded"

    assert [line["amount_cents"] for line in sandbox_gateway.ledger(idempotency_key=f"refund:{refund.id}")] == [-72]
    assert stale_refund_ids(session, noon(ends_on) + timedelta(minutes=2)) == []


# --- preview ---------------------------------------------------------------------------------------------------


def test_inactive_requester_is_not_emailed_a_rejection(session, billing_gateway):
    organization = setup_organization(session)
    subscription = subscription_for(session, organization, cycle="annual", method="boleto", start=ANCHOR)
    session.commit()

    request = submit(session, billing_gateway, payload("cancel", subscription.id, by=105), date(2027, 6, 1))

    assert (request.status, request.error_code) == ("rejected", "forbidden")
    assert session.scalars(select(Notification).where(Notification.kind == "change_request_rejected")).all() == []


# --- on-call: the refunds commands ---------------------------------------------------------------------------


def test_oncall_lists_and_closes_a_payout_from_the_command_line(session, billing_gateway, sandbox_gateway):
    from tests.integration.test_cli import renova

    subscription = annual_boleto(session)
    travel(session, billing_gateway, RENEWAL - timedelta(days=7), RENEWAL - timedelta(days=7))
    (boleto,) = boletos_of(session, subscription.id)
    pay(session, sandbox_gateway, boleto, RENEWAL - timedelta(days=5))
    submit(session, billing_gateway, payload("cancel", subscription.id), RENEWAL - timedelta(days=3))
    travel(session, billing_gateway, RENEWAL, RENEWAL)
    (refund,) = refunds_of(session, subscription.id)

    listed = renova("refunds", "list", "--status", "pending")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert "payout" in listed.stdout and "R$\xa0479,00" in listed.stdout

    refused = renova("refunds", "mark-paid", str(refund.id), "--reference", " ", "--reason", "x")
    assert refused.returncode == 2 and "reference" in refused.stdout
    bad_status = renova("refunds", "list", "--status", "lost")
    assert bad_status.returncode == 2 and "unknown status" in bad_status.stdout

    closed = renova(
        "refunds",
        "mark-paid",
        str(refund.id),
        "--reference",
        "PIX E123",
        "--reason",
        "paid to the owner",
        "--actor",
        "ana",
    )
    assert closed.returncode == 0, closed.stdout + closed.stderr
    session.refresh(refund)
    assert (refund.status, refund.reference) == ("paid", "PIX E123")
    again = renova("refunds", "mark-paid", str(refund.id), "--reference", "PIX E123", "--reason", "twice")
    assert again.returncode == 2 and "already paid" in again.stdout
    audit = session.scalars(select(AuditEvent).where(AuditEvent.target_id == str(refund.id))).one()
    assert (audit.actor, audit.reason) == ("ana", "paid to the owner")
