"""Card payments taken back at the PSP: a chargeback, or a refund made outside Renova (the PSP's
dashboard). Renova still counts that money as received, so each one is put in front of on-call —
an audit event `charge.reversed_at_gateway`, an error in the logs and Sentry, the metric
`renova_charge_reversals_reported` — and nothing else is changed: whether to contest a chargeback,
write the invoice off or end the subscription is a decision for people (README "Payments taken back
at the PSP" under "Pagar.me's webhooks", and its runbook RenovaPaymentTakenBackAtPSP).

A gateway event only says which charge to look at; what happened is read from the gateway."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Final

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from gateways.base import Gateway
from jobs import audit
from models.money import format_brl
from models.schema import AuditEvent, Charge, Invoice, Refund
from models.states import ChargeStatus, RefundStatus

logger = logging.getLogger(__name__)

ACTION: Final = "charge.reversed_at_gateway"
ACTOR: Final = "gateway"


def record_reported_card_charge(session: Session, charge: Charge, gateway: Gateway | None, *, now: datetime) -> str:
    """A webhook named one of Renova's card charges: ask the gateway whether money went back and, if
    more went back than Renova refunded itself, report it once per state the gateway shows."""
    if charge.status != ChargeStatus.SUCCEEDED or charge.gateway_id is None:
        return "ignored"  # no money was taken: nothing can be taken back
    lookup = getattr(gateway, "card_charge_state", None)
    if lookup is None:
        raise RuntimeError("this gateway cannot look a card charge up: its webhooks cannot be verified")
    state = lookup(charge.gateway_id)  # Unavailable: the message is retried
    refunded_here = refunded_by_renova(session, charge.id)
    if state.status == "chargedback":
        kind = "chargeback"
    elif state.reversed_cents > refunded_here:
        kind = "refund"
    else:
        return "unchanged"  # Renova's own refunds, or nothing
    details = {
        "kind": kind,
        "gateway_charge_id": state.gateway_id,
        "gateway_status": state.status,
        "amount_cents": state.amount_cents,
        "reversed_cents": state.reversed_cents,
        "refunded_by_renova_cents": refunded_here,
        "invoice_id": charge.invoice_id,
    }
    # Two webhooks about one charge may be processed at once: one of them reports.
    session.execute(select(Charge.id).where(Charge.id == charge.id).with_for_update())
    if _already_reported(session, charge.id, kind, state.reversed_cents):
        return "already_reported"
    invoice = session.get_one(Invoice, charge.invoice_id)
    taken_back = state.reversed_cents - refunded_here
    reason = (
        f"chargeback de {format_brl(taken_back)} na cobrança {state.gateway_id}"
        if kind == "chargeback"
        else f"estorno de {format_brl(taken_back)} feito fora do Renova na cobrança {state.gateway_id}"
    )
    audit.record(
        session,
        actor=ACTOR,
        action=ACTION,
        target_type="charge",
        target_id=str(charge.id),
        reason=reason,
        details={**details, "subscription_id": invoice.subscription_id},
    )
    logger.error(
        "card charge %s (invoice %s, gateway %s) was taken back at the gateway: %s, %s of %s cents reversed, "
        "%s refunded by Renova",
        charge.id,
        charge.invoice_id,
        state.gateway_id,
        kind,
        state.reversed_cents,
        state.amount_cents,
        refunded_here,
    )
    return f"reversed_{kind}"


def refunded_by_renova(session: Session, charge_id: int) -> int:
    """What Renova refunded, or is refunding, of a card charge (a refund in flight counts: its money
    may already show at the gateway before Renova records the answer)."""
    live = (RefundStatus.PENDING, RefundStatus.SUCCEEDED, RefundStatus.UNKNOWN)
    total = session.scalar(
        select(func.coalesce(func.sum(Refund.amount_cents), 0)).where(
            Refund.charge_id == charge_id, Refund.status.in_(live)
        )
    )
    return int(total or 0)


def _already_reported(session: Session, charge_id: int, kind: str, reversed_cents: int) -> bool:
    """The same state reported before (a redelivered or second webhook about it)."""
    return (
        session.scalar(
            select(AuditEvent.id)
            .where(
                AuditEvent.action == ACTION,
                AuditEvent.target_type == "charge",
                AuditEvent.target_id == str(charge_id),
                AuditEvent.details["kind"].astext == kind,
                AuditEvent.details["reversed_cents"].as_integer() == reversed_cents,
            )
            .limit(1)
        )
        is not None
    )


def count_reported(session: Session) -> dict[str, int]:
    """Reversals reported since the beginning, by kind (a count that only grows: what the alert watches)."""
    kind = AuditEvent.details["kind"].astext
    rows = session.execute(select(kind, func.count()).where(AuditEvent.action == ACTION).group_by(kind)).all()
    found = {str(name): int(count) for name, count in rows}
    return {name: found.get(name, 0) for name in ("chargeback", "refund")}
