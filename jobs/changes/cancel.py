"""Cancel at the end of the period (at once when suspended), and resume before then."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import select

import jobs
from jobs.changes.outcome import Run, apply, handles, void
from jobs.changes.queries import lock_own_subscription, upcoming_renewal_invoice, wait_for_charges
from jobs.contract import Cancel, Resume
from jobs.invoicing import create_renewal_invoice
from jobs.refunds import end_subscription
from models import policy
from models.calendar import ANNUAL, format_date_br
from models.policy import CANCELLATION_ALREADY_SCHEDULED, CANCELLATION_NOT_SCHEDULED, RuleViolation
from models.schema import Invoice, LedgerEntry, Subscription
from models.states import InvoiceKind, InvoiceStatus, LedgerKind, PaymentMethod, SubscriptionStatus

jobs.require_broker()

logger = logging.getLogger(__name__)


@handles("cancel")
def _cancel(run: Run, params: Cancel) -> None:
    session = run.session
    subscription = lock_own_subscription(run, params.subscription_id)
    policy.ensure_subscription_open(status=subscription.status)
    wait_for_charges(session, subscription)
    if subscription.status == SubscriptionStatus.SUSPENDED:
        _end_now(run, subscription)
        return
    renewal = subscription.current_period_end
    if subscription.cancel_at_period_end:
        raise RuleViolation(
            CANCELLATION_ALREADY_SCHEDULED,
            f"O cancelamento desta assinatura já está agendado para {format_date_br(renewal)}.",
            ends_on=renewal,
        )
    subscription.cancel_at_period_end = True
    voided: list[int] = []
    upcoming = upcoming_renewal_invoice(session, subscription)
    if upcoming is not None and upcoming.status == InvoiceStatus.OPEN:
        # The renewal will not happen: its boleto (issued from T − 7) must not be paid.
        void(run, subscription, upcoming, "Crédito devolvido: boleto da renovação cancelado")
        voided.append(upcoming.id)
    ends_on = max(renewal, run.on)
    run.notify(
        organization_id=subscription.organization_id,
        subscription_id=subscription.id,
        kind="cancellation_scheduled",
        dedupe_key=f"cancellation_scheduled:{run.request.id}",
        context={"ends_on": ends_on},
    )
    apply(
        run,
        {"ends_on": ends_on.isoformat(), "cancel_at_period_end": True, "voided_invoice_ids": voided},
        ledger_on=[subscription],
        details={"ends_on": ends_on.isoformat()},
    )


def _end_now(run: Run, subscription: Subscription) -> None:
    """A suspended subscription gives no service to wait for: it ends on D, owing nothing for the
    service it never had, and what it holds is refunded."""
    run.boletos_to_cancel.extend(end_subscription(run.session, subscription, ended_on=run.on, now=run.now))
    apply(
        run,
        {
            "ends_on": run.on.isoformat(),
            "status": subscription.status,
            "refunded_cents": _refunded_now(run, subscription),
        },
        ledger_on=[subscription],
        details={"ends_on": run.on.isoformat(), "while": SubscriptionStatus.SUSPENDED},
    )


def _refunded_now(run: Run, subscription: Subscription) -> int:
    return -sum(
        run.session.scalars(
            select(LedgerEntry.amount_cents).where(
                LedgerEntry.subscription_id == subscription.id, LedgerEntry.kind == LedgerKind.REFUND
            )
        )
    )


@handles("resume")
def _resume(run: Run, params: Resume) -> None:
    on = run.on
    subscription = lock_own_subscription(run, params.subscription_id)
    policy.ensure_subscription_open(status=subscription.status)
    renewal = subscription.current_period_end
    if not subscription.cancel_at_period_end:
        raise RuleViolation(
            CANCELLATION_NOT_SCHEDULED,
            "Esta assinatura não tem cancelamento agendado: nada foi alterado.",
        )
    if renewal <= on:
        raise RuleViolation(
            policy.SUBSCRIPTION_CANCELED,
            f"A assinatura foi encerrada em {format_date_br(renewal)}, como agendado, e o cancelamento não pode "
            "mais ser desfeito. Para voltar a usar o CONECTA, faça uma nova assinatura.",
            ended_on=renewal,
        )
    subscription.cancel_at_period_end = False
    result: dict[str, Any] = {"renewal_date": renewal.isoformat(), "cancel_at_period_end": False}
    reissued = _reissue_renewal_boleto(run, subscription)
    if reissued is not None:
        result["reissued_invoice_id"] = reissued
    run.notify(
        organization_id=subscription.organization_id,
        subscription_id=subscription.id,
        kind="cancellation_undone",
        dedupe_key=f"cancellation_undone:{run.request.id}",
        context={"renewal_date": renewal},
    )
    apply(run, result, ledger_on=[subscription], details={"renewal_date": renewal.isoformat()})


def _reissue_renewal_boleto(run: Run, subscription: Subscription) -> int | None:
    """After a cancellation voided the renewal's boleto (issued from T − 7), resuming needs a new one,
    due max(T, D + BOLETO_DUE_DAYS) like any boleto issued late."""
    session, on, config = run.session, run.on, run.config
    renewal = subscription.current_period_end
    voided = session.scalar(
        select(Invoice.id).where(
            Invoice.subscription_id == subscription.id,
            Invoice.kind == InvoiceKind.RENEWAL,
            Invoice.period_start == renewal,
            Invoice.status == InvoiceStatus.VOID,
        )
    )
    if (
        voided is None
        or subscription.cycle != ANNUAL
        or subscription.effective_payment_method != PaymentMethod.BOLETO
        or upcoming_renewal_invoice(session, subscription) is not None
    ):
        return None
    invoice = create_renewal_invoice(
        session,
        subscription,
        period_start=renewal,
        method=PaymentMethod.BOLETO,
        due_date=policy.late_boleto_due_date(renewal, on, config.boleto_due_days),
    )
    if invoice is None:  # billed meanwhile by the daily run: that invoice stands
        return None
    run.boleto_invoices.append(invoice.id)
    return invoice.id
