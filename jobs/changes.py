"""Change requests from the main application: subscribe, billing-cycle change with proration,
payment-method switch, card replacement, cancel and resume (DESIGN §1, §2 "Change requests").

A request is recorded once per (organization, idempotency key) and then processed under row locks:
the request row first, then the organization or subscription rows. Processing checks every rule
before changing anything (inside a savepoint, so a refusal can never leave half a change behind),
then either applies the change in the same transaction — ledger entries, a notice, `applied` with
a result — or, when a card must be charged now, records the invoice and the charge attempt, commits,
charges outside any transaction and lets the charge's consequence (registered below for the
`cycle_change` and `subscribe` invoice kinds) apply or reject the request. That consequence also
runs when the janitor later resolves an attempt whose outcome was unknown; until then the request
stays `pending`.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final

import dramatiq
from pydantic import ValidationError
from sqlalchemy import exists, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

import jobs
from gateways.base import Gateway, GatewayError
from jobs.context import BillingConfig, current_session, runtime
from jobs.contract import (
    BillingCycleChange,
    Cancel,
    CardUpdate,
    PaymentMethodSwitch,
    ReissueBoleto,
    Resume,
    Subscribe,
    canonical_payload,
    describe_field_errors,
    field_errors,
    parse_change_request,
    payload_hash,
    redact,
)
from jobs.invoicing import (
    MissingPlan,
    create_renewal_invoice,
    ledger,
    lock_subscription,
    plan_price,
    void_invoice,
    void_unused_paid_invoice,
)
from jobs.notifications import DECLINE_REASONS, notify
from jobs.outbox import send_after_commit
from jobs.payments import (
    LIVE_BOLETO,
    PreparedCharge,
    cancel_boleto_at_gateway,
    charge_and_record,
    consequence,
    issue_boleto,
    mark_paid_by_card,
    open_charge_attempt,
    prepare,
)
from jobs.refunds import end_subscription
from jobs.retries import LATENCY_SENSITIVE
from models import policy
from models.calendar import ANNUAL, MONTHLY, add_cycle, format_date_br, local_today, next_business_day
from models.policy import RuleViolation
from models.proration import quote_cycle_change
from models.schema import (
    Boleto,
    Card,
    ChangeRequest,
    Charge,
    Invoice,
    LedgerEntry,
    Member,
    Organization,
    Subscription,
)
from models.states import (
    BoletoStatus,
    ChangeRequestStatus,
    ChargeStatus,
    InvoiceKind,
    InvoiceStatus,
    PaymentMethod,
    SubscriptionStatus,
)

jobs.require_broker()

logger = logging.getLogger(__name__)

QUEUE: Final = "changes"

# --- error codes (besides those of models.policy) ----------------------------------------------

ORGANIZATION_NOT_FOUND: Final = "organization_not_found"
SUBSCRIPTION_NOT_FOUND: Final = "subscription_not_found"
ALREADY_SUBSCRIBED: Final = "already_subscribed"
UNKNOWN_PRODUCT: Final = "unknown_product"
CARD_EXPIRED: Final = "card_expired"
DOCUMENT_REQUIRED: Final = "document_required"
CANCELLATION_ALREADY_SCHEDULED: Final = "cancellation_already_scheduled"
CANCELLATION_NOT_SCHEDULED: Final = "cancellation_not_scheduled"
NO_OPEN_BOLETO: Final = "no_open_boleto"

# Every code a request can be rejected with, for the README and the API's documentation.
ERROR_CODES: Final[dict[str, str]] = {
    policy.INVALID_REQUEST: "the message's shape is wrong (missing field, wrong type, unknown kind)",
    ORGANIZATION_NOT_FOUND: "Renova has no copy of the organization (PUT /v1/organizations/{id} first)",
    policy.FORBIDDEN: "the requester is not an active owner, admin or financial responsible of the organization",
    SUBSCRIPTION_NOT_FOUND: "no such subscription in this organization",
    policy.SUBSCRIPTION_CANCELED: "the subscription is canceled (or its period ended with a scheduled cancellation)",
    UNKNOWN_PRODUCT: "no plan for this product and cycle",
    ALREADY_SUBSCRIBED: "the organization already has a live subscription of this product",
    policy.SAME_CYCLE: "the subscription is already in that billing cycle",
    policy.OUTSTANDING_INVOICE: "a cycle change while an invoice is past due",
    policy.BOLETO_REQUIRES_ANNUAL: "boleto asked for a monthly subscription",
    policy.NO_CARD_ON_FILE: "card asked but the organization has no card",
    policy.BOLETO_ALREADY_ISSUED: "boleto → card after the deadline (T − 7 days) or once the renewal's boleto exists",
    policy.SAME_PAYMENT_METHOD: "the payment method asked is already the one in effect",
    DOCUMENT_REQUIRED: "boleto asked but the organization has no CPF/CNPJ",
    CARD_EXPIRED: "the new card's expiry is in the past",
    policy.PAYMENT_DECLINED: "the immediate card charge was declined; nothing changed",
    CANCELLATION_ALREADY_SCHEDULED: "cancel asked twice",
    CANCELLATION_NOT_SCHEDULED: "resume asked with no cancellation scheduled",
    NO_OPEN_BOLETO: "segunda via asked but the subscription has no open invoice payable by boleto",
}

# The names the notification templates know for each kind ("Solicitação de …").
_NOTICE_KIND: Final = {
    "billing_cycle": "cycle_change",
    "payment_method": "payment_method_switch",
    "card": "card_update",
    "resume": "undo_cancel",
    "reissue_boleto": "reissue_boleto",
}


class UnrecordableChangeRequest(ValueError):
    """A queue message without a usable organization_id or idempotency_key: it cannot be recorded
    (the row is keyed by them), so it is not retried but lands in the dead-letter queue."""


class IdempotencyKeyReused(Exception):
    """The organization already used this idempotency key for a different request."""

    def __init__(self, existing: ChangeRequest) -> None:
        super().__init__(f"idempotency key already used by change request {existing.id} with another payload")
        self.existing = existing


class WaitForCharge(Exception):
    """A charge of the subscription is unresolved: the request stays `pending` and is processed again
    (the tick re-enqueues it) once the charge's outcome is known, on the state it leaves."""

    def __init__(self, invoice_id: int) -> None:
        super().__init__(f"a charge of invoice {invoice_id} is unresolved")
        self.invoice_id = invoice_id


@dataclass(frozen=True)
class Recorded:
    request: ChangeRequest
    created: bool


# --- recording ---------------------------------------------------------------------------------


