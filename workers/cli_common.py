"""What every `renova` command module shares: the console, a clear failure, wiring the broker, and
"now" as every process reads it. Command groups live in `workers/cli_*.py` and are registered in
`workers/cli.py`."""

from __future__ import annotations

from datetime import date, datetime
from typing import NoReturn

import typer
from rich.console import Console

from workers.settings import get_settings

console = Console()


def wire() -> None:
    """Build the broker and bind the actors; must run before any actor module is imported."""
    import workers.broker  # noqa: F401


def fail(message: str, code: int = 1) -> NoReturn:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def current_now() -> datetime:
    """ "now" as every process reads it: the test clock when one is set (development and test), else
    the wall clock (`jobs.clock.now`)."""
    from jobs import clock
    from workers.broker import billing_config
    from workers.db import get_session_factory

    with get_session_factory()() as session:
        return clock.now(session, billing_config(get_settings()))


def business_today() -> date:
    """Today's business date: "now"'s date in the billing time zone (the test clock's when one is set)."""
    from models.calendar import local_today

    return local_today(current_now(), get_settings().billing_timezone)


def actor_name(given: str | None) -> str:
    """Who acts, for the audit log: `--actor`, else the login name."""
    import os

    return given or os.environ.get("USER", "operator")
