"""The console's pages. Reads come from `jobs.lookups` and the flows' own queries; actions go through
the same functions as the CLI, each with a reason, written to `audit_events`."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, Path, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy.orm import Session

from jobs.contract import MAX_ID
from workers.console.auth import (
    COOKIE,
    ActingUserDep,
    ConsoleUser,
    FormUserDep,
    UserDep,
    refuse_nul_in_forms,
    session_cookie,
)
from workers.console.views import datahora, page
from workers.db import get_session
from workers.settings import Settings, get_settings

router = APIRouter(
    prefix="/console",
    include_in_schema=False,
    default_response_class=HTMLResponse,
    dependencies=[Depends(refuse_nul_in_forms)],
)
SessionDep = Annotated[Session, Depends(get_session)]
# A row's id in a path: a number no row can have is a "not found" page (mount_console), not a database error.
RowId = Annotated[int, Path(ge=1, le=MAX_ID)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


def now_of(session: Session) -> datetime:
    """The console's "now": the test clock's when one is set (development and test)."""
    from jobs import clock
    from jobs.context import runtime

    return clock.now(session, runtime().config)


def context(request: Request, session: Session, user: ConsoleUser | None, **values: Any) -> dict[str, Any]:
    from jobs.clock import clock_state
    from jobs.context import runtime

    clock_note = None
    if user is not None and runtime().config.allow_future_dates:
        state = clock_state(session)
        if state is not None:
            clock_note = f"Relógio de teste: para todos os processos, agora é {datahora(state.now)}."
    return {
        "user": user,
        "clock_note": clock_note,
        "flash": request.query_params.get("ok") or request.query_params.get("erro"),
        "flash_error": "erro" in request.query_params,
        **values,
    }


def back(path: str, *, ok: str | None = None, error: str | None = None) -> RedirectResponse:
    """Post/redirect/get, with the outcome shown once on the page it lands on."""
    query = urlencode({"ok": ok} if ok else {"erro": error} if error else {})
    separator = "&" if "?" in path else "?"
    return RedirectResponse(f"{path}{separator}{query}" if query else path, status_code=303)


def required_reason(reason: str) -> str | None:
    reason = reason.strip()
    return reason if reason else None


# --- login --------------------------------------------------------------------------------------------


def _safe_next(target: str) -> str:
    # Only paths inside the console: never an open redirect to another site.
    return target if target.startswith("/console") and not target.startswith("//") else "/console/"


@router.get("/login")
def login_form(request: Request, session: SessionDep, next: str = "/console/") -> Response:
    return page(request, "login.html", context(request, session, None, next=_safe_next(next), email="", error=None))


@router.post("/login")
def login(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    email: Annotated[str, Form()] = "",
    password: Annotated[str, Form()] = "",
    next: Annotated[str, Form()] = "/console/",
) -> Response:
    from jobs import audit
    from jobs.operators import authenticate

    operator = authenticate(session, email, password, now=datetime.now(UTC))
    if operator is None:
        session.rollback()
        values = {"next": _safe_next(next), "email": email, "error": "E-mail ou senha incorretos."}
        return page(request, "login.html", context(request, session, None, **values), status_code=401)
    audit.record(
        session, actor=operator.email, action="console_login", target_type="operator", target_id=str(operator.id)
    )
    session.commit()
    value, attributes = session_cookie(settings, operator.id)
    response = RedirectResponse(_safe_next(next), status_code=303)
    response.set_cookie(COOKIE, value, **attributes)
    return response


@router.post("/logout")
def logout(user: FormUserDep) -> Response:
    response = RedirectResponse("/console/login", status_code=303)
    response.delete_cookie(COOKIE, path="/console")
    return response


# --- overview -----------------------------------------------------------------------------------------


@router.get("/")
def overview(request: Request, session: SessionDep, user: UserDep) -> Response:
    from workers.console.status import operations_status

    status = operations_status(session)
    return page(request, "overview.html", context(request, session, user, status=status))


# --- subscriptions ------------------------------------------------------------------------------------


@router.get("/subscriptions")
def subscriptions(request: Request, session: SessionDep, user: UserDep, q: str = "") -> Response:
    from jobs.lookups import search_subscriptions

    hits = search_subscriptions(session, q) if q.strip() else []
    return page(request, "subscriptions.html", context(request, session, user, q=q, hits=hits))


@router.get("/subscriptions/{subscription_id}")
def subscription(request: Request, session: SessionDep, user: UserDep, subscription_id: RowId) -> Response:
    from jobs.lookups import masked_payload, subscription_record

    record = subscription_record(session, subscription_id)
    if record is None:
        return _not_found(request, session, user, f"Assinatura {subscription_id} não encontrada.")
    return page(request, "subscription.html", context(request, session, user, record=record, masked=masked_payload))


# --- change requests ----------------------------------------------------------------------------------


def _optional_int(value: str) -> int | None:
    return int(value) if value.strip().isdigit() else None


def _optional_date(value: str) -> date | None:
    try:
        return date.fromisoformat(value) if value.strip() else None
    except ValueError:
        return None


@router.get("/change-requests")
def change_requests(
    request: Request,
    session: SessionDep,
    user: UserDep,
    organization: str = "",
    status: str = "",
    kind: str = "",
    since: str = "",
    until: str = "",
) -> Response:
    from jobs.lookups import change_request_kinds, search_change_requests

    rows = search_change_requests(
        session,
        organization_id=_optional_int(organization),
        status=status or None,
        kind=kind or None,
        since=_optional_date(since),
        until=_optional_date(until),
    )
    filters = {"organization": organization, "status": status, "kind": kind, "since": since, "until": until}
    kinds = change_request_kinds(session)
    return page(request, "change_requests.html", context(request, session, user, rows=rows, kinds=kinds, **filters))


@router.get("/change-requests/{change_request_id}")
def change_request(request: Request, session: SessionDep, user: UserDep, change_request_id: RowId) -> Response:
    from jobs.lookups import masked_payload
    from models.schema import ChangeRequest

    row = session.get(ChangeRequest, change_request_id)
    if row is None:
        return _not_found(request, session, user, f"Solicitação {change_request_id} não encontrada.")
    values = {"row": row, "params": masked_payload(row.payload)}
    return page(request, "change_request.html", context(request, session, user, **values))


def _not_found(request: Request, session: Session, user: ConsoleUser, message: str) -> Response:
    values = {"title": "Não encontrado", "message": message}
    return page(request, "error.html", context(request, session, user, **values), status_code=404)


# --- dead letters -------------------------------------------------------------------------------------


def _broker_and_client() -> tuple[Any, Any]:
    from workers.broker import broker

    return broker, broker.client


@router.get("/dead-letters")
def dead_letters_page(request: Request, session: SessionDep, user: UserDep, queue: str = "") -> Response:
    from workers.dead_letters import dead_letters
    from workers.queues import QUEUES

    _, client = _broker_and_client()
    letters = dead_letters(client, (queue,) if queue in QUEUES else QUEUES)
    letters.sort(key=lambda letter: letter.died_at, reverse=True)
    values = {"letters": letters, "queues": QUEUES, "queue": queue}
    return page(request, "dead_letters.html", context(request, session, user, **values))


def _chosen_letters(message_id: str, queue: str) -> list[Any]:
    from workers.dead_letters import dead_letters
    from workers.queues import QUEUES

    _, client = _broker_and_client()
    letters = dead_letters(client, (queue,) if queue in QUEUES else QUEUES)
    return [letter for letter in letters if not message_id or letter.message_id == message_id]


def _act_on_dead_letters(
    session: Session, user: ConsoleUser, reason: str, message_id: str, queue: str, *, delete: bool
) -> Response:
    """One message (`message_id`), or every dead letter of `queue` (bulk): requeued or deleted, audited."""
    from workers.dead_letters import delete_audited, requeue_audited

    verb, done = ("apagar", "apagada(s)") if delete else ("reenfileirar", "reenfileirada(s)")
    target = f"/console/dead-letters?queue={queue}" if queue else "/console/dead-letters"
    if required_reason(reason) is None:
        return back(target, error="Diga por que (motivo obrigatório, vai para a auditoria).")
    if not message_id and not queue:
        return back(target, error=f"Escolha uma mensagem, ou uma fila para {verb} todas.")
    letters = _chosen_letters(message_id, queue)
    if not letters:
        return back(target, error=f"Nada a {verb}: a mensagem já não está entre as dead letters.")
    broker, client = _broker_and_client()
    if delete:
        handled = delete_audited(session, client, letters, actor=user.email, reason=reason.strip())
    else:
        handled = requeue_audited(session, broker, client, letters, actor=user.email, reason=reason.strip())
    session.commit()
    return back(target, ok=f"{len(handled)} mensagem(ns) {done}.")


@router.post("/dead-letters/requeue")
def requeue_dead_letters(
    session: SessionDep,
    user: ActingUserDep,
    reason: Annotated[str, Form()] = "",
    message_id: Annotated[str, Form()] = "",
    queue: Annotated[str, Form()] = "",
) -> Response:
    return _act_on_dead_letters(session, user, reason, message_id, queue, delete=False)


@router.post("/dead-letters/delete")
def delete_dead_letters(
    session: SessionDep,
    user: ActingUserDep,
    reason: Annotated[str, Form()] = "",
    message_id: Annotated[str, Form()] = "",
    queue: Annotated[str, Form()] = "",
) -> Response:
    return _act_on_dead_letters(session, user, reason, message_id, queue, delete=True)


# --- billing runs -------------------------------------------------------------------------------------


@router.get("/runs")
def runs(request: Request, session: SessionDep, user: UserDep) -> Response:
    from jobs.run_review import list_runs

    return page(request, "runs.html", context(request, session, user, runs=list_runs(session, limit=60)))


@router.get("/runs/{run_date}")
def run(request: Request, session: SessionDep, user: UserDep, run_date: str) -> Response:
    from jobs.charge_review import OnCallError
    from jobs.run_review import run_detail

    on = _optional_date(run_date)
    if on is None:
        return _not_found(request, session, user, f"Data inválida: {run_date!r} (use AAAA-MM-DD).")
    try:
        detail = run_detail(session, on)
    except OnCallError as exc:
        return _not_found(request, session, user, exc.message)
    return page(request, "run.html", context(request, session, user, detail=detail, tasks=detail.tasks))


# --- charges (on-call) --------------------------------------------------------------------------------

CHARGE_STATUSES = ("failed", "unknown", "pending")


@router.get("/charges")
def charges(
    request: Request,
    session: SessionDep,
    user: UserDep,
    status: str = "",
    since: str = "",
    until: str = "",
    code: str = "",
    organization: str = "",
) -> Response:
    from jobs.charge_review import list_charges

    rows = list_charges(
        session,
        statuses=[status] if status in CHARGE_STATUSES else None,
        since=_optional_date(since),
        until=_optional_date(until),
        decline_code=code.strip() or None,
        organization_id=_optional_int(organization),
        limit=100,
        now=now_of(session),
        timezone=get_settings().billing_timezone,
    )
    filters = {"status": status, "since": since, "until": until, "code": code, "organization": organization}
    values = {"rows": rows, "statuses": CHARGE_STATUSES, **filters}
    return page(request, "charges.html", context(request, session, user, **values))


@router.get("/charges/{charge_id}")
def charge(request: Request, session: SessionDep, user: UserDep, charge_id: RowId) -> Response:
    from jobs.charge_review import OnCallError, charge_detail

    try:
        detail = charge_detail(session, charge_id)
    except OnCallError as exc:
        return _not_found(request, session, user, exc.message)
    return page(request, "charge.html", context(request, session, user, detail=detail))


def _on_call_action(path: str, action: Any) -> Response:
    """Run an on-call action; a refusal (its code and message) comes back to the page, nothing changed."""
    from jobs.charge_review import OnCallError

    try:
        message = action()
    except OnCallError as exc:
        return back(path, error=f"{exc.message} ({exc.code})")
    return back(path, ok=message)


@router.post("/charges/{charge_id}/retry")
def retry_charge(
    session: SessionDep, user: ActingUserDep, charge_id: RowId, reason: Annotated[str, Form()] = ""
) -> Response:
    from jobs.charge_actions import enqueue_retry, retry_charge_now
    from jobs.context import runtime
    from models.money import format_brl

    def act() -> str:
        now = now_of(session)
        result = retry_charge_now(session, charge_id, actor=user.email, reason=reason, now=now, config=runtime().config)
        enqueue_retry(result, now)
        return f"Nova tentativa {result.attempt} de {format_brl(result.amount_cents)} enviada ao gateway."

    return _on_call_action(f"/console/charges/{charge_id}", act)


@router.post("/charges/{charge_id}/reconcile")
def reconcile_charge(
    session: SessionDep, user: ActingUserDep, charge_id: RowId, reason: Annotated[str, Form()] = ""
) -> Response:
    from jobs.charge_actions import reconcile_now
    from jobs.context import runtime

    def act() -> str:
        gateway = runtime().gateway_factory()
        result = reconcile_now(
            session, gateway, charge_id, actor=user.email, reason=reason, now=now_of(session), config=runtime().config
        )
        return f"Conciliada com o gateway: {result.status_before} → {result.status}."

    return _on_call_action(f"/console/charges/{charge_id}", act)


@router.post("/charges/{charge_id}/uncollectible")
def uncollectible(
    session: SessionDep, user: ActingUserDep, charge_id: RowId, reason: Annotated[str, Form()] = ""
) -> Response:
    from jobs.charge_actions import mark_uncollectible
    from jobs.charge_review import charge_row
    from jobs.context import runtime

    def act() -> str:
        invoice_id = charge_row(session, charge_id).invoice_id
        result = mark_uncollectible(
            session, invoice_id, actor=user.email, reason=reason, now=now_of(session), config=runtime().config
        )
        return f"Fatura {result.invoice_id} marcada como incobrável; assinatura {result.subscription_status}."

    return _on_call_action(f"/console/charges/{charge_id}", act)


# --- audit log ----------------------------------------------------------------------------------------


@router.get("/audit")
def audit_log(
    request: Request, session: SessionDep, user: UserDep, actor: str = "", action: str = "", target: str = ""
) -> Response:
    from jobs.audit import list_audit

    target_type, _, target_id = target.partition(":")
    rows = list_audit(
        session,
        actor=actor.strip() or None,
        action=action.strip() or None,
        target_type=target_type.strip() or None,
        target_id=target_id.strip() or None,
        limit=200,
    )
    values = {"rows": rows, "actor": actor, "action": action, "target": target}
    return page(request, "audit.html", context(request, session, user, **values))


# --- refunds (on-call) --------------------------------------------------------------------------------


@router.get("/refunds")
def refunds(request: Request, session: SessionDep, user: UserDep, status: str = "pending") -> Response:
    from jobs.refunds import list_refunds
    from models.states import RefundStatus

    chosen = status if status in {item.value for item in RefundStatus} else None
    values = {
        "rows": list_refunds(session, status=chosen),
        "status": status,
        "statuses": [s.value for s in RefundStatus],
    }
    return page(request, "refunds.html", context(request, session, user, **values))


@router.post("/refunds/{refund_id}/paid")
def refund_paid(
    session: SessionDep,
    user: ActingUserDep,
    refund_id: RowId,
    reference: Annotated[str, Form()] = "",
    reason: Annotated[str, Form()] = "",
) -> Response:
    """On-call paid a payout by bank transfer: the refund is closed with the transfer's reference."""
    from jobs.refunds import RefundActionRefused, mark_payout_paid

    try:
        mark_payout_paid(session, refund_id, reference=reference, reason=reason, actor=user.email, now=now_of(session))
    except RefundActionRefused as exc:
        session.rollback()
        return back("/console/refunds", error=str(exc))
    session.commit()
    return back("/console/refunds", ok=f"Reembolso {refund_id} marcado como pago.")


