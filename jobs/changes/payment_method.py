"""Payment-method switch, effective at the next renewal (boleto → card only until T − 7)."""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session

import jobs
from jobs.changes.outcome import Run, apply, handles
from jobs.changes.queries import lock_own_subscription, require_document, upcoming_renewal_invoice
from jobs.contract import PaymentMethodSwitch
from jobs.payments import organization_card
from models import policy
from models.schema import Subscription
from models.states import PaymentMethod

jobs.require_broker()

logger = logging.getLogger(__name__)


def _renewal_boleto_exists(session: Session, subscription: Subscription) -> bool:
    """A boleto (or a boleto invoice about to get one) already exists for the upcoming renewal."""
    upcoming = upcoming_renewal_invoice(session, subscription)
    return upcoming is not None and upcoming.method == PaymentMethod.BOLETO


@handles("payment_method")
def _payment_method(run: Run, params: PaymentMethodSwitch) -> None:
    session = run.session
    subscription = lock_own_subscription(run, params.subscription_id)
    policy.ensure_subscription_open(status=subscription.status)
    renewal = subscription.current_period_end
    pending = policy.plan_payment_method_switch(
        cycle=subscription.cycle,
        payment_method=subscription.payment_method,
        pending_payment_method=subscription.pending_payment_method,
        to_method=params.to,
        has_card=organization_card(session, subscription.organization_id) is not None,
        renewal_date=renewal,
        today=run.on,
        boleto_exists_for_renewal=_renewal_boleto_exists(session, subscription),
        lead_days=run.config.boleto_lead_days,
    )
    if params.to == PaymentMethod.BOLETO:
        require_document(run.organization)
    from_method = subscription.effective_payment_method
    subscription.pending_payment_method = pending
    card = organization_card(session, subscription.organization_id)
    run.notify(
        organization_id=subscription.organization_id,
        subscription_id=subscription.id,
        kind="payment_method_switch_scheduled",
        dedupe_key=f"payment_method_switch_scheduled:{run.request.id}",
        context={
            "from_method": from_method,
            "to_method": subscription.effective_payment_method,
            "effective_on": renewal,
            "card_last4": card.last4 if card else "",
        },
    )
    result = {
        "payment_method": subscription.payment_method,
        "pending_payment_method": subscription.pending_payment_method,
        "effective_payment_method": subscription.effective_payment_method,
        "effective_on": renewal.isoformat(),
        "pending_switch_canceled": pending is None,
    }
    if params.to == PaymentMethod.CARD and subscription.payment_method == PaymentMethod.BOLETO:
        deadline = policy.boleto_switch_deadline(renewal, run.config.boleto_lead_days)
        result["boleto_switch_deadline"] = deadline.isoformat()
    apply(run, result, ledger_on=[subscription], details={"from_method": from_method, "to_method": params.to})
