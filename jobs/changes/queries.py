"""The reads the change-request flows share: the organization's subscription, the wait for a charge in
flight, past-due and paid invoices. (The organization's card and the charges in flight are
`jobs.payments`' reads, shared with the daily run.)"""

from __future__ import annotations

import logging
from datetime import date

from sqlalchemy import exists, select
from sqlalchemy.orm import Session

import jobs
from jobs.changes.outcome import Run, WaitForCharge
from jobs.invoicing import lock_subscription
from jobs.payments import charge_in_flight
from models.dunning import is_past_due
from models.policy import DOCUMENT_REQUIRED, SUBSCRIPTION_NOT_FOUND, RuleViolation
from models.schema import Invoice, LedgerEntry, Organization, Subscription
from models.states import ChargeStatus, InvoiceKind, InvoiceStatus, LedgerKind

jobs.require_broker()

logger = logging.getLogger(__name__)


def lock_own_subscription(run: Run, subscription_id: int) -> Subscription:
    subscription = lock_subscription(run.session, subscription_id)
    if subscription is None or subscription.organization_id != run.request.organization_id:
        raise RuleViolation(
            SUBSCRIPTION_NOT_FOUND,
            "A assinatura não foi encontrada nesta organização.",
            subscription_id=subscription_id,
        )
    return subscription


def require_document(organization: Organization | None) -> None:
    if organization is None or not organization.document:
        raise RuleViolation(
            DOCUMENT_REQUIRED,
            "Para pagar via boleto, a organização precisa ter CPF ou CNPJ cadastrado. "
            "Atualize os dados da organização e tente novamente.",
        )


def request_invoice(session: Session, request_id: int) -> Invoice | None:
    return session.scalar(select(Invoice).where(Invoice.change_request_id == request_id))


def wait_for_charges(session: Session, subscription: Subscription) -> None:
    """A charge whose outcome is not known yet (an upgrade, a subscription's first payment, a renewal)
    would make a change compute from a state that is about to change: the request waits for it."""
    in_flight = charge_in_flight(session, subscription.id)
    if in_flight is not None:
        raise WaitForCharge(in_flight)


def past_due_invoice(session: Session, subscription: Subscription, on: date) -> Invoice | None:
    """The oldest open invoice already past due on `on`: a card invoice due whose charge failed or was
    never made, or a boleto no longer payable (payable until the business day after its due date)."""
    invoices = session.scalars(
        select(Invoice)
        .where(Invoice.subscription_id == subscription.id, Invoice.status == InvoiceStatus.OPEN)
        .order_by(Invoice.due_date, Invoice.id)
    ).all()
    for invoice in invoices:
        failed = any(charge.status == ChargeStatus.FAILED for charge in invoice.charges)
        if is_past_due(method=invoice.method, due_date=invoice.due_date, on=on, charge_failed=failed):
            return invoice
    return None


def paid_invoice_for_period(session: Session, subscription: Subscription, on: date) -> Invoice | None:
    """The paid invoice covering the current period: the one for exactly that period, else one
    containing D within it — never one whose unused part an earlier change already turned into credit."""
    prorated = exists().where(LedgerEntry.invoice_id == Invoice.id, LedgerEntry.kind == LedgerKind.PRORATION_CREDIT)
    candidates = session.scalars(
        select(Invoice)
        .where(
            Invoice.subscription_id == subscription.id,
            Invoice.status == InvoiceStatus.PAID,
            Invoice.kind.in_([InvoiceKind.RENEWAL, InvoiceKind.SUBSCRIBE, InvoiceKind.CYCLE_CHANGE]),
            ~prorated,
        )
        .order_by(Invoice.paid_at.desc().nulls_last(), Invoice.id.desc())
    ).all()
    period = (subscription.current_period_start, subscription.current_period_end)
    for invoice in candidates:
        if (invoice.period_start, invoice.period_end) == period:
            return invoice
    for invoice in candidates:
        if subscription.current_period_start <= invoice.period_start <= on < invoice.period_end:
            return invoice
    return None


def paid_unstarted_invoices(session: Session, subscription: Subscription, on: date) -> list[Invoice]:
    """Paid invoices of the subscription whose period starts after D: nothing of them was used yet."""
    return list(
        session.scalars(
            select(Invoice)
            .where(
                Invoice.subscription_id == subscription.id,
                Invoice.status == InvoiceStatus.PAID,
                Invoice.period_start > on,
            )
            .order_by(Invoice.period_start, Invoice.id)
            .with_for_update()
        )
    )


def upcoming_renewal_invoice(session: Session, subscription: Subscription) -> Invoice | None:
    """The renewal invoice of the next period (issued ahead for a boleto), ignoring void ones."""
    return session.scalar(
        select(Invoice)
        .where(
            Invoice.subscription_id == subscription.id,
            Invoice.kind == InvoiceKind.RENEWAL,
            Invoice.period_start == subscription.current_period_end,
            Invoice.status != InvoiceStatus.VOID,
        )
        .order_by(Invoice.id.desc())
        .limit(1)
    )
