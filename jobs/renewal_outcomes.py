"""Phase 3 of a chunk's card charges, set-based for the common outcome.

Most outcomes of a renewal day are the same: a renewal's card charge succeeded on an active
subscription. Recording them one by one costs several round trips each (lock the charge, read the
invoice, lock the subscription, read the card, update, insert), so that case is recorded for the
whole chunk in a few multi-row statements. Every other outcome — a decline (dunning starts), a
payment that reactivates, an invoice no longer open (the money becomes credit), an unknown or
ambiguous answer, the invoice of a change request — goes through `record_charge_outcome`, which
stays the reference: what is done here for the cases it takes is exactly what it would do.

The guards are the per-row path's: the chunk's charges are locked (`FOR UPDATE`, in id order) and
their state checked under the lock, so an outcome another worker recorded meanwhile is left alone;
the subscriptions are locked before their invoices change; and each UPDATE repeats its state check
and must touch every row it expects — if not, the caller rolls back and records the chunk one by one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from datetime import date, datetime
from typing import Any

from sqlalchemy import Integer, Text, column, select, update, values
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from gateways.base import ChargeResult
from jobs.context import BillingConfig
from jobs.notifications import NoticeSpec, notify_many
from jobs.payments import ChargeOutcome, PreparedCharge, card_of_organization, record_charge_outcome
from models.schema import Card, Charge, Invoice, LedgerEntry, Subscription
from models.states import (
    UNRESOLVED_CHARGE,
    ChargeStatus,
    InvoiceKind,
    InvoiceStatus,
    LedgerKind,
    PaymentMethod,
    SubscriptionStatus,
)

# Off: every outcome is recorded one by one (the reference path; the equivalence tests compare both).
SET_BASED_OUTCOMES = True


class SetPathMismatch(RuntimeError):
    """A set statement touched other rows than the locked state promised: the caller rolls back and
    records the chunk one outcome at a time."""


def record_outcomes(
    session: Session,
    outcomes: Sequence[tuple[PreparedCharge, ChargeOutcome]],
    *,
    on: date,
    now: datetime,
    config: BillingConfig,
) -> dict[int, str]:
    """Record a chunk's outcomes in the caller's transaction: the plain successes as sets, the rest
    one by one. Returns each attempt's status afterwards, like `record_charge_outcome`."""
    statuses = record_plain_successes(session, outcomes, on=on, now=now) if SET_BASED_OUTCOMES else {}
    for item, outcome in outcomes:
        if item.charge_id not in statuses:
            statuses[item.charge_id] = record_charge_outcome(
                session, item.charge_id, outcome, on=on, now=now, config=config
            )
    return statuses


