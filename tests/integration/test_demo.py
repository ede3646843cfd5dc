"""`renova demo` end to end: its own embedded stack under the data folder, the sandbox, web, worker and
scheduler as real processes, the customers acting through the API, webhooks, the moving test clock."""

from __future__ import annotations

import json
import re
import sqlite3
from contextlib import closing

import httpx
import pytest

from gateways.sandbox import STATE_FILE
from tests.integration.test_cli import renova


def demo(data_dir, *args: str, **env: str):
    result = renova("demo", *args, RENOVA_DATA_DIR=str(data_dir), **env)
    return result, result.stdout + result.stderr


def table_row(output: str, name: str) -> list[str]:
    row = next(line for line in output.splitlines() if re.match(rf"│ {re.escape(name)} +│", line))
    return [cell.strip() for cell in row.strip("│").split("│")]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_the_demo_runs_to_its_summary_and_stops_everything_it_started(stack_dir):
    result, output = demo(stack_dir, "--orgs", "3", "--days", "4", "--seed", "2")

    assert result.returncode == 0, output
    assert "Demo: 3 organizations, 4 days from" in output
    assert table_row(output, "applied:subscribe")[1] == "3"  # every organization subscribed through the API
    assert "ledger check: 3 subscriptions, no money kept or lost" in output
    assert "sandbox ledger: at most one successful charge per invoice" in output

    root = stack_dir / "demo"
    assert (root / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Every notice written was delivered to the mail sink by the worker.
    _, setup_notices, day_notices = table_row(output, "notices")
    mails = list((root / "mail").glob("*.eml"))
    assert len(mails) == int(setup_notices) + int(day_notices) > 0
    assert f"e-mails sent: {len(mails)} in {root / 'mail'}" in output

    assert "stopped everything the demo started" in output
    assert not (root / "processes.json").exists()
    assert not (root / "postgres" / "postmaster.pid").exists()
    assert not (root / "redis" / "port").exists()


def test_the_demo_runs_on_the_pagarme_emulator(stack_dir):
    result, output = demo(stack_dir, "--orgs", "3", "--days", "4", "--seed", "2", GATEWAY="pagarme")

    assert result.returncode == 0, output
    assert table_row(output, "applied:subscribe")[1] == "3"
    assert "ledger check: 3 subscriptions, no money kept or lost" in output
    assert "sandbox ledger: at most one successful charge per invoice" in output
    # Renova spoke Pagar.me's API: every charge and boleto at the emulator belongs to an order.
    state = stack_dir / "demo" / "gateway" / STATE_FILE
    with closing(sqlite3.connect(state)) as db:
        orders = db.execute("SELECT COUNT(*) FROM orders").fetchone()[0]
        charged = db.execute("SELECT (SELECT COUNT(*) FROM charges) + (SELECT COUNT(*) FROM boletos)").fetchone()[0]
    assert orders == charged >= 3


def test_keep_leaves_the_stack_running_until_stop(stack_dir):
    result, output = demo(stack_dir, "--orgs", "2", "--days", "2", "--keep")

    assert result.returncode == 0, output
    api = re.search(r"left running: API (\S+)", output)
    assert api is not None, output
    pids = json.loads((stack_dir / "demo" / "processes.json").read_text())
    assert set(pids) == {"gateway", "web", "worker", "scheduler"}
    health = httpx.get(f"{api.group(1)}/healthz", timeout=5).json()
    assert health["clock"] == "test"  # the demo's clock stays on its last day

    stopped, stop_output = demo(stack_dir, "--stop")
    assert stopped.returncode == 0 and "demo stopped" in stop_output
    assert not any(alive(pid) for pid in pids.values())
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{api.group(1)}/healthz", timeout=2)
    again, again_output = demo(stack_dir, "--stop")
    assert again.returncode == 0 and "no demo was running" in again_output


def test_the_demo_is_refused_in_production(stack_dir):
    refused = renova("demo", RENOVA_DATA_DIR=str(stack_dir), RENOVA_ENV="production")

    assert refused.returncode == 2
    assert "refused with RENOVA_ENV=production" in refused.stdout
    assert not (stack_dir / "demo").exists()
