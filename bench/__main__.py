"""`make bench`: renewal throughput of the daily run, as a ratio against a bare Dramatiq message
measured in the same process (machines are shared and noisy: only ratios are comparable).

    python -m bench [--subscriptions 2000]

Runs on its own embedded PostgreSQL database and Redis database under `.renova/bench`, with the
sandbox gateway as a real process (no added latency)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from datetime import UTC, date, datetime
from datetime import time as clock_time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = ROOT / ".renova" / "bench"
RUN_DATE = date(2027, 5, 10)


def configure_environment() -> None:
    from workers.embedded import EmbeddedStack, free_port

    stack = EmbeddedStack(DATA_DIR)
    os.environ.update(
        DATABASE_URL=stack.postgres_url("renova_bench"),
        REDIS_URL=stack.redis_url(db=1),
        RENOVA_ENV="test",
        RENOVA_DATA_DIR=str(DATA_DIR),
        GATEWAY_URL=f"http://127.0.0.1:{free_port()}",
    )


def start_gateway() -> subprocess.Popen[bytes]:
    import httpx

    url = os.environ["GATEWAY_URL"]
    port = url.rsplit(":", 1)[1]
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "workers.cli",
            "gateway",
            "--port",
            port,
            "--data-dir",
            str(DATA_DIR / "gateway"),
            "--webhook-url",
            "",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz").status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.1)
    process.kill()
    raise SystemExit("the sandbox gateway did not start")


def reset_database() -> None:
    from sqlalchemy import text

    from workers.db import get_engine, resolved_urls
    from workers.migrate import upgrade

    with get_engine().begin() as connection:
        connection.execute(text("DROP SCHEMA public CASCADE"))
        connection.execute(text("CREATE SCHEMA public"))
    upgrade(resolved_urls()[0])


def seed(count: int, *, with_charge: bool) -> None:
    from sqlalchemy import text

    from workers.db import get_engine

    balance = 0 if with_charge else 10_000
    with get_engine().begin() as connection:
        connection.execute(
            text(
                "TRUNCATE organizations, subscriptions, invoices, charges, cards, plans, notifications, "
                "ledger_entries, billing_runs RESTART IDENTITY CASCADE"
            )
        )
        connection.execute(text(f"ALTER SEQUENCE invoices_id_seq RESTART WITH {time.time_ns() // 1000}"))
        connection.execute(
            text(
                "INSERT INTO plans (product, cycle, price_cents) VALUES ('conecta', 'monthly', 4990), "
                "('conecta', 'annual', 47900)"
            )
        )
        connection.execute(
            text("INSERT INTO organizations (id, name) SELECT g, 'org ' || g FROM generate_series(1, :n) g"),
            {"n": count},
        )
        connection.execute(
            text(
                "INSERT INTO cards (organization_id, token, brand, last4, exp_month, exp_year) "
                "SELECT g, 'tok_ok', 'visa', '4242', 12, 2035 FROM generate_series(1, :n) g"
            ),
            {"n": count},
        )
        connection.execute(
            text(
                "INSERT INTO subscriptions (organization_id, cycle, payment_method, billing_anchor, current_period_start, "
                "current_period_end, balance_cents) SELECT g, 'monthly', 'card', :start, :start, :end, :balance "
                "FROM generate_series(1, :n) g"
            ),
            {"n": count, "start": date(2027, 4, 10), "end": RUN_DATE, "balance": balance},
        )


def wait_for(predicate, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit("timed out")
        time.sleep(0.02)


def measure_noop(broker, count: int) -> float:
    import dramatiq

    done: list[int] = []

    @dramatiq.actor(queue_name="bench")
    def noop(n: int) -> None:
        done.append(n)

    worker = dramatiq.Worker(broker, worker_threads=8)
    worker.start()
    try:
        started = time.perf_counter()
        for n in range(count):
            noop.send(n)
        wait_for(lambda: len(done) >= count)
        return count / (time.perf_counter() - started)
    finally:
        worker.stop()


def measure_run(broker, count: int, *, with_charge: bool) -> float:
    import dramatiq
    from sqlalchemy import func, select

    from jobs.billing_day import scan_run
    from jobs.context import runtime
    from models.schema import Invoice
    from workers.db import get_session_factory

    seed(count, with_charge=with_charge)
    now = datetime.combine(RUN_DATE, clock_time(12), UTC)
    worker = dramatiq.Worker(broker, worker_threads=8)
    worker.start()
    try:
        started = time.perf_counter()
        with get_session_factory()() as session:
            scan_run(session, RUN_DATE, now, runtime().config)

        def all_paid() -> bool:
            with get_session_factory()() as session:
                return session.scalar(select(func.count()).where(Invoice.status == "paid")) >= count

        wait_for(all_paid)
        return count / (time.perf_counter() - started)
    finally:
        worker.stop()


def measure_renewal_statements(count: int) -> float:
    """Phase 1 alone, as DESIGN measures it: the chunks' renewal statements, no gateway call."""
    from jobs.billing_day import CHUNK_SIZE, TASKS, due_ids
    from jobs.context import runtime
    from jobs.renewals import Work, renew_many
    from workers.db import get_session_factory

    seed(count, with_charge=True)
    now = datetime.combine(RUN_DATE, clock_time(12), UTC)
    with get_session_factory()() as session:
        ids = due_ids(session, TASKS["renew"], RUN_DATE, runtime().config)
        session.commit()
        started = time.perf_counter()
        for start in range(0, len(ids), CHUNK_SIZE):
            work = Work(on=RUN_DATE, now=now, config=runtime().config, gateway=runtime().gateway_factory())
            renew_many(session, ids[start : start + CHUNK_SIZE], work)
            session.commit()
        return len(ids) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subscriptions", type=int, default=2000)
    args = parser.parse_args()

    configure_environment()
    gateway = start_gateway()
    try:
        from workers.broker import broker

        broker.flush_all()
        reset_database()
        noop = measure_noop(broker, args.subscriptions)
        statements = measure_renewal_statements(args.subscriptions)
        credit_only = measure_run(broker, args.subscriptions, with_charge=False)
        charged = measure_run(broker, args.subscriptions, with_charge=True)
    finally:
        gateway.terminate()
        gateway.wait(timeout=10)

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Daily run, {args.subscriptions} renewals due (ratios to a bare message in this process)")
    for column in ("measure", "per second", "ratio to a bare message"):
        table.add_column(column)
    table.add_row("bare Dramatiq message (baseline)", f"{noop:,.0f}", "1.00")
    table.add_row(
        "card renewal statements, chunks of 200, one thread (no gateway call)",
        f"{statements:,.0f}",
        f"{statements / noop:.2f}",
    )
    table.add_row("renewal paid by credit (no gateway call)", f"{credit_only:,.0f}", f"{credit_only / noop:.2f}")
    table.add_row("renewal charged through the sandbox gateway", f"{charged:,.0f}", f"{charged / noop:.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()
