"""The `renova` command line: one entry point for every process and for operators."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import typer
from rich.table import Table

from workers.cli_attention import attention_app
from workers.cli_chaos import chaos
from workers.cli_common import (
    DEPENDENCY_ERRORS,
    Outage,
    business_today,
    console,
    current_now,
    fail,
    id_argument,
    use_environment,
    wire,
)
from workers.cli_endpoints import endpoints_app
from workers.cli_oncall import audit_app, charges_app, invoices_app, runs_app
from workers.cli_operators import operators_app
from workers.settings import Settings, SettingsError, get_settings

if TYPE_CHECKING:
    from jobs.plans import PlanError, PriceRow

app = typer.Typer(no_args_is_help=True, help="Renova — subscription billing workers for CONECTA.")
db_app = typer.Typer(no_args_is_help=True, help="Database schema (Alembic migrations).")
stack_app = typer.Typer(no_args_is_help=True, help="The embedded development stack (PostgreSQL + Redis).")
app.add_typer(db_app, name="db")
app.add_typer(stack_app, name="stack")
dead_app = typer.Typer(no_args_is_help=True, help="Messages that failed for good (Dramatiq's dead-letter queues).")
app.add_typer(dead_app, name="dead-letters")
plans_app = typer.Typer(no_args_is_help=True, help="Plan prices: what each product costs per billing cycle.")
app.add_typer(plans_app, name="plans")

refunds_app = typer.Typer(no_args_is_help=True, help="Refunds of ended subscriptions' balances (on-call).")
app.add_typer(refunds_app, name="refunds")
ledger_app = typer.Typer(no_args_is_help=True, help="Proofs that no money was kept or lost.")
app.add_typer(ledger_app, name="ledger")
clock_app = typer.Typer(
    no_args_is_help=True, help="The test clock: a frozen 'now' for every process (development and test only)."
)
app.add_typer(clock_app, name="clock")
app.add_typer(runs_app, name="runs")
app.add_typer(charges_app, name="charges")
app.add_typer(invoices_app, name="invoices")
app.add_typer(audit_app, name="audit")
app.add_typer(attention_app, name="attention")
app.add_typer(operators_app, name="operators")
app.add_typer(endpoints_app, name="endpoints")
app.command()(chaos)


@app.callback()
def main() -> None:
    """Load the configuration first, so a bad setting stops every command with a clear message."""
    try:
        get_settings()
    except SettingsError as exc:
        fail(str(exc), code=2)


# --- database --------------------------------------------------------------------------------


@db_app.command("upgrade")
def db_upgrade(revision: str = typer.Argument("head", help="Target revision.")) -> None:
    """Apply the migrations up to REVISION (the `release` process)."""
    from workers.db import resolved_urls
    from workers.migrate import upgrade

    url, _ = resolved_urls()
    upgrade(url, revision)
    console.print(f"database upgraded to [bold]{revision}[/]")


@db_app.command("current")
def db_current() -> None:
    """Show the schema revision of the database."""
    from workers.db import get_engine
    from workers.migrate import current_revision

    console.print(current_revision(get_engine()) or "(empty database)")


# --- processes -------------------------------------------------------------------------------


def refuse_unsafe_start() -> None:
    """In production the worker, web and scheduler processes refuse to start with a development
    default (`production_problems`) or a test clock set, naming every problem at once."""
    from workers.db import get_session_factory
    from workers.settings import production_problems
    from workers.startup import refuse_test_clock_in_production

    settings = get_settings()
    problems = production_problems(settings) if settings.renova_env == "production" else []
    if settings.database_url is not None or settings.renova_env != "production":  # never start an embedded one
        try:
            with get_session_factory()() as session:
                refuse_test_clock_in_production(session)
        except SettingsError as exc:
            problems.append(str(exc))
        except DEPENDENCY_ERRORS as exc:
            # Starting while the database is down is allowed: the process waits it out, and production
            # reads the real clock whatever the database holds.
            console.print(f"[yellow]cannot check for a test clock now ({type(exc).__name__}): starting anyway[/]")
    if problems:
        fail("refused to start:\n" + "\n".join(f"  - {problem}" for problem in problems), code=2)


def runtime_environment() -> dict[str, str]:
    """The environment for child processes, with the embedded stack's URLs filled in."""
    from workers.db import resolved_urls

    database_url, redis_url = resolved_urls()
    return {**os.environ, "DATABASE_URL": database_url, "REDIS_URL": redis_url}


@app.command()
def worker(
    processes: int | None = typer.Option(None, help="Worker processes (default WORKER_PROCESSES)."),
    threads: int | None = typer.Option(None, help="Threads per process (default WORKER_THREADS)."),
    queues: list[str] | None = typer.Option(None, "--queue", "-Q", help="Only these queues (repeatable)."),
    except_queues: list[str] | None = typer.Option(
        None,
        "--except-queue",
        "-X",
        help="Every queue but these (repeatable), e.g. -X changes beside a -Q changes worker.",
    ),
) -> None:
    """Run the Dramatiq workers (the `worker` process)."""
    from workers.queues import QUEUES

    if queues and except_queues:
        fail("give either --queue or --except-queue, not both", code=2)
    if unknown := sorted((set(queues or []) | set(except_queues or [])) - set(QUEUES)):
        fail(f"unknown queue {', '.join(unknown)}: the queues are {', '.join(QUEUES)}", code=2)
    if except_queues:
        queues = [queue for queue in QUEUES if queue not in except_queues]
        if not queues:
            fail("--except-queue leaves no queue to consume", code=2)
    settings = get_settings()
    refuse_unsafe_start()
    args = [
        sys.executable,
        "-m",
        "dramatiq",
        "workers.broker",
        "--processes",
        str(processes or settings.worker_processes),
        "--threads",
        str(threads or settings.worker_threads),
    ]
    if queues:
        args += ["--queues", *queues]
    environment = {**runtime_environment(), "dramatiq_worker_timeout": str(settings.worker_idle_poll_ms)}
    os.execvpe(args[0], args, environment)


