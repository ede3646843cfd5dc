"""On-call commands: `renova runs`, `renova charges`, `renova invoices`, `renova audit`.

Thin on purpose: every read and every action is a function of `jobs.charge_review`,
`jobs.charge_actions`, `jobs.run_review` or `jobs.audit` — the ones the ops console calls — and this
module only parses input and prints tables. Bad input (an unknown id, a blank reason, an action the
rules do not allow) prints why and exits 2, with nothing changed.
"""

from __future__ import annotations

import json
from datetime import date, datetime
from typing import TYPE_CHECKING, Any, NoReturn
from zoneinfo import ZoneInfo

import typer
from rich.table import Table

from jobs.contract import MAX_ID
from workers.cli_common import actor_name, console, current_now, fail, id_argument, wire
from workers.settings import get_settings

if TYPE_CHECKING:
    from jobs.charge_review import ChargeDetail, OnCallError

runs_app = typer.Typer(
    invoke_without_command=True, help="Daily billing runs: what each date's run found due, did and failed."
)
charges_app = typer.Typer(no_args_is_help=True, help="Card charges for on-call: failed and ambiguous attempts.")
invoices_app = typer.Typer(no_args_is_help=True, help="On-call actions on invoices.")
audit_app = typer.Typer(no_args_is_help=True, help="The audit log: who did what from the CLI or the console, and why.")

REASON_HELP = "Why (required; kept in the audit log)."
ACTOR_HELP = "Who acts (audit log; default the login name)."


# --- formatting for people -------------------------------------------------------------------------


def _day(value: date | None) -> str:
    return value.strftime("%d/%m/%Y") if value else "—"


def _when(value: datetime | None) -> str:
    """An instant in the billing time zone, as people read it."""
    if value is None:
        return "—"
    return value.astimezone(ZoneInfo(get_settings().billing_timezone)).strftime("%d/%m/%Y %H:%M")


def _money(cents: int | None) -> str:
    from models.money import format_brl

    return format_brl(cents) if cents is not None else "—"


def _parse_day(text: str, option: str) -> date:
    """YYYY-MM-DD, or dd/mm/yyyy as people write it."""
    try:
        if "/" in text:
            return datetime.strptime(text, "%d/%m/%Y").date()
        return date.fromisoformat(text)
    except ValueError:
        fail(f"{option} must be a date, YYYY-MM-DD or dd/mm/yyyy; got {text!r}", code=2)


def _refused(exc: OnCallError) -> NoReturn:
    fail(f"{exc.message} ({exc.code})", code=2)


def _session() -> Any:
    from workers.db import get_session_factory

    return get_session_factory()()


# --- runs ------------------------------------------------------------------------------------------


@runs_app.callback()
def runs(
    ctx: typer.Context,
    limit: int = typer.Option(14, "--limit", min=1, help="How many runs, newest date first."),
) -> None:
    """The latest billing runs: status, due/done/failed counts, scans, start and end."""
    if ctx.invoked_subcommand is not None:
        return
    wire()
    from jobs.run_review import list_runs

    with _session() as session:
        rows = list_runs(session, limit)
    if not rows:
        console.print("no billing runs yet")
        return
    table = Table(title=f"Billing runs (latest {len(rows)})")
    for column in ("date", "status", "due", "done", "failed", "scans", "started", "last scan", "finished"):
        table.add_column(column, no_wrap=True)
    for run in rows:
        table.add_row(
            _day(run.run_date),
            run.status,
            str(run.due_count),
            str(run.done_count),
            f"[red]{run.failed_count}[/]" if run.failed_count else "0",
            str(run.scans),
            _when(run.started_at),
            _when(run.last_scan_at),
            _when(run.finished_at),
        )
    console.print(table)


@runs_app.command("show")
def runs_show(run_date: str = typer.Argument(..., help="The business date, YYYY-MM-DD or dd/mm/yyyy.")) -> None:
    """One run: its counts and, per task, what its last scan found due (or what it did)."""
    on = _parse_day(run_date, "DATE")
    wire()
    from jobs.charge_review import OnCallError
    from jobs.run_review import run_detail

    with _session() as session:
        try:
            detail = run_detail(session, on)
        except OnCallError as exc:
            _refused(exc)
    run = detail.run
    console.print(
        f"[bold]Billing run {_day(run.run_date)}[/]: {run.status} — due {run.due_count}, done {run.done_count}, "
        f"failed {run.failed_count}, {run.scans} scan(s); started {_when(run.started_at)}, "
        f"last scan {_when(run.last_scan_at)}, finished {_when(run.finished_at)}"
    )
    if detail.tasks:
        table = Table(title="Per task")
        for column in ("task", "due at last scan", "done", "failed", "latest failed ids"):
            table.add_column(column)
        for task in detail.tasks:
            ids = ", ".join(str(row_id) for row_id in task.failed_ids[-10:])
            table.add_row(task.task, _count(task.due), _count(task.done), _count(task.failed), ids)
        console.print(table)
    if run.failed_count:
        console.print(
            f"{run.failed_count} row(s) failed in a chunk: each was retried on its own message (a message that "
            "kept failing is in `renova dead-letters list`), and a later scan finds any still due"
        )


