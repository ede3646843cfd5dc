"""`renova ledger check` (jobs.ledger_check): each rule caught on a minimal state that breaks it and
nothing else, consistent states (the factories' trails, a real renewal, a cycle change's split
period, an overpaid boleto) reported clean, and the CLI's exit codes.

Prices (tests.integration.factories): monthly R$ 49,90, annual R$ 479,00.
"""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from jobs.billing_day import run_day
from jobs.context import runtime
from jobs.invoicing import create_renewal_invoice
from jobs.ledger_check import BALANCE_KINDS, RULES, Violation, check_ledger
from models.calendar import add_cycle
from models.schema import Boleto, Charge, Invoice, LedgerEntry, Refund, Subscription
from tests.integration.factories import (
    ANNUAL_PRICE,
    MONTHLY_PRICE,
    Trail,
    make_organization,
    make_subscription,
    noon,
    seed_plans,
)

ANCHOR = date(2027, 3, 10)
END = date(2027, 4, 10)  # the monthly factory subscription's current period is [ANCHOR, END)


def found(session: Session, subscription_id: int | None = None) -> set[tuple[str, int | None, int | None]]:
    session.flush()
    return {(v.rule, v.subscription_id, v.invoice_id) for v in check_ledger(session, subscription_id)}


def monthly(
    session: Session, *, organization_id: int = 1, trail: Trail = "migrated", balance_cents: int = 0
) -> Subscription:
    if organization_id == 1:
        seed_plans(session)
    organization = make_organization(session, organization_id)
    return make_subscription(
        session, organization, cycle="monthly", method="card", anchor=ANCHOR, trail=trail, balance_cents=balance_cents
    )


def first_invoice(session: Session, subscription: Subscription) -> Invoice:
    return session.scalars(
        select(Invoice).where(Invoice.subscription_id == subscription.id).order_by(Invoice.id).limit(1)
    ).one()


def entry(
    session: Session,
    subscription: Subscription,
    kind: str,
    amount_cents: int,
    invoice_id: int | None = None,
    **details: Any,
) -> None:
    """A ledger entry; one of the balance kinds also moves the balance, as the flows do."""
    session.add(
        LedgerEntry(
            subscription_id=subscription.id,
            invoice_id=invoice_id,
            kind=kind,
            amount_cents=amount_cents,
            description=kind,
            details=details,
        )
    )
    if kind in BALANCE_KINDS:
        subscription.balance_cents += amount_cents


def invoice(
    session: Session, subscription: Subscription, start: date, end: date, *, status: str = "paid", amount: int = 4990
) -> Invoice:
    """An extra renewal invoice; a paid one is paid with credit granted for it, a consistent trail."""
    row = Invoice(
        subscription_id=subscription.id,
        organization_id=subscription.organization_id,
        kind="renewal",
        cycle=subscription.cycle,
        period_start=start,
        period_end=end,
        amount_cents=amount,
        discount_cents=amount if status == "paid" else 0,
        total_cents=0 if status == "paid" else amount,
        status=status,
        method="card",
        due_date=start,
        paid_on=start if status == "paid" else None,
    )
    session.add(row)
    session.flush()
    if status == "paid":
        entry(session, subscription, "credit_granted", amount)
        entry(session, subscription, "credit_applied", -amount, row.id)
    return row


def charge(session: Session, invoice_id: int, attempt: int, amount: int, status: str = "succeeded") -> Charge:
    row = Charge(
        invoice_id=invoice_id,
        attempt=attempt,
        idempotency_key=f"charge:{invoice_id}:{attempt}",
        amount_cents=amount,
        card_token="tok_ok",
        status=status,
    )
    session.add(row)
    session.flush()
    return row


def refund(session: Session, subscription: Subscription, amount: int, *, charge_id: int | None = None) -> None:
    session.add(
        Refund(
            subscription_id=subscription.id,
            organization_id=subscription.organization_id,
            charge_id=charge_id,
            method="card" if charge_id else "payout",
            amount_cents=amount,
        )
    )


def cancel(subscription: Subscription) -> None:
    subscription.status = "canceled"


# --- consistent states --------------------------------------------------------------------------


