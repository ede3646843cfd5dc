"""The overview's picture of operations: queues, workers, today's billing run, and what needs a look.

The figures are one reading of what `/metrics` exports (`workers.metrics.RenovaCollector.read`), so
the console and the alerts never disagree; the run's tasks come from `jobs.run_review`."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy.orm import Session

from workers.metrics import Readings


@dataclass(frozen=True)
class QueueLine:
    queue: str
    ready: int
    delayed: int
    dead: int
    oldest_age_seconds: float


@dataclass
class OperationsStatus:
    readings: Readings
    queues: list[QueueLine] = field(default_factory=list)
    workers_alive: int = 0
    run: object | None = None  # jobs.run_review.RunDetail of the latest run
    needs_attention: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


# What the overview calls out, in the alerts' own terms (deploy/prometheus/alerts.yml has the thresholds
# that page someone; these only point at what to open).
def _warnings(readings: Readings, status: OperationsStatus) -> list[str]:
    found = []
    up = readings.by_label("renova_up")
    for component, name in (("postgres", "PostgreSQL"), ("redis", "Redis")):
        if not up.get(component):
            found.append(f"{name} não responde ao console.")
    if up.get("redis") and status.workers_alive == 0:
        found.append("Nenhum worker ativo: nada está sendo processado.")
    if readings.value("renova_billing_today_run_done") == 0:
        found.append("A execução de hoje ainda não terminou.")
    unreconciled = sum(readings.by_label("renova_charges_unreconciled").values())
    if unreconciled:
        found.append(f"{unreconciled:.0f} cobrança(s) com resultado desconhecido aguardam conciliação.")
    dead = readings.value("renova_dead_letter_messages") or 0
    if dead:
        found.append(f"{dead:.0f} mensagem(ns) em dead letters.")
    parked = sum(status.needs_attention.values())
    if parked:
        found.append(f"{parked} item(ns) pararam de ser tentados e esperam um operador (renova attention list).")
    return found


def operations_status(session: Session) -> OperationsStatus:
    from jobs.run_review import list_runs, run_detail
    from workers.metrics import RenovaCollector, metrics_source
    from workers.settings import get_settings

    readings = RenovaCollector(metrics_source(), get_settings()).read()
    status = OperationsStatus(readings=readings)
    ready = readings.by_label("renova_queue_ready_messages")
    delayed = readings.by_label("renova_queue_delayed_messages")
    dead = readings.by_label("renova_queue_dead_messages")
    oldest = readings.by_label("renova_queue_oldest_ready_age_seconds")
    status.queues = [
        QueueLine(queue, int(ready[queue]), int(delayed.get(queue, 0)), int(dead.get(queue, 0)), oldest.get(queue, 0))
        for queue in ready
    ]
    status.workers_alive = int(readings.value("renova_workers_alive") or 0)
    status.needs_attention = {kind: int(n) for kind, n in readings.by_label("renova_needs_attention").items()}
    latest = list_runs(session, limit=1)
    status.run = run_detail(session, latest[0].run_date) if latest else None
    status.warnings = _warnings(readings, status)
    return status
