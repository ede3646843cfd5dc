"""Billing-cycle change with proration (DESIGN "Cycle change and proration")."""

from __future__ import annotations

import logging
from datetime import date, datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

import jobs
from jobs.changes.outcome import Run, apply, consequence_run, declined, handles, reject, send_cancellations, void
from jobs.changes.queries import (
    lock_own_subscription,
    paid_invoice_for_period,
    paid_unstarted_invoices,
    past_due_invoice,
    require_document,
    wait_for_charges,
)
from jobs.changes.recording import change_date
from jobs.context import BillingConfig
from jobs.contract import BillingCycleChange
from jobs.invoicing import (
    MissingPlan,
    invoice_values,
    ledger,
    lock_subscription,
    plan_price,
    void_unused_paid_invoice,
)
from jobs.payments import consequence, mark_paid_by_card, open_charge_attempt, organization_card, prepare
from models import policy
from models.calendar import ANNUAL, MONTHLY
from models.policy import UNKNOWN_PRODUCT, RuleViolation
from models.proration import quote_cycle_change
from models.schema import Charge, Invoice, Subscription
from models.states import ChargeStatus, InvoiceKind, InvoiceStatus, LedgerKind, PaymentMethod, SubscriptionStatus

jobs.require_broker()

logger = logging.getLogger(__name__)


@handles("billing_cycle")
def _billing_cycle(run: Run, params: BillingCycleChange) -> None:
    session, on = run.session, run.on
    subscription = lock_own_subscription(run, params.subscription_id)
    policy.ensure_subscription_open(status=subscription.status)
    wait_for_charges(session, subscription)
    past_due = past_due_invoice(session, subscription, on)
    policy.ensure_cycle_change_allowed(
        from_cycle=subscription.cycle,
        to_cycle=params.to_cycle,
        has_past_due_invoice=past_due is not None
        or subscription.status in (SubscriptionStatus.PAST_DUE, SubscriptionStatus.SUSPENDED),
        past_due_amount_cents=past_due.total_cents if past_due else None,
        past_due_since=past_due.due_date if past_due else None,
    )
    card = organization_card(session, subscription.organization_id)
    method = policy.method_for_cycle_change(
        to_cycle=params.to_cycle,
        requested_method=params.payment_method,
        current_method=subscription.effective_payment_method,
        has_card=card is not None,
    )
    if method == PaymentMethod.BOLETO:
        require_document(run.organization)

    # Moving to monthly (card-only) makes any unpaid boleto of the subscription pointless: it is
    # cancelled and the credit it had used comes back, so the quote counts it.
    to_void = (
        session.scalars(
            select(Invoice).where(
                Invoice.subscription_id == subscription.id,
                Invoice.status == InvoiceStatus.OPEN,
                Invoice.method == PaymentMethod.BOLETO,
            )
        ).all()
        if params.to_cycle == MONTHLY
        else []
    )
    # A paid invoice for a period that has not started (a renewal boleto paid early, a renewal covered
    # by credit) is unused in full: it is voided and its whole amount joins the credit.
    unstarted = paid_unstarted_invoices(session, subscription, on)
    balance = (
        subscription.balance_cents
        + sum(invoice.discount_cents for invoice in to_void)
        + sum(invoice.amount_cents for invoice in unstarted)
    )
    previous = paid_invoice_for_period(session, subscription, on)
    monthly_price, annual_price = _prices(session, subscription.product, on)
    quote = quote_cycle_change(
        from_cycle=subscription.cycle,
        to_cycle=params.to_cycle,
        period_start=subscription.current_period_start,
        period_end=subscription.current_period_end,
        paid_cents=_paid_for_period(previous),
        balance_cents=balance,
        on=on,
        monthly_price_cents=monthly_price,
        annual_price_cents=annual_price,
    )
    result = quote.to_dict()
    period_end = quote.new_period_end
    price, credit_used = quote.invoice_price_cents, quote.credit_applied_cents
    result.update(
        payment_method=method,
        renewal_date=period_end.isoformat(),
        previous_invoice_id=previous.id if previous else None,
        voided_invoice_ids=[invoice.id for invoice in to_void],
        unused_paid_invoice_ids=[invoice.id for invoice in unstarted],
    )
    amount_due = quote.amount_due_cents
    boleto = method == PaymentMethod.BOLETO
    invoice = Invoice(
        **invoice_values(
            subscription_id=subscription.id,
            organization_id=subscription.organization_id,
            change_request_id=run.request.id,
            kind=InvoiceKind.CYCLE_CHANGE,
            cycle=params.to_cycle,
            period_start=on,
            period_end=period_end,
            amount_cents=price,
            discount_cents=credit_used,  # the total is the quote's amount due (price − credit applied)
            method=method,
            due_date=on + timedelta(days=run.config.boleto_due_days) if boleto and amount_due else on,
        )
    )
    session.add(invoice)
    session.flush()
    result["invoice_id"] = invoice.id
    run.request.result = result
    if amount_due and not boleto:
        assert card is not None  # method_for_cycle_change
        charge = open_charge_attempt(session, invoice, card)
        assert charge is not None  # a new open invoice with a positive total
        run.charges.append(prepare(charge))
        return
    _apply_cycle_change(run, subscription, invoice, result)
    if amount_due:
        run.boleto_invoices.append(invoice.id)


def _prices(session: Session, product: str, on: date) -> tuple[int, int]:
    try:
        return plan_price(session, product, MONTHLY, on), plan_price(session, product, ANNUAL, on)
    except MissingPlan:
        raise RuleViolation(
            UNKNOWN_PRODUCT,
            "O ciclo de cobrança desta assinatura não pode ser alterado: o produto não tem preço para os dois "
            "ciclos. Fale com o suporte.",
            product=product,
        ) from None