@stack_app.command("start")
def stack_start() -> None:
    """Start (or reuse) the embedded PostgreSQL and Redis and print their URLs."""
    from workers.embedded import EmbeddedStack

    stack = EmbeddedStack(get_settings().data_dir)
    console.print(f"DATABASE_URL={stack.postgres_url()}")
    console.print(f"REDIS_URL={stack.redis_url()}")


@stack_app.command("stop")
def stack_stop() -> None:
    """Stop the embedded PostgreSQL and Redis cleanly."""
    from workers.embedded import EmbeddedStack
    from workers.mail import stop_mail_sink

    stop_mail_sink(get_settings().data_dir)
    EmbeddedStack(get_settings().data_dir).stop()
    console.print("embedded stack stopped")


# --- diagnostics -----------------------------------------------------------------------------


def mask_url(url: str | None) -> str:
    if not url:
        return "(embedded)"
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # a Redis URL is not a SQLAlchemy URL, but has the same shape
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        if parts.password:
            return url.replace(parts.password, "***")
        return url


@app.command()
def doctor(
    ping: bool = typer.Option(False, help="Also send a message and wait for a worker to process it."),
) -> None:
    """Configuration (secrets masked), PostgreSQL, Redis, schema revision and queues."""
    from sqlalchemy import text

    settings = get_settings()
    config = Table(title="Configuration", show_header=True)
    config.add_column("setting")
    config.add_column("value")
    for name, field in settings.model_fields.items():
        value = getattr(settings, name)
        if name in ("database_url", "redis_url", "smtp_url"):
            shown = mask_url(value)
        elif name == "api_keys":
            shown = f"{len(value)} key(s)"
        elif value is None:
            shown = "(unset)"
        elif hasattr(value, "get_secret_value"):
            shown = "***"
        elif isinstance(value, tuple):
            shown = ",".join(str(item) for item in value)
        else:
            shown = str(value)
        config.add_row(field.alias or name, shown)
    console.print(config)

    healthy = True
    try:
        from workers.db import get_engine, resolved_urls
        from workers.migrate import current_revision, head_revision

        database_url, redis_url = resolved_urls()
        with get_engine().connect() as connection:
            version = connection.execute(text("SHOW server_version")).scalar()
        console.print(f"[green]✓[/] PostgreSQL {version} answers at {mask_url(database_url)}")
        current, head = current_revision(get_engine()), head_revision(database_url)
        if current == head:
            console.print(f"[green]✓[/] schema at revision {current} (head)")
            healthy = _doctor_clock(settings) and healthy
        else:
            healthy = False
            console.print(f"[red]✗[/] schema at {current or 'nothing'}, head is {head}: run `renova db upgrade`")
    except Exception as exc:
        healthy = False
        console.print(f"[red]✗[/] PostgreSQL: {exc}")
        redis_url = None

    if redis_url:
        try:
            from workers.queues import queue_depths

            depths = queue_depths(redis_url)
            console.print(f"[green]✓[/] Redis answers at {mask_url(redis_url)}")
            queues = Table(title="Queues")
            for column in ("queue", "ready", "delayed", "dead-letter"):
                queues.add_column(column)
            for depth in depths:
                queues.add_row(depth.queue, str(depth.ready), str(depth.delayed), str(depth.dead))
            console.print(queues)
        except Exception as exc:
            healthy = False
            console.print(f"[red]✗[/] Redis: {exc}")

    healthy = _doctor_production(settings) and healthy
    if healthy and ping:
        healthy = _ping_worker()
    if not healthy:
        raise typer.Exit(1)
    console.print("[bold green]healthy[/]")


def _doctor_production(settings: Settings) -> bool:
    """What production would refuse: problems in production, a warning elsewhere."""
    from workers.settings import production_problems

    problems = production_problems(settings)
    if not problems:
        console.print("[green]✓[/] production settings: nothing would be refused")
        return True
    mark = "[red]✗[/]" if settings.renova_env == "production" else "[yellow]![/]"
    heading = "refused in production" if settings.renova_env == "production" else "would be refused in production"
    for problem in problems:
        console.print(f"{mark} {heading}: {problem}")
    return settings.renova_env != "production"


def _doctor_clock(settings: Settings) -> bool:
    """The clock line: real, or the test clock's instant; a test clock in production is unhealthy."""
    from jobs import clock
    from workers.db import get_session_factory

    with get_session_factory()() as session:
        state = clock.clock_state(session)
    if state is None:
        console.print("[green]✓[/] clock: real")
    elif settings.allows_future_dates:
        console.print(f"[yellow]![/] {_describe_clock(state.now)}")
    else:
        console.print(
            f"[red]✗[/] clock: a test clock is set ({state.now.isoformat()}) but RENOVA_ENV={settings.renova_env} "
            "refuses it: run `renova clock reset`"
        )
        return False
    return True