def _identity(payload: Any) -> tuple[int, str]:
    if not isinstance(payload, dict):
        raise UnrecordableChangeRequest("a change request must be a JSON object")
    organization_id = payload.get("organization_id")
    key = payload.get("idempotency_key")
    if isinstance(organization_id, bool) or not isinstance(organization_id, int) or organization_id <= 0:
        raise UnrecordableChangeRequest("organization_id (a positive integer) is required to record a request")
    if not isinstance(key, str) or not key.strip() or len(key.strip()) > 255:
        raise UnrecordableChangeRequest("idempotency_key (1 to 255 characters) is required to record a request")
    return organization_id, key.strip()


def _optional_id(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 2**63 else None


def record_change_request(session: Session, payload: Any, *, source: str, now: datetime) -> Recorded:
    """Persist a request once per (organization, idempotency key); does not commit.

    A payload of the wrong shape is recorded as `rejected` with `invalid_request` (with its card
    numbers, if any, redacted). The same key with the same payload returns the existing row; with a
    different payload it raises IdempotencyKeyReused.
    """
    organization_id, key = _identity(payload)
    violation: RuleViolation | None = None
    try:
        parsed = parse_change_request(payload)
        stored = canonical_payload(parsed)
        kind, subscription_id, requested_by = parsed.kind, parsed.subscription_id, parsed.requested_by
    except ValidationError as exc:
        fields = field_errors(exc.errors())
        violation = policy.invalid_request(describe_field_errors(fields), fields=fields)
        stored = redact(payload)
        raw_kind = payload.get("kind")
        kind = raw_kind if isinstance(raw_kind, str) and 0 < len(raw_kind) <= 32 else "invalid"
        subscription_id = _optional_id(payload.get("subscription_id"))
        requested_by = _optional_id(payload.get("requested_by"))
    digest = payload_hash(stored)
    request_id = session.scalar(
        insert(ChangeRequest)
        .values(
            organization_id=organization_id,
            subscription_id=subscription_id,
            requested_by=requested_by,
            idempotency_key=key,
            kind=kind,
            payload=stored,
            payload_hash=digest,
            source=source,
            created_at=now,
        )
        .on_conflict_do_nothing(index_elements=["organization_id", "idempotency_key"])
        .returning(ChangeRequest.id)
    )
    if request_id is None:
        existing = session.scalars(
            select(ChangeRequest)
            .where(ChangeRequest.organization_id == organization_id, ChangeRequest.idempotency_key == key)
            .execution_options(populate_existing=True)
        ).one()
        if existing.payload_hash != digest:
            raise IdempotencyKeyReused(existing)
        return Recorded(existing, created=False)
    request = session.get_one(ChangeRequest, request_id)
    if violation is not None:
        _reject(session, request, violation, now=now)
    return Recorded(request, created=True)


def pending_change_request_ids(session: Session, older_than: datetime, limit: int = 500) -> list[int]:
    """Pending requests created before `older_than` that no charge is deciding (for the tick to re-enqueue).

    A request whose card charge is in flight is the janitor's: its invoice exists, and the charge's
    consequence completes the request once the attempt is resolved.
    """
    in_flight = exists().where(Invoice.change_request_id == ChangeRequest.id)
    return list(
        session.scalars(
            select(ChangeRequest.id)
            .where(ChangeRequest.status == ChangeRequestStatus.PENDING, ChangeRequest.created_at < older_than)
            .where(~in_flight)
            .order_by(ChangeRequest.created_at)
            .limit(limit)
        )
    )


def change_date(request: ChangeRequest, config: BillingConfig) -> date:
    """D: the business date on which the request was made (what the user saw when they clicked)."""
    return local_today(request.created_at, config.timezone)


# --- processing --------------------------------------------------------------------------------


@dataclass
class _Run:
    """One request being processed, and what must happen after its transaction commits."""

    session: Session
    gateway: Gateway | None  # None inside a charge's consequence: no gateway call in a transaction
    request: ChangeRequest
    on: date
    now: datetime
    config: BillingConfig
    organization: Organization | None = None
    charges: list[PreparedCharge] = field(default_factory=list)
    boleto_invoices: list[int] = field(default_factory=list)
    boletos_to_cancel: list[str] = field(default_factory=list)
    notices: list[int | None] = field(default_factory=list)

    def notify(self, **kwargs: Any) -> None:
        self.notices.append(notify(self.session, **kwargs))


def process_request(
    session: Session, gateway: Gateway, request_id: int, *, on: date, now: datetime, config: BillingConfig
) -> str:
    """Process a recorded request as of business date `on` (D); returns its status afterwards.

    Commits. A request already applied or rejected, or whose charge is in flight, is left alone, so a
    duplicated message or a re-enqueue by the tick is harmless.
    """
    request = session.scalars(
        select(ChangeRequest)
        .where(ChangeRequest.id == request_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).one_or_none()
    if request is None:
        raise LookupError(f"change request {request_id} does not exist")
    if request.status != ChangeRequestStatus.PENDING or _request_invoice(session, request.id) is not None:
        session.commit()
        return request.status

    run = _Run(session, gateway, request, on, now, config)
    try:
        with session.begin_nested():
            params = _stored_params(request)
            _authorize(run, params.requested_by)
            _HANDLERS[params.kind](run, params)
    except RuleViolation as violation:
        run = _Run(session, gateway, request, on, now, config)
        run.notices.extend(_reject(session, request, violation, now=now))
    except WaitForCharge as waiting:
        logger.info("change request %s waits for the charge of invoice %s", request.id, waiting.invoice_id)
        session.commit()
        return request.status
    _send_after_commit(run)
    session.commit()
    _after_commit(run)
    return request.status


def preview_change_request(session: Session, params: Any, *, now: datetime, config: BillingConfig) -> dict[str, Any]:
    """What a validated request would do on today's business date, decided by the very code that
    processes requests (authorization, rules, pricing), then rolled back: nothing is written, charged,
    issued or sent. Returns `outcome` (`applied`, `charge`: applied once the card charge now succeeds,
    `wait`: a charge of the subscription is in flight, or `rejected` with `error`) and the `result`."""
    on = local_today(now, config.timezone)
    stored = canonical_payload(params)
    request = ChangeRequest(
        organization_id=params.organization_id,
        subscription_id=params.subscription_id,
        requested_by=params.requested_by,
        idempotency_key=f"preview:{secrets.token_hex(16)}",
        kind=params.kind,
        payload=stored,
        payload_hash=payload_hash(stored),
        source="preview",
        created_at=now,
    )
    try:
        session.add(request)
        session.flush()
        run = _Run(session, None, request, on, now, config)
        try:
            _authorize(run, params.requested_by)
            _HANDLERS[params.kind](run, params)
        except RuleViolation as violation:
            return {
                "outcome": "rejected",
                "kind": params.kind,
                "on": on.isoformat(),
                "error": {"code": violation.code, "message": violation.message, "details": violation.details},
            }
        except WaitForCharge:
            return {
                "outcome": "wait",
                "kind": params.kind,
                "on": on.isoformat(),
                "message": "Há um pagamento desta assinatura em processamento: a solicitação será processada "
                "assim que ele for concluído.",
            }
        result = dict(request.result or {})
        if params.kind in ("subscribe", "billing_cycle"):
            # Rows this preview created (and rolled back): the real request gets other ids.
            result.pop("invoice_id", None)
            result.pop("subscription_id", None)
        # A subscribe or cycle change applies only once its charge succeeds; a card update applies at
        # once and retries past-due invoices with the new card (`charge_now_cents`).
        outcome = "charge" if run.charges and params.kind in ("subscribe", "billing_cycle") else "applied"
        preview: dict[str, Any] = {"outcome": outcome, "kind": params.kind, "on": on.isoformat(), "result": result}
        if run.charges:
            preview["charge_now_cents"] = sum(item.request.amount_cents for item in run.charges)
        if run.boleto_invoices:
            preview["boleto_issued_now"] = True
        return preview
    finally:
        session.rollback()


def _stored_params(request: ChangeRequest) -> Any:
    try:
        return parse_change_request(request.payload)
    except ValidationError as exc:
        # Only reachable for rows written by hand or by an older contract.
        fields = field_errors(exc.errors())
        raise policy.invalid_request(describe_field_errors(fields), fields=fields) from None


def _authorize(run: _Run, requested_by: int) -> None:
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


def _send_after_commit(run: _Run) -> None:
    for gateway_id in run.boletos_to_cancel:
        send_after_commit(run.session, cancel_boleto_at_gateway, gateway_id)


def _after_commit(run: _Run) -> None:
    """The gateway calls, with no transaction open: the charges (phases 2 and 3) and the boletos."""
    session, request = run.session, run.request
    assert run.gateway is not None  # only a consequence's run has none, and it never gets here
    if run.charges:
        charged_on = local_today(run.now, run.config.timezone)
        statuses = charge_and_record(session, run.gateway, run.charges, on=charged_on, now=run.now, config=run.config)
        if request.kind == "card":
            _record_retries(session, request.id, run.charges, statuses)
    for invoice_id in run.boleto_invoices:
        try:
            boleto = issue_boleto(session, run.gateway, invoice_id, config=run.config)
        except GatewayError:
            # The daily run issues every open boleto invoice that has no boleto yet.
            logger.warning("boleto of invoice %s not issued now; the billing run will issue it", invoice_id)
            session.rollback()
            continue
        if boleto is not None:
            _add_boleto_to_result(session, request.id, boleto)
    session.commit()


def _record_retries(session: Session, request_id: int, charges: list[PreparedCharge], statuses: dict[int, str]) -> None:
    request = session.get_one(ChangeRequest, request_id, populate_existing=True)
    rows = session.execute(
        select(Charge.id, Charge.invoice_id).where(Charge.id.in_([item.charge_id for item in charges]))
    )
    invoice_of = {charge_id: invoice_id for charge_id, invoice_id in rows}
    retries = [{"invoice_id": invoice_of[c.charge_id], "charge_status": statuses[c.charge_id]} for c in charges]
    request.result = {**(request.result or {}), "retries": retries}
    session.commit()


def _add_boleto_to_result(session: Session, request_id: int, boleto: Boleto) -> None:
    request = session.get_one(ChangeRequest, request_id, populate_existing=True)
    request.result = {
        **(request.result or {}),
        "boleto": {
            "invoice_id": boleto.invoice_id,
            "digitable_line": boleto.digitable_line,
            "barcode": boleto.barcode,
            "due_date": boleto.due_date.isoformat(),
            "amount_cents": boleto.amount_cents,
        },
    }
    session.commit()


# --- outcomes ----------------------------------------------------------------------------------


def _apply(run: _Run, result: dict[str, Any], *, ledger_on: list[Subscription], details: dict[str, Any]) -> None:
    """Mark the request applied; a zero-amount `change_applied` ledger entry keeps the trail per subscription."""
    request = run.request
    for subscription in ledger_on:
        ledger(
            run.session,
            subscription,
            "change_applied",
            0,
            _LEDGER_DESCRIPTIONS[request.kind],
            change_request_id=request.id,
            request_kind=request.kind,
            **details,
        )
    request.status = ChangeRequestStatus.APPLIED
    request.result = result
    request.error_code = request.error_message = None
    request.processed_at = run.now


def _reject(session: Session, request: ChangeRequest, violation: RuleViolation, *, now: datetime) -> list[int | None]:
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
            "kind": _NOTICE_KIND.get(request.kind, request.kind),
            "code": violation.code,
            "message": violation.message,
        },
        recipients=[requester.email],
    )
    return [notice]