def _paid_for_period(invoice: Invoice | None) -> int:
    """P: what paid the period, in money and in credit. Every discount in Renova is the customer's own
    credit balance, so the invoice amount (total + discount) is what they gave for it; counting only
    the total would lose the unused share of the credit they spent on it."""
    return invoice.amount_cents if invoice is not None else 0


def _apply_cycle_change(
    run: Run,
    subscription: Subscription,
    invoice: Invoice,
    result: dict[str, Any],
    *,
    charge: Charge | None = None,
    paid_on: date | None = None,
) -> None:
    """Apply a priced cycle change: the boletos it makes pointless, the ledger, the new period."""
    session, request = run.session, run.request
    for voided_id in result["voided_invoice_ids"]:
        voided = session.get_one(Invoice, voided_id)
        if voided.status == InvoiceStatus.OPEN:
            void(run, subscription, voided, "Crédito devolvido: boleto cancelado pela alteração de ciclo")
        else:
            logger.warning("invoice %s changed state while change request %s was charged", voided_id, request.id)
    for unused_id in result.get("unused_paid_invoice_ids", []):
        unused = session.get_one(Invoice, unused_id)
        if not void_unused_paid_invoice(
            session,
            subscription,
            unused,
            description="Período pago não iniciado devolvido como crédito pela alteração de ciclo",
            change_request_id=request.id,
        ):
            logger.warning("invoice %s changed state while change request %s was charged", unused_id, request.id)

    paid, unused = result["paid_cents"], result["unused_cents"]
    previous_id = result["previous_invoice_id"]
    if previous_id is not None and paid:
        # paid = used + credit, to the cent, on the period being left.
        ledger(
            session,
            subscription,
            LedgerKind.PERIOD_USED,
            -(paid - unused),
            "Período utilizado até a alteração de ciclo",
            invoice_id=previous_id,
            change_request_id=request.id,
            paid_cents=paid,
            on=run.on.isoformat(),
        )
        ledger(
            session,
            subscription,
            LedgerKind.PRORATION_CREDIT,
            unused,
            "Crédito proporcional não utilizado",
            invoice_id=previous_id,
            change_request_id=request.id,
            paid_cents=paid,
        )
    if invoice.discount_cents:
        ledger(
            session,
            subscription,
            LedgerKind.CREDIT_APPLIED,
            -invoice.discount_cents,
            "Crédito aplicado ao novo ciclo",
            invoice_id=invoice.id,
            change_request_id=request.id,
        )

    # The balance the quote started from (B, including restored boleto discounts) is replaced by what
    # is left after the change; anything that moved the balance meanwhile is kept.
    new_balance = subscription.balance_cents - result["balance_cents"] + result["balance_after_cents"]
    if new_balance < 0:
        logger.error("change request %s would leave a negative balance (%s); kept at 0", request.id, new_balance)
        new_balance = 0
    from_cycle = subscription.cycle
    subscription.cycle = invoice.cycle
    subscription.current_period_start, subscription.current_period_end = invoice.period_start, invoice.period_end
    # DESIGN: to monthly, the new renewal date becomes the anchor; otherwise the period starts at D.
    extension = invoice.cycle == MONTHLY and not result.get("first_period_charged_now")
    subscription.billing_anchor = invoice.period_end if extension else invoice.period_start
    subscription.payment_method = invoice.method
    subscription.pending_payment_method = None
    subscription.balance_cents = new_balance

    if charge is not None:
        mark_paid_by_card(session, invoice, charge, on=paid_on or run.on, now=run.now)
    elif invoice.total_cents == 0:
        # Paid entirely with credit: no money moved, so no receipt (the cycle-change notice says it all).
        invoice.status = InvoiceStatus.PAID
        invoice.paid_on, invoice.paid_at = run.on, run.now

    run.notify(
        organization_id=subscription.organization_id,
        subscription_id=subscription.id,
        kind="cycle_changed",
        dedupe_key=f"cycle_changed:{request.id}",
        context={
            "from_cycle": from_cycle,
            "to_cycle": invoice.cycle,
            "quote": _notice_quote(result),
            "payment_method": invoice.method,
        },
    )
    apply(run, result, ledger_on=[subscription], details={"from_cycle": from_cycle, "to_cycle": invoice.cycle})


def _notice_quote(result: dict[str, Any]) -> dict[str, Any]:
    quote = {key: value for key, value in result.items() if not isinstance(value, list | dict)}
    if result.get("first_period_charged_now"):
        # No time was bought: "prorrogou 0 meses e 0 dias" would only confuse.
        quote.pop("months", None)
        quote.pop("extra_days", None)
    return quote


@consequence(InvoiceKind.CYCLE_CHANGE)
def cycle_change_charge_resolved(
    session: Session, charge: Charge, invoice: Invoice, on: date, now: datetime, config: BillingConfig
) -> None:
    """The immediate charge of a cycle change: paid → the change applies as quoted on D; declined →
    the request is rejected and nothing else changes (the invoice is void, no credit was used)."""
    run = consequence_run(session, invoice, on, now, config)
    subscription = lock_subscription(session, invoice.subscription_id)
    if run is None or subscription is None or invoice.status != InvoiceStatus.OPEN:
        return
    # The change was quoted for D, the day it was asked, whenever the charge is resolved.
    run.on = change_date(run.request, config)
    if charge.status == ChargeStatus.SUCCEEDED:
        result = dict(run.request.result or {})
        _apply_cycle_change(run, subscription, invoice, result, charge=charge, paid_on=on)
    else:
        invoice.status = InvoiceStatus.VOID
        run.notices.extend(reject(session, run.request, declined(charge), now=now))
    send_cancellations(run)