def _ping_worker(timeout_seconds: float = 15.0) -> bool:
    from sqlalchemy import select

    wire()
    from jobs.health import ping
    from models.schema import AuditEvent
    from workers.db import get_session_factory

    token = uuid.uuid4().hex
    ping.send(token)
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        with get_session_factory()() as session:
            found = session.scalar(select(AuditEvent.id).where(AuditEvent.target_id == token))
        if found:
            console.print("[green]✓[/] a worker processed the ping message")
            return True
        time.sleep(0.2)
    console.print(f"[red]✗[/] no worker processed the ping within {timeout_seconds:.0f}s: is `renova worker` running?")
    return False


@app.command()
def scheduler(
    interval: float | None = typer.Option(None, help="Seconds between ticks (default TICK_INTERVAL_SECONDS)."),
) -> None:
    """Send `tick` every interval (the `clock` process). Safe to run more than one."""
    import signal

    refuse_unsafe_start()
    wire()
    from jobs.tick import tick

    settings = get_settings()
    period = interval or settings.tick_interval_seconds
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    console.print(
        f"scheduler: tick every {period:g}s, runs due after {settings.billing_run_at:%H:%M} {settings.billing_timezone}"
    )
    next_tick = time.monotonic()
    outage: Outage | None = None
    while not stopping:
        try:
            # The test clock, when one is set (development and test), moves every process's "now".
            tick.send(current_now().isoformat(), settings.billing_run_at.isoformat())
        except DEPENDENCY_ERRORS as exc:
            # The clock outlives PostgreSQL and Redis: a missed tick is caught up by the next one.
            outage = outage or Outage()
            wait = outage.failed(exc, limit=period)
            console.print(f"[yellow]scheduler: tick not sent ({outage.describe()}); trying again in {wait:g}s[/]")
            next_tick = time.monotonic() + wait
        else:
            if outage is not None:
                console.print(f"scheduler: ticking again after {outage.describe()}")
                outage = None
            next_tick += period
        while not stopping and time.monotonic() < next_tick:
            time.sleep(min(0.2, max(0.0, next_tick - time.monotonic())))


@app.command("run-day")
def run_day_command(
    run_date: str | None = typer.Option(
        None, "--date", help="Business date to run, YYYY-MM-DD (default today, by the test clock when one is set)."
    ),
    wait: bool = typer.Option(False, help="Block until the run's work is done and print its counts."),
    timeout: float = typer.Option(600.0, help="With --wait: give up after this many seconds."),
) -> None:
    """Run (or re-run) the billing run for a date now. Workers do the work; dates after today are
    refused unless RENOVA_ENV is development or test ("today" follows the test clock when one is set)."""
    from sqlalchemy import select

    wire()
    from jobs.billing_day import FutureDateRefused, refuse_future_date, reopen_run, scan_run
    from jobs.context import runtime
    from models.calendar import local_today
    from models.schema import BillingRun
    from models.states import RunStatus
    from workers.db import get_session_factory, resolved_urls
    from workers.queues import queue_depths

    now = current_now()
    if run_date is None:
        on = local_today(now, runtime().config.timezone)
    else:
        try:
            on = date.fromisoformat(run_date)
        except ValueError:
            fail(f"--date must be YYYY-MM-DD, got {run_date!r}")
    try:
        refuse_future_date(on, now, runtime().config)
    except FutureDateRefused as exc:
        fail(str(exc))

    session_factory = get_session_factory()
    with session_factory() as session:
        reopen_run(session, on)
        session.commit()
        counts = scan_run(session, on, now, runtime().config)
    console.print(
        f"run {on.isoformat()}: due {sum(counts.values())} — "
        + ", ".join(f"{name} {count}" for name, count in counts.items() if count)
        if sum(counts.values())
        else f"run {on.isoformat()}: nothing due"
    )
    if not wait:
        return

    _, redis_url = resolved_urls()
    deadline = time.monotonic() + timeout
    outage: Outage | None = None
    while True:
        if time.monotonic() > deadline:
            fail(f"run {on.isoformat()} not done after {timeout:.0f}s: is `renova worker` running?")
        try:
            with session_factory() as session:
                run = session.scalar(select(BillingRun).where(BillingRun.run_date == on))
                if run is not None and run.status == RunStatus.DONE:
                    break
            busy = any(depth.ready or depth.delayed for depth in queue_depths(redis_url, ("billing",)))
            if not busy:
                time.sleep(0.5)
                with session_factory() as session:
                    scan_run(session, on, current_now(), runtime().config)
            else:
                time.sleep(0.5)
        except DEPENDENCY_ERRORS as exc:
            # Waiting outlives an outage too: the run's work is in the database and the queues.
            outage = outage or Outage()
            wait = outage.failed(exc, limit=5.0)
            console.print(f"[yellow]waiting: {outage.describe()}; trying again in {wait:g}s[/]")
            time.sleep(wait)
            continue
        if outage is not None:
            console.print(f"waiting again after {outage.describe()}")
            outage = None
    with session_factory() as session:
        run = session.scalar(select(BillingRun).where(BillingRun.run_date == on))
        assert run is not None
        table = Table(title=f"Billing run {on.isoformat()}")
        for column in ("due", "done", "failed", "scans", "status"):
            table.add_column(column)
        table.add_row(str(run.due_count), str(run.done_count), str(run.failed_count), str(run.scans), run.status)
        console.print(table)


@app.command()
def web(
    host: str | None = typer.Option(None, help="Address (default WEB_HOST)."),
    port: int | None = typer.Option(None, help="Port (default WEB_PORT)."),
) -> None:
    """Serve the HTTP API for the main application, gateway webhooks and /healthz (the `web` process)."""
    import uvicorn

    settings = get_settings()
    refuse_unsafe_start()
    uvicorn.run(
        "workers.api:create_app",
        factory=True,
        host=host or settings.web_host,
        port=port or settings.web_port,
        log_level="info",
    )


