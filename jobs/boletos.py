"""Boletos: issuing one for an open invoice (the first, or a segunda via), cancelling one at the
gateway, the gateway's webhooks when one is paid or expires, and what every boleto notice shows.

A boleto is issued once per invoice and sequence: the gateway call happens outside any transaction,
keyed by `boleto_idempotency_key`, so an interrupted issue is completed by the next attempt with the
same request. A payment never gets lost: money for an invoice that no longer takes it is credit.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

import dramatiq
from sqlalchemy import ColumnElement, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session, joinedload

import jobs
from gateways.base import (
    Ambiguous,
    BoletoIssue,
    BoletoIssued,
    BoletoRequest,
    Gateway,
    GatewayError,
    GatewayRejected,
    Payer,
    Unavailable,
    issue_boleto_many,
)
from jobs.context import BillingConfig, current_session, runtime
from jobs.invoicing import apply_credit, lock_subscription, mark_invoice_paid
from jobs.notifications import NoticeSpec, notify_many
from jobs.outbox import send_after_commit
from jobs.retries import STANDARD
from models.calendar import local_today
from models.schema import Boleto, Invoice, Subscription
from models.states import BoletoPurpose, BoletoStatus, InvoiceKind, InvoiceStatus, PaymentMethod, SubscriptionStatus

jobs.require_broker()
logger = logging.getLogger(__name__)

# A boleto that can still be paid: the invoice's current one.
LIVE_BOLETO = (BoletoStatus.ISSUED, BoletoStatus.OVERDUE)


def live_boleto(session: Session, invoice_id: int, *, lock: bool = False) -> Boleto | None:
    """The invoice's live boleto (a segunda via has a higher sequence than the one it replaced)."""
    query = (
        select(Boleto)
        .where(Boleto.invoice_id == invoice_id, Boleto.status.in_(LIVE_BOLETO))
        .order_by(Boleto.sequence.desc())
        .limit(1)
    )
    return session.scalar(query.with_for_update() if lock else query)


def awaiting_boleto() -> tuple[ColumnElement[bool], ...]:
    """SQL conditions on `Invoice`: an open boleto invoice without a live boleto — never issued, an
    interrupted issue, or a segunda via still to issue after the last one expired, was given up or
    underpaid."""
    return (
        Invoice.status == InvoiceStatus.OPEN,
        Invoice.method == PaymentMethod.BOLETO,
        ~select(Boleto.id).where(Boleto.invoice_id == Invoice.id, Boleto.status.in_(LIVE_BOLETO)).exists(),
    )


def boleto_notice(invoice: Invoice, boleto: Boleto, *, dunning: bool = False) -> dict[str, Any]:
    """The keys every notice about a boleto shows (issued, reminder, overdue, suspended): its invoice
    and period, the amount, the due date and the linha digitável.

    A notice about the boleto itself shows the boleto's amount and due date; a dunning notice
    (`dunning`: overdue, suspended) the invoice's, since dunning counts from the invoice's original due
    date whatever segunda via followed. An expired boleto can no longer be paid: its line is left out.
    """
    amount, due = (invoice.total_cents, invoice.due_date) if dunning else (boleto.amount_cents, boleto.due_date)
    return {
        "invoice_id": invoice.id,
        "amount_cents": amount,
        "due_date": due.isoformat(),
        "digitable_line": "" if boleto.status == BoletoStatus.EXPIRED else boleto.digitable_line,
        # The PDF attached to the e-mail is this boleto's; its Pix code pays the same amount any day.
        "boleto_id": boleto.id,
        "pix_code": "" if boleto.status == BoletoStatus.EXPIRED else boleto.pix_code or "",
        "period_start": invoice.period_start.isoformat(),
        "period_end": invoice.period_end.isoformat(),
    }


# --- a boleto paid or expired at the gateway (jobs.gateway_events routes its events here) -----------


def record_reported_boleto(
    session: Session,
    gateway_id: str,
    gateway: Gateway | None,
    *,
    today: date,
    now: datetime,
    config: BillingConfig,
) -> str:
    """A webhook said something happened to one of our boletos: ask the gateway what its state is now
    and record that (paid, or no longer payable). The webhook's body is never trusted."""
    lookup = getattr(gateway, "boleto_state", None)
    if lookup is None:
        raise RuntimeError("this gateway cannot look a boleto up: its webhooks cannot be verified")
    state = lookup(gateway_id)  # Unavailable: the message is retried
    if state.status == "paid":
        paid_on = local_today(state.paid_at, config.timezone) if state.paid_at else today
        return record_boleto_payment(
            session, gateway_id, amount_cents=state.paid_amount_cents, paid_on=paid_on, now=now
        )
    if state.status in ("expired", "canceled"):
        return record_boleto_expired(session, gateway_id, on=today)
    return "pending"