_LEDGER_DESCRIPTIONS: Final = {
    "subscribe": "Assinatura contratada",
    "billing_cycle": "Alteração do ciclo de cobrança",
    "payment_method": "Alteração da forma de pagamento",
    "card": "Cartão de crédito atualizado",
    "cancel": "Cancelamento agendado",
    "resume": "Cancelamento desfeito",
    "reissue_boleto": "Segunda via de boleto emitida",
}


# --- shared checks -----------------------------------------------------------------------------


def _lock_own_subscription(run: _Run, subscription_id: int) -> Subscription:
    subscription = lock_subscription(run.session, subscription_id)
    if subscription is None or subscription.organization_id != run.request.organization_id:
        raise RuleViolation(
            SUBSCRIPTION_NOT_FOUND,
            "A assinatura não foi encontrada nesta organização.",
            subscription_id=subscription_id,
        )
    return subscription


def _card(session: Session, organization_id: int) -> Card | None:
    return session.scalar(select(Card).where(Card.organization_id == organization_id))


def _require_document(organization: Organization | None) -> None:
    if organization is None or not organization.document:
        raise RuleViolation(
            DOCUMENT_REQUIRED,
            "Para pagar via boleto, a organização precisa ter CPF ou CNPJ cadastrado. "
            "Atualize os dados da organização e tente novamente.",
        )


def _request_invoice(session: Session, request_id: int) -> Invoice | None:
    return session.scalar(select(Invoice).where(Invoice.change_request_id == request_id))


def _wait_for_charges(session: Session, subscription: Subscription) -> None:
    """A charge whose outcome is not known yet (an upgrade, a subscription's first payment, a renewal)
    would make a change compute from a state that is about to change: the request waits for it."""
    in_flight = session.scalar(
        select(Invoice.id)
        .join(Charge, Charge.invoice_id == Invoice.id)
        .where(
            Invoice.subscription_id == subscription.id,
            Invoice.status == InvoiceStatus.OPEN,
            Charge.status.in_([ChargeStatus.PENDING, ChargeStatus.UNKNOWN]),
        )
        .limit(1)
    )
    if in_flight is not None:
        raise WaitForCharge(in_flight)


