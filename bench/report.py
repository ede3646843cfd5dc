"""The benchmark's verdicts and its table: pure functions (tested in tests/unit/test_bench_report.py),
plus printing the table with rich and appending it to bench/RESULTS.md."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

MET = "met"
NOT_MET = "NOT MET"
NO_TARGET = "—"


@dataclass(frozen=True)
class Target:
    """`value` (or `ratio`, when `on_ratio`) must be ≥ or ≤ `threshold`."""

    comparison: str  # ">=" or "<="
    threshold: float
    on_ratio: bool = False

    def __post_init__(self) -> None:
        if self.comparison not in (">=", "<="):
            raise ValueError(f"comparison must be '>=' or '<=', not {self.comparison!r}")

    def describe(self, unit: str) -> str:
        sign = "≥" if self.comparison == ">=" else "≤"
        return f"{sign} {_number(self.threshold)} {'(ratio)' if self.on_ratio else unit}"

    def holds(self, measured: float) -> bool:
        return measured >= self.threshold if self.comparison == ">=" else measured <= self.threshold


@dataclass
class Result:
    """One line of the table. `value` is None when the scenario could not measure (it failed or timed out);
    `violations` lists broken invariants, each of which makes the line NOT MET whatever its speed."""

    scenario: str
    value: float | None
    unit: str
    ratio: float | None = None
    target: Target | None = None
    violations: list[str] = field(default_factory=list)
    note: str = ""


def verdict(result: Result) -> str:
    if result.violations:
        return NOT_MET
    if result.target is None:
        return NO_TARGET
    measured = result.ratio if result.target.on_ratio else result.value
    if measured is None:
        return NOT_MET
    return MET if result.target.holds(measured) else NOT_MET


def _number(value: float) -> str:
    if value == int(value) and abs(value) >= 10:
        return f"{int(value):,}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:,.1f}"
    return f"{value:,.2f}"


def cells(result: Result) -> list[str]:
    """scenario, measured, unit, ratio, target, verdict, note: the same cells for the terminal and Markdown."""
    note = result.note
    if result.violations:
        note = "; ".join(["invariants broken: " + ", ".join(result.violations), *([note] if note else [])])
    return [
        result.scenario,
        "—" if result.value is None else _number(result.value),
        result.unit,
        "" if result.ratio is None else f"{result.ratio:.2f}",
        "" if result.target is None else result.target.describe(result.unit),
        verdict(result),
        note,
    ]


COLUMNS = ("scenario", "measured", "unit", "ratio", "target", "verdict", "note")


def markdown_row(result: Result) -> str:
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells(result)) + " |"


def markdown_table(results: list[Result], *, when: datetime, commit: str, cores: int, mode: str, setup: str) -> str:
    lines = [
        f"## {when:%Y-%m-%d %H:%M} — {mode}, commit {commit}, {cores} cores",
        "",
        setup,
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
        *(markdown_row(result) for result in results),
        "",
    ]
    return "\n".join(lines)


def git_commit(root: Path) -> str:
    try:
        completed = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return completed.stdout.strip() or "unknown"


def cores() -> int:
    return os.cpu_count() or 1


def print_table(results: list[Result], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in COLUMNS:
        table.add_column(column, justify="right" if column in ("measured", "ratio") else "left")
    for result in results:
        row = cells(result)
        status = row[5]
        row[5] = f"[green]{status}[/]" if status == MET else (f"[red]{status}[/]" if status == NOT_MET else status)
        table.add_row(*row)
    console = Console()
    console.width = max(console.width, 150)  # the notes stay readable when piped or in a narrow terminal
    console.print(table)


RESULTS_HEADER = """# Benchmark results

Appended by `make bench` / `make bench-quick` (`python -m bench [--quick]`), newest last. What each line
means: the README's "Benchmark" section.

"""


def append_results(path: Path, markdown: str) -> None:
    if not path.exists():
        path.write_text(RESULTS_HEADER)
    with path.open("a") as results:
        results.write("\n" + markdown)
