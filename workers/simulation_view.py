"""How `renova simulate` and `renova demo` show a simulation: a progress bar of days with the day's
counts, then a summary table."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import date

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from jobs.simulation import COUNTERS, SimulationResult
from models.money import format_brl


@contextmanager
def day_progress(console: Console, days: int) -> Iterator[Callable[[date, dict[str, int]], None]]:
    """A progress bar over the days; yields the `on_day` callback that advances it."""
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[last]}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("setting up", total=days, last="")

        def on_day(day: date, counts: dict[str, int]) -> None:
            shown = ", ".join(f"{name} {counts[name]}" for name in COUNTERS if counts.get(name))
            codes = [name.removeprefix("rejected:") for name in sorted(counts) if name.startswith("rejected:")]
            if codes:
                shown += f" ({', '.join(codes)})"
            progress.update(task, advance=1, description=day.isoformat(), last=shown or "—")
            if shown:
                progress.console.print(f"[dim]{day.isoformat()}[/]  {shown}")

        yield on_day


def summary_table(result: SimulationResult) -> Table:
    """Counts of the set-up and of the days, refusals by code, subscriptions by status at the end."""
    table = Table()
    table.add_column("count")
    table.add_column("set-up", justify="right")
    table.add_column("days", justify="right")
    others = (set(result.totals) | set(result.setup)) - set(COUNTERS)
    names = [*COUNTERS, *sorted(name for name in others if not name.startswith("rejected:"))]
    for name in names:
        table.add_row(name, str(result.setup.get(name, 0)), str(result.totals.get(name, 0)))
    for code, count in sorted(result.rejected.items()):
        table.add_row(f"rejected: {code}", "", str(count))
    for status, count in sorted(result.statuses.items()):
        table.add_row(f"subscriptions {status}", "", str(count))
    card = sum(cents for _, cents, _ in result.revenue)
    boleto = sum(cents for _, _, cents in result.revenue)
    table.add_row("collected by card", "", format_brl(card))
    table.add_row("collected by boleto", "", format_brl(boleto))
    return table