def _past_due_invoice(session: Session, subscription: Subscription, on: date) -> Invoice | None:
    """The oldest open invoice already past due on `on`: a card invoice due whose charge failed or was
    never made, or a boleto no longer payable (payable until the business day after its due date)."""
    invoices = session.scalars(
        select(Invoice)
        .where(Invoice.subscription_id == subscription.id, Invoice.status == InvoiceStatus.OPEN)
        .order_by(Invoice.due_date, Invoice.id)
    ).all()
    for invoice in invoices:
        if invoice.method == PaymentMethod.BOLETO:
            if next_business_day(invoice.due_date) < on:
                return invoice
        elif invoice.due_date < on or (
            invoice.due_date == on and any(charge.status == ChargeStatus.FAILED for charge in invoice.charges)
        ):
            return invoice
    return None


def _paid_invoice_for_period(session: Session, subscription: Subscription, on: date) -> Invoice | None:
    """The paid invoice covering the current period: the one for exactly that period, else one
    containing D within it — never one whose unused part an earlier change already turned into credit."""
    prorated = exists().where(LedgerEntry.invoice_id == Invoice.id, LedgerEntry.kind == "proration_credit")
    candidates = session.scalars(
        select(Invoice)
        .where(
            Invoice.subscription_id == subscription.id,
            Invoice.status == InvoiceStatus.PAID,
            Invoice.kind.in_([InvoiceKind.RENEWAL, InvoiceKind.SUBSCRIBE, InvoiceKind.CYCLE_CHANGE]),
            ~prorated,
        )
        .order_by(Invoice.paid_at.desc().nulls_last(), Invoice.id.desc())
    ).all()
    period = (subscription.current_period_start, subscription.current_period_end)
    for invoice in candidates:
        if (invoice.period_start, invoice.period_end) == period:
            return invoice
    for invoice in candidates:
        if subscription.current_period_start <= invoice.period_start <= on < invoice.period_end:
            return invoice
    return None


def _paid_unstarted_invoices(session: Session, subscription: Subscription, on: date) -> list[Invoice]:
    """Paid invoices of the subscription whose period starts after D: nothing of them was used yet."""
    return list(
        session.scalars(
            select(Invoice)
            .where(
                Invoice.subscription_id == subscription.id,
                Invoice.status == InvoiceStatus.PAID,
                Invoice.period_start > on,
            )
            .order_by(Invoice.period_start, Invoice.id)
            .with_for_update()
        )
    )


def _upcoming_renewal_invoice(session: Session, subscription: Subscription) -> Invoice | None:
    """The renewal invoice of the next period (issued ahead for a boleto), ignoring void ones."""
    return session.scalar(
        select(Invoice)
        .where(
            Invoice.subscription_id == subscription.id,
            Invoice.kind == InvoiceKind.RENEWAL,
            Invoice.period_start == subscription.current_period_end,
            Invoice.status != InvoiceStatus.VOID,
        )
        .order_by(Invoice.id.desc())
        .limit(1)
    )


def _void(run: _Run, subscription: Subscription, invoice: Invoice, why: str) -> None:
    gateway_id = void_invoice(run.session, subscription, invoice, description=why, change_request_id=run.request.id)
    if gateway_id is not None:
        run.boletos_to_cancel.append(gateway_id)


# --- subscribe ---------------------------------------------------------------------------------


def _subscribe(run: _Run, params: Subscribe) -> None:
    session, on = run.session, run.on
    # The organization's row serializes its subscribes (and card updates).
    organization = session.scalars(
        select(Organization).where(Organization.id == run.request.organization_id).with_for_update()
    ).one()
    try:
        price = plan_price(session, params.product, params.cycle, on)
    except MissingPlan:
        raise RuleViolation(
            UNKNOWN_PRODUCT,
            f"O produto {params.product!r} não está disponível no ciclo de cobrança {policy.cycle_name(params.cycle)}.",
            product=params.product,
            cycle=params.cycle,
        ) from None
    live = session.scalar(
        select(Subscription.id).where(
            Subscription.organization_id == organization.id,
            Subscription.product == params.product,
            Subscription.status != SubscriptionStatus.CANCELED,
        )
    )
    if live is not None:
        raise RuleViolation(
            ALREADY_SUBSCRIBED,
            "A organização já tem uma assinatura ativa deste produto. Para mudar o ciclo de cobrança ou a forma "
            "de pagamento, use Alterar plano em Minhas assinaturas.",
            subscription_id=live,
        )
    card = _card(session, organization.id)
    policy.ensure_method_allowed(cycle=params.cycle, method=params.payment_method, has_card=card is not None)
    if params.payment_method == PaymentMethod.BOLETO:
        _require_document(organization)

    period_end = add_cycle(on, params.cycle, 1)
    subscription = Subscription(
        organization_id=organization.id,
        product=params.product,
        cycle=params.cycle,
        status=SubscriptionStatus.ACTIVE,
        payment_method=params.payment_method,
        billing_anchor=on,
        current_period_start=on,
        current_period_end=period_end,
        balance_cents=0,
        cancel_at_period_end=False,
    )
    session.add(subscription)
    session.flush()
    run.request.subscription_id = subscription.id
    boleto = params.payment_method == PaymentMethod.BOLETO
    invoice = Invoice(
        subscription_id=subscription.id,
        organization_id=organization.id,
        change_request_id=run.request.id,
        kind=InvoiceKind.SUBSCRIBE,
        cycle=params.cycle,
        period_start=on,
        period_end=period_end,
        amount_cents=price,
        discount_cents=0,
        total_cents=price,
        status=InvoiceStatus.OPEN,
        method=params.payment_method,
        due_date=on + timedelta(days=run.config.boleto_due_days) if boleto else on,
    )
    session.add(invoice)
    session.flush()
    result = _subscription_result(subscription, invoice)
    if not boleto:
        assert card is not None  # ensure_method_allowed
        charge = open_charge_attempt(session, invoice, card)
        assert charge is not None  # a new open invoice with a positive total
        run.charges.append(prepare(charge))
        run.request.result = result  # shown while the first payment is processed
        return
    run.boleto_invoices.append(invoice.id)
    _subscribed(run, subscription, invoice, result)


