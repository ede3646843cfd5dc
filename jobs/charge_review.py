"""On-call review of card charges: the failed and ambiguous attempts, and one attempt in full with its
invoice, its subscription and what happened to that subscription, in time order.

Plain reads returning plain rows, the single implementation behind `renova charges list|show` and the
ops console (nothing here renders, speaks HTTP or changes anything). The actions on what these show
are `jobs.charge_actions`. The vocabulary is the flows' own: `models.states.ChargeStatus` and
`UNRESOLVED_CHARGE`, and the janitor's `jobs.payments.STALE_PENDING`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from typing import Any, Final
from zoneinfo import ZoneInfo

from sqlalchemy import ColumnElement, Select, false, func, or_, select
from sqlalchemy.orm import Session

from jobs.context import BillingConfig
from jobs.filters import can_match
from jobs.payments import STALE_PENDING
from models.schema import (
    AuditEvent,
    Boleto,
    Card,
    ChangeRequest,
    Charge,
    Invoice,
    LedgerEntry,
    Notification,
    Organization,
    Refund,
    Subscription,
)
from models.states import ChargeStatus

DEFAULT_TIMEZONE: Final = BillingConfig.timezone
# What on-call reviews by default: declines, and attempts whose outcome is not known (unknown, and
# pending ones old enough to have been interrupted — a fresh pending attempt is simply being charged).
REVIEW_STATUSES: Final[tuple[ChargeStatus, ...]] = (ChargeStatus.FAILED, ChargeStatus.UNKNOWN, ChargeStatus.PENDING)
MAX_LIMIT: Final = 1000


class OnCallError(ValueError):
    """Refused on-call input: a stable `code` for programs (the console) and a `message` for people.
    Nothing was changed."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class NotFound(OnCallError):
    """No row with that id."""


class ActionRefused(OnCallError):
    """The action is not allowed on this row now (the rules say why), or its input is incomplete."""


# --- rows ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChargeRow:
    """One charge attempt as on-call reviews it."""

    id: int
    invoice_id: int
    invoice_kind: str
    invoice_status: str
    subscription_id: int
    organization_id: int
    organization_name: str
    amount_cents: int
    attempt: int
    status: str
    gateway_code: str | None
    gateway_message: str | None
    hard_decline: bool
    next_retry_on: date | None
    card_last4: str | None
    created_at: datetime
    resolved_at: datetime | None


@dataclass(frozen=True)
class AttemptRow:
    """An attempt of the reviewed charge's invoice, with the gateway's answer."""

    id: int
    attempt: int
    status: str
    amount_cents: int
    card_last4: str | None
    idempotency_key: str
    gateway_id: str | None
    gateway_code: str | None
    gateway_message: str | None
    hard_decline: bool
    next_retry_on: date | None
    created_at: datetime
    resolved_at: datetime | None


@dataclass(frozen=True)
class BoletoRow:
    id: int
    sequence: int
    status: str
    amount_cents: int
    due_date: date
    paid_on: date | None
    paid_amount_cents: int | None


@dataclass(frozen=True)
class InvoiceView:
    id: int
    kind: str
    status: str
    cycle: str
    method: str
    period_start: date
    period_end: date
    amount_cents: int
    discount_cents: int
    total_cents: int
    due_date: date
    paid_on: date | None
    boletos: tuple[BoletoRow, ...]


@dataclass(frozen=True)
class CardView:
    """The organization's card on file: display data only (never its token)."""

    brand: str
    last4: str
    exp_month: int
    exp_year: int


@dataclass(frozen=True)
class SubscriptionView:
    id: int
    organization_id: int
    organization_name: str
    status: str
    cycle: str
    payment_method: str
    pending_payment_method: str | None
    billing_anchor: date
    current_period_start: date
    current_period_end: date
    balance_cents: int
    cancel_at_period_end: bool
    card: CardView | None


