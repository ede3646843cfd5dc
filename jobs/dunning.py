"""Dunning of unpaid renewals: boletos past their payment day, suspensions, and the card
renewals that ran out of retries (or wait for a new card after a hard decline).

The flows only; their dates (overdue, suspension, last retry) are models.dunning's."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from jobs.boletos import boleto_notice
from jobs.invoicing import lock_subscription
from jobs.notifications import notify
from jobs.payments import awaiting_outcome_or_retry, suspend
from jobs.renewals import Work
from models.dunning import last_retry_day, overdue_on, suspend_on
from models.schema import Boleto, Charge, Invoice
from models.states import BoletoStatus, InvoiceStatus, PaymentMethod, SubscriptionStatus


def mark_boleto_overdue(session: Session, boleto_id: int, work: Work) -> None:
    """The invoice's boleto (or the expired one awaiting its segunda via) is past its payment day,
    counted from the invoice's original due date."""
    boleto = session.scalar(select(Boleto).where(Boleto.id == boleto_id).with_for_update())
    if boleto is None or boleto.status not in (BoletoStatus.ISSUED, BoletoStatus.EXPIRED) or boleto.overdue_on:
        return
    invoice = session.get_one(Invoice, boleto.invoice_id)
    if overdue_on(invoice.due_date) > work.on:
        return
    subscription = lock_subscription(session, invoice.subscription_id)
    assert subscription is not None
    if boleto.status == BoletoStatus.ISSUED:
        boleto.status = BoletoStatus.OVERDUE
    boleto.overdue_on = overdue_on(invoice.due_date)
    if invoice.status == InvoiceStatus.OPEN and subscription.status == SubscriptionStatus.ACTIVE:
        subscription.status = SubscriptionStatus.PAST_DUE
    if invoice.status == InvoiceStatus.OPEN:
        notify(
            session,
            organization_id=invoice.organization_id,
            subscription_id=invoice.subscription_id,
            kind="boleto_overdue",
            dedupe_key=f"boleto_overdue:{boleto.id}",
            context={
                **boleto_notice(invoice, boleto, dunning=True),
                "suspend_on": suspend_on(boleto.overdue_on, work.config.boleto_grace_business_days).isoformat(),
            },
        )
    work.done += 1


def suspend_for_boleto(session: Session, boleto_id: int, work: Work) -> None:
    boleto = session.scalar(select(Boleto).where(Boleto.id == boleto_id).with_for_update())
    if (
        boleto is None
        or boleto.status not in (BoletoStatus.OVERDUE, BoletoStatus.EXPIRED)
        or boleto.overdue_on is None
        or suspend_on(boleto.overdue_on, work.config.boleto_grace_business_days) > work.on
    ):
        return
    invoice = session.get_one(Invoice, boleto.invoice_id)
    subscription = lock_subscription(session, invoice.subscription_id)
    assert subscription is not None
    if invoice.status == InvoiceStatus.OPEN and subscription.status != SubscriptionStatus.SUSPENDED:
        suspend(session, subscription, invoice, now=work.now, reason=PaymentMethod.BOLETO)
        work.done += 1


def suspend_for_card(session: Session, invoice_id: int, work: Work) -> None:
    """A card renewal still unpaid after the last retry day, with no attempt in flight or scheduled
    (a hard decline waits for a new card, but not forever)."""
    invoice = session.get(Invoice, invoice_id)
    if invoice is None:
        return
    subscription = lock_subscription(session, invoice.subscription_id)
    assert subscription is not None
    session.refresh(invoice)
    waiting = session.scalar(select(Charge.id).where(Charge.invoice_id == invoice_id, awaiting_outcome_or_retry()))
    if (
        invoice.status == InvoiceStatus.OPEN
        and invoice.method == PaymentMethod.CARD
        and waiting is None
        and last_retry_day(invoice.due_date, work.config.dunning_retry_days) <= work.on
        and subscription.status == SubscriptionStatus.PAST_DUE
    ):
        suspend(session, subscription, invoice, now=work.now, reason=PaymentMethod.CARD)
        work.done += 1