def _broker_client():
    wire()
    from workers.broker import broker

    return broker, broker.client


@dead_app.command("list")
def dead_letters_list(queue: list[str] | None = typer.Option(None, "--queue", "-Q", help="Only these queues.")) -> None:
    """Dead messages, oldest first: queue, id, actor, arguments (tokens and e-mails masked), last error."""
    from workers.dead_letters import dead_letters
    from workers.queues import QUEUES

    _, client = _broker_client()
    found = dead_letters(client, tuple(queue) if queue else QUEUES)
    if not found:
        console.print("no dead letters")
        return
    table = Table(title=f"Dead letters ({len(found)})")
    for column in ("queue", "message id", "actor", "arguments", "retries", "last error", "died at (UTC)"):
        # Ids are copied into `requeue --id`: never wrapped.
        table.add_column(column, overflow="fold", no_wrap=column == "message id")
    for letter in found:
        table.add_row(
            letter.queue,
            letter.message_id,
            letter.actor,
            letter.arguments[:120],
            str(letter.retries),
            letter.error[:160],
            f"{letter.died_at:%Y-%m-%d %H:%M:%S}",
        )
    console.print(table)


@dead_app.command("requeue")
def dead_letters_requeue(
    reason: str = typer.Option(..., help="Why (kept in the audit log)."),
    message_id: list[str] | None = typer.Option(None, "--id", help="Message ids to requeue (repeatable)."),
    all_messages: bool = typer.Option(False, "--all", help="Requeue every dead letter of the queues selected."),
    queue: list[str] | None = typer.Option(None, "--queue", "-Q", help="Only these queues."),
    actor: str = typer.Option(os.environ.get("USER", "operator"), help="Who is requeueing (audit log)."),
) -> None:
    """Put dead messages back on their queues with a fresh retry budget, and record who and why."""
    from workers.dead_letters import dead_letters, requeue_audited
    from workers.queues import QUEUES

    if not reason.strip():
        fail("--reason must say why the messages are requeued")
    if not message_id and not all_messages:
        fail("name the messages with --id, or pass --all")
    broker, client = _broker_client()
    chosen = [
        letter
        for letter in dead_letters(client, tuple(queue) if queue else QUEUES)
        if all_messages or letter.message_id in (message_id or [])
    ]
    missing = set(message_id or []) - {letter.message_id for letter in chosen}
    if missing:
        fail(f"no dead letter with id {', '.join(sorted(missing))}")

    from workers.db import get_session_factory

    with get_session_factory()() as session:
        requeued = requeue_audited(session, broker, client, chosen, actor=actor, reason=reason)
        session.commit()
    console.print(f"requeued {len(requeued)} message(s)")


@dead_app.command("delete")
def dead_letters_delete(
    reason: str = typer.Option(..., help="Why they must never run (kept in the audit log)."),
    message_id: list[str] | None = typer.Option(None, "--id", help="Message ids to delete (repeatable)."),
    all_messages: bool = typer.Option(False, "--all", help="Delete every dead letter of the queues selected."),
    queue: list[str] | None = typer.Option(None, "--queue", "-Q", help="Only these queues."),
    actor: str | None = typer.Option(None, help="Who is deleting (audit log; default the login name)."),
) -> None:
    """Drop dead messages for good (work made obsolete, e.g. by a manual fix), and record who and why.
    Bad input (no reason, no --id nor --all, an unknown id) exits 2 with nothing deleted."""
    from workers.cli_common import actor_name
    from workers.dead_letters import dead_letters, delete_audited
    from workers.queues import QUEUES

    if not reason.strip():
        fail("--reason must say why the messages are deleted", code=2)
    if not message_id and not all_messages:
        fail("name the messages with --id, or pass --all", code=2)
    unknown_queues = sorted(set(queue or []) - set(QUEUES))
    if unknown_queues:
        fail(f"unknown queue {', '.join(unknown_queues)}; use {', '.join(QUEUES)}", code=2)
    _, client = _broker_client()
    chosen = [
        letter
        for letter in dead_letters(client, tuple(queue) if queue else QUEUES)
        if all_messages or letter.message_id in (message_id or [])
    ]
    missing = set(message_id or []) - {letter.message_id for letter in chosen}
    if missing:
        fail(f"no dead letter with id {', '.join(sorted(missing))}", code=2)

    from workers.db import get_session_factory

    with get_session_factory()() as session:
        deleted = delete_audited(session, client, chosen, actor=actor_name(actor), reason=reason.strip())
        session.commit()
    console.print(f"deleted {len(deleted)} message(s)")


# --- plan prices ---------------------------------------------------------------------------------

# The command's option for each input `jobs.plans` names in its errors.
_PLAN_OPTIONS = {
    "product": "PRODUCT",
    "monthly_cents": "--monthly",
    "annual_cents": "--annual",
    "effective_from": "--from",
    "reason": "--reason",
}


def _plan_error(exc: PlanError) -> NoReturn:
    options = ", ".join(_PLAN_OPTIONS.get(name, name) for name in exc.fields)
    fail(f"{options}: {exc.message}" if options else exc.message, code=2)


def _print_prices(rows: list[PriceRow], on: date, title: str) -> None:
    from models.money import format_brl

    table = Table(title=f"{title} on {on.isoformat()}")
    for column in ("product", "cycle", "price", "effective from", "scheduled changes"):
        table.add_column(column, no_wrap=column != "scheduled changes")
    for row in rows:
        table.add_row(
            row.product,
            row.cycle,
            format_brl(row.price_cents) if row.price_cents is not None else "—",
            row.effective_from.isoformat() if row.effective_from else "—",
            "\n".join(
                f"{format_brl(change.price_cents)} from {change.effective_from.isoformat()}" for change in row.scheduled
            )
            or "—",
        )
    console.print(table)


