"""Subscribe: a new subscription anchored on D; the first invoice charged now (card) or its boleto
issued now."""

from __future__ import annotations

import logging
from datetime import date, datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

import jobs
from jobs.changes.outcome import Run, apply, consequence_run, declined, handles, reject, send_cancellations
from jobs.changes.queries import require_document
from jobs.context import BillingConfig
from jobs.contract import Subscribe
from jobs.invoicing import MissingPlan, invoice_values, lock_subscription, plan_price
from jobs.payments import consequence, mark_paid_by_card, open_charge_attempt, organization_card, prepare
from models import policy
from models.calendar import add_cycle
from models.policy import ALREADY_SUBSCRIBED, UNKNOWN_PRODUCT, RuleViolation
from models.schema import Charge, Invoice, Organization, Subscription
from models.states import ChargeStatus, InvoiceKind, InvoiceStatus, PaymentMethod, SubscriptionStatus

jobs.require_broker()

logger = logging.getLogger(__name__)


@handles("subscribe")
def _subscribe(run: Run, params: Subscribe) -> None:
    session, on = run.session, run.on
    # The organization's row serializes its subscribes (and card updates).
    organization = session.scalars(
        select(Organization).where(Organization.id == run.request.organization_id).with_for_update()
    ).one()
    try:
        price = plan_price(session, params.product, params.cycle, on)
    except MissingPlan:
        raise RuleViolation(
            UNKNOWN_PRODUCT,
            f"O produto {params.product!r} não está disponível no ciclo de cobrança {policy.cycle_name(params.cycle)}.",
            product=params.product,
            cycle=params.cycle,
        ) from None
    live = session.scalar(
        select(Subscription.id).where(
            Subscription.organization_id == organization.id,
            Subscription.product == params.product,
            Subscription.status != SubscriptionStatus.CANCELED,
        )
    )
    if live is not None:
        raise RuleViolation(
            ALREADY_SUBSCRIBED,
            "A organização já tem uma assinatura ativa deste produto. Para mudar o ciclo de cobrança ou a forma "
            "de pagamento, use Alterar plano em Minhas assinaturas.",
            subscription_id=live,
        )
    card = organization_card(session, organization.id)
    policy.ensure_method_allowed(cycle=params.cycle, method=params.payment_method, has_card=card is not None)
    if params.payment_method == PaymentMethod.BOLETO:
        require_document(organization)

    period_end = add_cycle(on, params.cycle, 1)
    subscription = Subscription(
        organization_id=organization.id,
        product=params.product,
        cycle=params.cycle,
        status=SubscriptionStatus.ACTIVE,
        payment_method=params.payment_method,
        billing_anchor=on,
        current_period_start=on,
        current_period_end=period_end,
        balance_cents=0,
        cancel_at_period_end=False,
    )
    session.add(subscription)
    session.flush()
    run.request.subscription_id = subscription.id
    boleto = params.payment_method == PaymentMethod.BOLETO
    invoice = Invoice(
        **invoice_values(
            subscription_id=subscription.id,
            organization_id=organization.id,
            change_request_id=run.request.id,
            kind=InvoiceKind.SUBSCRIBE,
            cycle=params.cycle,
            period_start=on,
            period_end=period_end,
            amount_cents=price,
            discount_cents=0,
            method=params.payment_method,
            due_date=on + timedelta(days=run.config.boleto_due_days) if boleto else on,
        )
    )
    session.add(invoice)
    session.flush()
    result = _subscription_result(subscription, invoice)
    if not boleto:
        assert card is not None  # ensure_method_allowed
        charge = open_charge_attempt(session, invoice, card)
        assert charge is not None  # a new open invoice with a positive total
        run.charges.append(prepare(charge))
        run.request.result = result  # shown while the first payment is processed
        return
    run.boleto_invoices.append(invoice.id)
    _subscribed(run, subscription, invoice, result)


def _subscription_result(subscription: Subscription, invoice: Invoice) -> dict[str, Any]:
    return {
        "subscription_id": subscription.id,
        "invoice_id": invoice.id,
        "cycle": subscription.cycle,
        "payment_method": subscription.payment_method,
        "amount_cents": invoice.total_cents,
        "period_start": subscription.current_period_start.isoformat(),
        "period_end": subscription.current_period_end.isoformat(),
        "renewal_date": subscription.current_period_end.isoformat(),
    }


def _subscribed(run: Run, subscription: Subscription, invoice: Invoice, result: dict[str, Any]) -> None:
    run.notify(
        organization_id=subscription.organization_id,
        subscription_id=subscription.id,
        kind="subscribed",
        dedupe_key=f"subscribed:{run.request.id}",
        context={
            "cycle": subscription.cycle,
            "payment_method": subscription.payment_method,
            "period_start": invoice.period_start,
            "period_end": invoice.period_end,
            "amount_cents": invoice.total_cents,
        },
    )
    apply(
        run,
        result,
        ledger_on=[subscription],
        details={"cycle": subscription.cycle, "payment_method": subscription.payment_method},
    )


@consequence(InvoiceKind.SUBSCRIBE)
def subscribe_charge_resolved(
    session: Session, charge: Charge, invoice: Invoice, on: date, now: datetime, config: BillingConfig
) -> None:
    """The first payment of a new subscription: paid → applied; declined → the subscription is canceled."""
    run = consequence_run(session, invoice, on, now, config)
    subscription = lock_subscription(session, invoice.subscription_id)
    if run is None or subscription is None or invoice.status != InvoiceStatus.OPEN:
        return
    if charge.status == ChargeStatus.SUCCEEDED:
        mark_paid_by_card(session, invoice, charge, on=on, now=now)
        _subscribed(run, subscription, invoice, _subscription_result(subscription, invoice))
    else:
        invoice.status = InvoiceStatus.VOID
        subscription.status = SubscriptionStatus.CANCELED
        subscription.canceled_at = now
        run.notices.extend(reject(session, run.request, declined(charge), now=now))
    send_cancellations(run)