@dataclass(frozen=True)
class TimelineEntry:
    """Something that happened to the subscription. `source` says which record it comes from:
    `audit` (kind = action), `change_request` (kind, status, error code), `ledger` (kind, amount,
    description) or `notice` (kind, status, sent_at — never its recipients).

    `at` is when the row was recorded: the database's clock, except for a change request, stamped by
    the business clock that decided it (the same instant in production; the test clock's in
    development and test, where a replayed date sorts its requests apart from the rest)."""

    at: datetime
    source: str
    kind: str
    status: str | None = None
    amount_cents: int | None = None
    invoice_id: int | None = None
    description: str = ""
    error_code: str | None = None
    sent_at: datetime | None = None
    actor: str | None = None
    reason: str | None = None
    target: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ChargeDetail:
    charge: ChargeRow
    attempts: tuple[AttemptRow, ...]
    invoice: InvoiceView
    subscription: SubscriptionView
    timeline: tuple[TimelineEntry, ...]


# --- the list ------------------------------------------------------------------------------------


def _charge_rows() -> Select[Any]:
    return (
        select(
            Charge,
            Invoice.kind,
            Invoice.status,
            Invoice.subscription_id,
            Invoice.organization_id,
            Organization.name,
        )
        .join(Invoice, Invoice.id == Charge.invoice_id)
        .join(Organization, Organization.id == Invoice.organization_id)
    )


def _charge_row(row: Any) -> ChargeRow:
    charge: Charge = row[0]
    return ChargeRow(
        id=charge.id,
        invoice_id=charge.invoice_id,
        invoice_kind=row[1],
        invoice_status=row[2],
        subscription_id=row[3],
        organization_id=row[4],
        organization_name=row[5],
        amount_cents=charge.amount_cents,
        attempt=charge.attempt,
        status=charge.status,
        gateway_code=charge.gateway_code,
        gateway_message=charge.gateway_message,
        hard_decline=charge.hard_decline,
        next_retry_on=charge.next_retry_on,
        card_last4=charge.card_last4,
        created_at=charge.created_at,
        resolved_at=charge.resolved_at,
    )


def _status_condition(statuses: Sequence[str], now: datetime | None) -> ColumnElement[bool]:
    """`pending` means a stale pending attempt, as the janitor counts it (`STALE_PENDING`): one younger
    is being charged right now and needs no one."""
    known = {member.value for member in ChargeStatus}
    unknown = [status for status in statuses if status not in known]
    if unknown:
        raise OnCallError(
            "invalid_status", f"unknown charge status {', '.join(map(repr, unknown))}; use {', '.join(sorted(known))}"
        )
    conditions: list[ColumnElement[bool]] = []
    others = [status for status in statuses if status != ChargeStatus.PENDING]
    if others:
        conditions.append(Charge.status.in_(others))
    if ChargeStatus.PENDING in statuses:
        reference = now if now is not None else func.now()
        conditions.append((Charge.status == ChargeStatus.PENDING) & (Charge.created_at < reference - STALE_PENDING))
    return or_(*conditions) if conditions else false()


def local_midnight(on: date, timezone: str) -> datetime:
    """The instant a business date starts in the billing time zone (for filters on timestamps)."""
    return datetime.combine(on, time(0), ZoneInfo(timezone))


