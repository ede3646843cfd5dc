"""Change requests (DESIGN §1 and §2 "Change requests"): every rule through the plain functions with
explicit dates (hand-computed proration, month ends, a leap day), then through the queue with real
Dramatiq workers, the real PostgreSQL and the sandbox gateway process.

Prices (tests.integration.factories): monthly R$ 49,90, annual R$ 479,00.
"""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, date, datetime, timedelta
from typing import Any

import dramatiq
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from jobs.boletos import cancel_boleto_at, issue_boleto
from jobs.changes import (
    IdempotencyKeyReused,
    UnrecordableChangeRequest,
    change_date,
    pending_change_request_ids,
    process_request,
    record_change_request,
    submit_change_request,
    submit_request,
)
from jobs.context import BillingConfig, runtime
from jobs.invoicing import create_renewal_invoice
from jobs.ledger_check import BALANCE_KINDS
from jobs.payments import reconcile_charge
from models.calendar import add_cycle, local_today
from models.schema import (
    Boleto,
    Card,
    ChangeRequest,
    Charge,
    Invoice,
    LedgerEntry,
    Member,
    Notification,
    Organization,
    Subscription,
)
from tests.integration.conftest import wait_until
from tests.integration.factories import (
    ANNUAL_PRICE,
    FACTORY_SOURCE,
    make_organization,
    make_subscription,
    noon,
    seed_plans,
)
from workers.db import get_session_factory

CONFIG = BillingConfig()
pytestmark = pytest.mark.usefixtures("ledger_checked")
OWNER, FINANCIAL, PLAIN_MEMBER = 101, 102, 103
ADMIN, INACTIVE_ADMIN, FORMER_FINANCIAL = 104, 105, 106


# --- helpers (also used by tests/test_api.py) --------------------------------------------------


def setup_organization(
    session: Session, *, card_token: str | None = "tok_ok", organization_id: int = 1
) -> Organization:
    """Plans, and organization 1 with an owner (101), a financial responsible (102), a plain member
    (103), an admin (104), an inactive admin (105) and an inactive financial responsible (106)."""
    if session.scalar(select(func.count()).select_from(Organization)) == 0:
        seed_plans(session)
    organization = make_organization(session, organization_id, card_token=card_token)
    base = organization_id * 100
    session.add_all(
        [
            Member(id=base + 4, organization_id=organization_id, email=f"admin{organization_id}@acme.example",
                   role="admin"),
            Member(id=base + 5, organization_id=organization_id, email=f"ex-admin{organization_id}@acme.example",
                   role="admin", active=False),
            Member(id=base + 6, organization_id=organization_id, email=f"ex-fin{organization_id}@acme.example",
                   role="member", financial_responsible=True, active=False),
        ]
    )  # fmt: skip
    session.flush()
    return organization


def subscription_for(
    session: Session,
    organization: Organization,
    *,
    cycle: str,
    method: str,
    start: date,
    end: date | None = None,
    paid_cents: int | None = None,
    balance_cents: int = 0,
) -> Subscription:
    """A subscription whose current period [start, end) is paid (end defaults to one cycle later)."""
    subscription = make_subscription(
        session,
        organization,
        cycle=cycle,
        method=method,
        anchor=start,
        period_start=start,
        paid_cents=paid_cents,
        balance_cents=balance_cents,
    )
    if end is not None:
        subscription.current_period_end = end
        invoice = session.scalars(select(Invoice).where(Invoice.subscription_id == subscription.id)).one()
        invoice.period_end = end
    session.flush()
    return subscription


def payload(kind: str, subscription_id: int | None = None, *, by: int = OWNER, **params: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "organization_id": 1,
        "requested_by": by,
        "idempotency_key": f"test-{uuid.uuid4()}",
        "kind": kind,
        **params,
    }
    if subscription_id is not None:
        body["subscription_id"] = subscription_id
    return body


def submit(session: Session, gateway: Any, body: dict[str, Any], on: date) -> ChangeRequest:
    """The queue path's plain function, as a message received at noon (UTC) of business date `on`."""
    request = submit_request(session, gateway, body, now=noon(on), config=CONFIG)
    assert request is not None
    session.expire_all()
    return session.get_one(ChangeRequest, request.id)


def ledger_of(session: Session, subscription_id: int) -> list[tuple[str, int, int | None]]:
    """The entries the flows wrote (not the factory's opening trail: its paid period and balance)."""
    rows = session.execute(
        select(LedgerEntry.kind, LedgerEntry.amount_cents, LedgerEntry.invoice_id)
        .where(LedgerEntry.subscription_id == subscription_id)
        .where(~LedgerEntry.details.contains({"source": FACTORY_SOURCE}))
        .order_by(LedgerEntry.id)
    )
    return [tuple(row) for row in rows]


def money_ledger(session: Session, subscription_id: int) -> list[tuple[str, int, int | None]]:
    return [entry for entry in ledger_of(session, subscription_id) if entry[0] != "change_applied"]


def assert_balance_matches_ledger(session: Session, subscription: Subscription, opening_balance: int = 0) -> None:
    """The credit balance is the running sum of the credit entries."""
    session.refresh(subscription)
    credit = sum(amount for kind, amount, _ in ledger_of(session, subscription.id) if kind in BALANCE_KINDS)
    assert subscription.balance_cents == opening_balance + credit


def assert_paid_is_used_plus_credit(session: Session, invoice: Invoice) -> None:
    """paid = used + credit, to the cent, for the period a cycle change left."""
    rows = session.execute(
        select(LedgerEntry.kind, LedgerEntry.amount_cents).where(
            LedgerEntry.invoice_id == invoice.id, LedgerEntry.kind.in_(["period_used", "proration_credit"])
        )
    )
    entries = {kind: amount for kind, amount in rows}
    assert -entries["period_used"] + entries["proration_credit"] == invoice.amount_cents


def notices(session: Session, kind: str | None = None) -> list[Notification]:
    statement = select(Notification).order_by(Notification.id)
    if kind is not None:
        statement = statement.where(Notification.kind == kind)
    return list(session.scalars(statement))


def invoices_of(session: Session, subscription_id: int, kind: str | None = None) -> list[Invoice]:
    statement = select(Invoice).where(Invoice.subscription_id == subscription_id).order_by(Invoice.id)
    if kind is not None:
        statement = statement.where(Invoice.kind == kind)
    return list(session.scalars(statement))


def renewal_boleto(session: Session, gateway: Any, subscription: Subscription, on: date) -> Invoice:
    """What the billing run does at T − 7: the next period's invoice (price − credit) and its boleto."""
    invoice = create_renewal_invoice(
        session, subscription, period_start=subscription.current_period_end, method="boleto",
        due_date=subscription.current_period_end,
    )  # fmt: skip
    assert invoice is not None
    session.commit()
    assert issue_boleto(session, gateway, invoice.id, config=CONFIG) is not None
    return invoice


# --- billing cycle: monthly → annual -----------------------------------------------------------


