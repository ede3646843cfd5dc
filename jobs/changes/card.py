"""Card replacement: the organization's one card, for all its subscriptions; past-due card invoices
retried at once."""

from __future__ import annotations

import logging

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

import jobs
from jobs.changes.outcome import Run, apply, handles
from jobs.changes.queries import lock_own_subscription
from jobs.contract import CardUpdate
from jobs.payments import open_charge_attempt, prepare
from models.policy import CARD_EXPIRED, RuleViolation
from models.schema import Card, Invoice, Organization, Subscription
from models.states import ChargeStatus, InvoiceStatus, PaymentMethod, SubscriptionStatus

jobs.require_broker()

logger = logging.getLogger(__name__)


@handles("card")
def _replace_card(run: Run, params: CardUpdate) -> None:
    session, on = run.session, run.on
    organization = session.scalars(
        select(Organization).where(Organization.id == run.request.organization_id).with_for_update()
    ).one()
    if params.subscription_id is not None:
        lock_own_subscription(run, params.subscription_id)
    if (params.exp_year, params.exp_month) < (on.year, on.month):
        raise RuleViolation(
            CARD_EXPIRED,
            f"O cartão informado venceu em {params.exp_month:02d}/{params.exp_year}. Cadastre um cartão válido.",
            exp_month=params.exp_month,
            exp_year=params.exp_year,
        )
    values = {
        "token": params.token,
        "brand": params.brand,
        "last4": params.last4,
        "exp_month": params.exp_month,
        "exp_year": params.exp_year,
    }
    card_id = session.scalar(
        insert(Card)
        .values(organization_id=organization.id, **values)
        .on_conflict_do_update(index_elements=["organization_id"], set_={**values, "updated_at": run.now})
        .returning(Card.id)
    )
    card = session.get_one(Card, card_id, populate_existing=True)
    subscriptions = session.scalars(
        select(Subscription)
        .where(Subscription.organization_id == organization.id, Subscription.status != SubscriptionStatus.CANCELED)
        .order_by(Subscription.id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).all()
    retried: list[int] = []
    for subscription in subscriptions:
        if subscription.status not in (SubscriptionStatus.PAST_DUE, SubscriptionStatus.SUSPENDED):
            continue
        for invoice in _retryable_card_invoices(session, subscription):
            charge = open_charge_attempt(session, invoice, card)
            if charge is not None:
                run.charges.append(prepare(charge))
                retried.append(invoice.id)
    run.notify(
        organization_id=organization.id,
        kind="card_updated",
        dedupe_key=f"card_updated:{run.request.id}",
        context={key: values[key] for key in ("brand", "last4", "exp_month", "exp_year")},
    )
    result = {
        "card": {key: values[key] for key in ("brand", "last4", "exp_month", "exp_year")},
        "subscription_ids": [subscription.id for subscription in subscriptions],
        "retried_invoice_ids": retried,
    }
    apply(run, result, ledger_on=list(subscriptions), details={"brand": params.brand, "last4": params.last4})


def _retryable_card_invoices(session: Session, subscription: Subscription) -> list[Invoice]:
    """Open card invoices whose attempts all failed (or that were never attempted, for want of a card)."""
    invoices = session.scalars(
        select(Invoice)
        .where(
            Invoice.subscription_id == subscription.id,
            Invoice.status == InvoiceStatus.OPEN,
            Invoice.method == PaymentMethod.CARD,
            Invoice.total_cents > 0,
        )
        .order_by(Invoice.due_date, Invoice.id)
    ).all()
    return [invoice for invoice in invoices if all(charge.status == ChargeStatus.FAILED for charge in invoice.charges)]