def list_charges(
    session: Session,
    *,
    statuses: Sequence[str] | None = None,
    since: date | None = None,
    until: date | None = None,
    decline_code: str | None = None,
    organization_id: int | None = None,
    limit: int = 50,
    offset: int = 0,
    now: datetime | None = None,
    timezone: str = DEFAULT_TIMEZONE,
) -> list[ChargeRow]:
    """Charge attempts for on-call, newest first: by default the failed, unknown and stale pending ones.

    `since`/`until` are business dates (inclusive) of the attempt's creation in `timezone`;
    `decline_code` is the gateway's code (e.g. `insufficient_funds`); `now` is the instant that
    decides which pending attempts are stale (default the database's clock)."""
    if not 1 <= limit <= MAX_LIMIT:
        raise OnCallError("invalid_limit", f"limit must be between 1 and {MAX_LIMIT}, got {limit}")
    if offset < 0:
        raise OnCallError("invalid_offset", f"offset must not be negative, got {offset}")
    if since is not None and until is not None and until < since:
        raise OnCallError("invalid_dates", f"until ({until.isoformat()}) is before since ({since.isoformat()})")
    if not can_match(texts=[decline_code, *(statuses or ())], ids=[organization_id]):
        return []
    query = _charge_rows().where(_status_condition(list(statuses or REVIEW_STATUSES), now))
    if since is not None:
        query = query.where(Charge.created_at >= local_midnight(since, timezone))
    if until is not None:
        query = query.where(Charge.created_at < local_midnight(until + timedelta(days=1), timezone))
    if decline_code is not None:
        query = query.where(Charge.gateway_code == decline_code)
    if organization_id is not None:
        query = query.where(Invoice.organization_id == organization_id)
    rows = session.execute(query.order_by(Charge.created_at.desc(), Charge.id.desc()).limit(limit).offset(offset))
    return [_charge_row(row) for row in rows]


# --- one charge in full --------------------------------------------------------------------------


def charge_row(session: Session, charge_id: int) -> ChargeRow:
    row = session.execute(_charge_rows().where(Charge.id == charge_id)).first()
    if row is None:
        raise NotFound("charge_not_found", f"no charge {charge_id}")
    return _charge_row(row)


def charge_detail(session: Session, charge_id: int) -> ChargeDetail:
    """The attempt, every attempt of its invoice with the gateway's answers, the invoice, the
    subscription, and the subscription's timeline (ledger, notices, change requests, audit events)."""
    row = charge_row(session, charge_id)
    invoice = session.get_one(Invoice, row.invoice_id, populate_existing=True)
    attempts = session.scalars(select(Charge).where(Charge.invoice_id == invoice.id).order_by(Charge.attempt)).all()
    return ChargeDetail(
        charge=row,
        attempts=tuple(_attempt_row(attempt) for attempt in attempts),
        invoice=invoice_view(session, invoice),
        subscription=subscription_view(session, invoice.subscription_id),
        timeline=tuple(timeline(session, invoice.subscription_id)),
    )


def _attempt_row(charge: Charge) -> AttemptRow:
    return AttemptRow(
        id=charge.id,
        attempt=charge.attempt,
        status=charge.status,
        amount_cents=charge.amount_cents,
        card_last4=charge.card_last4,
        idempotency_key=charge.idempotency_key,
        gateway_id=charge.gateway_id,
        gateway_code=charge.gateway_code,
        gateway_message=charge.gateway_message,
        hard_decline=charge.hard_decline,
        next_retry_on=charge.next_retry_on,
        created_at=charge.created_at,
        resolved_at=charge.resolved_at,
    )


def invoice_view(session: Session, invoice: Invoice) -> InvoiceView:
    boletos = session.scalars(select(Boleto).where(Boleto.invoice_id == invoice.id).order_by(Boleto.sequence)).all()
    return InvoiceView(
        id=invoice.id,
        kind=invoice.kind,
        status=invoice.status,
        cycle=invoice.cycle,
        method=invoice.method,
        period_start=invoice.period_start,
        period_end=invoice.period_end,
        amount_cents=invoice.amount_cents,
        discount_cents=invoice.discount_cents,
        total_cents=invoice.total_cents,
        due_date=invoice.due_date,
        paid_on=invoice.paid_on,
        boletos=tuple(
            BoletoRow(
                id=boleto.id,
                sequence=boleto.sequence,
                status=boleto.status,
                amount_cents=boleto.amount_cents,
                due_date=boleto.due_date,
                paid_on=boleto.paid_on,
                paid_amount_cents=boleto.paid_amount_cents,
            )
            for boleto in boletos
        ),
    )