@plans_app.command("set")
def plans_set(
    product: str = typer.Argument(..., help="Product, e.g. conecta."),
    monthly: str | None = typer.Option(None, help="Monthly price in reais: 49.90 or 49,90."),
    annual: str | None = typer.Option(None, help="Annual price in reais: 479.00 or 479,00."),
    effective_from: str | None = typer.Option(
        None, "--from", help="First day the prices apply, YYYY-MM-DD (default today; never before today)."
    ),
    reason: str = typer.Option("", help="Why (kept in the audit log)."),
    actor: str = typer.Option(os.environ.get("USER", "operator"), help="Who is setting the prices (audit log)."),
) -> None:
    """Set a product's prices from a date on. Each subscription pays the new price from its next
    renewal on that date or later; invoices already issued keep their amount."""
    from jobs.plans import PlanError, parse_iso_date, parse_reais, price_list, set_prices
    from workers.db import get_session_factory

    today = business_today()
    try:
        monthly_cents = parse_reais(monthly, "monthly_cents") if monthly is not None else None
        annual_cents = parse_reais(annual, "annual_cents") if annual is not None else None
    except PlanError as exc:
        _plan_error(exc)
    if effective_from is None:
        starts = today
    else:
        try:
            starts = parse_iso_date(effective_from)
        except ValueError:
            fail(f"--from must be a date YYYY-MM-DD, got {effective_from!r}", code=2)
    with get_session_factory()() as session:
        try:
            set_prices(
                session,
                product,
                monthly_cents=monthly_cents,
                annual_cents=annual_cents,
                effective_from=starts,
                today=today,
                actor=actor,
                reason=reason,
            )
        except PlanError as exc:
            session.rollback()
            _plan_error(exc)
        session.commit()
        rows = price_list(session, product, on=today)
    console.print(f"prices of [bold]{product}[/] set from {starts.isoformat()}")
    _print_prices(rows, today, f"Prices of {product}")


@plans_app.command("list")
def plans_list(product: str | None = typer.Option(None, help="Only this product.")) -> None:
    """The price in force today for each product and cycle, and the changes scheduled after today."""
    from jobs.plans import price_list
    from workers.db import get_session_factory

    today = business_today()
    with get_session_factory()() as session:
        rows = price_list(session, product, on=today)
    if not rows:
        fail(
            f"no prices for product {product!r}" if product else "no plan prices yet: set them with `renova plans set`"
        )
    _print_prices(rows, today, "Prices")


@app.command()
def gateway(
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8700, help="Port to listen on."),
    latency_ms: int = typer.Option(0, help="Added latency for every request, in milliseconds."),
    timeout_rate: float = typer.Option(0.0, help="Share of charges that succeed but answer too late (0–1)."),
    unavailable_rate: float = typer.Option(0.0, help="Share of requests refused with 503, not processed (0–1)."),
    data_dir: Path = typer.Option(Path(".renova/gateway"), help="Folder for the sandbox's SQLite state."),
    webhook_url: str | None = typer.Option(
        None,
        help="Where boleto paid/expired webhooks are posted (default: the local API's "
        "/v1/webhooks/gateway, or /v1/webhooks/pagarme with --flavor pagarme).",
    ),
    webhook_secret: str = typer.Option(
        "whsec_sandbox", envvar="GATEWAY_WEBHOOK_SECRET", help="HMAC secret for webhook signatures."
    ),
    api_key: str = typer.Option("sk_sandbox", envvar="GATEWAY_API_KEY", help="API key clients must send."),
    flavor: str = typer.Option(
        "sandbox",
        help="Which PSP's API to serve: sandbox (its own, /v1) or pagarme (Pagar.me v5, under /core/v5).",
    ),
    webhook_username: str = typer.Option(
        "", envvar="PAGARME_WEBHOOK_USERNAME", help="pagarme: the Basic user name sent with every webhook."
    ),
    webhook_password: str = typer.Option(
        "", envvar="PAGARME_WEBHOOK_PASSWORD", help="pagarme: the Basic password sent with every webhook."
    ),
) -> None:
    """Run the sandbox payment gateway (development, tests, demo, benchmarks), in its own API or Pagar.me's."""
    from gateways.sandbox import serve
    from gateways.sandbox.models import FLAVORS

    if flavor not in FLAVORS:
        fail(f"--flavor must be one of {', '.join(FLAVORS)}, got {flavor!r}", code=2)
    if webhook_url is None:
        route = "pagarme" if flavor == "pagarme" else "gateway"
        webhook_url = f"http://127.0.0.1:8000/v1/webhooks/{route}"
    serve(
        flavor=flavor,  # type: ignore[arg-type]
        webhook_username=webhook_username,
        webhook_password=webhook_password,
        host=host,
        port=port,
        latency_ms=latency_ms,
        timeout_rate=timeout_rate,
        unavailable_rate=unavailable_rate,
        data_dir=data_dir,
        webhook_url=webhook_url,
        webhook_secret=webhook_secret,
        api_key=api_key,
    )


# --- refunds (on-call) ---------------------------------------------------------------------------