def test_monthly_to_annual_by_card_on_a_leap_day(session, billing_gateway, sandbox_gateway):
    organization = setup_organization(session)
    # [Feb 15, Mar 15) 2024 has 29 days; on Feb 29, 15 are unused: 4990 × 15 / 29 = 2581.03 → 2581.
    subscription = subscription_for(session, organization, cycle="monthly", method="card", start=date(2024, 2, 15))
    old_invoice = invoices_of(session, subscription.id)[0]
    session.commit()

    request = submit(session, billing_gateway, payload("billing_cycle", subscription.id, to_cycle="annual"),
                     date(2024, 2, 29))  # fmt: skip

    assert (request.status, request.error_code) == ("applied", None)
    assert request.result["unused_cents"] == 2581
    assert request.result["amount_due_cents"] == ANNUAL_PRICE - 2581 == 45319
    assert request.result["new_period_end"] == request.result["renewal_date"] == "2025-02-28"
    session.refresh(subscription)
    assert (subscription.cycle, subscription.payment_method, subscription.status) == ("annual", "card", "active")
    assert (subscription.current_period_start, subscription.current_period_end) == (
        date(2024, 2, 29),
        date(2025, 2, 28),
    )
    assert subscription.billing_anchor == date(2024, 2, 29)
    assert add_cycle(subscription.billing_anchor, "annual", 4) == date(2028, 2, 29)  # back on the leap day
    assert subscription.balance_cents == 0
    invoice = session.get_one(Invoice, request.result["invoice_id"])
    assert (invoice.kind, invoice.status, invoice.change_request_id) == ("cycle_change", "paid", request.id)
    assert (invoice.amount_cents, invoice.discount_cents, invoice.total_cents) == (47900, 2581, 45319)
    charge = session.scalars(select(Charge).where(Charge.invoice_id == invoice.id)).one()
    assert (charge.status, charge.amount_cents) == ("succeeded", 45319)
    assert [entry["amount_cents"] for entry in sandbox_gateway.ledger(idempotency_key=charge.idempotency_key)] == [
        45319
    ]
    assert money_ledger(session, subscription.id) == [
        ("period_used", -(4990 - 2581), old_invoice.id),
        ("proration_credit", 2581, old_invoice.id),
        ("credit_applied", -2581, invoice.id),
        ("payment", 45319, invoice.id),
    ]
    assert_paid_is_used_plus_credit(session, old_invoice)
    assert_balance_matches_ledger(session, subscription)
    assert {notice.kind for notice in notices(session)} == {"cycle_changed", "charge_succeeded"}
    changed = notices(session, "cycle_changed")[0]
    assert changed.context["quote"]["amount_due_cents"] == 45319
    assert changed.context["payment_method"] == "card"


def test_monthly_to_annual_by_boleto_at_a_month_end_uses_the_balance(session, billing_gateway, sandbox_gateway):
    organization = setup_organization(session)
    # Anchor Jan 31: the period is [Jan 31, Feb 28) 2025, 28 days. On Feb 10, 18 are unused:
    # 4990 × 18 / 28 = 3207.86 → 3208; with the R$ 3,00 balance the credit is 3508.
    subscription = subscription_for(
        session, organization, cycle="monthly", method="card", start=date(2025, 1, 31), balance_cents=300
    )
    assert subscription.current_period_end == date(2025, 2, 28)
    old_invoice = invoices_of(session, subscription.id)[0]
    session.commit()

    body = payload("billing_cycle", subscription.id, to_cycle="annual", payment_method="boleto")
    request = submit(session, billing_gateway, body, date(2025, 2, 10))

    assert request.status == "applied"
    assert (request.result["credit_cents"], request.result["amount_due_cents"]) == (3508, 47900 - 3508)
    session.refresh(subscription)
    assert (subscription.cycle, subscription.payment_method) == ("annual", "boleto")
    assert (subscription.current_period_start, subscription.current_period_end) == (
        date(2025, 2, 10),
        date(2026, 2, 10),
    )
    assert subscription.balance_cents == 0
    invoice = session.get_one(Invoice, request.result["invoice_id"])
    assert (invoice.status, invoice.method, invoice.total_cents, invoice.discount_cents) == (
        "open",
        "boleto",
        44392,
        3508,
    )
    boleto = session.scalars(select(Boleto).where(Boleto.invoice_id == invoice.id)).one()
    # Issued now, due in BOLETO_DUE_DAYS (3).
    assert (boleto.due_date, boleto.amount_cents, boleto.status) == (date(2025, 2, 13), 44392, "issued")
    assert request.result["boleto"]["digitable_line"] == boleto.digitable_line
    assert sandbox_gateway.boleto(boleto.gateway_id)["amount_cents"] == 44392
    assert money_ledger(session, subscription.id) == [
        ("period_used", -(4990 - 3208), old_invoice.id),
        ("proration_credit", 3208, old_invoice.id),
        ("credit_applied", -3508, invoice.id),
    ]
    assert_paid_is_used_plus_credit(session, old_invoice)
    assert_balance_matches_ledger(session, subscription, opening_balance=300)
    assert {notice.kind for notice in notices(session)} == {"cycle_changed", "boleto_issued"}


def test_a_credit_larger_than_the_annual_price_stays_as_balance(session, billing_gateway):
    organization = setup_organization(session)
    subscription = subscription_for(
        session, organization, cycle="monthly", method="card", start=date(2025, 3, 1), balance_cents=50_000
    )
    session.commit()
    # [Mar 1, Apr 1) is 31 days; on Mar 11, 21 unused: 4990 × 21 / 31 = 3380.32 → 3380.
    request = submit(session, billing_gateway, payload("billing_cycle", subscription.id, to_cycle="annual"),
                     date(2025, 3, 11))  # fmt: skip

    assert request.status == "applied"
    assert request.result["amount_due_cents"] == 0
    assert request.result["balance_after_cents"] == 50_000 + 3380 - ANNUAL_PRICE == 5480
    invoice = session.get_one(Invoice, request.result["invoice_id"])
    assert (invoice.status, invoice.total_cents) == ("paid", 0)
    assert session.scalar(select(func.count()).select_from(Charge)) == 0
    assert_balance_matches_ledger(session, subscription, opening_balance=50_000)
    assert subscription.balance_cents == 5480


def test_a_declined_upgrade_changes_nothing(session, billing_gateway, sandbox_gateway):
    organization = setup_organization(session, card_token="tok_insufficient_funds")
    subscription = subscription_for(
        session, organization, cycle="monthly", method="card", start=date(2025, 3, 1), balance_cents=700
    )
    session.commit()
    before = (subscription.cycle, subscription.current_period_start, subscription.current_period_end,
              subscription.billing_anchor, subscription.balance_cents, subscription.status)  # fmt: skip

    request = submit(session, billing_gateway, payload("billing_cycle", subscription.id, to_cycle="annual",
                                                       by=FINANCIAL), date(2025, 3, 11))  # fmt: skip

    assert (request.status, request.error_code) == ("rejected", "payment_declined")
    assert "R$\xa0" in request.error_message and "Nenhuma alteração" in request.error_message
    session.refresh(subscription)
    after = (subscription.cycle, subscription.current_period_start, subscription.current_period_end,
             subscription.billing_anchor, subscription.balance_cents, subscription.status)  # fmt: skip
    assert after == before
    upgrade = invoices_of(session, subscription.id, "cycle_change")[0]
    assert upgrade.status == "void"
    assert ledger_of(session, subscription.id) == []
    charge = session.scalars(select(Charge)).one()
    assert charge.status == "failed" and charge.next_retry_on is None
    assert sandbox_gateway.ledger(idempotency_key=charge.idempotency_key) == []
    [rejected] = notices(session)
    assert rejected.kind == "change_request_rejected"
    assert rejected.recipients == ["financeiro1@acme.example"]
    assert rejected.context["code"] == "payment_declined"


