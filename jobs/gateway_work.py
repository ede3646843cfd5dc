"""Gateway work a flow decides inside its transaction and does once that transaction has committed.

Every flow that talks to the gateway — the daily run's renewals and dunning, change requests —
collects it the same way, in a `GatewayWork`: card charges recorded `pending` (phase 1 of a charge),
open boleto invoices to issue a boleto for, and boletos voided here to cancel at the gateway. `settle`
then makes those calls with no transaction open; a cancellation is its own message
(`cancel_boleto_at_gateway`), retried until the gateway confirms. Nothing is sent from inside a
transaction, or from a savepoint that may still roll back.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import date, datetime

from sqlalchemy.orm import Session

from gateways.base import Gateway, GatewayError, GatewayRejected, Unavailable
from jobs.boletos import cancel_boleto_at_gateway, issue_boletos
from jobs.context import BillingConfig
from jobs.outbox import send_now
from jobs.payments import PreparedCharge, charge_and_record
from models.schema import Boleto

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class GatewayWork:
    """What must reach the gateway after the commit."""

    charges: list[PreparedCharge] = field(default_factory=list)
    boleto_invoices: list[int] = field(default_factory=list)
    boletos_to_cancel: list[str] = field(default_factory=list)


@dataclass
class Settled:
    charge_statuses: dict[int, str]
    # The boleto issued (or found) per invoice.
    boletos: dict[int, Boleto]
    # A boleto the gateway could not issue now (it was not processed, or its answer was lost): the same
    # idempotency key makes the next attempt safe, and the daily run issues any that is still missing.
    retry: Unavailable | None = None


def settle(
    session: Session, gateway: Gateway, work: GatewayWork, *, on: date, now: datetime, config: BillingConfig
) -> Settled:
    """The charges as one concurrent batch (phases 2 and 3), then the boletos to issue as another (one the
    gateway refuses never keeps its neighbours from being issued), then the cancellations."""
    statuses = charge_and_record(session, gateway, work.charges, on=on, now=now, config=config) if work.charges else {}
    work.charges.clear()
    settled = Settled(statuses, {})
    boletos = issue_boletos(session, gateway, work.boleto_invoices, config=config) if work.boleto_invoices else {}
    for invoice_id, outcome in boletos.items():
        if isinstance(outcome, GatewayRejected):
            logger.error("the gateway refused the boleto of invoice %s: %s", invoice_id, outcome)
        elif isinstance(outcome, GatewayError):
            settled.retry = Unavailable(f"boleto of invoice {invoice_id}: {outcome}")
        elif outcome is not None:
            settled.boletos[invoice_id] = outcome
    work.boleto_invoices.clear()
    for gateway_id in work.boletos_to_cancel:
        send_now(session, cancel_boleto_at_gateway, gateway_id)
    work.boletos_to_cancel.clear()
    return settled