@refunds_app.command("list")
def refunds_list(
    status: str | None = typer.Option(
        None, help="Only refunds in this status: pending, unknown, succeeded, failed or paid."
    ),
) -> None:
    """Refunds of ended subscriptions: card refunds (the gateway returns them) and payouts (on-call pays)."""
    wire()
    from jobs.refunds import list_refunds
    from models.money import format_brl
    from models.states import RefundStatus
    from workers.db import get_session_factory

    if status is not None and status not in {member.value for member in RefundStatus}:
        fail(f"unknown status {status!r}; use one of {', '.join(member.value for member in RefundStatus)}", code=2)
    table = Table("id", "subscription", "method", "amount", "status", "created", "reference / gateway", "reason")
    with get_session_factory()() as session:
        refunds = list_refunds(session, status=status)
        for refund in refunds:
            table.add_row(
                str(refund.id),
                str(refund.subscription_id),
                refund.method,
                format_brl(refund.amount_cents),
                refund.status,
                refund.created_at.strftime("%Y-%m-%d %H:%M"),
                refund.reference or refund.gateway_id or refund.gateway_code or "",
                refund.reason,
            )
    if not refunds:
        console.print("no refunds" + (f" with status {status}" if status else ""))
        return
    console.print(table)


@refunds_app.command("mark-paid")
def refunds_mark_paid(
    refund_id: int = id_argument("The payout's id (see `renova refunds list --status pending`)."),
    reference: str = typer.Option(..., help="The bank transfer's reference (kept on the refund)."),
    reason: str = typer.Option(..., help="Why / how it was paid (kept in the audit log)."),
    actor: str = typer.Option(os.environ.get("USER", "operator"), help="Who paid it (audit log)."),
) -> None:
    """Close a pending payout that was paid by bank transfer; recorded in the audit log."""
    wire()
    from jobs.refunds import RefundActionRefused, mark_payout_paid
    from models.money import format_brl
    from workers.db import get_session_factory

    with get_session_factory()() as session:
        try:
            refund = mark_payout_paid(
                session, refund_id, reference=reference, reason=reason, actor=actor, now=datetime.now(UTC)
            )
        except RefundActionRefused as exc:
            session.rollback()
            fail(str(exc), code=2)
        session.commit()
        console.print(
            f"refund {refund.id} ({format_brl(refund.amount_cents)}) marked paid, reference {refund.reference}"
        )


# --- ledger check --------------------------------------------------------------------------------


@ledger_app.command("check")
def ledger_check(
    subscription: int | None = typer.Option(None, "--subscription", help="Only this subscription's id."),
) -> None:
    """Prove from the database that no money was kept or lost; exit 1 on any violation (read-only)."""
    wire()
    from jobs.ledger_check import check_ledger, subscriptions_checked
    from workers.db import get_session_factory

    with get_session_factory()() as session:
        checked = subscriptions_checked(session, subscription)
        if subscription is not None and not checked:
            fail(f"no subscription {subscription}", code=2)
        violations = check_ledger(session, subscription)
    if not violations:
        console.print(f"ledger check: {checked} subscriptions, no money kept or lost")
        return
    table = Table(title=f"Ledger check: {len(violations)} violation(s) in {checked} subscriptions")
    for column in ("rule", "subscription", "invoice", "expected", "found", "message"):
        table.add_column(column, overflow="fold", no_wrap=column in ("rule", "subscription", "invoice"))
    for violation in violations:
        table.add_row(
            violation.rule,
            str(violation.subscription_id or "—"),
            str(violation.invoice_id or "—"),
            str(violation.expected),
            str(violation.found),
            violation.message,
        )
    console.print(table)
    raise typer.Exit(1)


# --- the test clock (development and test) -------------------------------------------------------


def _describe_clock(state_now: datetime | None) -> str:
    """One line: which clock, its instant in the billing time zone and in UTC, and the business date."""
    from zoneinfo import ZoneInfo

    from models.calendar import local_today

    settings = get_settings()
    shown = state_now or datetime.now(UTC)
    local = shown.astimezone(ZoneInfo(settings.billing_timezone))
    kind = "test" if state_now is not None else "real"
    return (
        f"clock: {kind} — now {local:%Y-%m-%d %H:%M:%S} {settings.billing_timezone} "
        f"({shown.astimezone(UTC).isoformat(timespec='seconds')}), business date "
        f"{local_today(shown, settings.billing_timezone).isoformat()}"
    )


def _clock_change(change: str, value: str, actor: str) -> None:
    from jobs import audit, clock
    from workers.broker import billing_config
    from workers.db import get_session_factory

    settings = get_settings()
    config = billing_config(settings)
    if not config.allow_future_dates:
        fail(
            f"the test clock is for development and test only: refused with RENOVA_ENV={settings.renova_env}, "
            "which always uses the real clock",
            code=2,
        )
    with get_session_factory()() as session:
        try:
            if change == "set":
                state = clock.set_clock(
                    session, clock.parse_instant(value, settings.billing_timezone, settings.billing_run_at), config
                )
            else:
                state = clock.advance_clock(session, clock.parse_duration(value), config)
        except (clock.ClockInputError, clock.ClockRefused) as exc:
            session.rollback()
            fail(str(exc), code=2)
        audit.record(
            session,
            actor=actor,
            action=f"clock.{change}",
            target_type="test_clock",
            target_id=str(clock.CLOCK_ID),
            details={"input": value, "now": state.now.isoformat()},
        )
        session.commit()
    console.print(_describe_clock(state.now))