# --- work waiting for an operator (needs attention) ----------------------------------------------------


@router.get("/attention")
def attention(request: Request, session: SessionDep, user: UserDep) -> Response:
    from jobs.work_attempts import list_needing_attention

    return page(request, "attention.html", context(request, session, user, rows=list_needing_attention(session)))


@router.post("/attention/{kind}/{row_id}/retry")
def attention_retry(
    session: SessionDep, user: ActingUserDep, kind: str, row_id: RowId, reason: Annotated[str, Form()] = ""
) -> Response:
    """Put a parked row back in play: one more attempt now (its message is sent after the commit)."""
    from jobs.work_attempts import AttentionError, retry_now

    if required_reason(reason) is None:
        return back("/console/attention", error="Diga por que (motivo obrigatório, vai para a auditoria).")
    try:
        retry_now(session, kind, row_id, user.email, reason.strip(), now_of(session))
    except AttentionError as exc:
        session.rollback()
        return back("/console/attention", error=str(exc))
    session.commit()
    return back("/console/attention", ok=f"{kind} {row_id} volta a ser tentado agora.")


# --- events to the main application: endpoints and their deliveries -----------------------------------


@router.get("/endpoints")
def endpoints_page(
    request: Request, session: SessionDep, user: UserDep, endpoint: int | None = None, status: str = ""
) -> Response:
    """The main application's webhook endpoints, and one endpoint's delivery log (newest first)."""
    from jobs.event_delivery import delivery_log
    from jobs.events import delivery_counts, endpoints

    rows = endpoints(session)
    chosen = next((row for row in rows if row.id == endpoint), rows[0] if rows else None)
    wanted = status if status in ("pending", "delivered", "failed") else None
    values = {
        "rows": rows,
        "counts": delivery_counts(session),
        "chosen": chosen,
        "status": status,
        "deliveries": delivery_log(session, chosen.id, status=wanted, limit=100) if chosen else [],
    }
    return page(request, "endpoints.html", context(request, session, user, **values))


@router.post("/endpoints/deliveries/{delivery_id}/redeliver")
def redeliver_delivery(
    session: SessionDep, user: ActingUserDep, delivery_id: RowId, reason: Annotated[str, Form()] = ""
) -> Response:
    from jobs.clock import wall_clock
    from jobs.event_delivery import redeliver

    if required_reason(reason) is None:
        return back("/console/endpoints", error="Diga por que (motivo obrigatório, vai para a auditoria).")
    delivery = redeliver(session, delivery_id, actor=user.email, reason=reason.strip(), now=wall_clock())
    if delivery is None:
        session.rollback()
        return back("/console/endpoints", error=f"Entrega {delivery_id} não existe.")
    session.commit()
    return back(f"/console/endpoints?endpoint={delivery.endpoint_id}", ok=f"Entrega {delivery_id} será reenviada.")