@pytest.mark.parametrize("trail", ["migrated", "gateway"])
@pytest.mark.parametrize(("cycle", "method"), [("monthly", "card"), ("annual", "card"), ("annual", "boleto")])
def test_the_factories_leave_a_consistent_trail(session, trail, cycle, method):
    seed_plans(session)
    organization = make_organization(session)
    subscription = make_subscription(
        session, organization, cycle=cycle, method=method, anchor=ANCHOR, trail=trail, balance_cents=1_234
    )
    assert found(session) == set()
    kinds = sorted(session.scalars(select(LedgerEntry.kind).where(LedgerEntry.subscription_id == subscription.id)))
    if trail == "migrated":
        assert kinds == ["credit_applied", "credit_granted", "credit_granted"]
        assert session.scalar(select(Charge)) is None and session.scalar(select(Boleto)) is None
    else:
        assert kinds == ["credit_granted", "payment"]
        gateway_row = session.scalars(select(Charge if method == "card" else Boleto)).one()
        assert (gateway_row.status, gateway_row.amount_cents) == (
            "succeeded" if method == "card" else "paid",
            MONTHLY_PRICE if cycle == "monthly" else ANNUAL_PRICE,
        )


def test_a_renewal_through_the_daily_run_is_consistent(session, billing_gateway):
    subscription = monthly(session, trail="gateway", balance_cents=1_000)
    boleto_organization = make_organization(session, 2, card_token=None)
    boleto_subscription = make_subscription(
        session, boleto_organization, cycle="annual", method="boleto", anchor=date(2026, 4, 12), trail="gateway"
    )
    session.commit()

    for day in (END, END + timedelta(days=1)):
        run_day(session, billing_gateway, day, noon(day), runtime().config)
    session.refresh(subscription)
    assert subscription.current_period_start == END
    assert (
        session.scalar(
            select(Invoice.status).where(Invoice.kind == "renewal", Invoice.subscription_id == subscription.id)
        )
        == "paid"
    )
    # The annual boleto renewal (T = 2027-04-12, so T − 7 has passed) is issued and still open: consistent too.
    assert (
        session.scalar(
            select(Invoice.status).where(Invoice.subscription_id == boleto_subscription.id, Invoice.kind == "renewal")
        )
        == "open"
    )
    assert found(session) == set()


def test_a_cycle_change_splits_the_period_without_overlap(session):
    """The period left on D is in use until D only: the new period starting on D does not overlap it."""
    subscription = monthly(session)
    left = first_invoice(session, subscription)
    on = date(2027, 3, 25)
    entry(session, subscription, "period_used", -2_575, left.id, on=on.isoformat(), paid_cents=4990)
    entry(session, subscription, "proration_credit", 2_415, left.id, paid_cents=4990)
    annual = invoice(session, subscription, on, add_cycle(on, "annual", 1), amount=ANNUAL_PRICE)
    subscription.cycle, subscription.current_period_start, subscription.current_period_end = (
        "annual",
        on,
        annual.period_end,
    )
    assert found(session) == set()


def test_an_overpaid_boleto_is_one_payment_and_some_credit(session):
    seed_plans(session)
    organization = make_organization(session, card_token=None)
    subscription = make_subscription(
        session, organization, cycle="annual", method="boleto", anchor=ANCHOR, trail="gateway"
    )
    paid = first_invoice(session, subscription)
    boleto = session.scalars(select(Boleto)).one()
    boleto.paid_amount_cents = ANNUAL_PRICE + 1_000
    entry(session, subscription, "payment_to_credit", 1_000, paid.id)
    assert found(session) == set()


def test_a_live_subscription_may_hold_its_next_period_paid(session):
    subscription = monthly(session)
    invoice(session, subscription, END, add_cycle(ANCHOR, "monthly", 2))
    assert found(session) == set()


def test_an_ended_subscription_refunded_is_consistent(session):
    subscription = monthly(session, trail="gateway", balance_cents=700)
    cancel(subscription)
    paid_charge = session.scalars(select(Charge)).one()
    # A card refund the gateway refused, replaced by a payout: only the payout counts.
    session.add(
        Refund(
            subscription_id=subscription.id,
            organization_id=subscription.organization_id,
            charge_id=paid_charge.id,
            method="card",
            amount_cents=700,
            status="failed",
        )
    )
    refund(session, subscription, 700)
    entry(session, subscription, "refund", -700, refund_id=1)
    assert subscription.balance_cents == 0
    assert found(session) == set()


# --- every rule, broken alone ---------------------------------------------------------------------


def test_balance(session):
    subscription = monthly(session)
    subscription.balance_cents += 500  # credit from nowhere
    [violation] = check_ledger(session)
    assert (violation.rule, violation.subscription_id, violation.invoice_id) == ("balance", subscription.id, None)
    assert (violation.expected, violation.found) == (0, 500)
    assert "R$ 5,00 of credit was created without a ledger entry" in violation.message


