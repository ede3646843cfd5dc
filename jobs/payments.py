"""Money coming in: card charges in three phases, their reconciliation, and boleto payments.

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
from datetime import UTC, date, datetime, timedelta

import dramatiq
from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

import jobs
from gateways.base import (
    Ambiguous,
    BoletoRequest,
    ChargeRequest,
    ChargeResult,
    Declined,
    Gateway,
    GatewayError,
    GatewayRejected,
    IdempotencyConflict,
    Payer,
    Unavailable,
    charge_many,
)
from jobs.context import BillingConfig, current_session, runtime
from jobs.invoicing import ledger, lock_subscription, mark_invoice_paid
from jobs.notifications import notify
from jobs.retries import STANDARD
from models.calendar import local_today
from models.schema import Boleto, Card, Charge, GatewayEvent, Invoice, Subscription
from models.states import (
    BoletoStatus,
    ChargeStatus,
    InvoiceKind,
    InvoiceStatus,
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
    if any(status in (ChargeStatus.PENDING, ChargeStatus.UNKNOWN, ChargeStatus.SUCCEEDED) for _, status in attempts):
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
    if charge.status not in (ChargeStatus.PENDING, ChargeStatus.UNKNOWN):
        return charge.status

    match outcome:
        case ChargeResult(status="succeeded"):
            charge.status = ChargeStatus.SUCCEEDED
            charge.gateway_id = outcome.gateway_id
        case ChargeResult():
            charge.status = ChargeStatus.FAILED
            charge.gateway_id = outcome.gateway_id
            charge.gateway_code, charge.gateway_message, charge.hard_decline = (
                outcome.code,
                outcome.message,
                outcome.hard,
            )
        case Declined():
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

    The outcomes are recorded in one transaction; only if one of them fails is the batch recorded
    again with a savepoint per attempt, so recording one outcome never undoes its neighbours'. An
    attempt whose recording failed stays pending, and the janitor reconciles it by its key.
    """
    outcomes = list(zip(prepared, execute_charges(session, gateway, prepared), strict=True))
    try:
        statuses = {
            item.charge_id: record_charge_outcome(session, item.charge_id, outcome, on=on, now=now, config=config)
            for item, outcome in outcomes
        }
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


# --- renewal consequences (dunning) ------------------------------------------------------------


def next_retry_date(renewal_date: date, attempt: int, on: date, retry_days: tuple[int, ...]) -> date | None:
    """When a renewal's failed `attempt` (1 = on the renewal date) is retried; None after the last.

    Retries are T+1, T+3, T+5, T+7 by default: attempt n+1 happens on T + retry_days[n-1], or on the
    next scheduled day still ahead when a run was caught up late.
    """
    remaining = retry_days[attempt - 1 :] if attempt - 1 < len(retry_days) else ()
    for days in remaining:
        candidate = renewal_date + timedelta(days=days)
        if candidate > on:
            return candidate
    return None


def card_display(charge: Charge, session: Session, organization_id: int) -> dict[str, str]:
    card = session.scalar(select(Card).where(Card.organization_id == organization_id))
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
    last_retry_day = renewal_date + timedelta(days=config.dunning_retry_days[-1])
    if retry_on is None and on >= last_retry_day:
        suspend(session, subscription, invoice, now=now, reason="card")
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
    notify(
        session,
        organization_id=subscription.organization_id,
        subscription_id=subscription.id,
        kind="subscription_suspended",
        dedupe_key=f"subscription_suspended:{invoice.id}",
        context={"invoice_id": invoice.id, "amount_cents": invoice.total_cents, "reason": reason},
    )


# --- reconciliation (the janitor) --------------------------------------------------------------


def unresolved_charge_ids(session: Session, now: datetime, stale_after: timedelta = STALE_PENDING) -> list[int]:
    """Attempts whose outcome is unknown, and pending ones old enough to have been interrupted."""
    return list(
        session.scalars(
            select(Charge.id)
            .where(
                Charge.status.in_([ChargeStatus.PENDING, ChargeStatus.UNKNOWN]),
                (Charge.status == ChargeStatus.UNKNOWN) | (Charge.created_at < now - stale_after),
            )
            .order_by(Charge.created_at)
            .limit(1000)
        )
    )


def reconcile_charge(
    session: Session, gateway: Gateway, charge_id: int, *, now: datetime, config: BillingConfig
) -> str:
    """Resolve an attempt by looking its key up at the gateway — never by a blind new attempt.

    Found: record what the gateway did. Not found: the gateway never processed the key, so the
    same request (same key, same card token) is sent again, which the gateway deduplicates.
    """
    charge = session.get(Charge, charge_id)
    if charge is None or charge.status not in (ChargeStatus.PENDING, ChargeStatus.UNKNOWN):
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


# --- boleto payments (gateway webhooks) --------------------------------------------------------


def record_gateway_event(session: Session, event_id: str, *, now: datetime, config: BillingConfig) -> str:
    """Apply one stored gateway event, once (a redelivered event is a no-op)."""
    event = session.scalar(select(GatewayEvent).where(GatewayEvent.event_id == event_id).with_for_update())
    if event is None:
        raise LookupError(f"gateway event {event_id} was not stored")
    if event.processed_at is not None:
        return "duplicate"
    data = event.payload.get("data", {})
    if event.type == "boleto.paid":
        paid_on = date.fromisoformat(data["paid_on"]) if data.get("paid_on") else local_today(now, config.timezone)
        outcome = record_boleto_payment(
            session, str(data["boleto_id"]), amount_cents=int(data["amount_cents"]), paid_on=paid_on, now=now
        )
    elif event.type == "boleto.expired":
        outcome = record_boleto_expired(session, str(data["boleto_id"]))
    else:
        outcome = "ignored"
    event.processed_at = now
    return outcome