def _count(value: int | None) -> str:
    return "—" if value is None else str(value)


# --- charges ---------------------------------------------------------------------------------------


@charges_app.command("list")
def charges_list(
    status: list[str] | None = typer.Option(
        None,
        "--status",
        help="failed, unknown or pending (repeatable; pending means sent over 2 minutes ago). Default: all three.",
    ),
    since: str | None = typer.Option(None, help="Attempts made on or after this date (YYYY-MM-DD or dd/mm/yyyy)."),
    until: str | None = typer.Option(None, help="Attempts made on or before this date."),
    code: str | None = typer.Option(None, "--code", help="The gateway's decline code, e.g. insufficient_funds."),
    organization: int | None = typer.Option(
        None, "--organization", min=1, max=MAX_ID, help="Only this organization's id."
    ),
    limit: int = typer.Option(50, "--limit", min=1, max=1000, help="How many, newest first."),
    offset: int = typer.Option(0, "--offset", min=0, help="Skip this many (the next page)."),
) -> None:
    """Charge attempts on-call should look at: declined, unknown, or pending for too long."""
    first = _parse_day(since, "--since") if since else None
    last = _parse_day(until, "--until") if until else None
    wire()
    from jobs.charge_review import OnCallError, list_charges

    with _session() as session:
        try:
            rows = list_charges(
                session,
                statuses=status or None,
                since=first,
                until=last,
                decline_code=code,
                organization_id=organization,
                limit=limit,
                offset=offset,
                now=current_now(),
                timezone=get_settings().billing_timezone,
            )
        except OnCallError as exc:
            _refused(exc)
    if not rows:
        console.print("no charges to review")
        return
    table = Table(title=f"Charges ({len(rows)}) — `renova charges show ID` for the gateway's answers")
    # Short facts never wrap; the long ones fold, so the table still reads in an 80-column terminal.
    for column in ("id", "made", "organization", "invoice", "try", "amount", "status", "code", "retry on"):
        short = column in ("id", "try", "amount", "status")
        table.add_column(column, no_wrap=short, overflow="ellipsis" if short else "fold")
    for row in rows:
        table.add_row(
            str(row.id),
            _when(row.created_at),
            f"{row.organization_name} (#{row.organization_id})",
            f"{row.invoice_id} ({row.invoice_status})",
            str(row.attempt),
            _money(row.amount_cents),
            row.status,
            (row.gateway_code or "") + (" (hard)" if row.hard_decline else ""),
            _day(row.next_retry_on),
        )
    console.print(table)


@charges_app.command("show")
def charges_show(charge_id: int = id_argument("The charge's id (see `renova charges list`).")) -> None:
    """One attempt in full: every attempt of its invoice, the invoice, the subscription, and the
    subscription's timeline (ledger, notices, change requests, audit events)."""
    wire()
    from jobs.charge_review import OnCallError, charge_detail

    with _session() as session:
        try:
            detail = charge_detail(session, charge_id)
        except OnCallError as exc:
            _refused(exc)
    _print_detail(detail)


