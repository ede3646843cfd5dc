"""Segunda via: a new boleto for the open boleto invoice of a subscription."""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import select

import jobs
from jobs.boletos import live_boleto
from jobs.changes.outcome import Run, apply, handles
from jobs.changes.queries import lock_own_subscription
from jobs.contract import ReissueBoleto
from models import policy
from models.policy import NO_OPEN_BOLETO, RuleViolation
from models.schema import Invoice
from models.states import BoletoStatus, InvoiceStatus, PaymentMethod

jobs.require_broker()

logger = logging.getLogger(__name__)


@handles("reissue_boleto")
def _reissue_boleto(run: Run, params: ReissueBoleto) -> None:
    """A member asks for a new boleto ("segunda via") for the subscription's open boleto invoice: the
    current one is cancelled and a replacement, due D + BOLETO_DUE_DAYS, is issued after commit. Dunning
    keeps the invoice's original dates."""
    session = run.session
    subscription = lock_own_subscription(run, params.subscription_id)
    policy.ensure_subscription_open(status=subscription.status)
    invoice = session.scalar(
        select(Invoice)
        .where(
            Invoice.subscription_id == subscription.id,
            Invoice.status == InvoiceStatus.OPEN,
            Invoice.method == PaymentMethod.BOLETO,
        )
        .order_by(Invoice.due_date, Invoice.id)
        .limit(1)
        .with_for_update()
    )
    if invoice is None:
        raise RuleViolation(
            NO_OPEN_BOLETO,
            "Esta assinatura não tem boleto em aberto: não há segunda via a emitir.",
            subscription_id=subscription.id,
        )
    replaced = live_boleto(session, invoice.id, lock=True)
    if replaced is not None:
        replaced.status = BoletoStatus.CANCELED
        replaced.replaced_on = run.on
        run.boletos_to_cancel.append(replaced.gateway_id)
    run.boleto_invoices.append(invoice.id)
    apply(
        run,
        {
            "invoice_id": invoice.id,
            "replaced_boleto_id": replaced.id if replaced else None,
            "due_date": (run.on + timedelta(days=run.config.boleto_due_days)).isoformat(),
        },
        ledger_on=[subscription],
        details={"invoice_id": invoice.id},
    )