def test_an_upgrade_whose_charge_times_out_completes_when_reconciled(session, billing_gateway, sandbox_gateway):
    organization = setup_organization(session, card_token="tok_timeout")
    subscription = subscription_for(session, organization, cycle="monthly", method="card", start=date(2025, 3, 1))
    session.commit()
    on = date(2025, 3, 11)

    request = submit(session, billing_gateway, payload("billing_cycle", subscription.id, to_cycle="annual"), on)
    assert request.status == "pending"  # the gateway may have charged: only reconciliation can tell
    assert request.result["amount_due_cents"] == 47900 - 3380
    charge = session.scalars(select(Charge)).one()
    assert charge.status == "unknown"
    # Meanwhile another cycle change waits for that charge; the tick leaves the first to the janitor
    # and re-enqueues the waiting one.
    second = submit(session, billing_gateway, payload("billing_cycle", subscription.id, to_cycle="annual"), on)
    assert (second.status, second.error_code) == ("pending", None)
    assert pending_change_request_ids(session, noon(on) + timedelta(hours=1)) == [second.id]

    assert reconcile_charge(session, billing_gateway, charge.id, now=noon(on), config=CONFIG) == "succeeded"

    session.expire_all()
    request = session.get_one(ChangeRequest, request.id)
    assert request.status == "applied"
    # Processed again once the charge is known, the second one sees the annual plan it left.
    assert process_request(session, billing_gateway, second.id, on=on, now=noon(on), config=CONFIG) == "rejected"
    assert session.get_one(ChangeRequest, second.id).error_code == "same_cycle"
    session.refresh(subscription)
    assert subscription.cycle == "annual" and subscription.current_period_start == on
    assert len(sandbox_gateway.ledger(idempotency_key=charge.idempotency_key)) == 1


# --- billing cycle: annual → monthly -----------------------------------------------------------


def test_annual_to_monthly_extends_the_renewal_date_across_month_ends(session, billing_gateway):
    organization = setup_organization(session)
    # [2024-06-15, 2025-06-15) paid 47900, 365 days. On 2025-01-31, 135 unused:
    # U = 47900 × 135 / 365 = 17716.44 → 17716. k = 17716 // 4990 = 3, R = 2746.
    # Jan 31 + 3 months = Apr 30 (clamped); the next month, Apr 30 → May 31, has L = 31 days.
    # r = 2746 × 31 // 4990 = 17 days, worth 17 × 4990 // 31 = 2736; 2746 − 2736 = 10 stays as balance.
    subscription = subscription_for(session, organization, cycle="annual", method="boleto", start=date(2024, 6, 15))
    old_invoice = invoices_of(session, subscription.id)[0]
    session.commit()

    request = submit(session, billing_gateway, payload("billing_cycle", subscription.id, to_cycle="monthly"),
                     date(2025, 1, 31))  # fmt: skip

    assert request.status == "applied", request.error_message
    result = request.result
    assert (result["unused_cents"], result["months"], result["extra_days"]) == (17716, 3, 17)
    assert (result["month_length_days"], result["days_value_cents"], result["balance_after_cents"]) == (31, 2736, 10)
    assert result["renewal_date"] == "2025-05-17"
    session.refresh(subscription)
    assert (subscription.cycle, subscription.payment_method) == ("monthly", "card")  # monthly is card-only
    assert (subscription.current_period_start, subscription.current_period_end) == (
        date(2025, 1, 31),
        date(2025, 5, 17),
    )
    assert subscription.billing_anchor == date(2025, 5, 17)  # the new renewal date anchors the months after it
    assert add_cycle(subscription.billing_anchor, "monthly", 1) == date(2025, 6, 17)
    assert subscription.balance_cents == 10
    extension = session.get_one(Invoice, result["invoice_id"])
    assert (extension.kind, extension.status, extension.cycle) == ("cycle_change", "paid", "monthly")
    assert (extension.amount_cents, extension.discount_cents, extension.total_cents) == (17706, 17706, 0)
    assert (extension.period_start, extension.period_end) == (date(2025, 1, 31), date(2025, 5, 17))
    assert money_ledger(session, subscription.id) == [
        ("period_used", -(47900 - 17716), old_invoice.id),
        ("proration_credit", 17716, old_invoice.id),
        ("credit_applied", -17706, extension.id),
    ]
    assert_paid_is_used_plus_credit(session, old_invoice)
    assert_balance_matches_ledger(session, subscription)
    assert session.scalar(select(func.count()).select_from(Charge)) == 0
    [changed] = notices(session)
    assert (changed.kind, changed.context["quote"]["months"], changed.context["quote"]["extra_days"]) == (
        "cycle_changed",
        3,
        17,
    )


def test_back_and_forth_on_one_day_loses_no_money(session, billing_gateway):
    organization = setup_organization(session)
    subscription = subscription_for(session, organization, cycle="annual", method="card", start=date(2025, 1, 10))
    session.commit()
    on = date(2025, 7, 1)
    down = submit(session, billing_gateway, payload("billing_cycle", subscription.id, to_cycle="monthly"), on)
    up = submit(session, billing_gateway, payload("billing_cycle", subscription.id, to_cycle="annual"), on)

    assert (down.status, up.status) == ("applied", "applied")
    # The monthly period bought with the credit is itself prorated back in full on the same day.
    assert up.result["credit_cents"] == down.result["credit_cents"]
    assert up.result["amount_due_cents"] == ANNUAL_PRICE - down.result["credit_cents"]
    assert_balance_matches_ledger(session, subscription)


def test_annual_to_monthly_with_less_than_a_day_of_credit_charges_the_first_month(session, billing_gateway):
    organization = setup_organization(session)
    # The day before T: U = 47900 × 1 / 365 = 131.23 → 131, less than a day of the monthly plan
    # (4990 / 31 ≈ 161): the renewal date would be today, so the first month is charged now, less 131.
    subscription = subscription_for(session, organization, cycle="annual", method="card", start=date(2024, 3, 10))
    session.commit()

    request = submit(session, billing_gateway, payload("billing_cycle", subscription.id, to_cycle="monthly"),
                     date(2025, 3, 9))  # fmt: skip

    assert request.status == "applied"
    assert request.result["first_period_charged_now"] is True
    assert (request.result["amount_due_cents"], request.result["balance_after_cents"]) == (4990 - 131, 0)
    session.refresh(subscription)
    assert (subscription.current_period_start, subscription.current_period_end) == (date(2025, 3, 9), date(2025, 4, 9))
    assert subscription.billing_anchor == date(2025, 3, 9)
    invoice = session.get_one(Invoice, request.result["invoice_id"])
    assert (invoice.status, invoice.amount_cents, invoice.discount_cents, invoice.total_cents) == (
        "paid",
        4990,
        131,
        4859,
    )
    assert_balance_matches_ledger(session, subscription)