def _print_detail(detail: ChargeDetail) -> None:
    charge, invoice, subscription = detail.charge, detail.invoice, detail.subscription
    console.print(
        f"[bold]Charge {charge.id}[/]: attempt {charge.attempt} of invoice {invoice.id}, "
        f"{_money(charge.amount_cents)}, {charge.status}"
        + (f" — {charge.gateway_code}: {charge.gateway_message}" if charge.gateway_code else "")
    )
    attempts = Table(title="Attempts of the invoice")
    for column in ("try", "id", "status", "amount", "card", "made", "resolved", "code", "next retry"):
        attempts.add_column(column, no_wrap=True)
    attempts.add_column("gateway id", overflow="fold")  # what the PSP's dashboard and webhooks call it
    attempts.add_column("gateway message", overflow="fold")
    for attempt in detail.attempts:
        attempts.add_row(
            str(attempt.attempt),
            str(attempt.id),
            attempt.status,
            _money(attempt.amount_cents),
            f"…{attempt.card_last4}" if attempt.card_last4 else "—",
            _when(attempt.created_at),
            _when(attempt.resolved_at),
            (attempt.gateway_code or "") + (" (hard)" if attempt.hard_decline else ""),
            _day(attempt.next_retry_on),
            attempt.gateway_id or "—",
            attempt.gateway_message or "",
        )
    console.print(attempts)
    boletos = ", ".join(f"#{boleto.sequence} {boleto.status} due {_day(boleto.due_date)}" for boleto in invoice.boletos)
    amounts = f"amount {_money(invoice.amount_cents)}, credit {_money(invoice.discount_cents)}"
    period = f"period {_day(invoice.period_start)} to {_day(invoice.period_end)}, due {_day(invoice.due_date)}"
    console.print(
        f"[bold]Invoice {invoice.id}[/] ({invoice.kind}, {invoice.method}): {invoice.status} — "
        f"{_money(invoice.total_cents)} ({amounts}), {period}"
        + (f", paid {_day(invoice.paid_on)}" if invoice.paid_on else "")
        + (f"; boletos: {boletos}" if boletos else "")
    )
    card = subscription.card
    method = subscription.payment_method + (
        f" (→ {subscription.pending_payment_method} at renewal)" if subscription.pending_payment_method else ""
    )
    console.print(
        f"[bold]Subscription {subscription.id}[/] of {subscription.organization_name} "
        f"(#{subscription.organization_id}): {subscription.status}, {subscription.cycle}, {method}, "
        f"period {_day(subscription.current_period_start)} to {_day(subscription.current_period_end)}, "
        f"balance {_money(subscription.balance_cents)}"
        + (", cancels at period end" if subscription.cancel_at_period_end else "")
        + (
            f"; card on file {card.brand} …{card.last4} ({card.exp_month:02d}/{card.exp_year})"
            if card
            else "; no card on file"
        )
    )
    timeline = Table(title="Timeline of the subscription")
    for column in ("when", "what", "kind"):
        timeline.add_column(column, no_wrap=True)
    timeline.add_column("detail", overflow="fold")
    for entry in detail.timeline:
        timeline.add_row(_when(entry.at), entry.source.replace("_", " "), entry.kind, _entry_detail(entry))
    console.print(timeline)


def _entry_detail(entry: Any) -> str:
    if entry.source == "ledger":
        invoice = f" (invoice {entry.invoice_id})" if entry.invoice_id else ""
        return f"{_money(entry.amount_cents)} {entry.description}{invoice}"
    if entry.source == "notice":
        return f"{entry.status}" + (f", sent {_when(entry.sent_at)}" if entry.sent_at else "")
    if entry.source == "change_request":
        return f"{entry.status}" + (f": {entry.error_code}" if entry.error_code else "")
    return f"{entry.actor} on {entry.target}: {entry.reason}"


def _gateway() -> Any:
    from jobs.context import runtime

    return runtime().gateway_factory()


@charges_app.command("retry")
def charges_retry(
    charge_id: int = id_argument("A failed charge: its invoice gets a new attempt now."),
    reason: str = typer.Option(..., help=REASON_HELP),
    actor: str | None = typer.Option(None, help=ACTOR_HELP),
) -> None:
    """Charge the invoice of a failed charge again now, with the card on file, under dunning's rules
    (open card invoice, a card on file, nothing in flight, not canceled, no hard decline on the same
    card); waits for the gateway's answer."""
    wire()
    from jobs.charge_actions import retry_charge_now
    from jobs.charge_review import OnCallError, charge_row
    from jobs.context import runtime

    with _session() as session:
        try:
            result = retry_charge_now(
                session,
                charge_id,
                actor=actor_name(actor),
                reason=reason,
                now=current_now(),
                config=runtime().config,
                gateway=_gateway(),
            )
        except OnCallError as exc:
            _refused(exc)
        attempt = charge_row(session, result.charge_id)
    outcome = attempt.status + (f" — {attempt.gateway_code}: {attempt.gateway_message}" if attempt.gateway_code else "")
    console.print(
        f"charge {charge_id}: new attempt {result.attempt} (charge {result.charge_id}) of invoice {result.invoice_id}, "
        f"{_money(result.amount_cents)} on the card ending {result.card_last4}: [bold]{outcome}[/]"
    )
    console.print(
        f"invoice {result.invoice_id} is {result.invoice_status}; "
        f"subscription {result.subscription_id} is {result.subscription_status}"
    )