def record_boleto_payment(
    session: Session, gateway_id: str, *, amount_cents: int, paid_on: date, now: datetime, via: str = "boleto"
) -> str:
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
        mark_invoice_paid(session, invoice, paid_on=paid_on, now=now, amount_cents=invoice.total_cents, source=via)
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


# --- issuance ----------------------------------------------------------------------------------

# What a boleto pays, for its notice: its invoice's kind ("reissue" for a replacement, a segunda via).
BOLETO_PURPOSES: dict[str, BoletoPurpose] = {kind: BoletoPurpose(kind.value) for kind in InvoiceKind}


def boleto_idempotency_key(invoice_id: int, sequence: int = 1) -> str:
    return f"boleto:{invoice_id}" if sequence == 1 else f"boleto:{invoice_id}:{sequence}"


@dataclass(frozen=True)
class _BoletoToIssue:
    """What was read, before the gateway call, to issue one invoice's boleto."""

    issue: BoletoIssue
    sequence: int
    overdue_on: date | None


def issue_boleto(session: Session, gateway: Gateway, invoice_id: int, *, config: BillingConfig) -> Boleto | None:
    """Issue the boleto of an open boleto invoice that has no live one (none yet, or the last one expired,
    was given up or underpaid), once; the gateway call happens
    outside any transaction, keyed by the invoice and the boleto's sequence, so an interrupted issue is
    completed by the next attempt with the same request.

    The first boleto is due on the invoice's due date; a replacement (segunda via, after the previous one
    expired or was given up) BOLETO_DUE_DAYS after the day it was replaced, and keeps the invoice's
    dunning state (overdue since the original due date). Returns the live boleto, or None when the
    invoice no longer needs one; raises the gateway's error when it could not issue it.
    """
    outcome = issue_boletos(session, gateway, [invoice_id], config=config)[invoice_id]
    if isinstance(outcome, GatewayError):
        raise outcome
    return outcome


def issue_boletos(
    session: Session, gateway: Gateway, invoice_ids: Sequence[int], *, config: BillingConfig
) -> dict[int, Boleto | GatewayError | None]:
    """`issue_boleto` for many invoices as a set: read in a few statements, the gateway calls sent
    together (`issue_boleto_many`), the answers recorded in one transaction. Per invoice: the live
    boleto, None, or the error the gateway gave for that one alone. Commits."""
    ids = list(dict.fromkeys(invoice_ids))
    outcomes: dict[int, Boleto | GatewayError | None] = dict.fromkeys(ids)
    to_issue: dict[int, _BoletoToIssue] = {}
    for invoice_id, prepared in _prepare_boletos(session, ids, config).items():
        if isinstance(prepared, _BoletoToIssue):
            to_issue[invoice_id] = prepared
        else:
            outcomes[invoice_id] = prepared
    session.commit()
    if not to_issue:
        return outcomes

    answers = issue_boleto_many(gateway, [prepared.issue for prepared in to_issue.values()])
    issued: dict[int, tuple[_BoletoToIssue, BoletoIssued]] = {}
    for (invoice_id, prepared), answer in zip(to_issue.items(), answers, strict=True):
        if isinstance(answer, GatewayError):
            outcomes[invoice_id] = answer
        else:
            issued[invoice_id] = (prepared, answer)
    outcomes.update(_record_boletos(session, issued))
    session.commit()
    return outcomes