def _subscription_result(subscription: Subscription, invoice: Invoice) -> dict[str, Any]:
    return {
        "subscription_id": subscription.id,
        "invoice_id": invoice.id,
        "cycle": subscription.cycle,
        "payment_method": subscription.payment_method,
        "amount_cents": invoice.total_cents,
        "period_start": subscription.current_period_start.isoformat(),
        "period_end": subscription.current_period_end.isoformat(),
        "renewal_date": subscription.current_period_end.isoformat(),
    }


def _subscribed(run: _Run, subscription: Subscription, invoice: Invoice, result: dict[str, Any]) -> None:
    run.notify(
        organization_id=subscription.organization_id,
        subscription_id=subscription.id,
        kind="subscribed",
        dedupe_key=f"subscribed:{run.request.id}",
        context={
            "cycle": subscription.cycle,
            "payment_method": subscription.payment_method,
            "period_start": invoice.period_start,
            "period_end": invoice.period_end,
            "amount_cents": invoice.total_cents,
        },
    )
    _apply(
        run,
        result,
        ledger_on=[subscription],
        details={"cycle": subscription.cycle, "payment_method": subscription.payment_method},
    )


@consequence(InvoiceKind.SUBSCRIBE)
def subscribe_charge_resolved(
    session: Session, charge: Charge, invoice: Invoice, on: date, now: datetime, config: BillingConfig
) -> None:
    """The first payment of a new subscription: paid → applied; declined → the subscription is canceled."""
    run = _consequence_run(session, invoice, on, now, config)
    subscription = lock_subscription(session, invoice.subscription_id)
    if run is None or subscription is None or invoice.status != InvoiceStatus.OPEN:
        return
    if charge.status == ChargeStatus.SUCCEEDED:
        mark_paid_by_card(session, invoice, charge, on=on, now=now)
        _subscribed(run, subscription, invoice, _subscription_result(subscription, invoice))
    else:
        invoice.status = InvoiceStatus.VOID
        subscription.status = SubscriptionStatus.CANCELED
        subscription.canceled_at = now
        run.notices.extend(_reject(session, run.request, _declined(charge), now=now))
    _send_after_commit(run)


def _consequence_run(session: Session, invoice: Invoice, on: date, now: datetime, config: BillingConfig) -> _Run | None:
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
    run = _Run(session, None, request, on, now, config)
    run.organization = session.get(Organization, request.organization_id)
    return run


def _declined(charge: Charge) -> RuleViolation:
    reason = DECLINE_REASONS.get(charge.gateway_code or "") or charge.gateway_message
    return policy.payment_declined(amount_cents=charge.amount_cents, reason=reason, gateway_code=charge.gateway_code)


# --- billing cycle -----------------------------------------------------------------------------


def _billing_cycle(run: _Run, params: BillingCycleChange) -> None:
    session, on = run.session, run.on
    subscription = _lock_own_subscription(run, params.subscription_id)
    policy.ensure_subscription_open(status=subscription.status)
    _wait_for_charges(session, subscription)
    past_due = _past_due_invoice(session, subscription, on)
    policy.ensure_cycle_change_allowed(
        from_cycle=subscription.cycle,
        to_cycle=params.to_cycle,
        has_past_due_invoice=past_due is not None
        or subscription.status in (SubscriptionStatus.PAST_DUE, SubscriptionStatus.SUSPENDED),
        past_due_amount_cents=past_due.total_cents if past_due else None,
        past_due_since=past_due.due_date if past_due else None,
    )
    card = _card(session, subscription.organization_id)
    method = policy.method_for_cycle_change(
        to_cycle=params.to_cycle,
        requested_method=params.payment_method,
        current_method=subscription.effective_payment_method,
        has_card=card is not None,
    )
    if method == PaymentMethod.BOLETO:
        _require_document(run.organization)

    # Moving to monthly (card-only) makes any unpaid boleto of the subscription pointless: it is
    # cancelled and the credit it had used comes back, so the quote counts it.
    to_void = (
        session.scalars(
            select(Invoice).where(
                Invoice.subscription_id == subscription.id,
                Invoice.status == InvoiceStatus.OPEN,
                Invoice.method == PaymentMethod.BOLETO,
            )
        ).all()
        if params.to_cycle == MONTHLY
        else []
    )
    # A paid invoice for a period that has not started (a renewal boleto paid early, a renewal covered
    # by credit) is unused in full: it is voided and its whole amount joins the credit.
    unstarted = _paid_unstarted_invoices(session, subscription, on)
    balance = (
        subscription.balance_cents
        + sum(invoice.discount_cents for invoice in to_void)
        + sum(invoice.amount_cents for invoice in unstarted)
    )
    previous = _paid_invoice_for_period(session, subscription, on)
    monthly_price, annual_price = _prices(session, subscription.product, on)
    quote = quote_cycle_change(
        from_cycle=subscription.cycle,
        to_cycle=params.to_cycle,
        period_start=subscription.current_period_start,
        period_end=subscription.current_period_end,
        paid_cents=_paid_for_period(previous),
        balance_cents=balance,
        on=on,
        monthly_price_cents=monthly_price,
        annual_price_cents=annual_price,
    )
    result = quote.to_dict()
    if params.to_cycle == ANNUAL:
        # The credit is a discount on the annual price; what it does not cover is due now.
        period_end = quote.new_period_end
        price, credit_used = annual_price, quote.credit_applied_cents
    elif quote.new_period_end > on:
        # The credit buys k months and r days; the period it pays for is an invoice fully
        # discounted by that credit, so a later change prorates it like any paid period.
        period_end = quote.new_period_end
        price = credit_used = quote.credit_applied_cents
    else:
        # Less credit than a day of the monthly plan: the renewal date would be today, so the first
        # monthly period starts now and is charged now, less all the credit.
        period_end = add_cycle(on, MONTHLY, 1)
        price, credit_used = monthly_price, quote.credit_cents
        result.update(
            new_period_end=period_end.isoformat(),
            credit_applied_cents=credit_used,
            amount_due_cents=price - credit_used,
            balance_after_cents=0,
            first_period_charged_now=True,
        )
    result.update(
        payment_method=method,
        renewal_date=period_end.isoformat(),
        previous_invoice_id=previous.id if previous else None,
        voided_invoice_ids=[invoice.id for invoice in to_void],
        unused_paid_invoice_ids=[invoice.id for invoice in unstarted],
    )
    amount_due = price - credit_used
    boleto = method == PaymentMethod.BOLETO
    invoice = Invoice(
        subscription_id=subscription.id,
        organization_id=subscription.organization_id,
        change_request_id=run.request.id,
        kind=InvoiceKind.CYCLE_CHANGE,
        cycle=params.to_cycle,
        period_start=on,
        period_end=period_end,
        amount_cents=price,
        discount_cents=credit_used,
        total_cents=amount_due,
        status=InvoiceStatus.OPEN,
        method=method,
        due_date=on + timedelta(days=run.config.boleto_due_days) if boleto and amount_due else on,
    )
    session.add(invoice)
    session.flush()
    result["invoice_id"] = invoice.id
    run.request.result = result
    if amount_due and not boleto:
        assert card is not None  # method_for_cycle_change
        charge = open_charge_attempt(session, invoice, card)
        assert charge is not None  # a new open invoice with a positive total
        run.charges.append(prepare(charge))
        return
    _apply_cycle_change(run, subscription, invoice, result)
    if amount_due:
        run.boleto_invoices.append(invoice.id)


