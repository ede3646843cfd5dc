"""Processing a recorded request: rules checked in a savepoint, the flow applied, gateway work after
commit; the preview; the queue entry points (actors)."""

from __future__ import annotations

import logging
import secrets
from datetime import date, datetime
from typing import Any

import dramatiq
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

import jobs
from gateways.base import Gateway
from jobs import clock
from jobs.changes.outcome import HANDLERS, QUEUE, Run, WaitForCharge, authorize, reject
from jobs.changes.queries import request_invoice
from jobs.changes.recording import IdempotencyKeyReused, change_date, record_change_request
from jobs.context import BillingConfig, current_session, runtime
from jobs.contract import canonical_payload, describe_field_errors, field_errors, parse_change_request, payload_hash
from jobs.gateway_work import settle
from jobs.payments import PreparedCharge
from jobs.retries import LATENCY_SENSITIVE
from jobs.work_attempts import CHANGE_REQUEST, failures_recorded
from models import policy
from models.calendar import local_today
from models.policy import RuleViolation
from models.schema import Boleto, ChangeRequest, Charge
from models.states import ChangeRequestStatus

jobs.require_broker()

logger = logging.getLogger(__name__)


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
    if request.status != ChangeRequestStatus.PENDING or request_invoice(session, request.id) is not None:
        session.commit()
        return request.status

    run = Run(session, gateway, request, on, now, config)
    try:
        with session.begin_nested():
            params = _stored_params(request)
            authorize(run, params.requested_by)
            HANDLERS[params.kind](run, params)
    except RuleViolation as violation:
        run = Run(session, gateway, request, on, now, config)
        run.notices.extend(reject(session, request, violation, now=now))
    except WaitForCharge as waiting:
        logger.info("change request %s waits for the charge of invoice %s", request.id, waiting.invoice_id)
        session.commit()
        return request.status
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
        run = Run(session, None, request, on, now, config)
        try:
            authorize(run, params.requested_by)
            HANDLERS[params.kind](run, params)
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


def _after_commit(run: Run) -> None:
    """The gateway work, with no transaction open: charges (phases 2 and 3), boletos, cancellations. A
    boleto not issued now is issued by the daily run, which issues every one still missing."""
    assert run.gateway is not None  # only a consequence's run has none, and it never gets here
    charges = list(run.charges)
    settled = settle(
        run.session, run.gateway, run, on=local_today(run.now, run.config.timezone), now=run.now, config=run.config
    )
    if settled.retry is not None:
        logger.warning("change request %s: %s; the billing run will issue it", run.request.id, settled.retry)
    if run.request.kind == "card" and charges:
        _record_retries(run.session, run.request.id, charges, settled.charge_statuses)
    for boleto in settled.boletos.values():
        _add_boleto_to_result(run.session, run.request.id, boleto)
    run.session.commit()


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
        # The request is recorded: a failure is counted on it (the tick retries it with backoff).
        with failures_recorded(session, CHANGE_REQUEST, request.id, now):
            process_request(session, gateway, request.id, on=change_date(request, config), now=now, config=config)
    return request


@dramatiq.actor(queue_name=QUEUE, **LATENCY_SENSITIVE)
def submit_change_request(payload: dict[str, Any]) -> None:
    """The main application's entry point: one JSON object (see jobs.contract and the README)."""
    context = runtime()
    session = current_session()
    submit_request(
        session, context.gateway_factory(), payload, now=clock.now(session, context.config), config=context.config
    )


@dramatiq.actor(queue_name=QUEUE, **LATENCY_SENSITIVE)
def process_change_request(change_request_id: int) -> None:
    """Process a recorded request (sent by the API after recording it, and by the tick for stale ones)."""
    context = runtime()
    session = current_session()
    request = session.get(ChangeRequest, change_request_id)
    if request is None:
        logger.warning("change request %s does not exist (its transaction rolled back?)", change_request_id)
        return
    now = clock.now(session, context.config)
    # A failure is recorded on the request (the tick backs off, then leaves it to an operator) and raised.
    with failures_recorded(session, CHANGE_REQUEST, change_request_id, now):
        process_request(
            session,
            context.gateway_factory(),
            change_request_id,
            on=change_date(request, context.config),
            now=now,
            config=context.config,
        )
