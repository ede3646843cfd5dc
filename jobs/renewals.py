"""Renewals: the boleto seven days ahead, the renewal itself on T, card retries, and the notices
that announce them. Each handler takes ids found by the daily run's scan, re-checks them under a
row lock (a duplicate or late message finds nothing left to do) and commits per subscription."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from gateways.base import Gateway
from jobs.boletos import awaiting_boleto, boleto_notice
from jobs.context import BillingConfig
from jobs.gateway_work import GatewayWork, settle
from jobs.invoicing import (
    CREDIT_APPLIED,
    create_renewal_invoice,
    insert_renewal_invoices,
    lock_subscription,
    mark_invoice_paid,
    next_period_end,
    renewal_invoice,
    renewal_invoice_values,
)
from jobs.notifications import NoticeSpec, notify, notify_many
from jobs.payments import (
    card_of_organization,
    charge_in_flight,
    idempotency_key,
    notify_charge_failed,
    open_charge_attempt,
    organization_card,
    prepare,
    subscriptions_with_charge_in_flight,
)
from jobs.refunds import end_subscription
from models.policy import NO_CARD_ON_FILE, late_boleto_due_date, renewal_boleto_due
from models.schema import Boleto, Card, Charge, Invoice, LedgerEntry, Subscription
from models.states import (
    BoletoStatus,
    ChargeStatus,
    Cycle,
    InvoiceStatus,
    LedgerKind,
    PaymentMethod,
    SubscriptionStatus,
)

logger = logging.getLogger(__name__)

RENEWAL_NOTICE_DAYS = 30
BOLETO_REMINDER_DAYS = 2


@dataclass(kw_only=True)
class Work(GatewayWork):
    """What a handler did with its ids (`done` counts effects applied, a no-op is not done), and the
    gateway work it left for after the chunk's commit."""

    on: date
    now: datetime
    config: BillingConfig
    gateway: Gateway
    done: int = 0


# --- T − 7: the boleto of an annual renewal ------------------------------------------------------


def issue_renewal_boleto(session: Session, subscription_id: int, work: Work) -> None:
    """Create the next renewal's invoice (price − credit) and issue its boleto, once."""
    invoice_renewal_boleto(session, subscription_id, work)
    queue_missing_boletos(session, [subscription_id], work)


def issue_renewal_boletos(session: Session, subscription_ids: Sequence[int], work: Work) -> list[int]:
    """`issue_renewal_boleto` for a chunk: each invoice on its own, then the chunk's boletos to issue
    found in one query. Leaves nothing for the per-row handler."""
    for subscription_id in subscription_ids:
        invoice_renewal_boleto(session, subscription_id, work)
    queue_missing_boletos(session, subscription_ids, work)
    return []


def invoice_renewal_boleto(session: Session, subscription_id: int, work: Work) -> None:
    """Create the next renewal's boleto invoice (price − credit) when it is due and not created yet."""
    subscription = lock_subscription(session, subscription_id)
    if subscription is None:
        return
    renewal = subscription.current_period_end
    if renewal_boleto_due(
        cycle=subscription.cycle,
        status=subscription.status,
        payment_method=subscription.payment_method,
        pending_payment_method=subscription.pending_payment_method,
        cancel_at_period_end=subscription.cancel_at_period_end,
        renewal_date=renewal,
        invoiced=renewal_invoice(session, subscription.id, renewal) is not None,
        today=work.on,
        lead_days=work.config.boleto_lead_days,
    ):
        invoice = create_renewal_invoice(
            session,
            subscription,
            period_start=renewal,
            method=PaymentMethod.BOLETO,
            due_date=late_boleto_due_date(renewal, work.on, work.config.boleto_due_days),
        )
        if invoice is not None:
            work.done += 1
            if invoice.total_cents == 0:
                mark_invoice_paid(session, invoice, paid_on=work.on, now=work.now, amount_cents=0, source="crédito")


def queue_missing_boletos(session: Session, subscription_ids: Sequence[int], work: Work) -> None:
    """Every open boleto invoice of these subscriptions without its boleto (new, or an interrupted issue)."""
    missing = session.scalars(
        select(Invoice.id).where(Invoice.subscription_id.in_(subscription_ids), *awaiting_boleto()).order_by(Invoice.id)
    ).all()
    work.boleto_invoices.extend(missing)


# --- T: the renewal ------------------------------------------------------------------------------


