"""`renova simulate`: months of billing through the real flows (`run_day`, `submit_request`, the boleto
webhook functions) against real PostgreSQL and the sandbox gateway process, deterministic per seed."""

from __future__ import annotations

from datetime import date

import pytest

from jobs.context import runtime
from jobs.simulation import InProcessWorld, Simulation
from tests.integration.conftest import _reset_between
from tests.integration.test_cli import renova

pytestmark = pytest.mark.usefixtures("ledger_checked")

START = date(2027, 3, 1)
SEED = 3  # 6 organizations × 40 days: a soft decline, a boleto paid late, a switch after T − 7
EXPECTED_TOTALS = {
    "renewals_charged": 2,
    "boletos_issued": 2,
    "boletos_paid": 2,
    "boletos_paid_late": 1,
    "boletos_overdue": 1,
    "boletos_expired": 0,
    "declines": 1,
    "retries": 0,
    "suspensions": 1,
    "reactivations": 1,
    "requests_applied": 8,
    "requests_rejected": 5,
    "notices": 24,
    "refunds": 0,
}
EXPECTED_REJECTED = {"boleto_already_issued": 1, "boleto_requires_annual": 3, "forbidden": 1}


def run(session, gateway, sandbox, seed: int):
    world = InProcessWorld(session, gateway, sandbox, runtime().config)
    return Simulation(session, world, seed=seed, organizations=6, days=40, start=START).run()


def queued_messages(broker) -> int:
    from workers.queues import QUEUES

    return sum(broker.client.llen(f"dramatiq:{queue}") for queue in QUEUES)


def test_a_seed_gives_its_counts_with_a_clean_ledger_and_the_same_counts_again(
    session, billing_gateway, sandbox_gateway, broker
):
    first = run(session, billing_gateway, sandbox_gateway, SEED)

    # Notices, boleto cancellations, segundas vias and refunds were handled in this thread, not queued.
    assert queued_messages(broker) == 0

    assert first.violations == []
    assert {name: first.totals[name] for name in EXPECTED_TOTALS} == EXPECTED_TOTALS
    assert dict(first.rejected) == EXPECTED_REJECTED
    assert first.statuses == {"active": 5, "suspended": 1}
    assert len(first.per_day) == 40
    assert sum(counts["declines"] for _, counts in first.per_day) == first.totals["declines"]
    # The chart's series: two monthly renewals charged (R$ 49,90 each); two boletos paid, one of them
    # a renewal at R$ 479,00 (the other an upgrade to annual, less its credit).
    assert [day for day, _, _ in first.revenue] == [day for day, _ in first.per_day]
    assert sum(card for _, card, _ in first.revenue) == 2 * 4_990
    assert 47_900 < sum(boleto for _, _, boleto in first.revenue) < 2 * 47_900
    assert first.statuses_by_day[-1][1] == first.statuses

    _reset_between(session)
    again = run(session, billing_gateway, sandbox_gateway, SEED)
    assert again.violations == []
    assert again.counts() == first.counts()


def test_another_seed_gives_other_counts(session, billing_gateway, sandbox_gateway):
    other = run(session, billing_gateway, sandbox_gateway, SEED + 1)

    assert other.violations == []
    assert {name: other.totals[name] for name in EXPECTED_TOTALS} != EXPECTED_TOTALS


def test_the_command_runs_a_simulation_with_its_own_sandbox_gateway(clean_database):
    result = renova("simulate", "--orgs", "4", "--days", "35", "--seed", "7", "--start", "2027-05-01")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "Simulation: 4 organizations, 35 days from 2027-05-01, seed 7" in result.stdout
    assert "renewals_charged" in result.stdout
    assert "invariants hold" in result.stdout


def test_the_command_is_refused_in_production(clean_database):
    result = renova("simulate", "--orgs", "1", "--days", "1", RENOVA_ENV="production")

    assert result.returncode == 2
    assert "refused with RENOVA_ENV=production" in result.stdout