def record_plain_successes(
    session: Session, outcomes: Sequence[tuple[PreparedCharge, ChargeOutcome]], *, on: date, now: datetime
) -> dict[int, str]:
    """The successes `renewal_charge_resolved` would record by `mark_paid_by_card` alone (no reactivation),
    plus the attempts already resolved (left as they are); the ids it does not return are left to
    `record_charge_outcome`."""
    if not outcomes:
        return {}
    # A charge named twice, or two charges of one subscription, are recorded one by one and in order:
    # the second outcome depends on what the first did.
    named = Counter(item.charge_id for item, _ in outcomes)
    succeeded = {
        item.charge_id: outcome.gateway_id
        for item, outcome in outcomes
        if named[item.charge_id] == 1 and isinstance(outcome, ChargeResult) and outcome.succeeded
    }
    if not succeeded:
        return {}
    # Every charge of the chunk is locked here, in id order, so that the rows of a subscription are
    # known for all its outcomes (the per-row path then takes these locks again at no cost).
    charges = session.execute(
        select(
            Charge.id,
            Charge.status,
            Charge.amount_cents,
            Charge.card_last4,
            Invoice.id.label("invoice_id"),
            Invoice.subscription_id,
            Invoice.organization_id,
            Invoice.kind,
            Invoice.status.label("invoice_status"),
            Invoice.method,
            Invoice.total_cents,
            Invoice.change_request_id,
            Invoice.period_start,
            Invoice.period_end,
        )
        .join(Invoice, Invoice.id == Charge.invoice_id)
        .where(Charge.id.in_(list(named)))
        .order_by(Charge.id)
        .with_for_update(of=Charge)
    ).all()
    per_subscription = Counter(row.subscription_id for row in charges)
    statuses: dict[int, str] = {}
    candidates: dict[int, Any] = {}
    for row in charges:
        if row.id not in succeeded:
            continue
        if row.status not in UNRESOLVED_CHARGE:
            statuses[row.id] = row.status  # recorded meanwhile (a duplicate, the janitor): nothing changes
        elif (
            per_subscription[row.subscription_id] == 1
            and row.kind == InvoiceKind.RENEWAL
            and row.change_request_id is None
            and row.invoice_status == InvoiceStatus.OPEN
            and row.method == PaymentMethod.CARD
            and row.amount_cents == row.total_cents > 0
        ):
            candidates[row.subscription_id] = row
    if not candidates:
        return statuses

    # The subscriptions are locked before their invoices change, as `mark_invoice_paid` does. Only an
    # active one is taken: from past due or suspended the payment reactivates (per-row path).
    subscriptions = session.execute(
        select(Subscription.id, Subscription.status, Subscription.organization_id, Card.brand, Card.last4)
        .outerjoin(Card, card_of_organization(Subscription.organization_id))
        .where(Subscription.id.in_(list(candidates)))
        .order_by(Subscription.id)
        .with_for_update(of=Subscription)
    ).all()
    plain = [
        (candidates[subscription.id], subscription)
        for subscription in subscriptions
        if subscription.status == SubscriptionStatus.ACTIVE
        and subscription.organization_id == candidates[subscription.id].organization_id
    ]
    if not plain:
        return statuses

    outcome_rows = values(column("id", Integer), column("gateway_id", Text), name="outcome").data(
        [(charge.id, succeeded[charge.id]) for charge, _ in plain]
    )
    recorded = session.scalars(
        update(Charge.__table__)
        .where(Charge.id == outcome_rows.c.id, Charge.status.in_(UNRESOLVED_CHARGE))
        .values(status=ChargeStatus.SUCCEEDED.value, gateway_id=outcome_rows.c.gateway_id, resolved_at=now)
        .returning(Charge.id)
    ).all()
    paid = session.scalars(
        update(Invoice.__table__)
        .where(Invoice.id.in_([charge.invoice_id for charge, _ in plain]), Invoice.status == InvoiceStatus.OPEN)
        .values(status=InvoiceStatus.PAID.value, paid_on=on, paid_at=now)
        .returning(Invoice.id)
    ).all()
    if len(recorded) != len(plain) or len(paid) != len(plain):
        raise SetPathMismatch(f"{len(plain)} successes to record, {len(recorded)} charges and {len(paid)} invoices")
    session.execute(
        insert(LedgerEntry).values(
            [
                {
                    "subscription_id": charge.subscription_id,
                    "invoice_id": charge.invoice_id,
                    "kind": LedgerKind.PAYMENT.value,
                    "amount_cents": charge.amount_cents,
                    "description": "Pagamento (cartão)",
                    "details": {},
                }
                for charge, _ in plain
            ]
        )
    )
    notify_many(
        session,
        [
            NoticeSpec(
                organization_id=subscription.organization_id,
                subscription_id=subscription.id,
                kind="charge_succeeded",
                dedupe_key=f"charge_succeeded:{charge.invoice_id}",
                context=receipt(charge, subscription, on),
            )
            for charge, subscription in plain
        ],
    )
    statuses.update((charge.id, ChargeStatus.SUCCEEDED) for charge, _ in plain)
    expire_held(session, plain)
    return statuses


def receipt(charge: Any, subscription: Any, on: date) -> dict[str, Any]:
    """The `charge_succeeded` context `mark_invoice_paid` writes, with `card_display`'s card."""
    return {
        "invoice_id": charge.invoice_id,
        "amount_cents": charge.total_cents,
        "card_brand": subscription.brand or "",
        "card_last4": charge.card_last4 or subscription.last4 or "",
        "period_start": charge.period_start.isoformat(),
        "period_end": charge.period_end.isoformat(),
        "paid_on": on.isoformat(),
    }


def expire_held(session: Session, plain: Sequence[tuple[Any, Any]]) -> None:
    """Sessions keep objects across commits: a charge or invoice this session already held would keep
    its state from before these statements, which went around the ORM."""
    for charge, _ in plain:
        for model, key in ((Charge, charge.id), (Invoice, charge.invoice_id)):
            held = session.identity_map.get(session.identity_key(model, key))
            if held is not None:
                session.expire(held)