def test_ended_balance(session):
    subscription = monthly(session, balance_cents=500)
    cancel(subscription)
    assert found(session) == {("ended_balance", subscription.id, None)}


def test_ended_open_invoice(session):
    subscription = monthly(session)
    left_open = invoice(session, subscription, END, add_cycle(ANCHOR, "monthly", 2), status="open")
    cancel(subscription)
    assert found(session) == {("ended_open_invoice", subscription.id, left_open.id)}


def test_paid_invoice(session):
    subscription = monthly(session)
    unpaid = invoice(session, subscription, END, add_cycle(ANCHOR, "monthly", 2), status="open")
    unpaid.status = "paid"  # marked paid with no payment and no credit
    [violation] = check_ledger(session)
    assert (violation.rule, violation.subscription_id, violation.invoice_id) == (
        "paid_invoice",
        subscription.id,
        unpaid.id,
    )
    assert (violation.expected, violation.found) == (4990, 0)


@pytest.mark.parametrize("trail", ["gateway", "migrated"])
def test_voided_paid_invoice(session, trail):
    """Paid by money (a payment entry) or entirely by credit (only paid_on tells), then voided
    without its amount going back to the balance."""
    subscription = monthly(session, trail=trail)
    voided = first_invoice(session, subscription)
    voided.status = "void"
    assert found(session) == {("voided_paid_invoice", subscription.id, voided.id)}


def test_voided_invoice_credit(session):
    subscription = monthly(session, balance_cents=1_000)
    upcoming = create_renewal_invoice(session, subscription, period_start=END, method="card", due_date=END)
    assert upcoming is not None and upcoming.discount_cents == 1_000
    upcoming.status = "void"  # voided, but its discount never restored
    assert found(session) == {("voided_invoice_credit", subscription.id, upcoming.id)}


def test_paid_twice_by_entries(session):
    """Two payment entries for one invoice (here two half charges, so every sum still adds up)."""
    subscription = monthly(session, trail="gateway")
    paid = first_invoice(session, subscription)
    first = session.scalars(select(Charge)).one()
    first.amount_cents = 2_495
    session.execute(update(LedgerEntry).where(LedgerEntry.kind == "payment").values(amount_cents=2_495))
    charge(session, paid.id, 2, 2_495)
    entry(session, subscription, "payment", 2_495, paid.id)
    [violation] = check_ledger(session)
    assert (violation.rule, violation.subscription_id, violation.invoice_id) == ("paid_twice", subscription.id, paid.id)
    assert (violation.expected, violation.found) == (1, 2)


def test_paid_twice_at_the_gateway(session):
    """A second charge succeeded on a paid invoice; its credit was booked against another invoice, so the
    subscription's totals agree but neither invoice does."""
    subscription = monthly(session, trail="gateway")
    paid = first_invoice(session, subscription)
    other = invoice(session, subscription, END, add_cycle(ANCHOR, "monthly", 2), status="open")
    charge(session, paid.id, 2, 4990)
    entry(session, subscription, "payment_to_credit", 4990, other.id)
    assert found(session) == {("paid_twice", subscription.id, paid.id), ("paid_twice", subscription.id, other.id)}
    by_invoice = {v.invoice_id: v for v in check_ledger(session)}
    assert (by_invoice[paid.id].expected, by_invoice[paid.id].found) == (9980, 4990)


def test_money_received(session):
    subscription = monthly(session, trail="gateway")
    entry(session, subscription, "payment_to_credit", 4990)  # money recorded that no gateway ever took
    [violation] = check_ledger(session)
    assert (violation.rule, violation.subscription_id, violation.invoice_id) == (
        "money_received",
        subscription.id,
        None,
    )
    assert (violation.expected, violation.found) == (4990, 9980)


def test_refunds_against_the_ledger(session):
    subscription = monthly(session, balance_cents=500)
    cancel(subscription)
    refund(session, subscription, 500)
    entry(session, subscription, "refund", -500, refund_id=1)
    refund(session, subscription, 500)  # the same balance refunded twice
    [violation] = check_ledger(session)
    assert (violation.rule, violation.subscription_id, violation.invoice_id) == ("refunds", subscription.id, None)
    assert (violation.expected, violation.found) == (1000, 500)


def test_refunds_beyond_the_charge(session):
    subscription = monthly(session, trail="gateway", balance_cents=6_000)
    cancel(subscription)
    paid_charge = session.scalars(select(Charge)).one()
    refund(session, subscription, 6_000, charge_id=paid_charge.id)  # the charge took only 4990
    entry(session, subscription, "refund", -6_000, refund_id=1)
    [violation] = check_ledger(session)
    assert (violation.rule, violation.subscription_id, violation.invoice_id) == (
        "refunds",
        subscription.id,
        paid_charge.invoice_id,
    )
    assert (violation.expected, violation.found) == (4990, 6000)