def _prices(session: Session, product: str, on: date) -> tuple[int, int]:
    try:
        return plan_price(session, product, MONTHLY, on), plan_price(session, product, ANNUAL, on)
    except MissingPlan:
        raise RuleViolation(
            UNKNOWN_PRODUCT,
            "O ciclo de cobrança desta assinatura não pode ser alterado: o produto não tem preço para os dois "
            "ciclos. Fale com o suporte.",
            product=product,
        ) from None


def _paid_for_period(invoice: Invoice | None) -> int:
    """P: what paid the period, in money and in credit. Every discount in Renova is the customer's own
    credit balance, so the invoice amount (total + discount) is what they gave for it; counting only
    the total would lose the unused share of the credit they spent on it."""
    return invoice.amount_cents if invoice is not None else 0


def _apply_cycle_change(
    run: _Run,
    subscription: Subscription,
    invoice: Invoice,
    result: dict[str, Any],
    *,
    charge: Charge | None = None,
    paid_on: date | None = None,
) -> None:
    """Apply a priced cycle change: the boletos it makes pointless, the ledger, the new period."""
    session, request = run.session, run.request
    for voided_id in result["voided_invoice_ids"]:
        voided = session.get_one(Invoice, voided_id)
        if voided.status == InvoiceStatus.OPEN:
            _void(run, subscription, voided, "Crédito devolvido: boleto cancelado pela alteração de ciclo")
        else:
            logger.warning("invoice %s changed state while change request %s was charged", voided_id, request.id)
    for unused_id in result.get("unused_paid_invoice_ids", []):
        unused = session.get_one(Invoice, unused_id)
        if not void_unused_paid_invoice(
            session,
            subscription,
            unused,
            description="Período pago não iniciado devolvido como crédito pela alteração de ciclo",
            change_request_id=request.id,
        ):
            logger.warning("invoice %s changed state while change request %s was charged", unused_id, request.id)

    paid, unused = result["paid_cents"], result["unused_cents"]
    previous_id = result["previous_invoice_id"]
    if previous_id is not None and paid:
        # paid = used + credit, to the cent, on the period being left.
        ledger(
            session,
            subscription,
            "period_used",
            -(paid - unused),
            "Período utilizado até a alteração de ciclo",
            invoice_id=previous_id,
            change_request_id=request.id,
            paid_cents=paid,
            on=run.on.isoformat(),
        )
        ledger(session, subscription, "proration_credit", unused, "Crédito proporcional não utilizado",
               invoice_id=previous_id, change_request_id=request.id, paid_cents=paid)  # fmt: skip
    if invoice.discount_cents:
        ledger(session, subscription, "credit_applied", -invoice.discount_cents, "Crédito aplicado ao novo ciclo",
               invoice_id=invoice.id, change_request_id=request.id)  # fmt: skip

    # The balance the quote started from (B, including restored boleto discounts) is replaced by what
    # is left after the change; anything that moved the balance meanwhile is kept.
    new_balance = subscription.balance_cents - result["balance_cents"] + result["balance_after_cents"]
    if new_balance < 0:
        logger.error("change request %s would leave a negative balance (%s); kept at 0", request.id, new_balance)
        new_balance = 0
    from_cycle = subscription.cycle
    subscription.cycle = invoice.cycle
    subscription.current_period_start, subscription.current_period_end = invoice.period_start, invoice.period_end
    # DESIGN: to monthly, the new renewal date becomes the anchor; otherwise the period starts at D.
    extension = invoice.cycle == MONTHLY and not result.get("first_period_charged_now")
    subscription.billing_anchor = invoice.period_end if extension else invoice.period_start
    subscription.payment_method = invoice.method
    subscription.pending_payment_method = None
    subscription.balance_cents = new_balance

    if charge is not None:
        mark_paid_by_card(session, invoice, charge, on=paid_on or run.on, now=run.now)
    elif invoice.total_cents == 0:
        # Paid entirely with credit: no money moved, so no receipt (the cycle-change notice says it all).
        invoice.status = InvoiceStatus.PAID
        invoice.paid_on, invoice.paid_at = run.on, run.now

    run.notify(
        organization_id=subscription.organization_id,
        subscription_id=subscription.id,
        kind="cycle_changed",
        dedupe_key=f"cycle_changed:{request.id}",
        context={
            "from_cycle": from_cycle,
            "to_cycle": invoice.cycle,
            "quote": _notice_quote(result),
            "payment_method": invoice.method,
        },
    )
    _apply(run, result, ledger_on=[subscription], details={"from_cycle": from_cycle, "to_cycle": invoice.cycle})


def _notice_quote(result: dict[str, Any]) -> dict[str, Any]:
    quote = {key: value for key, value in result.items() if not isinstance(value, list | dict)}
    if result.get("first_period_charged_now"):
        # No time was bought: "prorrogou 0 meses e 0 dias" would only confuse.
        quote.pop("months", None)
        quote.pop("extra_days", None)
    return quote


@consequence(InvoiceKind.CYCLE_CHANGE)
def cycle_change_charge_resolved(
    session: Session, charge: Charge, invoice: Invoice, on: date, now: datetime, config: BillingConfig
) -> None:
    """The immediate charge of a cycle change: paid → the change applies as quoted on D; declined →
    the request is rejected and nothing else changes (the invoice is void, no credit was used)."""
    run = _consequence_run(session, invoice, on, now, config)
    subscription = lock_subscription(session, invoice.subscription_id)
    if run is None or subscription is None or invoice.status != InvoiceStatus.OPEN:
        return
    # The change was quoted for D, the day it was asked, whenever the charge is resolved.
    run.on = change_date(run.request, config)
    if charge.status == ChargeStatus.SUCCEEDED:
        result = dict(run.request.result or {})
        _apply_cycle_change(run, subscription, invoice, result, charge=charge, paid_on=on)
    else:
        invoice.status = InvoiceStatus.VOID
        run.notices.extend(_reject(session, run.request, _declined(charge), now=now))
    _send_after_commit(run)


# --- payment method ----------------------------------------------------------------------------