@clock_app.command("show")
def clock_show() -> None:
    """Which clock every process reads: the real one, or the test clock and its instant."""
    from jobs import clock
    from workers.db import get_session_factory

    settings = get_settings()
    with get_session_factory()() as session:
        state = clock.clock_state(session)
    if state is not None and not settings.allows_future_dates:
        console.print(_describe_clock(None))
        fail(
            f"a test clock is set ({state.now.isoformat()}) but RENOVA_ENV={settings.renova_env} ignores it "
            "and refuses to start: run `renova clock reset`",
            code=1,
        )
    console.print(_describe_clock(state.now if state else None))


@clock_app.command("set")
def clock_set(
    instant: str = typer.Argument(
        ...,
        help="YYYY-MM-DD (that business date, one minute after BILLING_RUN_AT) or YYYY-MM-DDTHH:MM "
        "(local time in BILLING_TIMEZONE; an explicit offset is honoured).",
    ),
    actor: str = typer.Option(os.environ.get("USER", "operator"), help="Who (audit log)."),
) -> None:
    """Freeze "now" for every process at an instant (development and test only)."""
    _clock_change("set", instant, actor)


@clock_app.command("advance")
def clock_advance(
    duration: str = typer.Argument(..., help="How far: 30m, 12h, 1d, 2w."),
    actor: str = typer.Option(os.environ.get("USER", "operator"), help="Who (audit log)."),
) -> None:
    """Move the test clock forward (from the real time when none is set; development and test only)."""
    _clock_change("advance", duration, actor)


@clock_app.command("reset")
def clock_reset(actor: str = typer.Option(os.environ.get("USER", "operator"), help="Who (audit log).")) -> None:
    """Back to the real clock (allowed everywhere: it is how a clock left in production is removed)."""
    from jobs import audit, clock
    from workers.db import get_session_factory

    with get_session_factory()() as session:
        removed = clock.reset_clock(session)
        if removed:
            audit.record(session, actor=actor, action="clock.reset", target_type="test_clock", target_id="1")
        session.commit()
    console.print(("test clock removed; " if removed else "no test clock was set; ") + _describe_clock(None))


# --- simulation (development and test) -----------------------------------------------------------


def _start_sandbox_process(data_dir: Path, flavor: str = "sandbox") -> tuple[subprocess.Popen[bytes], str, str]:
    """`renova gateway` (in `flavor`) on a free port with fault rates 0, its state in `data_dir`, no
    webhooks: the simulation records payments itself. Returns the process, its URL and its API key."""
    import secrets

    import httpx

    from workers.embedded import free_port

    port = free_port()
    api_key = f"sk_sim_{secrets.token_hex(8)}"
    url = f"http://127.0.0.1:{port}"
    command = [
        sys.executable, "-m", "workers.cli", "gateway",
        "--host", "127.0.0.1", "--port", str(port), "--data-dir", str(data_dir),
        "--webhook-url", "", "--api-key", api_key,
        "--timeout-rate", "0", "--unavailable-rate", "0", "--flavor", flavor,
    ]  # fmt: skip
    log = (data_dir / "sandbox.log").open("ab")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while True:
        if process.poll() is not None:
            fail(f"the sandbox gateway exited with {process.returncode} (log: {data_dir / 'sandbox.log'})")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200:
                return process, url, api_key
        if time.monotonic() > deadline:
            process.kill()
            fail("the sandbox gateway did not start within 30 s")
        time.sleep(0.1)


def _stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@app.command()
def simulate(
    orgs: int = typer.Option(20, "--orgs", min=1, help="How many organizations subscribe."),
    days: int = typer.Option(90, "--days", min=1, help="How many business dates to run, one after the other."),
    seed: int = typer.Option(1, "--seed", help="The seed of every random choice: the same seed, the same counts."),
    start: str | None = typer.Option(
        None, "--start", help="First business date, YYYY-MM-DD (default today, by the test clock when one is set)."
    ),
    gateway_url: str | None = typer.Option(
        None,
        "--gateway-url",
        help="A running sandbox gateway (fault rates 0; API key GATEWAY_API_KEY). Default: start one.",
    ),
) -> None:
    """Months of billing in minutes, headless: members subscribe and act, boletos are paid on time,
    late or never, and every daily run happens — deterministic per seed. Exits 1 if money was kept
    or lost (ledger check, or more than one successful charge per invoice at the gateway)."""
    import tempfile

    settings = get_settings()
    if settings.renova_env == "production":
        fail("renova simulate writes made-up customers and money: refused with RENOVA_ENV=production", code=2)
    first_day: date | None = None
    if start is not None:
        try:
            first_day = date.fromisoformat(start)
        except ValueError:
            fail(f"--start must be YYYY-MM-DD, got {start!r}", code=2)
    wire()
    from sqlalchemy import func, select

    from gateways.sandbox import clients
    from jobs import simulation
    from jobs.context import runtime
    from models.calendar import local_today
    from models.schema import Organization
    from workers.db import get_session_factory, resolved_urls
    from workers.migrate import upgrade
    from workers.simulation_view import day_progress, summary_table

    upgrade(resolved_urls()[0])
    config = runtime().config
    if first_day is None:
        first_day = local_today(current_now(), config.timezone)
    with contextlib.ExitStack() as cleanup:
        if gateway_url is None:
            data_dir = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="renova-simulate-")))
            process, url, api_key = _start_sandbox_process(data_dir, settings.gateway)
            cleanup.callback(_stop_process, process)
        else:
            url, api_key = gateway_url.rstrip("/"), settings.gateway_api_key.get_secret_value()
        gateway = cleanup.enter_context(
            clients.connect(settings.gateway, url, api_key, connect_timeout=2.0, read_timeout=10.0)
        )
        sandbox = simulation.SandboxHttp(url, api_key)
        cleanup.callback(sandbox.close)
        session = cleanup.enter_context(get_session_factory()())
        existing = session.scalar(select(func.count()).select_from(Organization)) or 0
        session.commit()
        if existing:
            console.print(
                f"[yellow]note:[/] the database already holds {existing} organizations: they are billed too and "
                "the ledger check covers them; the counts cover only this run's organizations"
            )
        console.print(f"simulating {orgs} organizations for {days} days from {first_day.isoformat()} (seed {seed})")
        with day_progress(console, days) as on_day:
            started = time.monotonic()
            world = simulation.InProcessWorld(session, gateway, sandbox, config)
            result = simulation.Simulation(
                session,
                world,
                seed=seed,
                organizations=orgs,
                days=days,
                start=first_day,
                on_day=on_day,
            ).run()
            elapsed = time.monotonic() - started
    title = f"Simulation: {orgs} organizations, {days} days from {first_day.isoformat()}, seed {seed}"
    console.print(f"[bold]{title}[/]")
    console.print(summary_table(result))
    console.print(f"simulated {days} days in {elapsed:.1f} s")
    if result.violations:
        console.print(f"[bold red]{len(result.violations)} invariant violation(s): money kept or lost[/]")
        for line in result.violations:
            console.print(f"  {line}", markup=False)
        raise typer.Exit(1)
    console.print("invariants hold: ledger check clean, at most one successful charge per invoice at the gateway")