def test_annual_to_monthly_cancels_the_issued_renewal_boleto(session, worker, billing_gateway, sandbox_gateway):
    organization = setup_organization(session)
    on = date(2025, 6, 10)
    subscription = subscription_for(
        session, organization, cycle="annual", method="boleto", start=date(2024, 6, 15), balance_cents=1000
    )
    session.commit()
    # T − 7 has passed: the billing run issued the renewal's boleto, with the R$ 10,00 balance discounted.
    upcoming = renewal_boleto(session, billing_gateway, subscription, on)
    assert (upcoming.discount_cents, subscription.balance_cents) == (1000, 0)
    boleto = session.scalars(select(Boleto)).one()

    request = submit(session, billing_gateway, payload("billing_cycle", subscription.id, to_cycle="monthly"), on)

    assert request.status == "applied"
    assert request.result["voided_invoice_ids"] == [upcoming.id]
    assert request.result["balance_cents"] == 1000  # the discount came back before the quote
    session.refresh(upcoming)
    session.refresh(boleto)
    assert (upcoming.status, boleto.status) == ("void", "canceled")
    assert ("credit_restored", 1000, upcoming.id) in money_ledger(session, subscription.id)
    # The opening 1000 went into the renewal invoice (credit_applied) and came back (credit_restored).
    assert_balance_matches_ledger(session, subscription, opening_balance=1000)
    # 5 unused days of 365: 656, plus 1000 = 1656 buys 9 days of a 30-day month (1497); 159 stay.
    assert (request.result["months"], request.result["extra_days"], subscription.balance_cents) == (0, 9, 159)
    # The gateway is told after the commit, by the outbox's message.
    wait_until(lambda: sandbox_gateway.boleto(boleto.gateway_id)["status"] == "canceled")


def test_annual_boleto_to_monthly_needs_a_card(session, billing_gateway):
    organization = setup_organization(session, card_token=None)
    subscription = subscription_for(session, organization, cycle="annual", method="boleto", start=date(2025, 1, 10))
    session.commit()
    request = submit(session, billing_gateway, payload("billing_cycle", subscription.id, to_cycle="monthly"),
                     date(2025, 5, 1))  # fmt: skip
    assert (request.status, request.error_code) == ("rejected", "no_card_on_file")
    session.refresh(subscription)
    assert (subscription.cycle, subscription.payment_method) == ("annual", "boleto")
    assert invoices_of(session, subscription.id, "cycle_change") == []


@pytest.mark.parametrize(
    ("cycle", "to_cycle", "method", "code"),
    [
        ("monthly", "monthly", None, "same_cycle"),
        ("annual", "monthly", "boleto", "boleto_requires_annual"),
    ],
)
def test_cycle_change_refusals(session, billing_gateway, cycle, to_cycle, method, code):
    organization = setup_organization(session)
    subscription = subscription_for(session, organization, cycle=cycle, method="card", start=date(2025, 1, 10))
    session.commit()
    body = payload("billing_cycle", subscription.id, to_cycle=to_cycle)
    if method:
        body["payment_method"] = method
    request = submit(session, billing_gateway, body, date(2025, 1, 20))
    assert (request.status, request.error_code) == ("rejected", code)
    assert ledger_of(session, subscription.id) == []


def test_no_cycle_change_while_an_invoice_is_past_due(session, billing_gateway):
    organization = setup_organization(session)
    subscription = subscription_for(session, organization, cycle="monthly", method="card", start=date(2025, 1, 10))
    renewal = Invoice(
        subscription_id=subscription.id, organization_id=1, kind="renewal", cycle="monthly",
        period_start=date(2025, 2, 10), period_end=date(2025, 3, 10), amount_cents=4990, discount_cents=0,
        total_cents=4990, method="card", due_date=date(2025, 2, 10),
    )  # fmt: skip
    session.add(renewal)
    session.flush()
    session.add(Charge(invoice_id=renewal.id, attempt=1, idempotency_key=f"charge:{renewal.id}:1", amount_cents=4990,
                       card_token="tok_insufficient_funds", status="failed", gateway_code="insufficient_funds"))  # fmt: skip
    subscription.status = "past_due"
    subscription.current_period_start, subscription.current_period_end = date(2025, 2, 10), date(2025, 3, 10)
    session.commit()

    request = submit(session, billing_gateway, payload("billing_cycle", subscription.id, to_cycle="annual"),
                     date(2025, 2, 12))  # fmt: skip

    assert (request.status, request.error_code) == ("rejected", "outstanding_invoice")
    assert "R$\xa049,90" in request.error_message and "10/02/2025" in request.error_message
    session.refresh(subscription)
    assert subscription.cycle == "monthly"


# --- payment method ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("days_before", "status", "code"),
    [(8, "applied", None), (7, "rejected", "boleto_already_issued"), (6, "rejected", "boleto_already_issued")],
)
def test_boleto_to_card_deadline(session, billing_gateway, days_before, status, code):
    organization = setup_organization(session)
    renewal = date(2025, 9, 20)
    subscription = subscription_for(
        session, organization, cycle="annual", method="boleto", start=date(2024, 9, 20), end=renewal
    )
    session.commit()

    request = submit(session, billing_gateway, payload("payment_method", subscription.id, to="card"),
                     renewal - timedelta(days=days_before))  # fmt: skip

    assert (request.status, request.error_code) == (status, code)
    session.refresh(subscription)
    if status == "applied":
        assert (subscription.payment_method, subscription.pending_payment_method) == ("boleto", "card")
        assert request.result["effective_on"] == "2025-09-20"
        assert request.result["boleto_switch_deadline"] == "2025-09-12"
        [notice] = notices(session)
        assert notice.kind == "payment_method_switch_scheduled"
        assert notice.context == {"from_method": "boleto", "to_method": "card", "effective_on": "2025-09-20",
                                  "card_last4": "4242"}  # fmt: skip
        assert [kind for kind, _, _ in ledger_of(session, subscription.id)] == ["change_applied"]
    else:
        assert subscription.pending_payment_method is None
        assert "12/09/2025" in request.error_message  # names the deadline
        assert notices(session)[0].kind == "change_request_rejected"


def test_boleto_to_card_refused_once_the_renewal_boleto_exists(session, billing_gateway):
    organization = setup_organization(session)
    on = date(2025, 9, 10)
    subscription = subscription_for(session, organization, cycle="annual", method="boleto", start=date(2024, 9, 20))
    session.commit()
    renewal_boleto(session, billing_gateway, subscription, on)  # issued early (e.g. a longer lead time)

    request = submit(session, billing_gateway, payload("payment_method", subscription.id, to="card"), on)

    assert (request.status, request.error_code) == ("rejected", "boleto_already_issued")
    assert request.result["error_details"]["boleto_issued"] is True


