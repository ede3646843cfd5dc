"""`renova operators`: who may log in to the ops console (viewers look, operators act)."""

from __future__ import annotations

import sys
from datetime import UTC, datetime

import typer
from rich.table import Table

from workers.cli_common import actor_name, console, fail, wire

operators_app = typer.Typer(no_args_is_help=True, help="People who log in to the ops console (/console).")


@operators_app.command("add")
def operators_add(
    email: str = typer.Argument(..., help="The operator's e-mail (their login)."),
    role: str = typer.Option("viewer", "--role", help="viewer (looks) or operator (acts)."),
    password_stdin: bool = typer.Option(False, "--password-stdin", help="Read the password from standard input."),
    actor: str | None = typer.Option(None, help="Who adds them (audit log; default: your login name)."),
) -> None:
    """Add an operator, or give an existing one a new password and role (and reactivate them)."""
    wire()
    from jobs.operators import OperatorError, add_operator
    from workers.db import get_session_factory

    if password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    with get_session_factory()() as session:
        try:
            operator = add_operator(session, email, password, role, actor=actor_name(actor), now=datetime.now(UTC))
        except OperatorError as exc:
            session.rollback()
            fail(str(exc), code=2)
        session.commit()
        console.print(f"operator {operator.email} ({operator.role}) can log in at /console")


@operators_app.command("list")
def operators_list() -> None:
    """Every operator, active or not, with their role and last login."""
    wire()
    from jobs.operators import list_operators
    from workers.db import get_session_factory

    with get_session_factory()() as session:
        rows = list_operators(session)
    if not rows:
        console.print("no operators yet: add one with `renova operators add EMAIL --role operator`")
        return
    table = Table()
    for column in ("e-mail", "role", "active", "last login (UTC)"):
        table.add_column(column)
    for row in rows:
        last = row.last_login_at.strftime("%Y-%m-%d %H:%M") if row.last_login_at else "never"
        table.add_row(row.email, row.role, "yes" if row.active else "no", last)
    console.print(table)


@operators_app.command("disable")
def operators_disable(
    email: str = typer.Argument(...),
    reason: str = typer.Option(..., "--reason", help="Why (audit log)."),
    actor: str | None = typer.Option(None, help="Who (audit log; default: your login name)."),
) -> None:
    """Stop an operator from logging in (their open sessions end at the next page)."""
    wire()
    from jobs.operators import OperatorError, disable_operator
    from workers.db import get_session_factory

    if not reason.strip():
        fail("--reason must say why", code=2)
    with get_session_factory()() as session:
        try:
            operator = disable_operator(session, email, actor=actor_name(actor), reason=reason.strip())
        except OperatorError as exc:
            session.rollback()
            fail(str(exc), code=2)
        session.commit()
        console.print(f"operator {operator.email} disabled")