def _renewal_boleto_exists(session: Session, subscription: Subscription) -> bool:
    """A boleto (or a boleto invoice about to get one) already exists for the upcoming renewal."""
    upcoming = _upcoming_renewal_invoice(session, subscription)
    return upcoming is not None and upcoming.method == PaymentMethod.BOLETO


def _payment_method(run: _Run, params: PaymentMethodSwitch) -> None:
    session = run.session
    subscription = _lock_own_subscription(run, params.subscription_id)
    policy.ensure_subscription_open(status=subscription.status)
    renewal = subscription.current_period_end
    pending = policy.plan_payment_method_switch(
        cycle=subscription.cycle,
        payment_method=subscription.payment_method,
        pending_payment_method=subscription.pending_payment_method,
        to_method=params.to,
        has_card=_card(session, subscription.organization_id) is not None,
        renewal_date=renewal,
        today=run.on,
        boleto_exists_for_renewal=_renewal_boleto_exists(session, subscription),
        lead_days=run.config.boleto_lead_days,
    )
    if params.to == PaymentMethod.BOLETO:
        _require_document(run.organization)
    from_method = subscription.effective_payment_method
    subscription.pending_payment_method = pending
    card = _card(session, subscription.organization_id)
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
    _apply(run, result, ledger_on=[subscription], details={"from_method": from_method, "to_method": params.to})


# --- card --------------------------------------------------------------------------------------


