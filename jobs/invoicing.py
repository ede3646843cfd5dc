"""Shared state transitions of invoices, credit and ledger, used by every flow that bills.

These functions change rows inside the caller's transaction and never commit: the flow decides
where its transactions end (and never holds one open across a gateway call).
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.dialects.postgresql import Insert, insert
from sqlalchemy.orm import Session

from jobs.notifications import notify
from models.calendar import add_cycle
from models.dunning import is_past_due
from models.schema import Charge, Invoice, LedgerEntry, Plan, Subscription
from models.states import ChargeStatus, InvoiceKind, InvoiceStatus, LedgerKind, PaymentMethod, SubscriptionStatus

CREDIT_APPLIED = "Crédito aplicado à fatura"


class MissingPlan(LookupError):
    """No price for a product and billing cycle."""


def plan_price(session: Session, product: str, cycle: str, on: date) -> int:
    """The plan's price in force on `on` (a renewal's T, a change's D). The price list is read once
    per session (a message's unit of work) rather than per row."""
    schedules: dict[tuple[str, str], list[tuple[date, int]]] = session.info.setdefault("plan_prices", {})
    if (product, cycle) not in schedules:
        schedules[product, cycle] = [
            (row.effective_from, row.price_cents)
            for row in session.execute(
                select(Plan.effective_from, Plan.price_cents)
                .where(Plan.product == product, Plan.cycle == cycle)
                .order_by(Plan.effective_from.desc())
            )
        ]
    for effective_from, price in schedules[product, cycle]:
        if effective_from <= on:
            return price
    raise MissingPlan(f"no {cycle} price for product {product!r} on {on.isoformat()}")


def lock_subscription(session: Session, subscription_id: int) -> Subscription | None:
    """SELECT … FOR UPDATE, refreshing a copy the session may already hold (it may be stale)."""
    return session.scalars(
        select(Subscription)
        .where(Subscription.id == subscription_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).one_or_none()


def ledger(
    session: Session,
    subscription: Subscription,
    kind: LedgerKind,
    amount_cents: int,
    description: str,
    *,
    invoice_id: int | None = None,
    change_request_id: int | None = None,
    **details: Any,
) -> None:
    session.add(
        LedgerEntry(
            subscription_id=subscription.id,
            invoice_id=invoice_id,
            change_request_id=change_request_id,
            kind=kind,
            amount_cents=amount_cents,
            description=description,
            details=details,
        )
    )


def invoice_values(
    *,
    subscription_id: int,
    organization_id: int,
    kind: InvoiceKind,
    cycle: str,
    period_start: date,
    period_end: date,
    amount_cents: int,
    discount_cents: int,
    method: str,
    due_date: date,
    change_request_id: int | None = None,
) -> dict[str, Any]:
    """The row of a new open invoice, as every flow inserts it (one row, or many at once). Its total is
    the amount less the discount — every discount in Renova is the customer's own credit. A renewal
    has no change request: the key is left out (a multi-row insert compiles every key of every row)."""
    values: dict[str, Any] = {
        "subscription_id": subscription_id,
        "organization_id": organization_id,
        "kind": kind,
        "cycle": cycle,
        "period_start": period_start,
        "period_end": period_end,
        "amount_cents": amount_cents,
        "discount_cents": discount_cents,
        "total_cents": amount_cents - discount_cents,
        "status": InvoiceStatus.OPEN,
        "method": method,
        "due_date": due_date,
    }
    if change_request_id is not None:
        values["change_request_id"] = change_request_id
    return values


def renewal_invoice_values(
    session: Session, subscription: Any, *, period_start: date, method: str, due_date: date
) -> dict[str, Any]:
    """The renewal invoice for the anchored period starting at `period_start`: the plan's price then,
    less the credit balance (DESIGN: amount = price − credit balance). `subscription` is a
    `Subscription` or a row with its columns."""
    price = plan_price(session, subscription.product, subscription.cycle, period_start)
    return invoice_values(
        subscription_id=subscription.id,
        organization_id=subscription.organization_id,
        kind=InvoiceKind.RENEWAL,
        cycle=subscription.cycle,
        period_start=period_start,
        period_end=next_period_end(subscription, period_start),
        amount_cents=price,
        discount_cents=min(subscription.balance_cents, price),
        method=method,
        due_date=due_date,
    )


def insert_renewal_invoices(values: dict[str, Any] | list[dict[str, Any]]) -> Insert:
    """The INSERT of renewal invoices (`renewal_invoice_values`) that skips one already there: a renewal
    invoice is unique per subscription and period among the renewals not voided."""
    return (
        insert(Invoice)
        .values(values)
        .on_conflict_do_nothing(
            index_elements=["subscription_id", "period_start"],
            index_where=text("kind = 'renewal' AND status <> 'void'"),
        )
    )


def create_renewal_invoice(
    session: Session, subscription: Subscription, *, period_start: date, method: str, due_date: date
) -> Invoice | None:
    """The invoice for the period starting at `period_start`, once: None when it already exists.

    The credit balance is discounted from it (DESIGN: amount = price − credit balance).
    """
    values = renewal_invoice_values(session, subscription, period_start=period_start, method=method, due_date=due_date)
    invoice_id = session.scalar(insert_renewal_invoices(values).returning(Invoice.id))
    if invoice_id is None:
        return None
    invoice = session.get_one(Invoice, invoice_id)
    discount = values["discount_cents"]
    if discount:
        subscription.balance_cents -= discount
        ledger(session, subscription, LedgerKind.CREDIT_APPLIED, -discount, CREDIT_APPLIED, invoice_id=invoice.id)
    return invoice


def apply_credit(
    session: Session, subscription: Subscription, invoice: Invoice, amount_cents: int, *, description: str
) -> None:
    """Move `amount_cents` of the balance onto an open invoice as a discount (ledger `credit_applied`)."""
    amount = min(amount_cents, subscription.balance_cents, invoice.total_cents)
    if amount <= 0:
        return
    invoice.discount_cents += amount
    invoice.total_cents -= amount
    subscription.balance_cents -= amount
    ledger(session, subscription, LedgerKind.CREDIT_APPLIED, -amount, description, invoice_id=invoice.id)


def renewal_invoice(session: Session, subscription_id: int, period_start: date) -> Invoice | None:
    return session.scalar(
        select(Invoice).where(
            Invoice.subscription_id == subscription_id,
            Invoice.period_start == period_start,
            Invoice.kind == InvoiceKind.RENEWAL,
            Invoice.status != InvoiceStatus.VOID,
        )
    )


def next_period_end(subscription: Subscription, period_start: date) -> date:
    """The end of the anchored period that starts at (or contains) `period_start`."""
    n = 1
    while add_cycle(subscription.billing_anchor, subscription.cycle, n) <= period_start:
        n += 1
    return add_cycle(subscription.billing_anchor, subscription.cycle, n)


def mark_invoice_paid(
    session: Session,
    invoice: Invoice,
    *,
    paid_on: date,
    now: datetime,
    amount_cents: int,
    source: str,
    card: dict[str, str] | None = None,
) -> bool:
    """Record a payment of an open invoice and its consequences; False when it was not open.

    A past-due or suspended subscription becomes active. From `suspended` the paid invoice covers
    `[paid_on, add_cycle(paid_on, cycle, 1))` and the payment date becomes the anchor (the customer
    never pays for time they were suspended); from `past_due` (service never stopped) the period stays.
    """
    if invoice.status != InvoiceStatus.OPEN:
        return False
    subscription = lock_subscription(session, invoice.subscription_id)
    assert subscription is not None
    invoice.status = InvoiceStatus.PAID
    invoice.paid_on = paid_on
    invoice.paid_at = now
    if amount_cents:
        ledger(session, subscription, LedgerKind.PAYMENT, amount_cents, f"Pagamento ({source})", invoice_id=invoice.id)

    if subscription.status in (SubscriptionStatus.PAST_DUE, SubscriptionStatus.SUSPENDED) and not has_other_past_due(
        session, subscription.id, invoice.id, paid_on
    ):
        if subscription.status == SubscriptionStatus.SUSPENDED:
            # Service stopped while suspended: whatever the invoice's kind, and even if its period has
            # not ended, the paid period starts on the payment date (the suspension notice promises it).
            restart_period_on_payment(subscription, invoice, paid_on)
        subscription.status = SubscriptionStatus.ACTIVE
        subscription.suspended_at = None
        notify(
            session,
            organization_id=subscription.organization_id,
            subscription_id=subscription.id,
            kind="subscription_reactivated",
            dedupe_key=f"subscription_reactivated:{invoice.id}",
            context={
                "invoice_id": invoice.id,
                "period_start": subscription.current_period_start.isoformat(),
                "period_end": subscription.current_period_end.isoformat(),
            },
        )

    if invoice.method == PaymentMethod.CARD or amount_cents == 0:
        notify(
            session,
            organization_id=subscription.organization_id,
            subscription_id=subscription.id,
            kind="charge_succeeded",
            dedupe_key=f"charge_succeeded:{invoice.id}",
            context={
                "invoice_id": invoice.id,
                "amount_cents": invoice.total_cents,
                "card_brand": (card or {}).get("brand", ""),
                "card_last4": (card or {}).get("last4", ""),
                "period_start": invoice.period_start.isoformat(),
                "period_end": invoice.period_end.isoformat(),
                "paid_on": paid_on.isoformat(),
            },
        )
    return True


def restart_period_on_payment(subscription: Subscription, invoice: Invoice, paid_on: date) -> None:
    new_end = add_cycle(paid_on, invoice.cycle, 1)
    invoice.period_start, invoice.period_end = paid_on, new_end
    subscription.billing_anchor = paid_on
    subscription.current_period_start, subscription.current_period_end = paid_on, new_end


def has_other_past_due(session: Session, subscription_id: int, invoice_id: int, on: date) -> bool:
    """Another open invoice of the subscription already past due on `on` (models.dunning.is_past_due:
    a boleto still payable, or one issued early, is not)."""
    charge_failed = (
        select(Charge.id).where(Charge.invoice_id == Invoice.id, Charge.status == ChargeStatus.FAILED).exists()
    )
    # Nothing due after `on` is past due, whatever its method: the SQL keeps only the candidates.
    candidates = session.execute(
        select(Invoice.method, Invoice.due_date, charge_failed).where(
            Invoice.subscription_id == subscription_id,
            Invoice.status == InvoiceStatus.OPEN,
            Invoice.id != invoice_id,
            Invoice.due_date <= on,
        )
    ).all()
    return any(
        is_past_due(method=method, due_date=due_date, on=on, charge_failed=failed)
        for method, due_date, failed in candidates
    )


def void_unused_paid_invoice(
    session: Session,
    subscription: Subscription,
    invoice: Invoice,
    *,
    description: str,
    change_request_id: int | None = None,
) -> int:
    """Void a paid invoice whose period has not started (a renewal boleto paid between T − 7 and T, a
    renewal covered by credit): it was not used at all, so its whole amount — money and credit —
    joins the balance (ledger `unused_period_credit`). Returns that amount (0 if it was not paid)."""
    if invoice.status != InvoiceStatus.PAID:
        return 0
    invoice.status = InvoiceStatus.VOID
    subscription.balance_cents += invoice.amount_cents
    ledger(
        session,
        subscription,
        LedgerKind.UNUSED_PERIOD_CREDIT,
        invoice.amount_cents,
        description,
        invoice_id=invoice.id,
        change_request_id=change_request_id,
    )
    return invoice.amount_cents


def void_invoice(
    session: Session,
    subscription: Subscription,
    invoice: Invoice,
    *,
    description: str,
    change_request_id: int | None = None,
) -> str | None:
    """Void an open invoice: its credit discount goes back to the balance (ledger `credit_restored`)
    and its unpaid boleto is marked canceled here. Returns that boleto's gateway id, which the caller
    cancels at the gateway after committing (never inside the transaction); None when there is none.
    """
    from jobs.boletos import live_boleto  # jobs.boletos builds on this module
    from models.states import BoletoStatus

    if invoice.status != InvoiceStatus.OPEN:
        return None
    invoice.status = InvoiceStatus.VOID
    if invoice.discount_cents:
        subscription.balance_cents += invoice.discount_cents
        ledger(
            session,
            subscription,
            LedgerKind.CREDIT_RESTORED,
            invoice.discount_cents,
            description,
            invoice_id=invoice.id,
            change_request_id=change_request_id,
        )
    boleto = live_boleto(session, invoice.id, lock=True)
    if boleto is not None:
        boleto.status = BoletoStatus.CANCELED
        return boleto.gateway_id
    return None
