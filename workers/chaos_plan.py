"""What a fault-injection run (`renova chaos`, workers/chaos.py) strikes and what it found: the plan,
each strike, and the report. Free of the actors, so the command can read its options before the broker
is wired."""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import date
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jobs.simulation import SimulationResult

WORKER_KILL = "worker SIGKILLed"
REDIS_WIPE = "Redis killed, data lost"
POSTGRES_RESTART = "PostgreSQL crashed and restarted"
SCHEDULER_KILL = "scheduler SIGKILLed"
FAULT_KINDS = (WORKER_KILL, REDIS_WIPE, POSTGRES_RESTART, SCHEDULER_KILL)

# A killed worker's messages go back to their queue once its heartbeat is this old (Dramatiq's 60 s
# would make each kill a minute of waiting).
HEARTBEAT_TIMEOUT_MS = 3_000
# …and Dramatiq's maintenance, which returns them, runs on this many per million commands (not 1,000).
MAINTENANCE_CHANCE = 50_000


@dataclass(frozen=True)
class ChaosPlan:
    """What to run and what to break: `make chaos` uses the defaults, the test suite a small plan."""

    organizations: int = 60
    days: int = 40
    seed: int = 1
    worker_kills: int = 20
    redis_wipes: int = 3
    postgres_restarts: int = 1
    scheduler_kills: int = 1
    unavailable_rate: float = 0.06
    timeout_rate: float = 0.07

    def faults_by_day(self, rng: random.Random) -> dict[int, list[str]]:
        """Which faults strike on which day (0 is the first), spread at random over the days."""
        planned = (
            [WORKER_KILL] * self.worker_kills
            + [REDIS_WIPE] * self.redis_wipes
            + [POSTGRES_RESTART] * self.postgres_restarts
            + [SCHEDULER_KILL] * self.scheduler_kills
        )
        by_day: dict[int, list[str]] = defaultdict(list)
        for kind in planned:
            by_day[rng.randrange(self.days)].append(kind)
        for faults in by_day.values():
            rng.shuffle(faults)
        return dict(by_day)


@dataclass(frozen=True)
class Strike:
    kind: str
    day: date
    at: float  # wall-clock seconds, to compare with the mail sink's receipt times
    messages_in_flight: int


@dataclass
class ChaosReport:
    plan: ChaosPlan
    result: SimulationResult | None = None
    strikes: list[Strike] = field(default_factory=list)
    gateway_faults: dict[str, int] = field(default_factory=dict)
    figures: dict[str, int] = field(default_factory=dict)
    # Each check by name: the problems found (empty: passed).
    checks: dict[str, list[str]] = field(default_factory=dict)
    dead_letters_before_wipes: int = 0
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.error is None and not any(self.checks.values())

    def strikes_by_kind(self) -> Counter[str]:
        return Counter(strike.kind for strike in self.strikes)
