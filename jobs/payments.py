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
from jobs.invoicing import apply_credit, lock_subscription, mark_invoice_paid
from jobs.notifications import notify
from jobs.outbox import send_after_commit
from jobs.retries import STANDARD
from models.calendar import local_today
from models.dunning import last_retry_day, next_retry_date
from models.schema import Boleto, Card, Charge, GatewayEvent, Invoice, Subscription
from models.states import (
    BoletoStatus,
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
        case ChargeResult(succeeded=True):
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
    context = {"invoice_id": invoice.id, "amount_cents": invoice.total_cents, "reason": reason}
    # The invoice's live boleto (a segunda via has a higher sequence): paying it reactivates.
    boleto = session.scalar(
        select(Boleto)
        .where(Boleto.invoice_id == invoice.id, Boleto.status.in_([BoletoStatus.ISSUED, BoletoStatus.OVERDUE]))
        .order_by(Boleto.sequence.desc())
        .limit(1)
    )
    if boleto is not None:
        context["digitable_line"] = boleto.digitable_line
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

LIVE_BOLETO = (BoletoStatus.ISSUED, BoletoStatus.OVERDUE)


def record_gateway_event(session: Session, event_id: str, *, now: datetime, config: BillingConfig) -> str:
    """Apply one stored gateway event, once (a redelivered event is a no-op)."""
    event = session.scalar(select(GatewayEvent).where(GatewayEvent.event_id == event_id).with_for_update())
    if event is None:
        raise LookupError(f"gateway event {event_id} was not stored")
    if event.processed_at is not None:
        return "duplicate"
    data = event.payload.get("data", {})
    today = local_today(now, config.timezone)
    if event.type == "boleto.paid":
        paid_on = date.fromisoformat(data["paid_on"]) if data.get("paid_on") else today
        outcome = record_boleto_payment(
            session, str(data["boleto_id"]), amount_cents=int(data["amount_cents"]), paid_on=paid_on, now=now
        )
    elif event.type == "boleto.expired":
        outcome = record_boleto_expired(session, str(data["boleto_id"]), on=today)
    else:
        outcome = "ignored"
    event.processed_at = now
    return outcome


def record_boleto_payment(session: Session, gateway_id: str, *, amount_cents: int, paid_on: date, now: datetime) -> str:
    """A boleto was paid. Money for an open invoice pays it, whichever of its boletos was used (the
    others are cancelled); anything above the invoice's total, and any payment for an invoice that no
    longer takes it (voided, already paid), becomes the customer's credit — never kept, never lost."""
    from jobs.refunds import credit_payment

    boleto = session.scalar(select(Boleto).where(Boleto.gateway_id == gateway_id).with_for_update())
    if boleto is None:
        return "unknown_boleto"
    if boleto.status == BoletoStatus.PAID:
        return "already_paid"
    invoice = session.scalar(
        select(Invoice)
        .where(Invoice.id == boleto.invoice_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    assert invoice is not None
    subscription = lock_subscription(session, invoice.subscription_id)
    assert subscription is not None
    boleto.status = BoletoStatus.PAID
    boleto.paid_on, boleto.paid_at, boleto.paid_amount_cents = paid_on, now, amount_cents
    if invoice.status == InvoiceStatus.OPEN and amount_cents >= invoice.total_cents:
        for other in session.scalars(
            select(Boleto).where(
                Boleto.invoice_id == invoice.id, Boleto.id != boleto.id, Boleto.status.in_(LIVE_BOLETO)
            )
        ):
            other.status = BoletoStatus.CANCELED
            send_after_commit(session, cancel_boleto_at_gateway, other.gateway_id)
        mark_invoice_paid(session, invoice, paid_on=paid_on, now=now, amount_cents=invoice.total_cents, source="boleto")
        if amount_cents > invoice.total_cents:
            credit_payment(
                session,
                subscription,
                invoice_id=invoice.id,
                amount_cents=amount_cents - invoice.total_cents,
                description="Valor pago acima do boleto convertido em crédito",
                now=now,
            )
            return "paid_over"
        return "paid"
    if invoice.status == InvoiceStatus.OPEN:
        # Less than the invoice's total: what was paid is applied to the invoice, which stays open
        # (and in dunning, from its original due date) for the rest, with a segunda via for the rest.
        logger.warning("boleto %s underpaid: %s of %s", gateway_id, amount_cents, invoice.total_cents)
        credit_payment(
            session,
            subscription,
            invoice_id=invoice.id,
            amount_cents=amount_cents,
            description="Pagamento parcial de boleto",
            now=now,
        )
        apply_credit(session, subscription, invoice, amount_cents, description="Pagamento parcial aplicado à fatura")
        boleto.replaced_on = paid_on
        send_after_commit(session, issue_invoice_boleto, invoice.id)
        return "underpaid"
    # Paid although we had cancelled it (or its invoice was voided meanwhile): the money is the
    # customer's, kept as credit for the next invoices (refunded if the subscription has ended).
    credit_payment(
        session,
        subscription,
        invoice_id=invoice.id,
        amount_cents=amount_cents,
        description="Pagamento de boleto cancelado convertido em crédito",
        now=now,
    )
    return "credited"


def record_boleto_expired(session: Session, gateway_id: str, *, on: date) -> str:
    """The gateway let a boleto expire. Dunning goes on (the invoice stays open, its dates anchored at
    the original due date); an open invoice of a live subscription gets a replacement (segunda via)."""
    boleto = session.scalar(select(Boleto).where(Boleto.gateway_id == gateway_id).with_for_update())
    if boleto is None:
        return "unknown_boleto"
    if boleto.status not in LIVE_BOLETO:
        return boleto.status
    boleto.status = BoletoStatus.EXPIRED
    invoice = session.get_one(Invoice, boleto.invoice_id)
    subscription = session.get_one(Subscription, invoice.subscription_id)
    if invoice.status == InvoiceStatus.OPEN and subscription.status != SubscriptionStatus.CANCELED:
        boleto.replaced_on = on
        send_after_commit(session, issue_invoice_boleto, invoice.id)
        return "expired_reissuing"
    return "expired"


@dramatiq.actor(queue_name="payments", **STANDARD)
def process_gateway_event(event_id: str) -> None:
    session = current_session()
    record_gateway_event(session, event_id, now=datetime.now(UTC), config=runtime().config)


# --- boleto issuance ---------------------------------------------------------------------------

# What a boleto pays, for its notice: its invoice's kind ("reissue" for a replacement, a segunda via).
BOLETO_PURPOSES: dict[str, str] = {kind: kind.value for kind in InvoiceKind}


def boleto_idempotency_key(invoice_id: int, sequence: int = 1) -> str:
    return f"boleto:{invoice_id}" if sequence == 1 else f"boleto:{invoice_id}:{sequence}"


def issue_boleto(session: Session, gateway: Gateway, invoice_id: int, *, config: BillingConfig) -> Boleto | None:
    """Issue the boleto of an open boleto invoice that has no live one (none yet, or the last one expired,
    was given up or underpaid), once; the gateway call happens
    outside any transaction, keyed by the invoice and the boleto's sequence, so an interrupted issue is
    completed by the next attempt with the same request.

    The first boleto is due on the invoice's due date; a replacement (segunda via, after the previous one
    expired or was given up) BOLETO_DUE_DAYS after the day it was replaced, and keeps the invoice's
    dunning state (overdue since the original due date). Returns the live boleto, or None when the
    invoice no longer needs one.
    """
    invoice = session.get(Invoice, invoice_id, populate_existing=True)
    if invoice is None or invoice.status != InvoiceStatus.OPEN or invoice.method != PaymentMethod.BOLETO:
        return None
    boletos = session.scalars(select(Boleto).where(Boleto.invoice_id == invoice_id).order_by(Boleto.sequence)).all()
    live = next((boleto for boleto in boletos if boleto.status in LIVE_BOLETO), None)
    if live is not None:
        return live
    previous = boletos[-1] if boletos else None
    sequence = previous.sequence + 1 if previous else 1
    if previous is None:
        due_date = invoice.due_date
    else:
        replaced_on = previous.replaced_on or local_today(previous.created_at, config.timezone)
        due_date = replaced_on + timedelta(days=config.boleto_due_days)
    overdue_on = previous.overdue_on if previous else None
    organization = invoice.subscription.organization
    request = BoletoRequest(
        invoice_id=invoice.id, amount_cents=invoice.total_cents, description=boleto_description(invoice)
    )
    payer = Payer(name=organization.name, document=organization.document or "", email=None)
    session.commit()

    issued = gateway.issue_boleto(request, payer, due_date, boleto_idempotency_key(invoice_id, sequence))

    # The invoice may have been voided (a cycle change, a cancellation) while the gateway answered.
    invoice = session.scalar(
        select(Invoice).where(Invoice.id == invoice_id).with_for_update().execution_options(populate_existing=True)
    )
    assert invoice is not None
    still_wanted = invoice.status == InvoiceStatus.OPEN
    if not still_wanted:
        status = BoletoStatus.CANCELED
    elif overdue_on is not None:
        status = BoletoStatus.OVERDUE
    else:
        status = BoletoStatus.ISSUED
    boleto_id = session.scalar(
        insert(Boleto)
        .values(
            invoice_id=invoice_id,
            sequence=sequence,
            gateway_id=issued.gateway_id,
            nosso_numero=issued.nosso_numero,
            barcode=issued.barcode,
            digitable_line=issued.digitable_line,
            amount_cents=issued.amount_cents,
            due_date=issued.due_date,
            status=status,
            overdue_on=overdue_on,
        )
        .on_conflict_do_nothing()
        .returning(Boleto.id)
    )
    if boleto_id is None:  # recorded meanwhile by a concurrent attempt with the same key
        session.commit()
        return session.scalar(
            select(Boleto).where(Boleto.invoice_id == invoice_id, Boleto.status.in_(LIVE_BOLETO)).limit(1)
        )
    if not still_wanted:
        # Recorded all the same, so a payment of it is recognised (and becomes credit).
        send_after_commit(session, cancel_boleto_at_gateway, issued.gateway_id)
        session.commit()
        return None
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
            "purpose": "reissue" if sequence > 1 else BOLETO_PURPOSES[invoice.kind],
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


@dramatiq.actor(queue_name="payments", **STANDARD)
def issue_invoice_boleto(invoice_id: int) -> None:
    """Issue an open invoice's missing boleto now (the daily run would find it too)."""
    issue_boleto(current_session(), runtime().gateway_factory(), invoice_id, config=runtime().config)


def cancel_boleto_at(gateway: Gateway, gateway_id: str) -> str:
    """Cancel at the gateway a boleto already marked canceled here; safe to repeat."""
    try:
        gateway.cancel_boleto(gateway_id)
    except Ambiguous as exc:
        # Cancelling is idempotent at the gateway, so an unknown outcome is simply asked again.
        raise Unavailable(f"boleto {gateway_id}: cancel outcome unknown: {exc}") from exc
    except GatewayRejected as exc:
        # Typically paid in the meantime: the payment webhook turns it into credit.
        logger.warning("boleto %s not canceled at the gateway: %s", gateway_id, exc)
        return exc.code
    return "canceled"


@dramatiq.actor(queue_name="payments", **STANDARD)
def cancel_boleto_at_gateway(gateway_id: str) -> None:
    cancel_boleto_at(runtime().gateway_factory(), gateway_id)