def _prepare_boletos(
    session: Session, invoice_ids: Sequence[int], config: BillingConfig
) -> dict[int, _BoletoToIssue | Boleto | None]:
    """Per invoice, the request for its missing boleto; or its live boleto, or None when it needs none."""
    invoices = session.scalars(
        select(Invoice)
        .where(Invoice.id.in_(invoice_ids))
        .options(joinedload(Invoice.subscription).joinedload(Subscription.organization))
        .execution_options(populate_existing=True)
    ).all()
    by_invoice: dict[int, list[Boleto]] = {invoice_id: [] for invoice_id in invoice_ids}
    for boleto in session.scalars(
        select(Boleto).where(Boleto.invoice_id.in_(invoice_ids)).order_by(Boleto.invoice_id, Boleto.sequence)
    ):
        by_invoice[boleto.invoice_id].append(boleto)

    prepared: dict[int, _BoletoToIssue | Boleto | None] = dict.fromkeys(invoice_ids)
    for invoice in invoices:
        if invoice.status != InvoiceStatus.OPEN or invoice.method != PaymentMethod.BOLETO:
            continue
        boletos = by_invoice[invoice.id]
        live = next((boleto for boleto in boletos if boleto.status in LIVE_BOLETO), None)
        if live is not None:
            prepared[invoice.id] = live
            continue
        previous = boletos[-1] if boletos else None
        sequence = previous.sequence + 1 if previous else 1
        if previous is None:
            due_date = invoice.due_date
        else:
            replaced_on = previous.replaced_on or local_today(previous.created_at, config.timezone)
            due_date = replaced_on + timedelta(days=config.boleto_due_days)
        organization = invoice.subscription.organization
        request = BoletoRequest(
            invoice_id=invoice.id, amount_cents=invoice.total_cents, description=boleto_description(invoice)
        )
        payer = Payer(name=organization.name, document=organization.document or "", email=None)
        issue = BoletoIssue(request, payer, due_date, boleto_idempotency_key(invoice.id, sequence))
        prepared[invoice.id] = _BoletoToIssue(issue, sequence, previous.overdue_on if previous else None)
    return prepared


def _record_boletos(
    session: Session, issued: Mapping[int, tuple[_BoletoToIssue, BoletoIssued]]
) -> dict[int, Boleto | None]:
    """Record what the gateway issued, in one insert, and the notices of the new ones. A boleto whose
    invoice was voided while the gateway answered (a cycle change, a cancellation) is recorded
    canceled all the same, so that a payment of it is recognised (and becomes credit), and is
    cancelled at the gateway."""
    if not issued:
        return {}
    invoices = {
        invoice.id: invoice
        for invoice in session.scalars(
            select(Invoice)
            .where(Invoice.id.in_(issued))
            .order_by(Invoice.id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
    }
    rows = []
    for invoice_id, (prepared, answer) in issued.items():
        if invoices[invoice_id].status != InvoiceStatus.OPEN:
            status = BoletoStatus.CANCELED
        elif prepared.overdue_on is not None:
            status = BoletoStatus.OVERDUE
        else:
            status = BoletoStatus.ISSUED
        rows.append(
            {
                "invoice_id": invoice_id,
                "sequence": prepared.sequence,
                "gateway_id": answer.gateway_id,
                "nosso_numero": answer.nosso_numero,
                "barcode": answer.barcode,
                "digitable_line": answer.digitable_line,
                "pix_code": answer.pix_code,
                "amount_cents": answer.amount_cents,
                "due_date": answer.due_date,
                "status": status,
                "overdue_on": prepared.overdue_on,
            }
        )
    new_ids = session.scalars(insert(Boleto).values(rows).on_conflict_do_nothing().returning(Boleto.id)).all()
    new = {boleto.invoice_id: boleto for boleto in session.scalars(select(Boleto).where(Boleto.id.in_(new_ids)))}

    recorded: dict[int, Boleto | None] = {}
    notices = []
    for invoice_id, (prepared, answer) in issued.items():
        invoice, boleto = invoices[invoice_id], new.get(invoice_id)
        if boleto is None:  # recorded meanwhile by a concurrent attempt with the same key
            recorded[invoice_id] = live_boleto(session, invoice_id)
        elif boleto.status == BoletoStatus.CANCELED:
            send_after_commit(session, cancel_boleto_at_gateway, answer.gateway_id)
            recorded[invoice_id] = None
        else:
            recorded[invoice_id] = boleto
            purpose = BoletoPurpose.REISSUE if prepared.sequence > 1 else BOLETO_PURPOSES[invoice.kind]
            notices.append(
                NoticeSpec(
                    organization_id=invoice.organization_id,
                    subscription_id=invoice.subscription_id,
                    kind="boleto_issued",
                    dedupe_key=f"boleto_issued:{boleto.id}",
                    context={**boleto_notice(invoice, boleto), "purpose": purpose},
                )
            )
    notify_many(session, notices)
    return recorded


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
