"""`renova chaos` (`make chaos`), small: the demo's customers on a stack of their own while workers are
SIGKILLed holding messages, Redis is killed with its data, PostgreSQL crash-restarts, the scheduler is
killed and the sandbox fails requests; then no money, notice or request was lost or doubled. And the
run's own checks catch what they are there to catch."""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from collections import Counter
from email.message import EmailMessage
from pathlib import Path

import pytest
import redis

from tests.integration.conftest import ROOT
from workers.chaos_plan import FAULT_KINDS, POSTGRES_RESTART, REDIS_WIPE, SCHEDULER_KILL, WORKER_KILL, ChaosPlan, Strike
from workers.embedded import EmbeddedStack
from workers.mail import write_eml


def chaos(data_dir: Path, *args: str, **env: str) -> tuple[int, str]:
    result = subprocess.run(
        [sys.executable, "-m", "workers.cli", "chaos", *args],
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "200", "RENOVA_DATA_DIR": str(data_dir), **env},
        capture_output=True,
        text=True,
        timeout=600,
    )
    return result.returncode, result.stdout + result.stderr


def row(output: str, name: str) -> str:
    found = re.search(rf"│ {re.escape(name)} +│ *(.*?) *│", output)
    assert found is not None, f"no row {name!r} in:\n{output}"
    return found.group(1)


def test_a_small_chaos_run_passes_with_every_fault_struck(stack_dir):
    code, output = chaos(
        stack_dir,
        "--orgs", "4", "--days", "3", "--seed", "3",
        "--worker-kills", "2", "--redis-wipes", "1", "--postgres-restarts", "1", "--scheduler-kills", "1",
        "--unavailable-rate", "0.2", "--timeout-rate", "0.2",
    )  # fmt: skip

    assert code == 0, output
    assert output.rstrip().endswith("PASS")
    struck = {kind: int(row(output, kind).split()[0]) for kind in FAULT_KINDS}
    assert struck == {WORKER_KILL: 2, REDIS_WIPE: 1, POSTGRES_RESTART: 1, SCHEDULER_KILL: 1}
    for check in (
        "no invoice charged twice at the gateway",
        "renova ledger check clean",
        "every due renewal invoiced",
        "no lost notice",
        "no duplicate notice",
        "no change request left pending",
        "no work stuck",
        "no dead letter",
        "every event delivered, in order per subscription",
    ):
        assert row(output, check) == "ok", output
    assert int(row(output, "charges succeeded")) > 0
    assert int(row(output, "notices sent")) > 0
    assert int(row(output, "events written")) > 0
    # Everything the run started was stopped.
    assert not (stack_dir / "chaos" / "postgres" / "postmaster.pid").exists()
    assert not (stack_dir / "chaos" / "redis" / "port").exists()


def test_chaos_is_refused_in_production(stack_dir):
    code, output = chaos(stack_dir, RENOVA_ENV="production")

    assert code == 2
    assert "refused with RENOVA_ENV=production" in output


def test_the_plan_strikes_each_fault_as_often_as_asked():
    plan = ChaosPlan(days=7, worker_kills=20, redis_wipes=3, postgres_restarts=1, scheduler_kills=2)

    by_day = plan.faults_by_day(random.Random(5))

    assert set(by_day) <= set(range(7))
    assert Counter(kind for faults in by_day.values() for kind in faults) == {
        WORKER_KILL: 20,
        REDIS_WIPE: 3,
        POSTGRES_RESTART: 1,
        SCHEDULER_KILL: 2,
    }


def test_a_killed_embedded_redis_comes_back_empty_on_the_same_port(stack_dir):
    embedded = EmbeddedStack(stack_dir)
    url = embedded.redis_url()
    redis.Redis.from_url(url).set("kept", "no")
    try:
        port = embedded.kill_redis()
        with pytest.raises(redis.ConnectionError):
            redis.Redis.from_url(url, socket_connect_timeout=0.5, retry=None).ping()
        embedded.start_redis(port)

        assert embedded.redis_url() == url
        assert redis.Redis.from_url(url).get("kept") is None
    finally:
        embedded.stop_redis()


# --- the notice checks catch what they are there to catch ------------------------------------------------


def mail(directory: Path, key: str, message_id: str, received_ns: int) -> None:
    message = EmailMessage()
    message["Message-ID"] = message_id
    message["X-Renova-Notification"] = key
    message["Subject"] = "aviso"
    message.set_content("corpo")
    path = write_eml(directory, message.as_bytes())
    path.rename(directory / f"{received_ns}-{path.name.split('-', 1)[1]}")


def test_notice_checks_find_lost_and_doubled_notices(tmp_path, broker):
    from workers.chaos import _notice_problems

    second = 1_000_000_000
    start = 1_800_000_000 * second
    mail(tmp_path, "once", "<a@x>", start)
    mail(tmp_path, "twice-no-fault", "<b@x>", start)
    mail(tmp_path, "twice-no-fault", "<b@x>", start + 5 * second)
    mail(tmp_path, "twice-after-kill", "<c@x>", start + 10 * second)
    mail(tmp_path, "twice-after-kill", "<c@x>", start + 20 * second)
    mail(tmp_path, "two-ids", "<d@x>", start)
    mail(tmp_path, "two-ids", "<e@x>", start + 10 * second)
    notices = [
        ("once", "sent"),
        ("twice-no-fault", "sent"),
        ("twice-after-kill", "sent"),
        ("two-ids", "sent"),
        ("never-mailed", "sent"),
        ("still-pending", "pending"),
        ("given-up", "failed"),
    ]
    kill = Strike(WORKER_KILL, day=None, at=start / second + 10.5, messages_in_flight=1)  # type: ignore[arg-type]

    lost, doubled, resent = _notice_problems(notices, tmp_path, [kill])

    assert lost == [
        "never-mailed: marked sent, no e-mail received",
        "still-pending: pending",
        "given-up: failed",
    ]
    assert sorted(doubled) == [
        "twice-no-fault: e-mailed twice with no fault in between",
        "two-ids: 2 e-mails with different Message-IDs",
    ]
    assert resent == 1