def renew(session: Session, subscription_id: int, work: Work) -> None:
    """Apply the pending switch, invoice the new period, advance, and prepare the card charge."""
    subscription = lock_subscription(session, subscription_id)
    if subscription is None or subscription.current_period_end > work.on:
        return
    if subscription.status == SubscriptionStatus.CANCELED:
        return
    if subscription.cancel_at_period_end:
        # Never end while a charge of the subscription is unresolved: its money must find its invoice.
        if charge_in_flight(session, subscription.id) is None:
            ended_on = subscription.current_period_end
            work.boletos_to_cancel.extend(end_subscription(session, subscription, ended_on=ended_on, now=work.now))
            work.done += 1
        return
    if subscription.status == SubscriptionStatus.SUSPENDED:
        return  # not renewed while its outstanding invoice is unpaid
    if charge_in_flight(session, subscription.id, changes_only=True) is not None:
        return  # a cycle change is being charged: renew after it resolves, on the period it leaves

    renewal = subscription.current_period_end
    if subscription.pending_payment_method:
        previous = subscription.payment_method
        subscription.payment_method = subscription.pending_payment_method
        subscription.pending_payment_method = None
        notify(
            session,
            organization_id=subscription.organization_id,
            subscription_id=subscription.id,
            kind="payment_method_switch_applied",
            dedupe_key=f"payment_method_switch_applied:{subscription.id}:{renewal.isoformat()}",
            context={
                "from_method": previous,
                "to_method": subscription.payment_method,
                "renewal_date": renewal.isoformat(),
            },
        )

    invoice = renewal_invoice(session, subscription.id, renewal)
    if invoice is None:
        method = subscription.payment_method
        due = (
            renewal
            if method == PaymentMethod.CARD
            else late_boleto_due_date(renewal, work.on, work.config.boleto_due_days)
        )
        invoice = create_renewal_invoice(session, subscription, period_start=renewal, method=method, due_date=due)
        assert invoice is not None  # the row lock serializes creators
    subscription.current_period_start = renewal
    subscription.current_period_end = (
        invoice.period_end if invoice.period_end > renewal else next_period_end(subscription, renewal)
    )
    work.done += 1

    if invoice.status == InvoiceStatus.OPEN and invoice.total_cents == 0:
        mark_invoice_paid(session, invoice, paid_on=work.on, now=work.now, amount_cents=0, source="crédito")
    elif invoice.status == InvoiceStatus.OPEN and invoice.method == PaymentMethod.CARD:
        card = organization_card(session, subscription.organization_id)
        if card is None:
            no_card_on_file(session, subscription, invoice)
        else:
            charge = open_charge_attempt(session, invoice, card)
            if charge is not None:
                work.charges.append(prepare(charge))
    if invoice.method == PaymentMethod.BOLETO:
        queue_missing_boletos(session, [subscription.id], work)


# Off: every renewal goes through `renew` one by one (the reference path; the equivalence tests compare both).
SET_BASED_RENEWALS = True


def renew_many(session: Session, subscription_ids: Sequence[int], work: Work) -> list[int]:
    """The common renewals of a chunk, set-based: one locking read, one multi-row insert each for
    invoices, credit entries and charges, one batch of period updates — with exactly the rows `renew`
    would write. Taken here: an active or past-due subscription due on or before D, paid by card
    after its pending switch (if any), not ending, with no change being charged and no invoice yet for
    the new period, that either has a card on file and something to charge, or is active and covered
    entirely by credit (paid at once, no charge). Returns the ids it left to `renew`, which handles
    every other case one by one: a switch to boleto, a boleto subscription, no card on file, a
    cancellation, a suspended subscription, a past-due one covered by credit (its payment reactivates),
    an invoice that already exists."""
    if not SET_BASED_RENEWALS:
        return list(subscription_ids)
    rows = session.execute(
        select(
            Subscription.id,
            Subscription.organization_id,
            Subscription.product,
            Subscription.cycle,
            Subscription.status,
            Subscription.payment_method,
            Subscription.pending_payment_method,
            Subscription.cancel_at_period_end,
            Subscription.billing_anchor,
            Subscription.current_period_end,
            Subscription.balance_cents,
            Card.id.label("card_id"),
            Card.token.label("card_token"),
            Card.last4.label("card_last4"),
        )
        .outerjoin(Card, card_of_organization(Subscription.organization_id))
        .where(Subscription.id.in_(subscription_ids))
        .order_by(Subscription.id)
        .with_for_update(of=Subscription)
    ).all()
    in_flight = subscriptions_with_charge_in_flight(session, subscription_ids, changes_only=True)
    taken, invoices = {}, []
    for row in rows:
        if (
            row.current_period_end > work.on
            or row.status not in (SubscriptionStatus.ACTIVE, SubscriptionStatus.PAST_DUE)
            or row.cancel_at_period_end
            or (row.pending_payment_method or row.payment_method) != PaymentMethod.CARD
            or row.id in in_flight
        ):
            continue
        renewal = row.current_period_end
        values = renewal_invoice_values(
            session, row, period_start=renewal, method=PaymentMethod.CARD.value, due_date=renewal
        )
        if values["total_cents"] <= 0 and row.status != SubscriptionStatus.ACTIVE:
            continue  # paid by credit now, which reactivates a past-due subscription: `renew` does that
        if values["total_cents"] > 0 and row.card_id is None:
            continue  # no card on file: dunning starts (`renew`)
        taken[row.id] = row
        invoices.append(values)
    created = (
        session.execute(
            insert_renewal_invoices(invoices).returning(
                Invoice.id,
                Invoice.subscription_id,
                Invoice.period_start,
                Invoice.period_end,
                Invoice.total_cents,
                Invoice.discount_cents,
            )
        ).all()
        if invoices
        else []
    )
    if created:
        renew_created(session, taken, created, work)
    # The subscriptions just renewed may sit in the session's identity map with their old period.
    session.expire_all()
    renewed = {invoice.subscription_id for invoice in created}
    return [subscription_id for subscription_id in subscription_ids if subscription_id not in renewed]