def test_card_to_boleto_inside_the_window_and_back(session, billing_gateway):
    organization = setup_organization(session)
    subscription = subscription_for(session, organization, cycle="annual", method="card", start=date(2024, 9, 20))
    session.commit()
    on = date(2025, 9, 16)  # T − 4: always allowed; the next run issues the boleto due max(T, D + 3)

    request = submit(session, billing_gateway, payload("payment_method", subscription.id, to="boleto"), on)
    assert request.status == "applied"
    session.refresh(subscription)
    assert (subscription.payment_method, subscription.pending_payment_method) == ("card", "boleto")

    # Asking for the current method cancels the pending switch — but boleto → card is past its deadline.
    back = submit(session, billing_gateway, payload("payment_method", subscription.id, to="card"), on)
    assert (back.status, back.error_code) == ("rejected", "boleto_already_issued")

    earlier = date(2025, 9, 1)
    again = submit(session, billing_gateway, payload("payment_method", subscription.id, to="card"), earlier)
    assert (again.status, again.result["pending_switch_canceled"]) == ("applied", True)
    session.refresh(subscription)
    assert (subscription.payment_method, subscription.pending_payment_method) == ("card", None)


@pytest.mark.parametrize(
    ("cycle", "method", "to", "card", "code"),
    [
        ("monthly", "card", "boleto", "tok_ok", "boleto_requires_annual"),
        ("annual", "boleto", "card", None, "no_card_on_file"),
        ("annual", "card", "card", "tok_ok", "same_payment_method"),
    ],
)
def test_payment_method_refusals(session, billing_gateway, cycle, method, to, card, code):
    organization = setup_organization(session, card_token=card)
    subscription = subscription_for(session, organization, cycle=cycle, method=method, start=date(2025, 1, 10))
    session.commit()
    request = submit(session, billing_gateway, payload("payment_method", subscription.id, to=to), date(2025, 1, 12))
    assert (request.status, request.error_code) == ("rejected", code)
    session.refresh(subscription)
    assert subscription.pending_payment_method is None


# --- who may ask -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("member", "status"),
    [
        (OWNER, "applied"),
        (ADMIN, "applied"),
        (FINANCIAL, "applied"),
        (PLAIN_MEMBER, "rejected"),
        (INACTIVE_ADMIN, "rejected"),
        (FORMER_FINANCIAL, "rejected"),
        (999, "rejected"),  # not a member of the organization
        (201, "rejected"),  # the owner of another organization
    ],
)
def test_only_owners_admins_and_financial_responsibles_may_change(session, billing_gateway, member, status):
    organization = setup_organization(session)
    make_organization(session, 2)
    subscription = subscription_for(session, organization, cycle="annual", method="card", start=date(2025, 1, 10))
    session.commit()

    request = submit(session, billing_gateway, payload("cancel", subscription.id, by=member), date(2025, 2, 1))

    assert request.status == status
    session.refresh(subscription)
    assert subscription.cancel_at_period_end is (status == "applied")
    if status == "rejected":
        assert request.error_code == "forbidden"
        assert ledger_of(session, subscription.id) == []
        requester = session.get(Member, member)
        rejected = notices(session, "change_request_rejected")
        # The notice goes to the requester, when Renova knows them in this organization as an active
        # member: inactive members receive no notices.
        known = requester is not None and requester.organization_id == 1 and requester.active
        assert [notice.recipients for notice in rejected] == ([[requester.email]] if known else [])


# --- card --------------------------------------------------------------------------------------


def past_due_renewal(session: Session, subscription: Subscription, token: str = "tok_insufficient_funds") -> Invoice:
    """The renewal on T failed on the card: invoice open, attempt 1 failed, subscription past due."""
    renewal = subscription.current_period_end
    invoice = Invoice(
        subscription_id=subscription.id, organization_id=subscription.organization_id, kind="renewal",
        cycle=subscription.cycle, period_start=renewal, period_end=add_cycle(renewal, subscription.cycle, 1),
        amount_cents=4990, discount_cents=0, total_cents=4990, method="card", due_date=renewal,
    )  # fmt: skip
    session.add(invoice)
    session.flush()
    session.add(Charge(invoice_id=invoice.id, attempt=1, idempotency_key=f"charge:{invoice.id}:1", amount_cents=4990,
                       card_token=token, status="failed", gateway_code="insufficient_funds",
                       next_retry_on=renewal + timedelta(days=1)))  # fmt: skip
    subscription.status = "past_due"
    subscription.current_period_start, subscription.current_period_end = invoice.period_start, invoice.period_end
    session.flush()
    return invoice


def card_body(token: str = "tok_ok", **overrides: Any) -> dict[str, Any]:
    return {"token": token, "brand": "mastercard", "last4": "5454", "exp_month": 8, "exp_year": 2031, **overrides}


def test_a_new_card_retries_the_past_due_invoice_at_once(session, billing_gateway, sandbox_gateway):
    organization = setup_organization(session, card_token="tok_insufficient_funds")
    subscription = subscription_for(session, organization, cycle="monthly", method="card", start=date(2025, 1, 10))
    invoice = past_due_renewal(session, subscription)
    session.commit()

    request = submit(session, billing_gateway, payload("card", subscription.id, **card_body()), date(2025, 2, 11))

    assert request.status == "applied"
    assert request.result["retried_invoice_ids"] == [invoice.id]
    assert request.result["retries"] == [{"invoice_id": invoice.id, "charge_status": "succeeded"}]
    card = session.scalars(select(Card)).one()
    assert (card.token, card.brand, card.last4, card.exp_month, card.exp_year) == (
        "tok_ok",
        "mastercard",
        "5454",
        8,
        2031,
    )
    session.refresh(invoice)
    session.refresh(subscription)
    assert (invoice.status, subscription.status) == ("paid", "active")
    second = session.scalars(select(Charge).where(Charge.attempt == 2)).one()
    assert (second.status, second.card_token, second.card_last4) == ("succeeded", "tok_ok", "5454")
    assert session.scalars(select(Charge).where(Charge.attempt == 1)).one().next_retry_on is None
    assert len(sandbox_gateway.ledger(idempotency_key=second.idempotency_key)) == 1
    assert ("payment", 4990, invoice.id) in money_ledger(session, subscription.id)
    assert {"card_updated", "charge_succeeded", "subscription_reactivated"} <= {n.kind for n in notices(session)}


def test_one_card_for_every_subscription_of_the_organization(session, billing_gateway):
    organization = setup_organization(session)
    first = subscription_for(session, organization, cycle="monthly", method="card", start=date(2025, 1, 10))
    second = Subscription(
        organization_id=1, product="outro", cycle="annual", payment_method="boleto", billing_anchor=date(2025, 1, 10),
        current_period_start=date(2025, 1, 10), current_period_end=date(2026, 1, 10),
    )  # fmt: skip
    session.add(second)
    session.commit()
    request = submit(session, billing_gateway, payload("card", None, **card_body()), date(2025, 1, 20))
    assert request.status == "applied"
    assert session.scalar(select(func.count()).select_from(Card)) == 1
    assert sorted(request.result["subscription_ids"]) == sorted([first.id, second.id])
    for subscription in (first, second):
        assert [kind for kind, _, _ in ledger_of(session, subscription.id)] == ["change_applied"]
    [notice] = notices(session)
    assert (notice.kind, notice.context["last4"]) == ("card_updated", "5454")


