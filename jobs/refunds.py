"""Ending a subscription, and giving back what it still holds (DESIGN "Ending a subscription and refunds").

When a subscription ends, nothing is owed for service never given (its unpaid invoices are voided
and their boletos cancelled) and nothing paid for a period that never started is kept (that
invoice is voided into credit). A positive balance on an ended subscription is then refunded:

- money that came by card goes back through the gateway, against the charges it came from, newest
  first, in three phases like a charge (a `pending` row with key `refund:{id}` is committed first,
  the gateway is called with no transaction open, the outcome recorded after; an unknown outcome is
  asked again with the same key, never refunded twice);
- money that came by boleto cannot be returned by the gateway: it becomes a `payout` for on-call
  to pay and close with a bank reference. A card refund the gateway refuses becomes a payout too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import date, datetime, timedelta

import dramatiq
from sqlalchemy import func, select
from sqlalchemy.orm import Session

import jobs
from gateways.base import Ambiguous, Gateway, GatewayRejected, RefundResult
from jobs import audit, clock
from jobs.context import current_session, runtime
from jobs.invoicing import ledger, void_invoice, void_unused_paid_invoice
from jobs.notifications import notify
from jobs.outbox import send_after_commit
from jobs.retries import STANDARD
from models.schema import Boleto, Charge, Invoice, Refund, Subscription
from models.states import (
    BoletoStatus,
    ChargeStatus,
    InvoiceStatus,
    LedgerKind,
    RefundMethod,
    RefundStatus,
    SubscriptionStatus,
)

jobs.require_broker()
logger = logging.getLogger(__name__)

# A card refund still pending this long is presumed interrupted and is asked again (same key).
STALE_REFUND = timedelta(minutes=1)


class RefundActionRefused(ValueError):
    """An on-call action that does not apply to this refund (wrong kind, already closed, …)."""


def refund_idempotency_key(refund_id: int) -> str:
    return f"refund:{refund_id}"


# --- ending --------------------------------------------------------------------------------------


def end_subscription(session: Session, subscription: Subscription, *, ended_on: date, now: datetime) -> list[str]:
    """Cancel the (locked) subscription as of `ended_on` and settle its money; returns the gateway ids of
    the boletos it voided, for the caller's gateway work (cancelled once its transaction commits)."""
    subscription.status = SubscriptionStatus.CANCELED
    subscription.canceled_at = now
    subscription.pending_payment_method = None
    voided: list[int] = []
    boletos_to_cancel: list[str] = []
    invoices = session.scalars(
        select(Invoice)
        .where(
            Invoice.subscription_id == subscription.id,
            Invoice.status.in_([InvoiceStatus.OPEN, InvoiceStatus.PAID]),
        )
        .order_by(Invoice.id)
        .with_for_update()
    ).all()
    for invoice in invoices:
        if invoice.status == InvoiceStatus.OPEN:
            voided.append(invoice.id)
            gateway_id = void_invoice(
                session, subscription, invoice, description="Fatura anulada: assinatura encerrada"
            )
            if gateway_id is not None:
                boletos_to_cancel.append(gateway_id)
        elif invoice.period_start >= ended_on:
            void_unused_paid_invoice(
                session, subscription, invoice, description="Período pago não iniciado: assinatura encerrada"
            )
    notify(
        session,
        organization_id=subscription.organization_id,
        subscription_id=subscription.id,
        kind="subscription_canceled",
        dedupe_key=f"subscription_canceled:{subscription.id}",
        context={
            "ended_on": ended_on.isoformat(),
            "voided_invoice_ids": voided,
            "credit_cents": max(subscription.balance_cents, 0),
        },
    )
    refund_balance(session, subscription, now=now)
    return boletos_to_cancel


def credit_payment(
    session: Session, subscription: Subscription, *, invoice_id: int, amount_cents: int, description: str, now: datetime
) -> None:
    """Money that arrived for an invoice that no longer takes it: the customer's credit, refunded at
    once when the subscription has ended."""
    subscription.balance_cents += amount_cents
    ledger(session, subscription, LedgerKind.PAYMENT_TO_CREDIT, amount_cents, description, invoice_id=invoice_id)
    refund_balance(session, subscription, now=now)