def _replace_card(run: _Run, params: CardUpdate) -> None:
    session, on = run.session, run.on
    organization = session.scalars(
        select(Organization).where(Organization.id == run.request.organization_id).with_for_update()
    ).one()
    if params.subscription_id is not None:
        _lock_own_subscription(run, params.subscription_id)
    if (params.exp_year, params.exp_month) < (on.year, on.month):
        raise RuleViolation(
            CARD_EXPIRED,
            f"O cartão informado venceu em {params.exp_month:02d}/{params.exp_year}. Cadastre um cartão válido.",
            exp_month=params.exp_month,
            exp_year=params.exp_year,
        )
    values = {
        "token": params.token,
        "brand": params.brand,
        "last4": params.last4,
        "exp_month": params.exp_month,
        "exp_year": params.exp_year,
    }
    card_id = session.scalar(
        insert(Card)
        .values(organization_id=organization.id, **values)
        .on_conflict_do_update(index_elements=["organization_id"], set_={**values, "updated_at": run.now})
        .returning(Card.id)
    )
    card = session.get_one(Card, card_id, populate_existing=True)
    subscriptions = session.scalars(
        select(Subscription)
        .where(Subscription.organization_id == organization.id, Subscription.status != SubscriptionStatus.CANCELED)
        .order_by(Subscription.id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).all()
    retried: list[int] = []
    for subscription in subscriptions:
        if subscription.status not in (SubscriptionStatus.PAST_DUE, SubscriptionStatus.SUSPENDED):
            continue
        for invoice in _retryable_card_invoices(session, subscription):
            charge = open_charge_attempt(session, invoice, card)
            if charge is not None:
                run.charges.append(prepare(charge))
                retried.append(invoice.id)
    run.notify(
        organization_id=organization.id,
        kind="card_updated",
        dedupe_key=f"card_updated:{run.request.id}",
        context={key: values[key] for key in ("brand", "last4", "exp_month", "exp_year")},
    )
    result = {
        "card": {key: values[key] for key in ("brand", "last4", "exp_month", "exp_year")},
        "subscription_ids": [subscription.id for subscription in subscriptions],
        "retried_invoice_ids": retried,
    }
    _apply(run, result, ledger_on=list(subscriptions), details={"brand": params.brand, "last4": params.last4})


def _retryable_card_invoices(session: Session, subscription: Subscription) -> list[Invoice]:
    """Open card invoices whose attempts all failed (or that were never attempted, for want of a card)."""
    invoices = session.scalars(
        select(Invoice)
        .where(
            Invoice.subscription_id == subscription.id,
            Invoice.status == InvoiceStatus.OPEN,
            Invoice.method == PaymentMethod.CARD,
            Invoice.total_cents > 0,
        )
        .order_by(Invoice.due_date, Invoice.id)
    ).all()
    return [invoice for invoice in invoices if all(charge.status == ChargeStatus.FAILED for charge in invoice.charges)]


# --- cancel and resume -------------------------------------------------------------------------


def _cancel(run: _Run, params: Cancel) -> None:
    session = run.session
    subscription = _lock_own_subscription(run, params.subscription_id)
    policy.ensure_subscription_open(status=subscription.status)
    _wait_for_charges(session, subscription)
    if subscription.status == SubscriptionStatus.SUSPENDED:
        _end_now(run, subscription)
        return
    renewal = subscription.current_period_end
    if subscription.cancel_at_period_end:
        raise RuleViolation(
            CANCELLATION_ALREADY_SCHEDULED,
            f"O cancelamento desta assinatura já está agendado para {format_date_br(renewal)}.",
            ends_on=renewal,
        )
    subscription.cancel_at_period_end = True
    voided: list[int] = []
    upcoming = _upcoming_renewal_invoice(session, subscription)
    if upcoming is not None and upcoming.status == InvoiceStatus.OPEN:
        # The renewal will not happen: its boleto (issued from T − 7) must not be paid.
        _void(run, subscription, upcoming, "Crédito devolvido: boleto da renovação cancelado")
        voided.append(upcoming.id)
    ends_on = max(renewal, run.on)
    run.notify(
        organization_id=subscription.organization_id,
        subscription_id=subscription.id,
        kind="cancellation_scheduled",
        dedupe_key=f"cancellation_scheduled:{run.request.id}",
        context={"ends_on": ends_on},
    )
    _apply(
        run,
        {"ends_on": ends_on.isoformat(), "cancel_at_period_end": True, "voided_invoice_ids": voided},
        ledger_on=[subscription],
        details={"ends_on": ends_on.isoformat()},
    )


def _end_now(run: _Run, subscription: Subscription) -> None:
    """A suspended subscription gives no service to wait for: it ends on D, owing nothing for the
    service it never had, and what it holds is refunded."""
    run.boletos_to_cancel.extend(end_subscription(run.session, subscription, ended_on=run.on, now=run.now))
    _apply(
        run,
        {
            "ends_on": run.on.isoformat(),
            "status": subscription.status,
            "refunded_cents": _refunded_now(run, subscription),
        },
        ledger_on=[subscription],
        details={"ends_on": run.on.isoformat(), "while": "suspended"},
    )


def _refunded_now(run: _Run, subscription: Subscription) -> int:
    return -sum(
        run.session.scalars(
            select(LedgerEntry.amount_cents).where(
                LedgerEntry.subscription_id == subscription.id, LedgerEntry.kind == "refund"
            )
        )
    )


def _resume(run: _Run, params: Resume) -> None:
    on = run.on
    subscription = _lock_own_subscription(run, params.subscription_id)
    policy.ensure_subscription_open(status=subscription.status)
    renewal = subscription.current_period_end
    if not subscription.cancel_at_period_end:
        raise RuleViolation(
            CANCELLATION_NOT_SCHEDULED,
            "Esta assinatura não tem cancelamento agendado: nada foi alterado.",
        )
    if renewal <= on:
        raise RuleViolation(
            policy.SUBSCRIPTION_CANCELED,
            f"A assinatura foi encerrada em {format_date_br(renewal)}, como agendado, e o cancelamento não pode "
            "mais ser desfeito. Para voltar a usar o CONECTA, faça uma nova assinatura.",
            ended_on=renewal,
        )
    subscription.cancel_at_period_end = False
    result: dict[str, Any] = {"renewal_date": renewal.isoformat(), "cancel_at_period_end": False}
    reissued = _reissue_renewal_boleto(run, subscription)
    if reissued is not None:
        result["reissued_invoice_id"] = reissued
    run.notify(
        organization_id=subscription.organization_id,
        subscription_id=subscription.id,
        kind="cancellation_undone",
        dedupe_key=f"cancellation_undone:{run.request.id}",
        context={"renewal_date": renewal},
    )
    _apply(run, result, ledger_on=[subscription], details={"renewal_date": renewal.isoformat()})


def _reissue_renewal_boleto(run: _Run, subscription: Subscription) -> int | None:
    """After a cancellation voided the renewal's boleto (issued from T − 7), resuming needs a new one,
    due max(T, D + BOLETO_DUE_DAYS) like any boleto issued late."""
    session, on, config = run.session, run.on, run.config
    renewal = subscription.current_period_end
    voided = session.scalar(
        select(Invoice.id).where(
            Invoice.subscription_id == subscription.id,
            Invoice.kind == InvoiceKind.RENEWAL,
            Invoice.period_start == renewal,
            Invoice.status == InvoiceStatus.VOID,
        )
    )
    if (
        voided is None
        or subscription.cycle != ANNUAL
        or subscription.effective_payment_method != PaymentMethod.BOLETO
        or _upcoming_renewal_invoice(session, subscription) is not None
    ):
        return None
    invoice = create_renewal_invoice(
        session,
        subscription,
        period_start=renewal,
        method=PaymentMethod.BOLETO,
        due_date=policy.late_boleto_due_date(renewal, on, config.boleto_due_days),
    )
    if invoice is None:  # billed meanwhile by the daily run: that invoice stands
        return None
    run.boleto_invoices.append(invoice.id)
    return invoice.id


# --- segunda via --------------------------------------------------------------------------------


def _reissue_boleto(run: _Run, params: ReissueBoleto) -> None:
    """A member asks for a new boleto ("segunda via") for the subscription's open boleto invoice: the
    current one is cancelled and a replacement, due D + BOLETO_DUE_DAYS, is issued after commit. Dunning
    keeps the invoice's original dates."""
    session = run.session
    subscription = _lock_own_subscription(run, params.subscription_id)
    policy.ensure_subscription_open(status=subscription.status)
    invoice = session.scalar(
        select(Invoice)
        .where(
            Invoice.subscription_id == subscription.id,
            Invoice.status == InvoiceStatus.OPEN,
            Invoice.method == PaymentMethod.BOLETO,
        )
        .order_by(Invoice.due_date, Invoice.id)
        .limit(1)
        .with_for_update()
    )
    if invoice is None:
        raise RuleViolation(
            NO_OPEN_BOLETO,
            "Esta assinatura não tem boleto em aberto: não há segunda via a emitir.",
            subscription_id=subscription.id,
        )
    replaced = session.scalar(
        select(Boleto).where(Boleto.invoice_id == invoice.id, Boleto.status.in_(LIVE_BOLETO)).with_for_update()
    )
    if replaced is not None:
        replaced.status = BoletoStatus.CANCELED
        replaced.replaced_on = run.on
        run.boletos_to_cancel.append(replaced.gateway_id)
    run.boleto_invoices.append(invoice.id)
    _apply(
        run,
        {
            "invoice_id": invoice.id,
            "replaced_boleto_id": replaced.id if replaced else None,
            "due_date": (run.on + timedelta(days=run.config.boleto_due_days)).isoformat(),
        },
        ledger_on=[subscription],
        details={"invoice_id": invoice.id},
    )


_HANDLERS: Final[dict[str, Callable[[_Run, Any], None]]] = {
    "subscribe": _subscribe,
    "billing_cycle": _billing_cycle,
    "payment_method": _payment_method,
    "card": _replace_card,
    "cancel": _cancel,
    "resume": _resume,
    "reissue_boleto": _reissue_boleto,
}


# --- the queue path ----------------------------------------------------------------------------


def submit_request(
    session: Session, gateway: Gateway, payload: Any, *, now: datetime, config: BillingConfig
) -> ChangeRequest | None:
    """Record a queue message's request and process it; None when its key was reused for another payload.

    Such a message cannot be recorded (the key's row belongs to the first payload), so it is logged
    and dropped; the first request is unaffected. Commits.
    """
    try:
        recorded = record_change_request(session, payload, source="queue", now=now)
    except IdempotencyKeyReused as exc:
        session.rollback()
        logger.warning(
            "change request message ignored: organization %s reused idempotency key of request %s "
            "with a different payload",
            exc.existing.organization_id,
            exc.existing.id,
        )
        return None
    session.commit()
    request = recorded.request
    if request.status == ChangeRequestStatus.PENDING:
        process_request(session, gateway, request.id, on=change_date(request, config), now=now, config=config)
    return request


@dramatiq.actor(queue_name=QUEUE, **LATENCY_SENSITIVE)
def submit_change_request(payload: dict[str, Any]) -> None:
    """The main application's entry point: one JSON object (see jobs.contract and the README)."""
    context = runtime()
    submit_request(current_session(), context.gateway_factory(), payload, now=datetime.now(UTC), config=context.config)


@dramatiq.actor(queue_name=QUEUE, **LATENCY_SENSITIVE)
def process_change_request(change_request_id: int) -> None:
    """Process a recorded request (sent by the API after recording it, and by the tick for stale ones)."""
    context = runtime()
    session = current_session()
    request = session.get(ChangeRequest, change_request_id)
    if request is None:
        logger.warning("change request %s does not exist (its transaction rolled back?)", change_request_id)
        return
    process_request(
        session,
        context.gateway_factory(),
        change_request_id,
        on=change_date(request, context.config),
        now=datetime.now(UTC),
        config=context.config,
    )