def renew_created(session: Session, taken: dict[int, Any], created: Sequence[Any], work: Work) -> None:
    """What `renew` does after creating each invoice of `created`, for all of them at once: the pending
    switch applied (and announced), the period advanced, the credit applied, then either the card
    attempt recorded `pending` or — covered entirely by credit — the invoice paid with its receipt."""
    session.execute(
        update(Subscription),
        [
            {
                "id": invoice.subscription_id,
                # A pending switch becomes the payment method (only a switch to card is taken here).
                "payment_method": taken[invoice.subscription_id].pending_payment_method
                or taken[invoice.subscription_id].payment_method,
                "pending_payment_method": None,
                "current_period_start": invoice.period_start,
                "current_period_end": invoice.period_end,
                "balance_cents": taken[invoice.subscription_id].balance_cents - invoice.discount_cents,
            }
            for invoice in created
        ],
    )
    switched = [
        NoticeSpec(
            organization_id=row.organization_id,
            subscription_id=row.id,
            kind="payment_method_switch_applied",
            dedupe_key=f"payment_method_switch_applied:{row.id}:{invoice.period_start.isoformat()}",
            context={
                "from_method": row.payment_method,
                "to_method": row.pending_payment_method,
                "renewal_date": invoice.period_start.isoformat(),
            },
        )
        for invoice in created
        if (row := taken[invoice.subscription_id]).pending_payment_method
    ]
    if switched:
        notify_many(session, switched)
    credits = [
        {
            "subscription_id": invoice.subscription_id,
            "invoice_id": invoice.id,
            "kind": LedgerKind.CREDIT_APPLIED.value,
            "amount_cents": -invoice.discount_cents,
            "description": CREDIT_APPLIED,
        }
        for invoice in created
        if invoice.discount_cents
    ]
    if credits:
        session.execute(insert(LedgerEntry).values(credits))
    covered = [invoice for invoice in created if invoice.total_cents == 0]
    if covered:
        pay_covered_by_credit(session, taken, covered, work)
    charged = [invoice for invoice in created if invoice.total_cents > 0]
    if charged:
        charge_ids = session.scalars(
            insert(Charge)
            .values(
                [
                    {
                        "invoice_id": invoice.id,
                        "attempt": 1,
                        "idempotency_key": idempotency_key(invoice.id, 1),
                        "amount_cents": invoice.total_cents,
                        "card_id": taken[invoice.subscription_id].card_id,
                        "card_token": taken[invoice.subscription_id].card_token,
                        "card_last4": taken[invoice.subscription_id].card_last4,
                    }
                    for invoice in charged
                ]
            )
            .returning(Charge.id)
        ).all()
        work.charges.extend(
            prepare(charge) for charge in session.scalars(select(Charge).where(Charge.id.in_(charge_ids)))
        )
    work.done += len(created)


def pay_covered_by_credit(session: Session, taken: dict[int, Any], covered: Sequence[Any], work: Work) -> None:
    """`mark_invoice_paid` of a zero invoice on an active subscription: paid on D without a charge or a
    payment entry (no money moved), and the receipt without a card (`source` "crédito")."""
    paid = session.scalars(
        update(Invoice.__table__)
        .where(Invoice.id.in_([invoice.id for invoice in covered]), Invoice.status == InvoiceStatus.OPEN)
        .values(status=InvoiceStatus.PAID.value, paid_on=work.on, paid_at=work.now)
        .returning(Invoice.id)
    ).all()
    assert len(paid) == len(covered)  # created just now, under the subscriptions' locks
    notify_many(
        session,
        [
            NoticeSpec(
                organization_id=taken[invoice.subscription_id].organization_id,
                subscription_id=invoice.subscription_id,
                kind="charge_succeeded",
                dedupe_key=f"charge_succeeded:{invoice.id}",
                context={
                    "invoice_id": invoice.id,
                    "amount_cents": 0,
                    "card_brand": "",
                    "card_last4": "",
                    "period_start": invoice.period_start.isoformat(),
                    "period_end": invoice.period_end.isoformat(),
                    "paid_on": work.on.isoformat(),
                },
            )
            for invoice in covered
        ],
    )


