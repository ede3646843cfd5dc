"""On-call actions on failed and ambiguous charges and on unpaid invoices: retry a declined charge now,
reconcile an ambiguous one, write an unpaid invoice off as uncollectible.

The single implementation behind `renova charges retry|reconcile`, `renova invoices uncollectible` and
the ops console. Each action takes a session, an explicit `now`, who acts (`actor`) and why (`reason`,
required), refuses with `ActionRefused` (a code and a message, nothing changed) when the rules do not
allow it, writes exactly one audit event in the transaction of its change, and commits. They reuse the
flows' own steps, never a second path: a retry is a dunning attempt (`open_charge_attempt`, `prepare`,
then `jobs.gateway_work.settle` after the commit), a reconciliation is the janitor's `reconcile_charge`,
and a write-off suspends with `jobs.payments.suspend`, as dunning does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from gateways.base import Gateway, GatewayError
from jobs import audit
from jobs.boletos import cancel_boleto_at, cancel_boleto_at_gateway, live_boleto
from jobs.charge_review import ActionRefused, NotFound
from jobs.context import BillingConfig
from jobs.gateway_work import GatewayWork, settle
from jobs.invoicing import lock_subscription
from jobs.outbox import send_after_commit, send_now
from jobs.payments import (
    STALE_PENDING,
    PreparedCharge,
    open_charge_attempt,
    organization_card,
    prepare,
    reconcile_charge,
    reconcile_charges,
    suspend,
)
from models.calendar import format_date_br, local_today
from models.dunning import is_past_due, payable_until
from models.schema import Charge, Invoice, Subscription
from models.states import (
    UNRESOLVED_CHARGE,
    BoletoStatus,
    ChargeStatus,
    InvoiceStatus,
    PaymentMethod,
    SubscriptionStatus,
)

logger = logging.getLogger(__name__)

# The suspension notice's `reason` for a written-off invoice: its template says the invoice will not
# be charged again (rather than "pay the boleto" or "register a card").
UNCOLLECTIBLE_REASON = "uncollectible"


def require_reason(reason: str) -> str:
    """Every on-call action says why; the reason is kept in the audit log."""
    if not reason or not reason.strip():
        raise ActionRefused("reason_required", "a reason is required: say why (it is kept in the audit log)")
    return reason.strip()


def _require_actor(actor: str) -> str:
    if not actor or not actor.strip():
        raise ActionRefused("actor_required", "who acts is required (it is kept in the audit log)")
    return actor.strip()


# --- retry a declined charge now -----------------------------------------------------------------


@dataclass(frozen=True)
class RetryResult:
    """A new attempt for the invoice of a failed charge. `status` is `pending` until the gateway has
    answered (then `succeeded`, `failed` or `unknown`); `prepared` is its gateway request, for whoever
    makes the call after the commit (`enqueue_retry`, or `retry_charge_now(..., gateway=...)`)."""

    failed_charge_id: int
    invoice_id: int
    subscription_id: int
    charge_id: int
    attempt: int
    amount_cents: int
    card_last4: str | None
    status: str
    invoice_status: str
    subscription_status: str
    prepared: PreparedCharge
    audit_event_id: int


def retry_charge_now(
    session: Session,
    charge_id: int,
    *,
    actor: str,
    reason: str,
    now: datetime,
    config: BillingConfig,
    gateway: Gateway | None = None,
) -> RetryResult:
    """A new attempt, now, for the invoice of a failed charge, under dunning's rules: the invoice is
    open and paid by card, the subscription is not canceled, the organization has a card on file, no
    attempt of the invoice is in flight, and a hard decline is not retried with the very card that
    was declined. Phase 1 (the `pending` attempt) and the audit event are committed together.

    With `gateway`, phases 2 and 3 follow at once (`jobs.gateway_work.settle`, as the daily run does
    after a chunk) and the result has the outcome; without, the caller sends the attempt after the
    commit (`enqueue_retry`), and an attempt nobody sends is reconciled by the janitor anyway."""
    reason, actor = require_reason(reason), _require_actor(actor)
    named = session.get(Charge, charge_id)
    if named is None:
        raise NotFound("charge_not_found", f"no charge {charge_id}")
    invoice_id = named.invoice_id
    subscription_id = session.scalar(select(Invoice.subscription_id).where(Invoice.id == invoice_id))
    assert subscription_id is not None
    # Locked first, like every flow that bills the subscription (renewal, dunning, change requests).
    subscription = lock_subscription(session, subscription_id)
    assert subscription is not None
    invoice = session.get_one(Invoice, invoice_id, populate_existing=True)
    attempts = session.scalars(
        select(Charge)
        .where(Charge.invoice_id == invoice_id)
        .order_by(Charge.attempt)
        .execution_options(populate_existing=True)
    ).all()
    named = next(attempt for attempt in attempts if attempt.id == charge_id)
    card = organization_card(session, invoice.organization_id)
    try:
        _check_retry(named, list(attempts), invoice, subscription, card_token=card.token if card else None)
    except ActionRefused:
        session.rollback()  # releases the subscription's lock; nothing was changed
        raise
    assert card is not None

    charge = open_charge_attempt(session, invoice, card)
    if charge is None:  # another attempt was opened meanwhile (open_charge_attempt locks the attempts)
        session.rollback()
        raise ActionRefused("charge_in_flight", f"invoice {invoice_id} already has an attempt in flight")
    prepared = prepare(charge)
    event = audit.record(
        session,
        actor=actor,
        action="charge.retry",
        target_type="charge",
        target_id=str(charge_id),
        reason=reason,
        details={
            "invoice_id": invoice_id,
            "subscription_id": subscription_id,
            "new_charge_id": charge.id,
            "attempt": charge.attempt,
            "amount_cents": charge.amount_cents,
        },
    )
    session.flush()
    audit_event_id, new_charge_id, attempt = event.id, charge.id, charge.attempt
    session.commit()

    status: str = ChargeStatus.PENDING
    if gateway is not None:
        work = GatewayWork(charges=[prepared])
        settled = settle(session, gateway, work, on=local_today(now, config.timezone), now=now, config=config)
        status = settled.charge_statuses.get(new_charge_id, ChargeStatus.PENDING)
    invoice = session.get_one(Invoice, invoice_id, populate_existing=True)
    subscription = session.get_one(Subscription, subscription_id, populate_existing=True)
    return RetryResult(
        failed_charge_id=charge_id,
        invoice_id=invoice_id,
        subscription_id=subscription_id,
        charge_id=new_charge_id,
        attempt=attempt,
        amount_cents=prepared.request.amount_cents,
        card_last4=card.last4,
        status=status,
        invoice_status=invoice.status,
        subscription_status=subscription.status,
        prepared=prepared,
        audit_event_id=audit_event_id,
    )


def _check_retry(
    named: Charge, attempts: list[Charge], invoice: Invoice, subscription: Subscription, *, card_token: str | None
) -> None:
    if named.status in UNRESOLVED_CHARGE:
        raise ActionRefused(
            "charge_in_flight",
            f"charge {named.id} is {named.status}: its outcome is not known yet, so it is never retried blindly; "
            "reconcile it instead",
        )
    if named.status != ChargeStatus.FAILED:
        raise ActionRefused(
            "charge_not_failed", f"charge {named.id} is {named.status}: only a failed charge is retried"
        )
    if invoice.status != InvoiceStatus.OPEN:
        raise ActionRefused(f"invoice_{invoice.status}", f"invoice {invoice.id} is {invoice.status}: nothing to charge")
    if subscription.status == SubscriptionStatus.CANCELED:
        raise ActionRefused("subscription_canceled", f"subscription {subscription.id} is canceled: nothing is charged")
    if invoice.method != PaymentMethod.CARD:
        raise ActionRefused("not_card_invoice", f"invoice {invoice.id} is paid by {invoice.method}, not by card")
    in_flight = next((attempt for attempt in attempts if attempt.status in UNRESOLVED_CHARGE), None)
    if in_flight is not None:
        raise ActionRefused(
            "charge_in_flight",
            f"attempt {in_flight.attempt} (charge {in_flight.id}) of invoice {invoice.id} is {in_flight.status}: "
            "wait for its outcome or reconcile it",
        )
    if invoice.total_cents <= 0:
        raise ActionRefused("nothing_to_charge", f"invoice {invoice.id} has nothing left to charge")
    if card_token is None:
        raise ActionRefused("no_card_on_file", f"organization {invoice.organization_id} has no card on file")
    last = attempts[-1]
    if last.hard_decline and last.card_token == card_token:
        # Dunning never retries a hard decline (expired, stolen, invalid card): it waits for a new card.
        raise ActionRefused(
            "hard_decline",
            f"the card ending {last.card_last4 or '????'} was declined for good ({last.gateway_code}): "
            "it is not retried; wait for the customer's new card",
        )


def enqueue_retry(result: RetryResult, now: datetime) -> None:
    """Send a committed retry to the gateway from a worker: the janitor's path for a pending attempt
    (its key is looked up, then the same request is sent), on the `payments` queue."""
    reconcile_charges.send([result.charge_id], now.isoformat())


# --- reconcile an ambiguous charge ---------------------------------------------------------------


@dataclass(frozen=True)
class ReconcileResult:
    charge_id: int
    invoice_id: int
    status_before: str
    # `succeeded`/`failed` once the gateway answered; still `unknown`/`pending` if it was unavailable.
    status: str
    invoice_status: str
    audit_event_id: int


def reconcile_now(
    session: Session,
    gateway: Gateway,
    charge_id: int,
    *,
    actor: str,
    reason: str,
    now: datetime,
    config: BillingConfig,
) -> ReconcileResult:
    """Resolve an `unknown` (or stale `pending`) attempt now by looking its key up at the gateway —
    `jobs.payments.reconcile_charge`, what the janitor does every tick. The audit event is committed
    with the reconciliation's first step, before the gateway is asked, so no outcome is ever recorded
    without it; the outcome itself is on the charge (and in the result)."""
    reason, actor = require_reason(reason), _require_actor(actor)
    charge = session.scalar(
        select(Charge).where(Charge.id == charge_id).with_for_update().execution_options(populate_existing=True)
    )
    if charge is None:
        raise NotFound("charge_not_found", f"no charge {charge_id}")
    if charge.status not in UNRESOLVED_CHARGE:
        session.rollback()
        raise ActionRefused(
            "charge_resolved", f"charge {charge_id} is already {charge.status}: there is nothing to reconcile"
        )
    if charge.status == ChargeStatus.PENDING and charge.created_at >= now - STALE_PENDING:
        session.rollback()
        minutes = int(STALE_PENDING.total_seconds() // 60)
        raise ActionRefused(
            "charge_in_flight",
            f"charge {charge_id} was sent less than {minutes} minutes ago and is being charged right now: "
            "reconcile it only if it is still pending after that",
        )
    status_before, invoice_id = charge.status, charge.invoice_id
    event = audit.record(
        session,
        actor=actor,
        action="charge.reconcile",
        target_type="charge",
        target_id=str(charge_id),
        reason=reason,
        details={"invoice_id": invoice_id, "status_before": status_before},
    )
    session.flush()
    audit_event_id = event.id
    status = reconcile_charge(session, gateway, charge_id, now=now, config=config)
    session.commit()
    invoice_status = session.scalar(
        select(Invoice.status).where(Invoice.id == invoice_id).execution_options(populate_existing=True)
    )
    return ReconcileResult(charge_id, invoice_id, status_before, status, invoice_status or "", audit_event_id)


# --- write an unpaid invoice off -----------------------------------------------------------------


@dataclass(frozen=True)
class UncollectibleResult:
    invoice_id: int
    subscription_id: int
    total_cents: int
    subscription_status_before: str
    subscription_status: str
    # Failed attempts whose scheduled retry was dropped.
    retries_cancelled: tuple[int, ...]
    # Gateway ids of the boletos cancelled here; at the gateway after the commit.
    boletos_canceled: tuple[str, ...]
    audit_event_id: int


def mark_uncollectible(
    session: Session,
    invoice_id: int,
    *,
    actor: str,
    reason: str,
    now: datetime,
    config: BillingConfig,
    gateway: Gateway | None = None,
) -> UncollectibleResult:
    """Write off an open invoice that will not be paid: it becomes `uncollectible` and its dunning ends.

    Allowed for an open invoice already past due (`models.dunning.is_past_due`: a card charge failed,
    or a boleto that can no longer be paid on time), with no attempt in flight (its money could still
    pay it) and no older open invoice on the subscription (the oldest debt is settled first). Then: its
    scheduled card retries are dropped, its live boleto is cancelled (here, and at the gateway after the
    commit: at once with `gateway`, else by the `cancel_boleto_at_gateway` message), and the
    subscription, whose period was not paid, is suspended with its notice unless already suspended or
    canceled. The credit that had been applied to the invoice stays applied: it paid for service given.
    """
    reason, actor = require_reason(reason), _require_actor(actor)
    found = session.get(Invoice, invoice_id)
    if found is None:
        raise NotFound("invoice_not_found", f"no invoice {invoice_id}")
    subscription = lock_subscription(session, found.subscription_id)
    assert subscription is not None
    invoice = session.scalar(
        select(Invoice).where(Invoice.id == invoice_id).with_for_update().execution_options(populate_existing=True)
    )
    assert invoice is not None
    charges = session.scalars(
        select(Charge)
        .where(Charge.invoice_id == invoice_id)
        .order_by(Charge.attempt)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).all()
    try:
        _check_uncollectible(session, invoice, list(charges), now=now, config=config)
    except ActionRefused:
        session.rollback()
        raise

    retries = tuple(charge.id for charge in charges if charge.next_retry_on is not None)
    for charge in charges:
        charge.next_retry_on = None
    invoice.status = InvoiceStatus.UNCOLLECTIBLE
    # Cancelled before the suspension, so that its notice offers no boleto to pay.
    boleto = live_boleto(session, invoice.id, lock=True)
    boletos: tuple[str, ...] = ()
    if boleto is not None:
        boleto.status = BoletoStatus.CANCELED
        boletos = (boleto.gateway_id,)
    status_before = subscription.status
    if subscription.status != SubscriptionStatus.CANCELED:
        suspend(session, subscription, invoice, now=now, reason=UNCOLLECTIBLE_REASON)
    event = audit.record(
        session,
        actor=actor,
        action="invoice.uncollectible",
        target_type="invoice",
        target_id=str(invoice_id),
        reason=reason,
        details={
            "subscription_id": subscription.id,
            "total_cents": invoice.total_cents,
            "kind": invoice.kind,
            "retries_cancelled": list(retries),
            "boleto_ids": [boleto.id] if boleto is not None else [],
            "subscription_status": [status_before, subscription.status],
        },
    )
    if gateway is None:
        for gateway_id in boletos:
            send_after_commit(session, cancel_boleto_at_gateway, gateway_id)
    session.flush()
    result = UncollectibleResult(
        invoice_id=invoice_id,
        subscription_id=subscription.id,
        total_cents=invoice.total_cents,
        subscription_status_before=status_before,
        subscription_status=subscription.status,
        retries_cancelled=retries,
        boletos_canceled=boletos,
        audit_event_id=event.id,
    )
    session.commit()
    if gateway is not None:
        for gateway_id in boletos:
            try:
                cancel_boleto_at(gateway, gateway_id)
            except GatewayError as exc:
                # Not confirmed now: the message retries it until the gateway does.
                logger.warning("boleto %s not cancelled at the gateway yet (%s); queued", gateway_id, exc)
                send_now(session, cancel_boleto_at_gateway, gateway_id)
    return result


def _check_uncollectible(
    session: Session, invoice: Invoice, charges: list[Charge], *, now: datetime, config: BillingConfig
) -> None:
    if invoice.status == InvoiceStatus.PAID:
        raise ActionRefused("invoice_paid", f"invoice {invoice.id} is paid: nothing is owed")
    if invoice.status == InvoiceStatus.VOID:
        raise ActionRefused("invoice_void", f"invoice {invoice.id} is void: nothing is owed")
    if invoice.status == InvoiceStatus.UNCOLLECTIBLE:
        raise ActionRefused("invoice_uncollectible", f"invoice {invoice.id} is already uncollectible")
    in_flight = next((charge for charge in charges if charge.status in UNRESOLVED_CHARGE), None)
    if in_flight is not None:
        raise ActionRefused(
            "charge_in_flight",
            f"charge {in_flight.id} of invoice {invoice.id} is {in_flight.status}: its money may still pay the "
            "invoice; reconcile it first",
        )
    today = local_today(now, config.timezone)
    failed = any(charge.status == ChargeStatus.FAILED for charge in charges)
    if not is_past_due(method=invoice.method, due_date=invoice.due_date, on=today, charge_failed=failed):
        if invoice.method == PaymentMethod.BOLETO:
            until = f"its boleto can be paid until {format_date_br(payable_until(invoice.due_date))}"
        else:
            until = f"it is due on {format_date_br(invoice.due_date)} and no charge of it has failed"
        raise ActionRefused("invoice_not_past_due", f"invoice {invoice.id} is not past due: {until}")
    older = session.scalar(
        select(Invoice.id)
        .where(
            Invoice.subscription_id == invoice.subscription_id,
            Invoice.status == InvoiceStatus.OPEN,
            Invoice.id != invoice.id,
            Invoice.period_start < invoice.period_start,
        )
        .order_by(Invoice.period_start)
        .limit(1)
    )
    if older is not None:
        # Paying the older one would reactivate the subscription on a period that overlaps this one.
        raise ActionRefused(
            "older_invoice_open",
            f"invoice {older} of the same subscription is older and still open: settle or write off the oldest first",
        )