def record_boleto_payment(session: Session, gateway_id: str, *, amount_cents: int, paid_on: date, now: datetime) -> str:
    boleto = session.scalar(select(Boleto).where(Boleto.gateway_id == gateway_id).with_for_update())
    if boleto is None:
        return "unknown_boleto"
    if boleto.status == BoletoStatus.PAID:
        return "already_paid"
    invoice = session.get_one(Invoice, boleto.invoice_id)
    was_open = boleto.status in (BoletoStatus.ISSUED, BoletoStatus.OVERDUE) and invoice.status == InvoiceStatus.OPEN
    boleto.status = BoletoStatus.PAID
    boleto.paid_on, boleto.paid_at = paid_on, now
    if was_open:
        mark_invoice_paid(session, invoice, paid_on=paid_on, now=now, amount_cents=amount_cents, source="boleto")
        return "paid"
    # Paid although we had cancelled it (or its invoice was voided meanwhile): the money is the
    # customer's, kept as credit for the next invoices.
    subscription = lock_subscription(session, invoice.subscription_id)
    assert subscription is not None
    subscription.balance_cents += amount_cents
    ledger(
        session,
        subscription,
        "payment_to_credit",
        amount_cents,
        "Pagamento de boleto cancelado convertido em crédito",
        invoice_id=invoice.id,
    )
    return "credited"


def record_boleto_expired(session: Session, gateway_id: str) -> str:
    boleto = session.scalar(select(Boleto).where(Boleto.gateway_id == gateway_id).with_for_update())
    if boleto is None:
        return "unknown_boleto"
    if boleto.status in (BoletoStatus.ISSUED, BoletoStatus.OVERDUE):
        boleto.status = BoletoStatus.EXPIRED
        return "expired"
    return boleto.status


@dramatiq.actor(queue_name="payments", **STANDARD)
def process_gateway_event(event_id: str) -> None:
    session = current_session()
    record_gateway_event(session, event_id, now=datetime.now(UTC), config=runtime().config)


# --- boleto issuance ---------------------------------------------------------------------------


def boleto_idempotency_key(invoice_id: int) -> str:
    return f"boleto:{invoice_id}"


def issue_boleto(session: Session, gateway: Gateway, invoice_id: int) -> Boleto | None:
    """Issue the boleto of an open boleto invoice, once; the gateway call happens outside any
    transaction, keyed by the invoice, so an interrupted issue is completed by the next attempt.

    Returns the boleto (existing or new), or None when the invoice no longer needs one.
    """
    invoice = session.get(Invoice, invoice_id)
    if invoice is None or invoice.status != InvoiceStatus.OPEN or invoice.method != "boleto":
        return None
    existing = session.scalar(select(Boleto).where(Boleto.invoice_id == invoice_id))
    if existing is not None:
        return existing
    organization = invoice.subscription.organization
    request = BoletoRequest(
        invoice_id=invoice.id, amount_cents=invoice.total_cents, description=boleto_description(invoice)
    )
    payer = Payer(name=organization.name, document=organization.document or "", email=None)
    due_date = invoice.due_date
    session.commit()

    issued = gateway.issue_boleto(request, payer, due_date, boleto_idempotency_key(invoice_id))

    boleto_id = session.scalar(
        insert(Boleto)
        .values(
            invoice_id=invoice_id,
            gateway_id=issued.gateway_id,
            nosso_numero=issued.nosso_numero,
            barcode=issued.barcode,
            digitable_line=issued.digitable_line,
            amount_cents=issued.amount_cents,
            due_date=issued.due_date,
        )
        .on_conflict_do_nothing(index_elements=["invoice_id"])
        .returning(Boleto.id)
    )
    if boleto_id is None:
        return session.scalar(select(Boleto).where(Boleto.invoice_id == invoice_id))
    invoice = session.get_one(Invoice, invoice_id)
    notify(
        session,
        organization_id=invoice.organization_id,
        subscription_id=invoice.subscription_id,
        kind="boleto_issued",
        dedupe_key=f"boleto_issued:{boleto_id}",
        context={
            "invoice_id": invoice.id,
            "amount_cents": issued.amount_cents,
            "due_date": issued.due_date.isoformat(),
            "digitable_line": issued.digitable_line,
            "period_start": invoice.period_start.isoformat(),
            "period_end": invoice.period_end.isoformat(),
        },
    )
    session.commit()
    return session.get(Boleto, boleto_id)


def boleto_description(invoice: Invoice) -> str:
    from models.calendar import format_date_br
    from models.policy import cycle_name

    return (
        f"CONECTA — assinatura {cycle_name(invoice.cycle)} de {format_date_br(invoice.period_start)} "
        f"a {format_date_br(invoice.period_end)}"
    )


def cancel_boleto(session: Session, gateway: Gateway, boleto: Boleto) -> None:
    """Cancel an unpaid boleto at the gateway, then record it (the caller commits)."""
    if boleto.status not in (BoletoStatus.ISSUED, BoletoStatus.OVERDUE):
        return
    gateway.cancel_boleto(boleto.gateway_id)
    boleto.status = BoletoStatus.CANCELED
