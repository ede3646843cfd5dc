"""One request being processed (`Run`), its authorization, and its two outcomes: applied (with a ledger
trail) or rejected (with a notice to the requester). Flows register their handler here."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, Final

from sqlalchemy import select
from sqlalchemy.orm import Session

import jobs
from gateways.base import Gateway
from jobs.boletos import cancel_boleto_at_gateway
from jobs.context import BillingConfig
from jobs.gateway_work import GatewayWork
from jobs.invoicing import ledger, void_invoice
from jobs.notifications import DECLINE_REASONS, notify
from jobs.outbox import send_after_commit
from models import policy
from models.policy import ORGANIZATION_NOT_FOUND, RuleViolation
from models.schema import ChangeRequest, Charge, Invoice, Member, Organization, Subscription
from models.states import ChangeRequestStatus, LedgerKind

jobs.require_broker()

logger = logging.getLogger(__name__)


QUEUE: Final = "changes"


# The names the notification templates know for each kind ("Solicitação de …").
NOTICE_KIND: Final = {
    "billing_cycle": "cycle_change",
    "payment_method": "payment_method_switch",
    "card": "card_update",
    "resume": "undo_cancel",
    "reissue_boleto": "reissue_boleto",
}


class WaitForCharge(Exception):
    """A charge of the subscription is unresolved: the request stays `pending` and is processed again
    (the tick re-enqueues it) once the charge's outcome is known, on the state it leaves."""

    def __init__(self, invoice_id: int) -> None:
        super().__init__(f"a charge of invoice {invoice_id} is unresolved")
        self.invoice_id = invoice_id


@dataclass
class Run(GatewayWork):
    """One request being processed, and the gateway work left for after its transaction commits."""

    session: Session
    gateway: Gateway | None  # None inside a charge's consequence: no gateway call in a transaction
    request: ChangeRequest
    on: date
    now: datetime
    config: BillingConfig
    organization: Organization | None = None
    notices: list[int | None] = field(default_factory=list)

    def notify(self, **kwargs: Any) -> None:
        self.notices.append(notify(self.session, **kwargs))


def authorize(run: Run, requested_by: int) -> None:
    organization = run.session.get(Organization, run.request.organization_id)
    if organization is None:
        raise RuleViolation(
            ORGANIZATION_NOT_FOUND,
            "A organização não foi encontrada no sistema de cobrança. Tente novamente em alguns minutos.",
            organization_id=run.request.organization_id,
        )
    run.organization = organization
    member = run.session.scalar(
        select(Member).where(Member.id == requested_by, Member.organization_id == organization.id)
    )
    policy.ensure_can_change_billing(
        role=member.role if member else None,
        financial_responsible=bool(member and member.financial_responsible),
        active=bool(member and member.active),
    )


def send_cancellations(run: Run) -> None:
    """A charge's consequence has no gateway step of its own: its cancellations leave with its commit."""
    for gateway_id in run.boletos_to_cancel:
        send_after_commit(run.session, cancel_boleto_at_gateway, gateway_id)
    run.boletos_to_cancel.clear()


def apply(run: Run, result: dict[str, Any], *, ledger_on: list[Subscription], details: dict[str, Any]) -> None:
    """Mark the request applied; a zero-amount `change_applied` ledger entry keeps the trail per subscription."""
    request = run.request
    for subscription in ledger_on:
        ledger(
            run.session,
            subscription,
            LedgerKind.CHANGE_APPLIED,
            0,
            LEDGER_DESCRIPTIONS[request.kind],
            change_request_id=request.id,
            request_kind=request.kind,
            **details,
        )
    request.status = ChangeRequestStatus.APPLIED
    request.result = result
    request.error_code = request.error_message = None
    request.processed_at = run.now


def reject(session: Session, request: ChangeRequest, violation: RuleViolation, *, now: datetime) -> list[int | None]:
    """Record the refusal on the request and a notice to the requester; returns the notice ids."""
    request.status = ChangeRequestStatus.REJECTED
    request.error_code = violation.code
    request.error_message = violation.message
    request.processed_at = now
    if violation.details:
        request.result = {**(request.result or {}), "error_details": violation.details}
    if session.get(Organization, request.organization_id) is None:
        return []  # nobody to tell: the notice belongs to an organization
    requester = (
        session.scalar(
            select(Member).where(Member.id == request.requested_by, Member.organization_id == request.organization_id)
        )
        if request.requested_by
        else None
    )
    if requester is None or not requester.email or not requester.active:
        # Inactive members receive no notices, whatever they asked.
        logger.info("change request %s rejected (%s); no active requester to tell", request.id, violation.code)
        return []
    subscription = session.get(Subscription, request.subscription_id) if request.subscription_id else None
    notice = notify(
        session,
        organization_id=request.organization_id,
        subscription_id=subscription.id
        if subscription is not None and subscription.organization_id == request.organization_id
        else None,
        kind="change_request_rejected",
        dedupe_key=f"change_request_rejected:{request.id}",
        context={
            "kind": NOTICE_KIND.get(request.kind, request.kind),
            "code": violation.code,
            "message": violation.message,
        },
        recipients=[requester.email],
    )
    return [notice]


LEDGER_DESCRIPTIONS: Final = {
    "subscribe": "Assinatura contratada",
    "billing_cycle": "Alteração do ciclo de cobrança",
    "payment_method": "Alteração da forma de pagamento",
    "card": "Cartão de crédito atualizado",
    "cancel": "Cancelamento agendado",
    "resume": "Cancelamento desfeito",
    "reissue_boleto": "Segunda via de boleto emitida",
}


def void(run: Run, subscription: Subscription, invoice: Invoice, why: str) -> None:
    gateway_id = void_invoice(run.session, subscription, invoice, description=why, change_request_id=run.request.id)
    if gateway_id is not None:
        run.boletos_to_cancel.append(gateway_id)


def consequence_run(session: Session, invoice: Invoice, on: date, now: datetime, config: BillingConfig) -> Run | None:
    if invoice.change_request_id is None:
        logger.error("invoice %s of kind %s has no change request", invoice.id, invoice.kind)
        return None
    request = session.scalars(
        select(ChangeRequest)
        .where(ChangeRequest.id == invoice.change_request_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).one()
    if request.status != ChangeRequestStatus.PENDING:
        return None
    run = Run(session, None, request, on, now, config)
    run.organization = session.get(Organization, request.organization_id)
    return run


def declined(charge: Charge) -> RuleViolation:
    reason = DECLINE_REASONS.get(charge.gateway_code or "") or charge.gateway_message
    return policy.payment_declined(amount_cents=charge.amount_cents, reason=reason, gateway_code=charge.gateway_code)


Handler = Callable[[Run, Any], None]
# Each flow registers the function that applies its kind of request (see `handles`).
HANDLERS: dict[str, Handler] = {}


def handles(kind: str) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        HANDLERS[kind] = handler
        return handler

    return register
