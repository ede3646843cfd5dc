"""Daily billing runs as on-call reads them (`renova runs`, the ops console): plain rows from
`billing_runs`, nothing rendered or changed.

What a run records (jobs.billing_day): its due count from the first scan, the done and failed counts
its chunks add, the number of scans, and `counts` — the per-task due counts of the last scan
(`last_scan`) and, per task, the rows done (`done`), the attempts that failed (`failed`) and the latest
ids that failed (`failed_ids`; each failed id is retried on its own message, and a later scan finds it
again while it is still due).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from jobs.billing_day import TASKS
from jobs.charge_review import NotFound, OnCallError
from models.schema import BillingRun


@dataclass(frozen=True)
class RunRow:
    run_date: date
    status: str
    due_count: int
    done_count: int
    failed_count: int
    scans: int
    started_at: datetime
    last_scan_at: datetime | None
    finished_at: datetime | None


@dataclass(frozen=True)
class TaskCount:
    """One task of the run (`issue_boletos`, `renew`, `retry_charges`, …): rows due at its last scan,
    rows done, attempts that failed and the latest failed rows (each failed row is retried on its own)."""

    task: str
    due: int | None
    done: int | None
    failed: int | None = None
    failed_ids: tuple[int, ...] = ()  # the latest rows (subscription, invoice or boleto ids) that failed


@dataclass(frozen=True)
class RunDetail:
    run: RunRow
    tasks: tuple[TaskCount, ...]
    # The counts as stored, for anything a later version of the run records.
    counts: dict[str, Any] = field(default_factory=dict)


def _row(run: BillingRun) -> RunRow:
    return RunRow(
        run_date=run.run_date,
        status=run.status,
        due_count=run.due_count,
        done_count=run.done_count,
        failed_count=run.failed_count,
        scans=run.scans,
        started_at=run.started_at,
        last_scan_at=run.last_scan_at,
        finished_at=run.finished_at,
    )


def list_runs(session: Session, limit: int = 30) -> list[RunRow]:
    """The latest billing runs, newest date first."""
    if limit < 1:
        raise OnCallError("invalid_limit", f"limit must be at least 1, got {limit}")
    runs = session.scalars(select(BillingRun).order_by(BillingRun.run_date.desc()).limit(limit))
    return [_row(run) for run in runs]


def run_detail(session: Session, run_date: date) -> RunDetail:
    """One run with its per-task counts, in the order the run does its tasks."""
    run = session.scalar(select(BillingRun).where(BillingRun.run_date == run_date))
    if run is None:
        raise NotFound("run_not_found", f"no billing run for {run_date.isoformat()}")
    counts = dict(run.counts or {})
    due = counts.get("last_scan") or {}
    done = counts.get("done") or {}
    failed = counts.get("failed") or {}
    failed_ids = counts.get("failed_ids") or {}
    names = list(TASKS) + sorted((set(due) | set(done)) - set(TASKS))
    tasks = tuple(
        TaskCount(name, due.get(name), done.get(name), failed.get(name), tuple(failed_ids.get(name) or ()))
        for name in names
        if name in due or name in done
    )
    return RunDetail(_row(run), tasks, counts)