def test_card_refusals(session, billing_gateway):
    setup_organization(session)
    session.commit()
    expired = submit(session, billing_gateway, payload("card", **card_body(exp_month=1, exp_year=2025)),
                     date(2025, 2, 1))  # fmt: skip
    assert (expired.status, expired.error_code) == ("rejected", "card_expired")
    assert session.scalars(select(Card)).one().token == "tok_ok"


def test_a_card_number_is_refused_and_never_stored(session, billing_gateway):
    setup_organization(session)
    session.commit()
    body = payload("card", **card_body(token="4111 1111 1111 1111"), cvv="123")
    request = submit(session, billing_gateway, body, date(2025, 2, 1))

    assert (request.status, request.error_code) == ("rejected", "invalid_request")
    assert "token" in request.error_message and "cvv" in request.error_message
    stored_values = [str(value) for value in request.payload.values()]
    assert not any("4111" in value for value in stored_values)
    assert "123" not in stored_values  # the cvv is redacted, not kept
    assert "4111" not in request.error_message
    assert session.scalars(select(Card)).one().token == "tok_ok"
    [notice] = notices(session)
    assert notice.kind == "change_request_rejected" and notice.recipients == ["dona1@acme.example"]


# --- subscribe ---------------------------------------------------------------------------------


def test_subscribe_by_card_then_the_daily_run_renews_it(session, billing_gateway, sandbox_gateway):
    from jobs.billing_day import run_day

    setup_organization(session)
    session.commit()
    on = date(2025, 1, 31)

    request = submit(session, billing_gateway, payload("subscribe", product="conecta", cycle="monthly",
                                                       payment_method="card"), on)  # fmt: skip

    assert request.status == "applied"
    subscription = session.get_one(Subscription, request.result["subscription_id"])
    assert request.subscription_id == subscription.id
    assert (subscription.status, subscription.cycle, subscription.payment_method) == ("active", "monthly", "card")
    assert (subscription.billing_anchor, subscription.current_period_end) == (on, date(2025, 2, 28))
    [first] = invoices_of(session, subscription.id)
    assert (first.kind, first.status, first.total_cents, first.change_request_id) == ("subscribe", "paid", 4990,
                                                                                      request.id)  # fmt: skip
    assert money_ledger(session, subscription.id) == [("payment", 4990, first.id)]
    assert {"subscribed", "charge_succeeded"} == {n.kind for n in notices(session)}

    # The first renewal, by the daily run on T: anchored on Jan 31, so Feb 28 then Mar 31.
    run_day(session, billing_gateway, date(2025, 2, 28), noon(date(2025, 2, 28)), runtime().config)
    session.refresh(subscription)
    renewal = invoices_of(session, subscription.id, "renewal")[0]
    assert (renewal.period_start, renewal.period_end, renewal.status) == (date(2025, 2, 28), date(2025, 3, 31), "paid")
    assert (subscription.current_period_start, subscription.current_period_end) == (
        date(2025, 2, 28),
        date(2025, 3, 31),
    )
    charges = session.scalars(select(Charge).order_by(Charge.id)).all()
    assert [c.status for c in charges] == ["succeeded", "succeeded"]
    assert all(len(sandbox_gateway.ledger(idempotency_key=c.idempotency_key)) == 1 for c in charges)


def test_subscribe_declined_leaves_no_live_subscription(session, billing_gateway):
    setup_organization(session, card_token="tok_stolen")
    session.commit()
    body = payload("subscribe", cycle="annual", payment_method="card")
    request = submit(session, billing_gateway, body, date(2025, 1, 10))

    assert (request.status, request.error_code) == ("rejected", "payment_declined")
    subscription = session.get_one(Subscription, request.subscription_id)
    assert subscription.status == "canceled"
    assert invoices_of(session, subscription.id)[0].status == "void"
    # Canceled, so the organization may subscribe again.
    session.execute(Card.__table__.update().values(token="tok_ok"))
    session.commit()
    again = submit(session, billing_gateway, payload("subscribe", cycle="annual", payment_method="card"),
                   date(2025, 1, 10))  # fmt: skip
    assert again.status == "applied"


def test_subscribe_annual_by_boleto_is_active_at_once(session, billing_gateway, sandbox_gateway):
    setup_organization(session, card_token=None)
    session.commit()
    on = date(2025, 4, 17)
    request = submit(session, billing_gateway, payload("subscribe", cycle="annual", payment_method="boleto"), on)

    assert request.status == "applied"
    subscription = session.get_one(Subscription, request.result["subscription_id"])
    assert (subscription.status, subscription.current_period_end) == ("active", date(2026, 4, 17))
    [invoice] = invoices_of(session, subscription.id)
    assert (invoice.status, invoice.method, invoice.due_date) == ("open", "boleto", on + timedelta(days=3))
    assert request.result["boleto"]["due_date"] == "2025-04-20"
    assert {"subscribed", "boleto_issued"} == {n.kind for n in notices(session)}


@pytest.mark.parametrize(
    ("body", "card", "code"),
    [
        ({"cycle": "monthly", "payment_method": "boleto"}, "tok_ok", "boleto_requires_annual"),
        ({"cycle": "monthly", "payment_method": "card"}, None, "no_card_on_file"),
        ({"cycle": "monthly", "payment_method": "card", "product": "outro"}, "tok_ok", "unknown_product"),
    ],
)
def test_subscribe_refusals(session, billing_gateway, body, card, code):
    setup_organization(session, card_token=card)
    session.commit()
    request = submit(session, billing_gateway, payload("subscribe", **body), date(2025, 1, 10))
    assert (request.status, request.error_code) == ("rejected", code)
    assert session.scalar(select(func.count()).select_from(Subscription)) == 0


def test_a_second_live_subscription_is_refused(session, billing_gateway):
    organization = setup_organization(session)
    subscription_for(session, organization, cycle="monthly", method="card", start=date(2025, 1, 10))
    session.commit()
    request = submit(session, billing_gateway, payload("subscribe", cycle="annual", payment_method="card"),
                     date(2025, 1, 12))  # fmt: skip
    assert (request.status, request.error_code) == ("rejected", "already_subscribed")


# --- cancel and resume -------------------------------------------------------------------------