# --- the demo ------------------------------------------------------------------------------------


@app.command()
def demo(
    orgs: int = typer.Option(60, "--orgs", min=1, max=500, help="How many organizations subscribe."),
    days: int = typer.Option(90, "--days", min=1, max=400, help="How many days pass, one at a time."),
    seed: int = typer.Option(1, "--seed", help="The seed of the customers' choices."),
    keep: bool = typer.Option(False, "--keep", help="Leave the stack running afterwards, to browse it."),
    stop: bool = typer.Option(False, "--stop", help="Only stop a demo left running with --keep."),
) -> None:
    """Watch months of billing pass in minutes: the whole system on its own embedded stack (PostgreSQL,
    Redis, mail sink, sandbox gateway, web, worker, scheduler as real processes), ~60 organizations
    acting through the API while the test clock moves one day at a time. Ends with a summary, the
    ledger check, a chart and where to look; exits 1 if money was kept or lost."""
    settings = get_settings()
    if settings.renova_env == "production":
        fail("renova demo writes made-up customers and money: refused with RENOVA_ENV=production", code=2)
    from workers.demo_stack import DemoError, DemoStack, demo_dir, stop_leftovers

    root = demo_dir(settings.data_dir)
    if stop:
        console.print("demo stopped" if stop_leftovers(root) else "no demo was running")
        return
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        fail("the demo draws its chart with matplotlib: pip install 'renova[demo]'", code=2)

    stack = DemoStack(root)
    started = time.monotonic()
    try:
        stack.start(say=console.print)
        use_environment(stack.env)
        wire()
        from jobs.context import runtime
        from models.calendar import local_today
        from workers.db import get_session_factory
        from workers.demo import draw_chart, run_demo
        from workers.simulation_view import day_progress, summary_table

        run_settings = get_settings()
        config = runtime().config
        first_day = local_today(datetime.now(UTC), config.timezone)
        console.print(
            f"{orgs} organizations subscribe, then {days} days pass from {first_day.isoformat()} (seed {seed}); "
            f"API {stack.web_url}"
        )
        with day_progress(console, days) as on_day:
            result, warnings = run_demo(
                stack,
                get_session_factory(),
                config,
                run_settings.billing_run_at,
                seed=seed,
                organizations=orgs,
                days=days,
                start=first_day,
                on_day=on_day,
            )
        console.print(f"[bold]Demo: {orgs} organizations, {days} days from {first_day.isoformat()}, seed {seed}[/]")
        console.print(summary_table(result))
        for warning in warnings:
            console.print(f"[yellow]note:[/] {warning}")
        console.print("[bold]renova ledger check[/]")
        check = subprocess.run(
            [sys.executable, "-m", "workers.cli", "ledger", "check"],
            env={**os.environ, **stack.env},
            capture_output=True,
            text=True,
        )
        console.print((check.stdout + check.stderr).rstrip(), markup=False, highlight=False)
        gateway_violations = [line for line in result.violations if line.startswith("[gateway]")]
        for line in gateway_violations:
            console.print(f"  {line}", markup=False)
        if not gateway_violations:
            console.print("sandbox ledger: at most one successful charge per invoice")
        chart = draw_chart(result, root / "demo.png")
        mails = sorted(stack.mail.glob("*.eml"))
        console.print(f"chart: {chart}")
        console.print(f"e-mails sent: {len(mails)} in {stack.mail}")
        console.print(f"logs: {stack.logs}")
        console.print(f"took {time.monotonic() - started:.0f} s")
        failed = check.returncode != 0 or bool(result.violations)
    except DemoError as exc:
        keep = False
        fail(str(exc))
    except KeyboardInterrupt:
        keep = False
        fail("interrupted", code=130)
    finally:
        if keep:
            console.print(
                f"left running: API {stack.web_url} (docs {stack.web_url}/docs, key {stack.api_key}), "
                f"sandbox {stack.gateway_url}; stop it with `renova demo --stop`"
            )
            console.print(f"the CLI on it: RENOVA_DATA_DIR={root} renova clock show | ledger check | refunds list …")
        else:
            stack.stop()
            console.print("stopped everything the demo started")
    if failed:
        console.print("[bold red]money was kept or lost: see above[/]")
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