@charges_app.command("reconcile")
def charges_reconcile(
    charge_id: int = id_argument("An unknown charge, or one pending for over 2 minutes."),
    reason: str = typer.Option(..., help=REASON_HELP),
    actor: str | None = typer.Option(None, help=ACTOR_HELP),
) -> None:
    """Resolve a charge whose outcome is unknown by looking its key up at the gateway (never a new
    charge: a key the gateway never saw is sent again, deduplicated by that key)."""
    wire()
    from jobs.charge_actions import reconcile_now
    from jobs.charge_review import OnCallError
    from jobs.context import runtime
    from models.states import UNRESOLVED_CHARGE

    with _session() as session:
        try:
            result = reconcile_now(
                session,
                _gateway(),
                charge_id,
                actor=actor_name(actor),
                reason=reason,
                now=current_now(),
                config=runtime().config,
            )
        except OnCallError as exc:
            _refused(exc)
    console.print(
        f"charge {charge_id}: {result.status_before} → [bold]{result.status}[/]; "
        f"invoice {result.invoice_id} is {result.invoice_status}"
    )
    if result.status in UNRESOLVED_CHARGE:
        console.print("the gateway did not answer: the charge stays unresolved and is reconciled again by the tick")


# --- invoices --------------------------------------------------------------------------------------


@invoices_app.command("uncollectible")
def invoices_uncollectible(
    invoice_id: int = id_argument("An open, past-due invoice."),
    reason: str = typer.Option(..., help=REASON_HELP),
    actor: str | None = typer.Option(None, help=ACTOR_HELP),
) -> None:
    """Write off an open, past-due invoice: dunning ends for it (no more retries, its boleto is
    cancelled at the gateway) and its subscription, whose period was not paid, is suspended."""
    wire()
    from jobs.charge_actions import mark_uncollectible
    from jobs.charge_review import OnCallError
    from jobs.context import runtime

    with _session() as session:
        try:
            result = mark_uncollectible(
                session,
                invoice_id,
                actor=actor_name(actor),
                reason=reason,
                now=current_now(),
                config=runtime().config,
                gateway=_gateway(),
            )
        except OnCallError as exc:
            _refused(exc)
    console.print(f"invoice {invoice_id} ({_money(result.total_cents)}) is now [bold]uncollectible[/]")
    if result.retries_cancelled:
        console.print(f"scheduled retries dropped: charge(s) {', '.join(map(str, result.retries_cancelled))}")
    if result.boletos_canceled:
        console.print(f"boleto(s) cancelled at the gateway: {', '.join(result.boletos_canceled)}")
    console.print(
        f"subscription {result.subscription_id}: {result.subscription_status_before} → {result.subscription_status}"
    )


# --- the audit log ---------------------------------------------------------------------------------


@audit_app.command("list")
def audit_list(
    actor: str | None = typer.Option(None, help="Only this actor."),
    action: str | None = typer.Option(None, help="An action (charge.retry) or a family of them (charge)."),
    target: str | None = typer.Option(None, help="TYPE or TYPE:ID, e.g. invoice:42, charge, message:<id>."),
    since: str | None = typer.Option(None, help="On or after this date (YYYY-MM-DD or dd/mm/yyyy)."),
    limit: int = typer.Option(100, "--limit", min=1, max=10000, help="How many, newest first."),
) -> None:
    """Who did what from the CLI or the console, and why, newest first."""
    first = _parse_day(since, "--since") if since else None
    target_type, _, target_id = (target or "").partition(":")
    wire()
    from jobs.audit import list_audit
    from jobs.charge_review import local_midnight

    with _session() as session:
        rows = list_audit(
            session,
            actor=actor,
            action=action,
            target_type=target_type or None,
            target_id=target_id or None,
            since=local_midnight(first, get_settings().billing_timezone) if first else None,
            limit=limit,
        )
    if not rows:
        console.print("no audit events")
        return
    table = Table(title=f"Audit events ({len(rows)})")
    for column in ("when", "actor", "action", "target"):
        table.add_column(column, no_wrap=True)
    table.add_column("reason", overflow="fold")
    table.add_column("details", overflow="fold")
    for row in rows:
        table.add_row(
            _when(row.created_at),
            row.actor,
            row.action,
            f"{row.target_type}:{row.target_id}" if row.target_type else (row.target_id or "—"),
            row.reason,
            json.dumps(row.details, ensure_ascii=False, default=str) if row.details else "",
        )
    console.print(table)
