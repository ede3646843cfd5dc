"""`renova attention`: stored work that failed too often and waits for an operator (jobs.work_attempts)."""

from __future__ import annotations

from datetime import UTC

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from workers.cli_common import actor_name, console, current_now, fail, id_argument, wire

attention_app = typer.Typer(
    no_args_is_help=True,
    help="Stuck work: change requests, gateway events and notices that failed too often and are no longer retried.",
)

KIND_HELP = "change_request, gateway_event or notification"


@attention_app.command("list")
def attention_list(kind: str | None = typer.Option(None, "--kind", help=f"Only this kind: {KIND_HELP}.")) -> None:
    """Rows that need attention, longest waiting first: kind, id, failed attempts, last error, since when."""
    wire()
    from jobs.work_attempts import AttentionError, list_needing_attention
    from workers.db import get_session_factory

    with get_session_factory()() as session:
        try:
            stuck = list_needing_attention(session, kind)
        except AttentionError as exc:
            fail(escape(str(exc)), code=2)
    if not stuck:
        console.print("nothing needs attention" + (f" ({kind})" if kind else ""))
        return
    table = Table(title=f"Needs attention ({len(stuck)})")
    for column in ("kind", "id", "attempts", "last error", "since (UTC)"):
        # Ids are copied into `attention retry`: never wrapped.
        table.add_column(column, overflow="fold", no_wrap=column in ("kind", "id"))
    for item in stuck:
        # A gateway event is also shown by the gateway's own id, which its logs and the sandbox use.
        shown_id = str(item.id) if item.key == str(item.id) else f"{item.id} ({item.key})"
        since = f"{item.since.astimezone(UTC):%Y-%m-%d %H:%M:%S}"
        # An error's text is shown as it is, never read as rich markup.
        table.add_row(item.kind, Text(shown_id), str(item.attempts), Text(item.last_error or ""), since)
    console.print(table)


@attention_app.command("retry")
def attention_retry(
    kind: str = typer.Argument(..., help=KIND_HELP),
    row_id: int = id_argument("The row's id, as `renova attention list` shows it.", metavar="ID"),
    reason: str = typer.Option(..., help="Why it can be retried now (kept in the audit log)."),
    actor: str | None = typer.Option(None, help="Who retries it (audit log); default: the login name."),
) -> None:
    """Put one row back in play and send its message now; recorded in the audit log.

    Its failed attempts are kept: if it fails again for the same kind of reason it needs attention
    again at once, instead of failing five more times."""
    wire()
    from jobs.work_attempts import AttentionError, retry_now
    from workers.db import get_session_factory

    if not reason.strip():
        fail("--reason must say why the row can be retried", code=2)
    now = current_now()
    with get_session_factory()() as session:
        try:
            row = retry_now(session, kind, row_id, actor_name(actor), reason, now)
        except AttentionError as exc:
            session.rollback()
            fail(escape(str(exc)), code=2)
        attempts = row.attempts
        session.commit()  # the message leaves once the row is back in play
    console.print(f"{kind} {row_id} retried now (after {attempts} failed attempts)")