def test_proration(session):
    subscription = monthly(session)
    left = first_invoice(session, subscription)
    entry(session, subscription, "period_used", -3_000, left.id, on="2027-03-25")
    entry(session, subscription, "proration_credit", 1_500, left.id)  # 490 cents lost
    [violation] = check_ledger(session)
    assert (violation.rule, violation.subscription_id, violation.invoice_id) == ("proration", subscription.id, left.id)
    assert (violation.expected, violation.found) == (4990, 4500)


def test_overlap(session):
    subscription = monthly(session)
    first = first_invoice(session, subscription)
    later = invoice(session, subscription, ANCHOR + timedelta(days=10), END + timedelta(days=10))
    [violation] = check_ledger(session)
    assert (violation.rule, violation.subscription_id, violation.invoice_id) == ("overlap", subscription.id, later.id)
    assert (violation.expected, violation.found) == ("[2027-03-10, 2027-04-10)", "[2027-03-20, 2027-04-20)")
    assert f"invoice {first.id}" in violation.message


def test_overlap_after_a_cycle_change_that_did_not_end_the_period(session):
    """The period left is in use until D; a new period starting before D overlaps it."""
    subscription = monthly(session)
    left = first_invoice(session, subscription)
    entry(session, subscription, "period_used", -2_575, left.id, on="2027-03-25")
    entry(session, subscription, "proration_credit", 2_415, left.id)
    annual = invoice(session, subscription, date(2027, 3, 24), date(2028, 3, 24), amount=ANNUAL_PRICE)
    subscription.current_period_start, subscription.current_period_end = annual.period_start, annual.period_end
    assert found(session) == {("overlap", subscription.id, annual.id)}


def test_unused_period_on_a_live_subscription(session):
    subscription = monthly(session)
    beyond = invoice(session, subscription, END + timedelta(days=31), END + timedelta(days=61))
    assert found(session) == {("unused_period", subscription.id, beyond.id)}


def test_unused_period_on_an_ended_subscription(session):
    subscription = monthly(session)
    next_period = invoice(session, subscription, END, add_cycle(ANCHOR, "monthly", 2))
    cancel(subscription)  # ended on END: the paid period starting then is never served
    [violation] = check_ledger(session)
    assert (violation.rule, violation.subscription_id, violation.invoice_id) == (
        "unused_period",
        subscription.id,
        next_period.id,
    )
    assert (violation.expected, violation.found) == ("2027-04-10", "2027-04-10")


def test_every_rule_is_tested_here():
    tested = [name.removeprefix("test_") for name in globals() if name.startswith("test_")]
    assert [rule for rule in RULES if not any(name.startswith(rule) for name in tested)] == []


# --- scope ------------------------------------------------------------------------------------------


def test_one_subscription_is_checked_alone(session):
    broken = monthly(session)
    fine = monthly(session, organization_id=2)
    broken.balance_cents += 1
    assert found(session, fine.id) == set()
    assert found(session, broken.id) == {("balance", broken.id, None)}
    assert found(session) == {("balance", broken.id, None)}


def test_violations_are_frozen():
    violation = Violation("balance", 1, None, 0, 1, "m")
    with pytest.raises(AttributeError):
        violation.rule = "other"  # type: ignore[misc]


# --- CLI ----------------------------------------------------------------------------------------------


@pytest.mark.ledger_unchecked("commits a broken balance on purpose, for the CLI to find")
def test_cli_exits_1_and_shows_the_rule_on_a_bad_state(session):
    from tests.integration.test_cli import renova

    subscription = monthly(session)
    subscription.balance_cents += 500
    session.commit()

    result = renova("ledger", "check")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "balance" in result.stdout and "created without a ledger entry" in result.stdout
    scoped = renova("ledger", "check", "--subscription", str(subscription.id))
    assert scoped.returncode == 1 and "balance" in scoped.stdout


def test_cli_exits_0_on_a_clean_state(session):
    from tests.integration.test_cli import renova

    monthly(session)
    monthly(session, organization_id=2, trail="gateway")
    session.commit()

    result = renova("ledger", "check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ledger check: 2 subscriptions, no money kept or lost" in result.stdout
    missing = renova("ledger", "check", "--subscription", "999999")
    assert missing.returncode == 2 and "no subscription 999999" in missing.stdout