def subscription_view(session: Session, subscription_id: int) -> SubscriptionView:
    subscription = session.get_one(Subscription, subscription_id, populate_existing=True)
    organization = session.get_one(Organization, subscription.organization_id)
    card = session.scalar(select(Card).where(Card.organization_id == subscription.organization_id))
    return SubscriptionView(
        id=subscription.id,
        organization_id=subscription.organization_id,
        organization_name=organization.name,
        status=subscription.status,
        cycle=subscription.cycle,
        payment_method=subscription.payment_method,
        pending_payment_method=subscription.pending_payment_method,
        billing_anchor=subscription.billing_anchor,
        current_period_start=subscription.current_period_start,
        current_period_end=subscription.current_period_end,
        balance_cents=subscription.balance_cents,
        cancel_at_period_end=subscription.cancel_at_period_end,
        card=CardView(card.brand, card.last4, card.exp_month, card.exp_year) if card else None,
    )


# Within one transaction every row has the same timestamp (PostgreSQL's now() is the transaction's
# start): the audit event that explains a change comes first, then what the change wrote.
_SOURCE_ORDER: Final = {"audit": 0, "change_request": 1, "ledger": 2, "notice": 3}


def timeline(session: Session, subscription_id: int) -> list[TimelineEntry]:
    """Everything on record about a subscription, oldest first."""
    entries: list[tuple[TimelineEntry, int]] = []
    for entry in session.scalars(select(LedgerEntry).where(LedgerEntry.subscription_id == subscription_id)):
        timeline_entry = TimelineEntry(
            at=entry.created_at,
            source="ledger",
            kind=entry.kind,
            amount_cents=entry.amount_cents,
            invoice_id=entry.invoice_id,
            description=entry.description,
        )
        entries.append((timeline_entry, entry.id))
    for notice in session.scalars(select(Notification).where(Notification.subscription_id == subscription_id)):
        # Kind, status and when it was sent: never its recipients nor its context (addresses, lines).
        entries.append(
            (
                TimelineEntry(
                    at=notice.created_at,
                    source="notice",
                    kind=notice.kind,
                    status=notice.status,
                    sent_at=notice.sent_at,
                ),
                notice.id,
            )
        )
    for request in session.scalars(select(ChangeRequest).where(ChangeRequest.subscription_id == subscription_id)):
        # Never its payload: a card update carries the gateway token.
        entries.append(
            (
                TimelineEntry(
                    at=request.created_at,
                    source="change_request",
                    kind=request.kind,
                    status=request.status,
                    error_code=request.error_code,
                    details={"change_request_id": request.id},
                ),
                request.id,
            )
        )
    for event in session.scalars(select(AuditEvent).where(_about_subscription(session, subscription_id))):
        entries.append(
            (
                TimelineEntry(
                    at=event.created_at,
                    source="audit",
                    kind=event.action,
                    actor=event.actor,
                    reason=event.reason,
                    target=f"{event.target_type}:{event.target_id}" if event.target_type else event.target_id,
                    details=dict(event.details),
                ),
                event.id,
            )
        )
    entries.sort(key=lambda pair: (pair[0].at, _SOURCE_ORDER[pair[0].source], pair[1]))
    return [entry for entry, _ in entries]


def _about_subscription(session: Session, subscription_id: int) -> ColumnElement[bool]:
    """Audit events whose target is the subscription, one of its invoices, charges or refunds."""
    invoice_ids = [
        str(i) for i in session.scalars(select(Invoice.id).where(Invoice.subscription_id == subscription_id))
    ]
    charge_ids = [
        str(i)
        for i in session.scalars(
            select(Charge.id)
            .join(Invoice, Invoice.id == Charge.invoice_id)
            .where(Invoice.subscription_id == subscription_id)
        )
    ]
    refund_ids = [str(i) for i in session.scalars(select(Refund.id).where(Refund.subscription_id == subscription_id))]
    targets = {
        "subscription": [str(subscription_id)],
        "invoice": invoice_ids,
        "charge": charge_ids,
        "refund": refund_ids,
    }
    return or_(
        *(
            (AuditEvent.target_type == target_type) & AuditEvent.target_id.in_(ids)
            for target_type, ids in targets.items()
            if ids
        )
    )
