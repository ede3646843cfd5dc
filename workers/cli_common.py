"""What every `renova` command module shares: the console, a clear failure, wiring the broker, and
"now" as every process reads it. Command groups live in `workers/cli_*.py` and are registered in
`workers/cli.py`."""

from __future__ import annotations

import time
from datetime import date, datetime
from typing import Any, NoReturn

import dramatiq.errors
import redis
import sqlalchemy.exc
import typer
from rich.console import Console

from jobs.contract import MAX_ID
from workers.settings import get_settings

console = Console()


def id_argument(help: str = "", metavar: str | None = None) -> Any:
    """A required row id, or a list of them when the parameter is a list: 1 to MAX_ID (a bigint), so
    a larger number is refused with typer's readable message instead of by the database."""
    return typer.Argument(..., min=1, max=MAX_ID, help=help, metavar=metavar)


def use_environment(env: dict[str, str]) -> None:
    """Point this process's settings, database and (not yet built) broker at another stack."""
    import os

    from workers.db import reset, resolved_urls

    os.environ.update(env)
    get_settings.cache_clear()
    reset()
    resolved_urls.cache_clear()


def wire() -> None:
    """Build the broker and bind the actors; must run before any actor module is imported."""
    import workers.broker  # noqa: F401


# A dependency out of reach (PostgreSQL, Redis): a long-running command waits it out instead of exiting.
DEPENDENCY_ERRORS: tuple[type[BaseException], ...] = (
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    redis.ConnectionError,
    redis.TimeoutError,
    dramatiq.errors.ConnectionError,
    ConnectionError,
)


class Outage:
    """An outage seen from a loop: how long it has lasted, what the last error was, and how long to
    wait before the next attempt (doubling from half a second, never more than `limit`)."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.attempts = 0
        self.last_error = ""

    def failed(self, exc: BaseException, *, limit: float) -> float:
        self.attempts += 1
        self.last_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
        return max(0.1, min(limit, 0.5 * 2 ** (self.attempts - 1)))

    def describe(self) -> str:
        return f"{self.last_error}; {self.attempts} failed attempt(s) over {time.monotonic() - self.started:.0f}s"


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