def test_cancel_at_period_end_and_resume(session, billing_gateway):
    organization = setup_organization(session)
    subscription = subscription_for(session, organization, cycle="monthly", method="card", start=date(2025, 1, 10))
    session.commit()
    on = date(2025, 1, 20)

    cancel = submit(session, billing_gateway, payload("cancel", subscription.id), on)
    assert (cancel.status, cancel.result["ends_on"]) == ("applied", "2025-02-10")
    twice = submit(session, billing_gateway, payload("cancel", subscription.id), on)
    assert twice.error_code == "cancellation_already_scheduled"
    session.refresh(subscription)
    assert subscription.cancel_at_period_end is True

    resume = submit(session, billing_gateway, payload("resume", subscription.id), date(2025, 2, 9))
    assert (resume.status, resume.result["renewal_date"]) == ("applied", "2025-02-10")
    session.refresh(subscription)
    assert subscription.cancel_at_period_end is False
    again = submit(session, billing_gateway, payload("resume", subscription.id), date(2025, 2, 9))
    assert again.error_code == "cancellation_not_scheduled"
    assert [n.kind for n in notices(session)] == [
        "cancellation_scheduled",
        "change_request_rejected",
        "cancellation_undone",
        "change_request_rejected",
    ]
    assert notices(session, "cancellation_scheduled")[0].context == {"ends_on": "2025-02-10"}


def test_resume_after_the_renewal_date_is_too_late(session, billing_gateway):
    organization = setup_organization(session)
    subscription = subscription_for(session, organization, cycle="monthly", method="card", start=date(2025, 1, 10))
    subscription.cancel_at_period_end = True
    session.commit()
    late = submit(session, billing_gateway, payload("resume", subscription.id), date(2025, 2, 10))
    assert (late.status, late.error_code) == ("rejected", "subscription_canceled")
    subscription.status = "canceled"
    session.commit()
    after = submit(session, billing_gateway, payload("billing_cycle", subscription.id, to_cycle="annual"),
                   date(2025, 2, 11))  # fmt: skip
    assert after.error_code == "subscription_canceled"


def test_cancel_voids_the_issued_renewal_boleto(session, billing_gateway, sandbox_gateway):
    organization = setup_organization(session)
    on = date(2025, 9, 15)
    subscription = subscription_for(
        session, organization, cycle="annual", method="boleto", start=date(2024, 9, 20), balance_cents=500
    )
    session.commit()
    upcoming = renewal_boleto(session, billing_gateway, subscription, on)
    boleto = session.scalars(select(Boleto)).one()

    request = submit(session, billing_gateway, payload("cancel", subscription.id), on)

    assert request.status == "applied"
    assert request.result["voided_invoice_ids"] == [upcoming.id]
    session.refresh(upcoming)
    session.refresh(boleto)
    session.refresh(subscription)
    assert (upcoming.status, boleto.status, subscription.balance_cents) == ("void", "canceled", 500)
    assert_balance_matches_ledger(session, subscription, opening_balance=500)
    # The outbox message (no worker in this test) would do this; it is safe to repeat.
    assert cancel_boleto_at(billing_gateway, boleto.gateway_id) == "canceled"
    assert sandbox_gateway.boleto(boleto.gateway_id)["status"] == "canceled"


# --- idempotency -------------------------------------------------------------------------------


def test_the_same_request_twice_is_processed_once(session, billing_gateway, sandbox_gateway):
    organization = setup_organization(session)
    subscription = subscription_for(session, organization, cycle="monthly", method="card", start=date(2025, 3, 1))
    session.commit()
    body = payload("billing_cycle", subscription.id, to_cycle="annual")
    first = submit(session, billing_gateway, body, date(2025, 3, 11))
    # The same key and payload, even with a default spelled out and a day later: the same request.
    replay = submit(session, billing_gateway, {**body, "payment_method": None}, date(2025, 3, 12))

    assert replay.id == first.id and replay.status == "applied"
    assert session.scalar(select(func.count()).select_from(ChangeRequest)) == 1
    assert len(invoices_of(session, subscription.id, "cycle_change")) == 1
    assert session.scalar(select(func.count()).select_from(Charge)) == 1


def test_a_reused_key_with_another_payload(session, billing_gateway):
    organization = setup_organization(session)
    subscription = subscription_for(session, organization, cycle="annual", method="card", start=date(2025, 3, 1))
    session.commit()
    body = payload("cancel", subscription.id)
    submit(session, billing_gateway, body, date(2025, 3, 11))
    other = {**body, "kind": "resume"}

    with pytest.raises(IdempotencyKeyReused):
        record_change_request(session, other, source="api", now=noon(date(2025, 3, 11)))
    session.rollback()
    # The queue path cannot record a second row for the key: the message is dropped and logged.
    assert submit_request(session, billing_gateway, other, now=noon(date(2025, 3, 11)), config=CONFIG) is None
    assert session.scalars(select(ChangeRequest)).one().kind == "cancel"


@pytest.mark.parametrize(
    "body",
    [
        {"kind": "cancel", "subscription_id": 1, "requested_by": 101},
        {"organization_id": "1", "idempotency_key": "k", "kind": "cancel"},
        {"organization_id": 1, "idempotency_key": "", "kind": "cancel"},
        ["not", "an", "object"],
    ],
)
def test_messages_that_cannot_be_recorded(session, body):
    with pytest.raises(UnrecordableChangeRequest):
        record_change_request(session, body, source="queue", now=noon(date(2025, 1, 1)))


def test_a_malformed_message_is_recorded_as_rejected(session, billing_gateway):
    setup_organization(session)
    session.commit()
    body = {"organization_id": 1, "idempotency_key": "bad-1", "requested_by": OWNER, "subscription_id": 7,
            "kind": "billing_cycle", "to_cycle": "weekly", "colour": "blue"}  # fmt: skip
    request = submit(session, billing_gateway, body, date(2025, 1, 10))
    assert (request.status, request.error_code, request.kind) == ("rejected", "invalid_request", "billing_cycle")
    assert "to_cycle" in request.error_message and "colour" in request.error_message
    fields = {item["field"] for item in request.result["error_details"]["fields"]}
    assert fields == {"to_cycle", "colour"}
    # Replaying the same malformed message finds the same row.
    assert submit(session, billing_gateway, body, date(2025, 1, 10)).id == request.id


def test_pending_requests_are_found_for_the_tick(session):
    setup_organization(session)
    session.commit()
    on = date(2025, 1, 10)
    recorded = record_change_request(session, payload("cancel", 1), source="api", now=noon(on))
    session.commit()
    assert change_date(recorded.request, CONFIG) == on
    assert pending_change_request_ids(session, noon(on)) == []
    assert pending_change_request_ids(session, noon(on) + timedelta(minutes=1)) == [recorded.request.id]


# --- through the queue, with real workers ------------------------------------------------------


def today() -> date:
    return local_today(datetime.now(UTC), CONFIG.timezone)


def request_by_key(key: str) -> ChangeRequest | None:
    with get_session_factory()() as fresh:
        request = fresh.scalar(select(ChangeRequest).where(ChangeRequest.idempotency_key == key))
        return request if request is not None and request.status != "pending" else None


