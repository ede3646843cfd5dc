"""The `renova` command line: one entry point for every process and for operators."""

from __future__ import annotations

import os
import sys
import time
import uuid
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from workers.settings import SettingsError, get_settings

app = typer.Typer(no_args_is_help=True, help="Renova — subscription billing workers for CONECTA.")
db_app = typer.Typer(no_args_is_help=True, help="Database schema (Alembic migrations).")
stack_app = typer.Typer(no_args_is_help=True, help="The embedded development stack (PostgreSQL + Redis).")
app.add_typer(db_app, name="db")
app.add_typer(stack_app, name="stack")
dead_app = typer.Typer(no_args_is_help=True, help="Messages that failed for good (Dramatiq's dead-letter queues).")
app.add_typer(dead_app, name="dead-letters")

console = Console()


def wire() -> None:
    """Build the broker and bind the actors; must run before any actor module is imported."""
    import workers.broker  # noqa: F401


def fail(message: str, code: int = 1) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


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
) -> None:
    """Run the Dramatiq workers (the `worker` process)."""
    settings = get_settings()
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
    os.execvpe(args[0], args, runtime_environment())


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

    if healthy and ping:
        healthy = _ping_worker()
    if not healthy:
        raise typer.Exit(1)
    console.print("[bold green]healthy[/]")


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
    from datetime import UTC, datetime

    wire()
    from jobs.billing_day import tick

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
    while not stopping:
        tick.send(datetime.now(UTC).isoformat(), settings.billing_run_at.isoformat())
        next_tick += period
        while not stopping and time.monotonic() < next_tick:
            time.sleep(min(0.2, max(0.0, next_tick - time.monotonic())))


@app.command("run-day")
def run_day_command(
    run_date: str = typer.Option(..., "--date", help="Business date to run, YYYY-MM-DD."),
    wait: bool = typer.Option(False, help="Block until the run's work is done and print its counts."),
    timeout: float = typer.Option(600.0, help="With --wait: give up after this many seconds."),
) -> None:
    """Run (or re-run) the billing run for a date now. Workers do the work; dates after today are
    refused unless RENOVA_ENV is development or test."""
    from datetime import UTC, date, datetime

    from sqlalchemy import select, update

    wire()
    from jobs.billing_day import FutureDateRefused, scan_run
    from jobs.context import runtime
    from models.calendar import local_today
    from models.schema import BillingRun
    from workers.db import get_session_factory, resolved_urls
    from workers.queues import queue_depths

    try:
        on = date.fromisoformat(run_date)
    except ValueError:
        fail(f"--date must be YYYY-MM-DD, got {run_date!r}")
    settings = get_settings()
    now = datetime.now(UTC)
    if on > local_today(now, settings.billing_timezone) and not settings.allows_future_dates:
        fail(f"{on.isoformat()} is after today: refused in {settings.renova_env} (allowed in development and test)")

    session_factory = get_session_factory()
    with session_factory() as session:
        session.execute(update(BillingRun).where(BillingRun.run_date == on).values(status="running", finished_at=None))
        session.commit()
        try:
            counts = scan_run(session, on, now, runtime().config)
        except FutureDateRefused as exc:
            fail(str(exc))
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
    while True:
        with session_factory() as session:
            run = session.scalar(select(BillingRun).where(BillingRun.run_date == on))
            if run is not None and run.status == "done":
                break
        if time.monotonic() > deadline:
            fail(f"run {on.isoformat()} not done after {timeout:.0f}s: is `renova worker` running?")
        busy = any(depth.ready or depth.delayed for depth in queue_depths(redis_url, ("billing",)))
        if not busy:
            time.sleep(0.5)
            with session_factory() as session:
                scan_run(session, on, datetime.now(UTC), runtime().config)
        else:
            time.sleep(0.5)
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
    from workers.dead_letters import dead_letters, requeue
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

    from models.schema import AuditEvent
    from workers.db import get_session_factory

    requeued: list[str] = []
    with get_session_factory()() as session:
        for letter in chosen:
            if requeue(broker, client, letter):
                requeued.append(letter.message_id)
                session.add(
                    AuditEvent(
                        actor=actor,
                        action="dead_letter.requeue",
                        target_type="message",
                        target_id=letter.message_id,
                        reason=reason,
                        details={"queue": letter.queue, "actor_name": letter.actor, "error": letter.error},
                    )
                )
        session.commit()
    console.print(f"requeued {len(requeued)} message(s)")


@app.command()
def gateway(
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8700, help="Port to listen on."),
    latency_ms: int = typer.Option(0, help="Added latency for every request, in milliseconds."),
    timeout_rate: float = typer.Option(0.0, help="Share of charges that succeed but answer too late (0–1)."),
    unavailable_rate: float = typer.Option(0.0, help="Share of requests refused with 503, not processed (0–1)."),
    data_dir: Path = typer.Option(Path(".renova/gateway"), help="Folder for the sandbox's SQLite state."),
    webhook_url: str = typer.Option(
        "http://127.0.0.1:8000/v1/webhooks/gateway", help="Where boleto paid/expired webhooks are posted."
    ),
    webhook_secret: str = typer.Option(
        "whsec_sandbox", envvar="GATEWAY_WEBHOOK_SECRET", help="HMAC secret for webhook signatures."
    ),
    api_key: str = typer.Option("sk_sandbox", envvar="GATEWAY_API_KEY", help="API key clients must send."),
) -> None:
    """Run the sandbox payment gateway (development, tests, demo, benchmarks)."""
    from gateways.sandbox import serve

    serve(
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


if __name__ == "__main__":
    app()