# --- refunds (phase 1) ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    """Money the subscription received, newest first: a card charge (refundable through the gateway)
    or a boleto payment (paid out by on-call)."""

    received_at: datetime
    charge_id: int | None
    card_last4: str | None
    refundable_cents: int


def _sources(session: Session, subscription_id: int) -> list[_Source]:
    refunded = (
        select(Refund.charge_id, func.sum(Refund.amount_cents).label("cents"))
        .where(Refund.method == RefundMethod.CARD, Refund.status != RefundStatus.FAILED)
        .group_by(Refund.charge_id)
        .subquery()
    )
    charges = session.execute(
        select(
            Charge.id,
            Charge.card_last4,
            Charge.amount_cents - func.coalesce(refunded.c.cents, 0),
            func.coalesce(Charge.resolved_at, Charge.created_at),
        )
        .join(Invoice, Invoice.id == Charge.invoice_id)
        .outerjoin(refunded, refunded.c.charge_id == Charge.id)
        .where(
            Invoice.subscription_id == subscription_id,
            Charge.status == ChargeStatus.SUCCEEDED,
            Charge.gateway_id.is_not(None),
        )
    ).all()
    boletos = session.execute(
        select(
            func.coalesce(Boleto.paid_amount_cents, Boleto.amount_cents),
            func.coalesce(Boleto.paid_at, Boleto.created_at),
        )
        .join(Invoice, Invoice.id == Boleto.invoice_id)
        .where(Invoice.subscription_id == subscription_id, Boleto.status == BoletoStatus.PAID)
    ).all()
    sources = [_Source(at, charge_id, last4, left) for charge_id, last4, left, at in charges if left > 0]
    # Earlier payouts came out of boleto money, newest first, like the allocation below.
    paid_out = session.scalar(
        select(func.coalesce(func.sum(Refund.amount_cents), 0)).where(
            Refund.subscription_id == subscription_id,
            Refund.method == RefundMethod.PAYOUT,
            Refund.status != RefundStatus.FAILED,
        )
    )
    for amount, at in sorted(boletos, key=lambda row: row[1], reverse=True):
        used = min(amount, paid_out)
        paid_out -= used
        if amount - used > 0:
            sources.append(_Source(at, None, None, amount - used))
    return sorted(sources, key=lambda source: source.received_at, reverse=True)


def refund_balance(session: Session, subscription: Subscription, *, now: datetime) -> list[Refund]:
    """Refund the whole positive balance of an ended (locked) subscription; nothing otherwise.

    The balance is allocated to the money received, newest first: card charges get card refunds (up to
    what each has left), boleto money and anything without a traceable source one payout.
    """
    remaining = subscription.balance_cents
    if remaining <= 0 or subscription.status != SubscriptionStatus.CANCELED:
        return []
    refunds: list[Refund] = []
    payout = 0
    for source in _sources(session, subscription.id):
        if remaining == 0:
            break
        amount = min(remaining, source.refundable_cents)
        remaining -= amount
        if source.charge_id is None:
            payout += amount
        else:
            refunds.append(_new_refund(subscription, RefundMethod.CARD, amount, charge_id=source.charge_id))
    payout += remaining
    if payout:
        refunds.append(_new_refund(subscription, RefundMethod.PAYOUT, payout))
    session.add_all(refunds)
    session.flush()
    for refund in refunds:
        _record_refund(session, subscription, refund)
        if refund.method == RefundMethod.CARD:
            send_after_commit(session, process_refund, refund.id)
    return refunds


def _new_refund(
    subscription: Subscription, method: RefundMethod, amount: int, *, charge_id: int | None = None
) -> Refund:
    return Refund(
        subscription_id=subscription.id,
        organization_id=subscription.organization_id,
        charge_id=charge_id,
        method=method,
        amount_cents=amount,
        status=RefundStatus.PENDING,
        reason="saldo de assinatura encerrada",
    )


def _record_refund(session: Session, subscription: Subscription, refund: Refund) -> None:
    """The balance leaves the subscription when the refund is decided (its ledger `refund` entry);
    the refund row then carries the obligation until the money is back with the customer."""
    subscription.balance_cents -= refund.amount_cents
    description = "Estorno no cartão" if refund.method == RefundMethod.CARD else "Devolução por transferência"
    ledger(session, subscription, LedgerKind.REFUND, -refund.amount_cents, description, refund_id=refund.id)
    _notify_refund(session, subscription, refund)


def _notify_refund(session: Session, subscription: Subscription, refund: Refund) -> None:
    card_last4 = (
        session.scalar(select(Charge.card_last4).where(Charge.id == refund.charge_id)) if refund.charge_id else None
    )
    notify(
        session,
        organization_id=subscription.organization_id,
        subscription_id=subscription.id,
        kind="refund_created",
        dedupe_key=f"refund_created:{refund.id}",
        context={
            "amount_cents": refund.amount_cents,
            "method": refund.method,
            "card_last4": card_last4 or "",
            "subscription_id": subscription.id,
        },
    )


# --- card refunds (phases 2 and 3) -----------------------------------------------------------------


def execute_refund(session: Session, gateway: Gateway, refund_id: int, *, now: datetime) -> str:
    """Send a pending (or unknown) card refund to the gateway with its key and record the answer.

    Unavailable propagates (nothing was processed: the message is retried). A refusal turns the
    refund into a payout, so the money is still given back.
    """
    refund = session.get(Refund, refund_id, populate_existing=True)
    if refund is None:
        raise LookupError(f"refund {refund_id} does not exist")
    if refund.method != RefundMethod.CARD or refund.status not in (RefundStatus.PENDING, RefundStatus.UNKNOWN):
        return refund.status
    charge_gateway_id = session.scalar(select(Charge.gateway_id).where(Charge.id == refund.charge_id))
    amount = refund.amount_cents
    session.commit()

    outcome: RefundResult | Ambiguous | GatewayRejected
    if charge_gateway_id is None:
        outcome = GatewayRejected("charge_not_refundable", "the charge has no gateway id")
    else:
        try:
            outcome = gateway.refund(charge_gateway_id, amount, refund_idempotency_key(refund_id))
        except (Ambiguous, GatewayRejected) as exc:
            outcome = exc

    refund = session.scalar(
        select(Refund).where(Refund.id == refund_id).with_for_update().execution_options(populate_existing=True)
    )
    assert refund is not None
    if refund.status in (RefundStatus.PENDING, RefundStatus.UNKNOWN):
        match outcome:
            case RefundResult():
                refund.status = RefundStatus.SUCCEEDED
                refund.gateway_id = outcome.gateway_id
                refund.resolved_at = now
            case Ambiguous():
                refund.status = RefundStatus.UNKNOWN
                refund.gateway_message = str(outcome)
            case GatewayRejected():
                refund.status = RefundStatus.FAILED
                refund.gateway_code, refund.gateway_message = outcome.code, outcome.message
                refund.resolved_at = now
                _replace_by_payout(session, refund)
    session.commit()
    return refund.status


def _replace_by_payout(session: Session, refused: Refund) -> None:
    subscription = session.get_one(Subscription, refused.subscription_id)
    payout = _new_refund(subscription, RefundMethod.PAYOUT, refused.amount_cents)
    payout.reason = f"estorno no cartão recusado pelo gateway (reembolso {refused.id})"
    session.add(payout)
    session.flush()
    logger.warning("card refund %s refused (%s); replaced by payout %s", refused.id, refused.gateway_code, payout.id)
    _notify_refund(session, subscription, payout)


def stale_refund_ids(session: Session, now: datetime, older_than: timedelta = STALE_REFUND) -> list[int]:
    """Card refunds whose outcome is unknown, or pending long enough to have been interrupted."""
    return list(
        session.scalars(
            select(Refund.id)
            .where(
                Refund.method == RefundMethod.CARD,
                Refund.status.in_([RefundStatus.PENDING, RefundStatus.UNKNOWN]),
                Refund.created_at < now - older_than,
            )
            .order_by(Refund.created_at)
            .limit(500)
        )
    )


@dramatiq.actor(queue_name="payments", **STANDARD)
def process_refund(refund_id: int) -> None:
    session = current_session()
    context = runtime()
    execute_refund(session, context.gateway_factory(), refund_id, now=clock.now(session, context.config))


# --- on-call -------------------------------------------------------------------------------------


def list_refunds(session: Session, *, status: str | None = None) -> list[Refund]:
    query = select(Refund).order_by(Refund.created_at, Refund.id)
    if status is not None:
        query = query.where(Refund.status == status)
    return list(session.scalars(query))


def mark_payout_paid(
    session: Session, refund_id: int, *, reference: str, reason: str, actor: str, now: datetime
) -> Refund:
    """Close a pending payout that on-call paid by bank transfer (audited). Does not commit."""
    refund = session.scalar(select(Refund).where(Refund.id == refund_id).with_for_update())
    if refund is None:
        raise RefundActionRefused(f"refund {refund_id} does not exist")
    if refund.method != RefundMethod.PAYOUT:
        raise RefundActionRefused(f"refund {refund_id} is a card refund: the gateway returns it, not on-call")
    if refund.status != RefundStatus.PENDING:
        raise RefundActionRefused(f"refund {refund_id} is already {refund.status}")
    if not reference.strip() or not reason.strip():
        raise RefundActionRefused("a payout is closed with the transfer's reference and a reason")
    refund.status = RefundStatus.PAID
    refund.reference = reference.strip()
    refund.resolved_at = now
    audit.record(
        session,
        actor=actor,
        action="refund.mark_paid",
        target_type="refund",
        target_id=str(refund.id),
        reason=reason.strip(),
        details={"reference": refund.reference, "amount_cents": refund.amount_cents},
    )
    return refund
