"""`renova chaos` (`make chaos`): the fault-injection run (workers/chaos.py) on its own embedded stack,
its figures and checks as tables, PASS or FAIL."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from workers.cli_common import console, fail, use_environment, wire
from workers.settings import get_settings

if TYPE_CHECKING:
    from workers.chaos_plan import ChaosReport


def chaos(
    orgs: int = typer.Option(60, "--orgs", min=1, max=500, help="How many organizations subscribe."),
    days: int = typer.Option(40, "--days", min=1, max=400, help="How many billing days pass."),
    seed: int = typer.Option(1, "--seed", help="The seed of the customers' choices and of the faults."),
    worker_kills: int = typer.Option(20, "--worker-kills", min=0, help="Workers SIGKILLed while holding messages."),
    redis_wipes: int = typer.Option(3, "--redis-wipes", min=0, help="Times Redis is killed with its data."),
    postgres_restarts: int = typer.Option(1, "--postgres-restarts", min=0, help="PostgreSQL crash-restarts."),
    scheduler_kills: int = typer.Option(1, "--scheduler-kills", min=0, help="Times the scheduler is SIGKILLed."),
    unavailable_rate: float = typer.Option(0.06, min=0, max=1, help="Share of gateway requests answered 503."),
    timeout_rate: float = typer.Option(
        0.07, min=0, max=1, help="Share of gateway requests processed but answered after the read timeout."
    ),
) -> None:
    """Break things on purpose and prove nothing was lost: the demo's customers and days on a stack of
    their own (`<data dir>/chaos`) while workers are SIGKILLed, Redis is killed with its data, PostgreSQL
    crash-restarts and the scheduler is killed, and the sandbox fails requests. Then checks the
    sandbox ledger, the database and the mail sink; prints the figures and PASS or FAIL (exit 1)."""
    settings = get_settings()
    if settings.renova_env == "production":
        fail("renova chaos kills processes and writes made-up customers: refused with RENOVA_ENV=production", code=2)
    from workers.chaos_plan import HEARTBEAT_TIMEOUT_MS, MAINTENANCE_CHANCE, ChaosPlan
    from workers.demo_stack import DemoError, DemoStack

    plan = ChaosPlan(
        organizations=orgs,
        days=days,
        seed=seed,
        worker_kills=worker_kills,
        redis_wipes=redis_wipes,
        postgres_restarts=postgres_restarts,
        scheduler_kills=scheduler_kills,
        unavailable_rate=unavailable_rate,
        timeout_rate=timeout_rate,
    )
    stack = DemoStack(
        settings.data_dir.resolve() / "chaos",
        extra_env={
            "WORKER_HEARTBEAT_TIMEOUT_MS": str(HEARTBEAT_TIMEOUT_MS),
            "REDIS_MAINTENANCE_CHANCE": str(MAINTENANCE_CHANCE),
        },
    )
    started = time.monotonic()
    try:
        stack.start(say=console.print)
        use_environment(stack.env)
        wire()
        from jobs.context import runtime
        from models.calendar import local_today
        from workers.chaos import run_chaos
        from workers.db import get_session_factory
        from workers.simulation_view import day_progress

        config = runtime().config
        first_day = local_today(datetime.now(UTC), config.timezone)
        console.print(
            f"{orgs} organizations, {days} days from {first_day.isoformat()} (seed {seed}); faults: "
            f"{worker_kills} worker kills, {redis_wipes} Redis wipes, {postgres_restarts} PostgreSQL restarts, "
            f"{scheduler_kills} scheduler kills, gateway {unavailable_rate:.0%} 503 + {timeout_rate:.0%} stalls"
        )
        with day_progress(console, days) as on_day:
            report = run_chaos(
                stack, get_session_factory(), config, get_settings().billing_run_at, plan, first_day, on_day
            )
    except DemoError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail("interrupted", code=130)
    finally:
        stack.stop()
    console.print(figures_table(report))
    console.print(checks_table(report))
    for warning in report.warnings:
        console.print(f"[yellow]note:[/] {warning}", markup=True)
    if report.error:
        console.print(f"[bold red]the run stopped:[/] {report.error}")
    console.print(f"logs: {stack.logs}; took {time.monotonic() - started:.0f} s")
    if not report.passed:
        console.print("[bold red]FAIL[/]")
        raise typer.Exit(1)
    console.print("[bold green]PASS[/]")


def figures_table(report: ChaosReport) -> Table:
    from workers.chaos_plan import FAULT_KINDS

    table = Table(title="Faults and work")
    table.add_column("figure")
    table.add_column("count", justify="right")
    struck = report.strikes_by_kind()
    for kind in FAULT_KINDS:
        mid_work = sum(1 for strike in report.strikes if strike.kind == kind and strike.messages_in_flight)
        table.add_row(kind, f"{struck[kind]} ({mid_work} with messages in flight)")
    for kind, count in report.gateway_faults.items():
        table.add_row(f"gateway requests {kind}", str(count))
    for name, count in report.figures.items():
        table.add_row(name, str(count))
    return table


def checks_table(report: ChaosReport) -> Table:
    table = Table(title="Checks")
    table.add_column("check")
    table.add_column("result")
    for name, problems in report.checks.items():
        table.add_row(name, "[green]ok[/]" if not problems else "[red]" + "; ".join(problems)[:500] + "[/]")
    return table