def no_card_on_file(session: Session, subscription: Subscription, invoice: Invoice) -> None:
    if subscription.status == SubscriptionStatus.ACTIVE:
        subscription.status = SubscriptionStatus.PAST_DUE
    notify_charge_failed(
        session,
        subscription,
        invoice,
        dedupe_key=f"charge_failed:no_card:{invoice.id}",
        amount_cents=invoice.total_cents,
        code=NO_CARD_ON_FILE,
        reason="Não há cartão de crédito cadastrado.",
        hard=True,
        next_retry_on=None,
        card_last4="",
    )


# --- T + n: card retries ---------------------------------------------------------------------------


def retry_charge(session: Session, invoice_id: int, work: Work) -> None:
    invoice = session.get(Invoice, invoice_id)
    if invoice is None:
        return
    subscription = lock_subscription(session, invoice.subscription_id)
    assert subscription is not None
    invoice = session.get_one(Invoice, invoice_id)
    due = session.scalar(
        select(Charge.id).where(
            Charge.invoice_id == invoice_id,
            Charge.next_retry_on <= work.on,
            Charge.status == ChargeStatus.FAILED,
            Charge.hard_decline.is_(False),
        )
    )
    if due is None:
        return
    card = organization_card(session, invoice.organization_id)
    if invoice.status != InvoiceStatus.OPEN or subscription.status == SubscriptionStatus.CANCELED or card is None:
        for charge in session.scalars(select(Charge).where(Charge.invoice_id == invoice_id)):
            charge.next_retry_on = None
        return
    charge = open_charge_attempt(session, invoice, card)
    if charge is not None:
        work.charges.append(prepare(charge))
        work.done += 1


# --- notices ahead of time -------------------------------------------------------------------------


def send_boleto_reminder(session: Session, boleto_id: int, work: Work) -> None:
    boleto = session.get(Boleto, boleto_id)
    if boleto is None or boleto.status != BoletoStatus.ISSUED:
        return
    if not work.on <= boleto.due_date <= work.on + timedelta(days=BOLETO_REMINDER_DAYS):
        return
    invoice = session.get_one(Invoice, boleto.invoice_id)
    created = notify(
        session,
        organization_id=invoice.organization_id,
        subscription_id=invoice.subscription_id,
        kind="boleto_reminder",
        dedupe_key=f"boleto_reminder:{boleto.id}",
        context=boleto_notice(invoice, boleto),
    )
    work.done += created is not None


def send_renewal_notice(session: Session, subscription_id: int, work: Work) -> None:
    """The notice 30 days before an annual renewal; none for a subscription that will not renew
    (canceled, cancelled at period end, or suspended: no new invoice while one is unpaid)."""
    from models.policy import boleto_switch_deadline

    subscription = session.get(Subscription, subscription_id)
    if (
        subscription is None
        or subscription.cycle != Cycle.ANNUAL
        or subscription.status in (SubscriptionStatus.CANCELED, SubscriptionStatus.SUSPENDED)
        or subscription.cancel_at_period_end
    ):
        return
    renewal = subscription.current_period_end
    if not work.on < renewal <= work.on + timedelta(days=RENEWAL_NOTICE_DAYS):
        return
    # What the renewal invoice will ask (the price then, less the credit balance).
    upcoming = renewal_invoice_values(
        session, subscription, period_start=renewal, method=subscription.effective_payment_method, due_date=renewal
    )
    context = {
        "renewal_date": renewal.isoformat(),
        "amount_cents": upcoming["total_cents"],
        "cycle": subscription.cycle,
        "payment_method": subscription.effective_payment_method,
    }
    if subscription.effective_payment_method == PaymentMethod.BOLETO:
        lead_days = work.config.boleto_lead_days
        context["boleto_lead_days"] = lead_days
        # Boleto → card is accepted while today < T − lead days: T − lead − 1 is the last day.
        deadline = boleto_switch_deadline(renewal, lead_days)
        if work.on <= deadline:
            context["switch_to_card_until"] = deadline.isoformat()
    created = notify(
        session,
        organization_id=subscription.organization_id,
        subscription_id=subscription.id,
        kind="renewal_notice",
        dedupe_key=f"renewal_notice:{subscription.id}:{renewal.isoformat()}",
        context=context,
    )
    work.done += created is not None


def settle_gateway_work(session: Session, work: Work) -> dict[int, str]:
    """After the chunk's commit: its card charges, then its boletos (see `jobs.gateway_work.settle`)."""
    settled = settle(session, work.gateway, work, on=work.on, now=work.now, config=work.config)
    if settled.retry is not None:
        raise settled.retry  # the message is retried; what was done is not redone
    return settled.charge_statuses