def test_queue_upgrade_applies_with_the_quote(session, worker, broker, billing_gateway, sandbox_gateway):
    organization = setup_organization(session)
    start = today() - timedelta(days=10)
    # A 30-day period paid R$ 30,00: 20 unused days are worth exactly 2000.
    subscription = subscription_for(session, organization, cycle="monthly", method="card", start=start,
                                    end=start + timedelta(days=30), paid_cents=3000)  # fmt: skip
    session.commit()
    body = payload("billing_cycle", subscription.id, to_cycle="annual")

    # As the README shows for a main application that does not import Renova's actors.
    broker.enqueue(dramatiq.Message(queue_name="changes", actor_name="submit_change_request", args=(body,),
                                    kwargs={}, options={}))  # fmt: skip
    request = wait_until(lambda: request_by_key(body["idempotency_key"]))

    assert request.status == "applied", request.error_message
    assert request.source == "queue"
    assert (request.result["unused_cents"], request.result["amount_due_cents"]) == (2000, ANNUAL_PRICE - 2000)
    assert request.result["renewal_date"] == add_cycle(today(), "annual", 1).isoformat()
    session.expire_all()
    assert session.get_one(Subscription, subscription.id).cycle == "annual"
    assert [kind for kind, _, _ in money_ledger(session, subscription.id)] == [
        "period_used",
        "proration_credit",
        "credit_applied",
        "payment",
    ]


def test_queue_rejections_are_recorded_with_a_notice(session, worker, billing_gateway):
    organization = setup_organization(session)
    subscription = subscription_for(session, organization, cycle="monthly", method="card", start=today())
    session.commit()
    forbidden = payload("cancel", subscription.id, by=PLAIN_MEMBER)
    boleto = payload("payment_method", subscription.id, to="boleto")
    malformed = payload("payment_method", subscription.id, to="pix")
    for body in (forbidden, boleto, malformed):
        submit_change_request.send(body)

    codes = [wait_until(lambda body=body: request_by_key(body["idempotency_key"])).error_code
             for body in (forbidden, boleto, malformed)]  # fmt: skip

    assert codes == ["forbidden", "boleto_requires_annual", "invalid_request"]
    session.expire_all()
    assert ledger_of(session, subscription.id) == []
    assert sorted(n.recipients[0] for n in notices(session, "change_request_rejected")) == [
        "colab1@acme.example",
        "dona1@acme.example",
        "dona1@acme.example",
    ]


def test_a_message_without_organization_goes_to_the_dead_letter_queue(session, worker, broker):
    from workers.queues import queue_depths

    kwargs = broker.client.connection_pool.connection_kwargs
    url = f"redis://{kwargs['host']}:{kwargs['port']}/{kwargs.get('db', 0)}"
    submit_change_request.send({"idempotency_key": "x", "kind": "cancel"})
    assert wait_until(lambda: queue_depths(url, ("changes",))[0].dead) == 1
    assert session.scalar(select(func.count()).select_from(ChangeRequest)) == 0


def test_duplicated_messages_change_and_charge_once(session, worker, billing_gateway, sandbox_gateway):
    organization = setup_organization(session)
    subscription = subscription_for(session, organization, cycle="monthly", method="card",
                                    start=today() - timedelta(days=3))  # fmt: skip
    session.commit()
    body = payload("billing_cycle", subscription.id, to_cycle="annual")
    for _ in range(3):  # at-least-once delivery: the same message three times, at once
        submit_change_request.send(body)

    request = wait_until(lambda: request_by_key(body["idempotency_key"]))
    assert request.status == "applied"
    wait_until(lambda: worker_idle(worker), timeout=10)
    session.expire_all()
    assert session.scalar(select(func.count()).select_from(ChangeRequest)) == 1
    [charge] = session.scalars(select(Charge)).all()
    assert len(sandbox_gateway.ledger(idempotency_key=charge.idempotency_key)) == 1


def worker_idle(worker) -> bool:
    from workers.queues import queue_depths

    kwargs = worker.broker.client.connection_pool.connection_kwargs
    url = f"redis://{kwargs['host']}:{kwargs['port']}/{kwargs.get('db', 0)}"
    return all(depth.ready == 0 and depth.delayed == 0 for depth in queue_depths(url, ("changes",)))


def test_two_concurrent_cycle_changes_on_one_subscription(session, worker, billing_gateway, sandbox_gateway):
    organization = setup_organization(session)
    subscription = subscription_for(session, organization, cycle="monthly", method="card",
                                    start=today() - timedelta(days=5))  # fmt: skip
    session.commit()
    to_annual = payload("billing_cycle", subscription.id, to_cycle="annual")
    by_boleto = payload("billing_cycle", subscription.id, to_cycle="annual", payment_method="boleto",
                        by=FINANCIAL)  # fmt: skip
    barrier = threading.Barrier(2)

    def send(body: dict[str, Any]) -> None:
        barrier.wait()
        submit_change_request.send(body)

    threads = [threading.Thread(target=send, args=(body,)) for body in (to_annual, by_boleto)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    keys = [body["idempotency_key"] for body in (to_annual, by_boleto)]

    def recorded(key: str) -> ChangeRequest | None:
        with get_session_factory()() as fresh:
            return fresh.scalar(select(ChangeRequest).where(ChangeRequest.idempotency_key == key))

    def settled() -> bool:
        # The subscription row lock orders them: one applies; the other sees the result (same cycle),
        # or waits while the first one's charge is in flight and is processed again — the tick's job,
        # done here; harmless while a worker holds it, since the request row lock serializes them.
        for row in filter(None, (recorded(key) for key in keys)):
            if row.status == "pending":
                process_request(session, billing_gateway, row.id, on=today(), now=datetime.now(UTC), config=CONFIG)
        return all(request_by_key(key) for key in keys)

    wait_until(settled, interval=0.2)
    results = [wait_until(lambda key=key: request_by_key(key)) for key in keys]
    assert sorted(r.status for r in results) == ["applied", "rejected"]
    rejected = next(r for r in results if r.status == "rejected")
    assert rejected.error_code == "same_cycle"
    session.expire_all()
    upgrades = invoices_of(session, subscription.id, "cycle_change")
    assert [invoice.status for invoice in upgrades if invoice.status != "void"] in (["paid"], ["open"])
    subscription = session.get_one(Subscription, subscription.id)
    assert subscription.cycle == "annual"
    assert_balance_matches_ledger(session, subscription)
    for charge in session.scalars(select(Charge)):
        assert len(sandbox_gateway.ledger(idempotency_key=charge.idempotency_key)) <= 1


def test_resume_after_the_renewal_boleto_was_voided(session, billing_gateway):
    organization = setup_organization(session)
    on = date(2025, 9, 15)
    subscription = subscription_for(session, organization, cycle="annual", method="boleto", start=date(2024, 9, 20))
    session.commit()
    renewal_boleto(session, billing_gateway, subscription, on)
    assert submit(session, billing_gateway, payload("cancel", subscription.id), on).status == "applied"

    resume = submit(session, billing_gateway, payload("resume", subscription.id), date(2025, 9, 17))

    session.refresh(subscription)
    renewals = invoices_of(session, subscription.id, "renewal")
    # A void invoice no longer holds the renewal's slot: a new invoice and boleto, due max(T, D + 3).
    assert resume.status == "applied"
    assert [invoice.status for invoice in renewals] == ["void", "open"]
    assert renewals[1].due_date == date(2025, 9, 20)
    assert subscription.cancel_at_period_end is False
