"""Money coming in by card: charges in three phases, their consequences, and their reconciliation;
the reads every flow shares about charges (is one in flight?) and the organization's card. Boletos
are `jobs.boletos`.

A card is charged in three steps so that it is never charged twice and never lost:
1. `open_charge_attempt` records a `pending` attempt with its idempotency key (the caller commits);
2. `execute_charges` calls the gateway with no transaction open;
3. `record_charge_outcome` records `succeeded`, `failed` or `unknown` and its consequences.
An `unknown` or stale `pending` attempt is only ever resolved by looking its key up at the gateway.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

import dramatiq
from sqlalchemy import ColumnElement, Select, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

import jobs
from gateways.base import (
    Ambiguous,
    ChargeRequest,
    ChargeResult,
    Declined,
    Gateway,
    GatewayError,
    GatewayRejected,
    IdempotencyConflict,
    Unavailable,
    charge_many,
)
from jobs.boletos import boleto_notice, live_boleto
from jobs.context import BillingConfig, current_session, runtime
from jobs.invoicing import lock_subscription, mark_invoice_paid
from jobs.notifications import notify
from jobs.retries import STANDARD
from models.calendar import local_today
from models.dunning import last_retry_day, next_retry_date
from models.schema import Card, Charge, Invoice, Subscription
from models.states import (
    UNRESOLVED_CHARGE,
    ChargeStatus,
    InvoiceKind,
    InvoiceStatus,
    PaymentMethod,
    SubscriptionStatus,
)

jobs.require_broker()
logger = logging.getLogger(__name__)

ChargeOutcome = ChargeResult | GatewayError
# What a resolved attempt means for its invoice depends on why the invoice exists (a renewal's
# dunning, a change request's all-or-nothing); flows register their handler per invoice kind.
Consequence = Callable[[Session, Charge, Invoice, date, datetime, BillingConfig], None]
CONSEQUENCES: dict[str, Consequence] = {}

# A pending attempt this old is presumed interrupted (worker killed mid-charge) and reconciled.
STALE_PENDING = timedelta(minutes=2)
# How long a reconciliation message owns an unresolved attempt before a tick may send another.
RECONCILE_LEASE = timedelta(minutes=5)


def consequence(kind: str) -> Callable[[Consequence], Consequence]:
    def register(handler: Consequence) -> Consequence:
        CONSEQUENCES[kind] = handler
        return handler

    return register


@dataclass(frozen=True)
class PreparedCharge:
    charge_id: int
    request: ChargeRequest


def idempotency_key(invoice_id: int, attempt: int) -> str:
    return f"charge:{invoice_id}:{attempt}"


# --- phase 1 -----------------------------------------------------------------------------------


def open_charge_attempt(session: Session, invoice: Invoice, card: Card) -> Charge | None:
    """A new `pending` attempt for an open invoice; None while another attempt is unresolved, when
    the invoice is not open, or when a concurrent duplicate created the same attempt first."""
    if invoice.status != InvoiceStatus.OPEN or invoice.total_cents <= 0:
        return None
    attempts = session.execute(
        select(Charge.attempt, Charge.status).where(Charge.invoice_id == invoice.id).with_for_update()
    ).all()
    if any(status in (*UNRESOLVED_CHARGE, ChargeStatus.SUCCEEDED) for _, status in attempts):
        return None
    attempt = max((number for number, _ in attempts), default=0) + 1
    charge_id = session.scalar(
        insert(Charge)
        .values(
            invoice_id=invoice.id,
            attempt=attempt,
            idempotency_key=idempotency_key(invoice.id, attempt),
            amount_cents=invoice.total_cents,
            card_id=card.id,
            card_token=card.token,
            card_last4=card.last4,
        )
        .on_conflict_do_nothing()
        .returning(Charge.id)
    )
    # Earlier failed attempts no longer wait for a retry: this is it.
    for earlier in session.scalars(select(Charge).where(Charge.invoice_id == invoice.id, Charge.id != charge_id)):
        earlier.next_retry_on = None
    return session.get(Charge, charge_id) if charge_id else None


def prepare(charge: Charge) -> PreparedCharge:
    """The gateway request of an attempt, derived from its row alone: a replay of its idempotency key
    (reconciliation) sends exactly the same body, as the gateway requires."""
    return PreparedCharge(
        charge.id,
        ChargeRequest(
            card_token=charge.card_token,
            amount_cents=charge.amount_cents,
            idempotency_key=charge.idempotency_key,
            description=f"CONECTA fatura {charge.invoice_id}, tentativa {charge.attempt}",
        ),
    )


# --- phase 2 -----------------------------------------------------------------------------------


def execute_charges(session: Session, gateway: Gateway, prepared: Sequence[PreparedCharge]) -> list[ChargeOutcome]:
    """Call the gateway for each prepared attempt, concurrently, with no transaction open."""
    if session.in_transaction():
        session.commit()
    return charge_many(gateway, [item.request for item in prepared])


# --- phase 3 -----------------------------------------------------------------------------------


def record_charge_outcome(
    session: Session, charge_id: int, outcome: ChargeOutcome, *, on: date, now: datetime, config: BillingConfig
) -> str:
    """Record what the gateway said about an attempt, once, and apply its consequences.

    Returns the attempt's status afterwards. A duplicate (the attempt was already resolved) changes
    nothing; `Unavailable` leaves the attempt pending for reconciliation (it was not processed).
    """
    charge = session.scalar(select(Charge).where(Charge.id == charge_id).with_for_update())
    if charge is None:
        raise LookupError(f"charge {charge_id} does not exist")
    if charge.status not in UNRESOLVED_CHARGE:
        return charge.status

    match outcome:
        case ChargeResult(succeeded=True):
            charge.status = ChargeStatus.SUCCEEDED
            charge.gateway_id = outcome.gateway_id
        case ChargeResult() | Declined():
            charge.status = ChargeStatus.FAILED
            charge.gateway_id = outcome.gateway_id
            charge.gateway_code, charge.gateway_message, charge.hard_decline = (
                outcome.code,
                outcome.message,
                outcome.hard,
            )
        case IdempotencyConflict() | Ambiguous():
            charge.status = ChargeStatus.UNKNOWN
            charge.gateway_message = str(outcome)
            return charge.status
        case GatewayRejected():
            # The gateway refused the card itself (e.g. an invalid token): no retry can help.
            charge.status = ChargeStatus.FAILED
            charge.gateway_code, charge.gateway_message, charge.hard_decline = outcome.code, outcome.message, True
        case Unavailable():
            return charge.status
        case _:
            charge.status = ChargeStatus.UNKNOWN
            charge.gateway_message = f"unexpected outcome: {outcome!r}"
            return charge.status

    charge.resolved_at = now
    invoice = session.get_one(Invoice, charge.invoice_id)
    if charge.status == ChargeStatus.SUCCEEDED and invoice.status != InvoiceStatus.OPEN:
        # The money arrived for an invoice that no longer takes it (voided while the charge was in
        # flight): it is the customer's credit, refunded at once if the subscription has ended.
        from jobs.refunds import credit_payment

        subscription = lock_subscription(session, invoice.subscription_id)
        assert subscription is not None
        credit_payment(
            session,
            subscription,
            invoice_id=invoice.id,
            amount_cents=charge.amount_cents,
            description="Cobrança de fatura anulada convertida em crédito",
            now=now,
        )
        return charge.status
    CONSEQUENCES[invoice.kind](session, charge, invoice, on, now, config)
    return charge.status


def charge_and_record(
    session: Session,
    gateway: Gateway,
    prepared: Sequence[PreparedCharge],
    *,
    on: date,
    now: datetime,
    config: BillingConfig,
) -> dict[int, str]:
    """Phases 2 and 3 for attempts the caller has recorded (phase 1) in its own transaction.

    The outcomes are recorded in one transaction (`jobs.renewal_outcomes`: the common case as sets);
    only if one of them fails is the batch recorded again, one by one, with a savepoint per attempt,
    so recording one outcome never undoes its neighbours'. An attempt whose recording failed stays
    pending, and the janitor reconciles it by its key.
    """
    from jobs.renewal_outcomes import record_outcomes  # it builds on this module

    outcomes = list(zip(prepared, execute_charges(session, gateway, prepared), strict=True))
    try:
        # The chunk's plain renewal successes as sets, every other outcome one by one.
        statuses = record_outcomes(session, outcomes, on=on, now=now, config=config)
        session.commit()
        return statuses
    except Exception:
        session.rollback()
    statuses = {}
    for item, outcome in outcomes:
        savepoint = session.begin_nested()
        try:
            statuses[item.charge_id] = record_charge_outcome(
                session, item.charge_id, outcome, on=on, now=now, config=config
            )
            savepoint.commit()
        except Exception:
            savepoint.rollback()
            logger.exception("could not record the outcome of charge %s; left for reconciliation", item.charge_id)
            statuses[item.charge_id] = ChargeStatus.PENDING
    session.commit()
    return statuses


# --- shared reads: charges in flight, the organization's card --------------------------------------


def _charges_in_flight(column: Any, *, changes_only: bool) -> Select[Any]:
    """`column` of the invoices having a charge whose outcome is not known yet; with `changes_only`,
    of the open invoices of change requests (a cycle change, a subscribe) only."""
    query = (
        select(column)
        .select_from(Invoice)
        .join(Charge, Charge.invoice_id == Invoice.id)
        .where(Charge.status.in_(UNRESOLVED_CHARGE))
    )
    if changes_only:
        query = query.where(Invoice.kind != InvoiceKind.RENEWAL, Invoice.status == InvoiceStatus.OPEN)
    return query


def charge_in_flight(session: Session, subscription_id: int, *, changes_only: bool = False) -> int | None:
    """The invoice of a charge of the subscription whose outcome is not known yet, or None. A flow that
    computes from the subscription's money (a change request, a renewal, the end of a subscription)
    waits for it: its outcome is about to change that money."""
    query = _charges_in_flight(Invoice.id, changes_only=changes_only)
    return session.scalar(query.where(Invoice.subscription_id == subscription_id).limit(1))


def subscriptions_with_charge_in_flight(
    session: Session, subscription_ids: Sequence[int], *, changes_only: bool = False
) -> set[int]:
    """`charge_in_flight` for a chunk of subscriptions: the ids of those that have one."""
    query = _charges_in_flight(Invoice.subscription_id, changes_only=changes_only)
    return set(session.scalars(query.where(Invoice.subscription_id.in_(subscription_ids))))


def card_of_organization(organization_id: Any) -> ColumnElement[bool]:
    """SQL condition on `Card`: the card on file of the organization (it has at most one, which every
    subscription of the organization uses). `organization_id` is a value, or a column to join on."""
    return Card.organization_id == organization_id


def organization_card(session: Session, organization_id: int) -> Card | None:
    return session.scalar(select(Card).where(card_of_organization(organization_id)))


def awaiting_outcome_or_retry() -> ColumnElement[bool]:
    """SQL condition on `Charge`: an attempt whose outcome is unknown, or a failed one with a retry
    scheduled — while an invoice has one, its dunning waits."""
    return Charge.status.in_(UNRESOLVED_CHARGE) | Charge.next_retry_on.is_not(None)


# --- renewal consequences (dunning) ------------------------------------------------------------


def card_display(charge: Charge, session: Session, organization_id: int) -> dict[str, str]:
    card = organization_card(session, organization_id)
    return {"brand": card.brand if card else "", "last4": charge.card_last4 or (card.last4 if card else "")}


@consequence(InvoiceKind.RENEWAL)
def renewal_charge_resolved(
    session: Session, charge: Charge, invoice: Invoice, on: date, now: datetime, config: BillingConfig
) -> None:
    subscription = lock_subscription(session, invoice.subscription_id)
    assert subscription is not None
    if charge.status == ChargeStatus.SUCCEEDED:
        mark_paid_by_card(session, invoice, charge, on=on, now=now)
        return

    renewal_date = invoice.due_date
    retry_on = (
        None if charge.hard_decline else next_retry_date(renewal_date, charge.attempt, on, config.dunning_retry_days)
    )
    charge.next_retry_on = retry_on
    if retry_on is None and on >= last_retry_day(renewal_date, config.dunning_retry_days):
        suspend(session, subscription, invoice, now=now, reason=PaymentMethod.CARD)
    elif subscription.status == SubscriptionStatus.ACTIVE:
        subscription.status = SubscriptionStatus.PAST_DUE
    notify_charge_failed(
        session,
        subscription,
        invoice,
        dedupe_key=f"charge_failed:{charge.id}",
        amount_cents=charge.amount_cents,
        code=charge.gateway_code or "",
        reason=charge.gateway_message or "",
        hard=charge.hard_decline,
        next_retry_on=retry_on,
        card_last4=charge.card_last4 or "",
    )


def mark_paid_by_card(session: Session, invoice: Invoice, charge: Charge, *, on: date, now: datetime) -> bool:
    """A succeeded attempt pays its invoice (with the receipt showing the card)."""
    return mark_invoice_paid(
        session,
        invoice,
        paid_on=on,
        now=now,
        amount_cents=charge.amount_cents,
        source="cartão",
        card=card_display(charge, session, invoice.organization_id),
    )


def notify_charge_failed(
    session: Session,
    subscription: Subscription,
    invoice: Invoice,
    *,
    dedupe_key: str,
    amount_cents: int,
    code: str,
    reason: str,
    hard: bool,
    next_retry_on: date | None,
    card_last4: str,
) -> None:
    notify(
        session,
        organization_id=subscription.organization_id,
        subscription_id=subscription.id,
        kind="charge_failed",
        dedupe_key=dedupe_key,
        context={
            "invoice_id": invoice.id,
            "amount_cents": amount_cents,
            "code": code,
            "reason": reason,
            "hard": hard,
            "next_retry_on": next_retry_on.isoformat() if next_retry_on else None,
            "card_last4": card_last4,
        },
    )


def suspend(session: Session, subscription: Subscription, invoice: Invoice, *, now: datetime, reason: str) -> None:
    if subscription.status in (SubscriptionStatus.SUSPENDED, SubscriptionStatus.CANCELED):
        return
    subscription.status = SubscriptionStatus.SUSPENDED
    subscription.suspended_at = now
    context: dict[str, Any] = {"invoice_id": invoice.id, "amount_cents": invoice.total_cents, "reason": reason}
    # The invoice's live boleto: paying it reactivates.
    boleto = live_boleto(session, invoice.id)
    if boleto is not None:
        context |= boleto_notice(invoice, boleto, dunning=True)
        context["boleto_due_date"] = boleto.due_date.isoformat()
    notify(
        session,
        organization_id=subscription.organization_id,
        subscription_id=subscription.id,
        kind="subscription_suspended",
        dedupe_key=f"subscription_suspended:{invoice.id}",
        context=context,
    )


# --- reconciliation (the janitor) --------------------------------------------------------------


def claim_unresolved_charges(
    session: Session, now: datetime, stale_after: timedelta = STALE_PENDING, lease: timedelta = RECONCILE_LEASE
) -> list[int]:
    """Attempts whose outcome is unknown, and pending ones old enough to have been interrupted, that
    no reconciliation owns: each is claimed until `now + lease`, so that the next ticks (of every
    scheduler) leave it to the message about to be sent. Rows another transaction is claiming are
    skipped. At most 1,000, oldest first."""
    unclaimed = (
        select(Charge.id)
        .where(
            Charge.status.in_(UNRESOLVED_CHARGE),
            (Charge.status == ChargeStatus.UNKNOWN) | (Charge.created_at < now - stale_after),
            Charge.reconcile_claimed_until.is_(None) | (Charge.reconcile_claimed_until <= now),
        )
        .order_by(Charge.created_at)
        .limit(1000)
        .with_for_update(skip_locked=True)
    )
    claimed = session.scalars(
        update(Charge)
        .where(Charge.id.in_(unclaimed.scalar_subquery()))
        .values(reconcile_claimed_until=now + lease)
        .returning(Charge.id)
    )
    return sorted(claimed)


def reconcile_charge(
    session: Session, gateway: Gateway, charge_id: int, *, now: datetime, config: BillingConfig
) -> str:
    """Resolve an attempt by looking its key up at the gateway — never by a blind new attempt.

    Found: record what the gateway did. Not found: the gateway never processed the key, so the
    same request (same key, same card token) is sent again, which the gateway deduplicates.
    """
    charge = session.get(Charge, charge_id)
    if charge is None or charge.status not in UNRESOLVED_CHARGE:
        return charge.status if charge else "missing"
    prepared = prepare(charge)
    session.commit()
    on = local_today(now, config.timezone)
    try:
        found = gateway.find_charge(prepared.request.idempotency_key)
    except Unavailable:
        return ChargeStatus.PENDING if charge.status == ChargeStatus.PENDING else ChargeStatus.UNKNOWN
    outcome: ChargeOutcome = found if found is not None else execute_charges(session, gateway, [prepared])[0]
    status = record_charge_outcome(session, charge_id, outcome, on=on, now=now, config=config)
    session.commit()
    return status


@dramatiq.actor(queue_name="payments", **STANDARD)
def reconcile_charges(charge_ids: list[int], now: str) -> None:
    session = current_session()
    gateway = runtime().gateway_factory()
    instant = datetime.fromisoformat(now)
    for charge_id in charge_ids:
        reconcile_charge(session, gateway, charge_id, now=instant, config=runtime().config)
