"""The benchmark's scenarios: each measures one thing on the benchmark's stack and returns the table's
line(s), with the invariants checked after it (bench/invariants.py)."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from datetime import time as clock_time

import httpx
import redis
from sqlalchemy import text

from bench.invariants import check_invariants
from bench.report import Result, Target, cores
from bench.seed import RUN_DATE, Day, reset_database, seed_day
from bench.stack import GATEWAY_API_KEY, BenchStack
from gateways.base import ChargeRequest, ChargeResult
from gateways.http import HttpGateway

NOW = datetime.combine(RUN_DATE, clock_time(12), UTC)
POLL_SECONDS = 0.05
SLOW_LATENCY_MS = 200
SANDBOX_IN_FLIGHT = 64


@dataclass(frozen=True)
class Sizes:
    subscriptions: int
    renewals: int
    boletos: int
    scan_small: int
    scan_large: int
    messages: int
    charges: int
    change_requests: int
    timeout_seconds: float

    @property
    def day(self) -> Day:
        return Day(self.subscriptions, self.renewals, self.boletos)


FULL = Sizes(200_000, 10_000, 1_000, 50_000, 500_000, 10_000, 10_000, 100, 900)
QUICK = Sizes(20_000, 1_000, 100, 5_000, 50_000, 1_000, 1_000, 100, 300)


class TimedOut(Exception):
    """A scenario's work did not finish in its time: a NOT MET line, with how far it got."""


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = POLL_SECONDS) -> float:
    """Poll until `predicate` holds; returns the perf_counter() at which it was seen to hold."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimedOut
        time.sleep(interval)
    return time.perf_counter()


_DAY_PROGRESS = text(
    """
    SELECT
      (SELECT count(*) FROM subscriptions WHERE id <= :renewals AND current_period_end > :on) AS advanced,
      (SELECT count(*) FROM charges c JOIN invoices i ON i.id = c.invoice_id
        WHERE i.subscription_id <= :renewals AND c.status = 'succeeded') AS charged,
      (SELECT count(*) FROM charges WHERE status IN ('pending', 'unknown')) AS unresolved,
      (SELECT count(*) FROM boletos b JOIN invoices i ON i.id = b.invoice_id
        WHERE i.subscription_id > :renewals AND i.subscription_id <= :due AND b.status = 'issued') AS boletos
    """
)


# When each kind of row of the day was written, in seconds from the run's start (database clock, which
# stamps a transaction's start): where the day's time went, for the closing line of each day.
_DAY_TIMELINE = text(
    """
    SELECT what, extract(epoch FROM first - :started) AS first, extract(epoch FROM last - :started) AS last, n
    FROM (
      SELECT 'invoices' AS what, min(created_at) AS first, max(created_at) AS last, count(*) AS n, 1 AS o
        FROM invoices WHERE created_at >= :started
      UNION ALL SELECT 'charges settled', min(updated_at), max(updated_at), count(*), 2
        FROM charges WHERE created_at >= :started AND status = 'succeeded'
      UNION ALL SELECT 'boletos', min(created_at), max(created_at), count(*), 3
        FROM boletos WHERE created_at >= :started
      UNION ALL SELECT 'notices sent', min(sent_at), max(sent_at), count(*), 4
        FROM notifications WHERE created_at >= :started AND sent_at IS NOT NULL
    ) AS t ORDER BY o
    """
)


class Bench:
    def __init__(self, stack: BenchStack, sizes: Sizes, say: Callable[[str], object] = print) -> None:
        from workers.db import get_session_factory

        self.stack = stack
        self.sizes = sizes
        self.say = say
        self.sessions = get_session_factory()
        # A fresh schema first: the floors check the invariants too, on an empty database.
        with self.sessions() as session:
            reset_database(session, fresh=True)
        self._fresh = False
        self.redis = redis.Redis.from_url(stack.redis_url)

    # --- helpers -----------------------------------------------------------------------------------

    def seed(self, day: Day) -> None:
        started = time.perf_counter()
        with self.sessions() as session:
            reset_database(session, fresh=self._fresh)
            self._fresh = False
            seed_day(session, day)
        self.say(f"  seeded {day.subscriptions:,} subscriptions in {time.perf_counter() - started:.1f} s")

    def invariants(self) -> list[str]:
        with self.sessions() as session:
            return check_invariants(session, self.stack.gateway_url, GATEWAY_API_KEY)

    def day_progress(self, day: Day) -> tuple[int, int, int, int]:
        with self.sessions() as session:
            row = session.execute(
                _DAY_PROGRESS, {"renewals": day.renewals, "due": day.renewals + day.boletos, "on": RUN_DATE}
            ).one()
        return row.advanced, row.charged, row.unresolved, row.boletos

    def timeline(self, started: datetime) -> str:
        with self.sessions() as session:
            rows = session.execute(_DAY_TIMELINE, {"started": started}).all()
        return "; ".join(
            f"{row.what} {row.n:,} at {row.first:.1f}–{row.last:.1f} s" for row in rows if row.first is not None
        )

    def day_done(self, day: Day) -> bool:
        advanced, charged, unresolved, boletos = self.day_progress(day)
        return advanced == charged == day.renewals and unresolved == 0 and boletos == day.boletos

    def start_run(self) -> None:
        """What `tick` does when a date is due: claim its run, then send `run_billing_day`."""
        from jobs.billing_day import claim_run, run_billing_day

        with self.sessions() as session:
            claim_run(session, RUN_DATE)
            session.commit()
        run_billing_day.send(RUN_DATE.isoformat(), NOW.isoformat())

    def billing_backlog(self) -> int:
        return int(self.redis.llen("dramatiq:billing"))

    # --- 1. the floor ------------------------------------------------------------------------------

    def floor(self) -> Result:
        from bench.actors import bench_noop

        count = self.sizes.messages
        self.say(f"floor: {count:,} no-op messages")
        self.stack.start_gateway(latency_ms=0)  # unused here, but read by the invariants
        self.stack.start_workers()
        try:
            started = time.perf_counter()
            for n in range(count):
                bench_noop.send(n)
            # Every message acknowledged: Dramatiq's hash of the queue's messages is empty.
            ended = wait_for(
                lambda: self.redis.hlen("dramatiq:billing.msgs") == 0 and self.billing_backlog() == 0,
                self.sizes.timeout_seconds,
            )
        except TimedOut:
            return Result("1. floor: bare Dramatiq message", None, "messages/s", note="timed out")
        finally:
            self.stack.stop_workers()
        rate = count / (ended - started)
        self.floor_rate = rate
        return Result(
            "1. floor: bare Dramatiq message",
            rate,
            "messages/s",
            note=f"{count:,} no-op messages, sent and consumed",
            violations=self.invariants(),
        )

    # --- 2. the sandbox's floor --------------------------------------------------------------------

    def sandbox_floor(self) -> Result:
        """The sandbox answering as fast as it can, through the client the workers charge with
        (`HttpGateway.charge_many`, one event loop), from this one process."""
        count = self.sizes.charges
        self.say(f"sandbox floor: {count:,} charges, {SANDBOX_IN_FLIGHT} in flight")
        self.stack.start_gateway(latency_ms=0)
        requests = [ChargeRequest("tok_ok", 4990, f"bench:{n}", f"bench {n}") for n in range(count)]
        with HttpGateway(self.stack.gateway_url, GATEWAY_API_KEY, 2.0, 30.0, max_in_flight=SANDBOX_IN_FLIGHT) as client:
            started = time.perf_counter()
            outcomes = client.charge_many(requests)
            elapsed = time.perf_counter() - started
        failures = sum(1 for outcome in outcomes if not (isinstance(outcome, ChargeResult) and outcome.succeeded))
        note = f"{count:,} charges, {SANDBOX_IN_FLIGHT} in flight, HttpGateway.charge_many"
        violations = self.invariants()
        if failures:
            violations.append(f"{failures} charges not approved")
        return Result("2. sandbox floor: bare charge", count / elapsed, "charges/s", note=note, violations=violations)

    # --- 3, 4, 6. a renewal day ----------------------------------------------------------------------

    def renewal_day(self, latency_ms: int) -> tuple[Result, Result | None]:
        """The day's run on real workers, from its start to the last renewal recorded. Returns its line
        and, for the day without latency, the workers' peak memory line."""
        day = self.sizes.day
        due = day.renewals + day.boletos
        slow = latency_ms > 0
        name = f"4. slow gateway ({latency_ms} ms): renewals" if slow else "3. renewal day: renewals"
        self.say(f"{'slow gateway' if slow else 'renewal day'}: {due:,} due of {day.subscriptions:,}")
        self.seed(day)
        self.stack.start_gateway(latency_ms=latency_ms)
        self.stack.start_workers()
        try:
            started, started_at, cpu_before = time.perf_counter(), datetime.now(UTC), self.stack.cpu_seconds()
            self.start_run()
            try:
                ended = wait_for(lambda: self.day_done(day), self.sizes.timeout_seconds)
                self.say(f"  {ended - started:.1f} s; {self.timeline(started_at)}")
                self.say(f"  {self._cpu_used(cpu_before, ended - started)}")
            except TimedOut:
                advanced, charged, unresolved, boletos = self.day_progress(day)
                note = (
                    f"timed out after {self.sizes.timeout_seconds:.0f} s: {advanced:,} advanced, {charged:,} charged, "
                    f"{unresolved:,} unresolved, {boletos:,} boletos"
                )
                return Result(name, None, "renewals/s", target=self._day_target(slow), note=note), None
            peaks = self.stack.worker_peak_rss_mb()
        finally:
            self.stack.stop_workers()
        rate = due / (ended - started)
        violations = self.invariants()
        note = f"{day.renewals:,} card + {day.boletos:,} boleto renewals in {ended - started:.1f} s"
        floor = getattr(self, "floor_rate", None)
        line = Result(
            name,
            rate,
            "renewals/s",
            ratio=None if slow or not floor else rate / floor,
            target=self._day_target(slow),
            violations=violations,
            note=note,
        )
        memory = None
        if not slow:
            memory = Result(
                "6. memory: peak RSS per worker process",
                max(peaks) if peaks else None,
                "MB",
                target=Target("<=", 250),
                violations=violations,
                note="during the renewal day; " + ", ".join(f"{peak:.0f}" for peak in sorted(peaks, reverse=True)),
            )
        return line, memory

    def _cpu_used(self, before: dict[str, float], elapsed: float) -> str:
        """Where the day's CPU went, against what the machine's cores could give in that time."""
        after = self.stack.cpu_seconds()
        used = {name: after[name] - before.get(name, 0.0) for name in after}
        parts = ", ".join(f"{name} {seconds:.1f}" for name, seconds in sorted(used.items(), key=lambda i: -i[1]))
        return f"CPU seconds: {parts}; total {sum(used.values()):.1f} of {cores() * elapsed:.1f} ({cores()} cores)"

    @staticmethod
    def _day_target(slow: bool) -> Target:
        return Target(">=", 400) if slow else Target(">=", 0.5, on_ratio=True)

    # --- 5. scan scaling ---------------------------------------------------------------------------

    def scan_scaling(self) -> Result:
        times = {}
        for size in (self.sizes.scan_small, self.sizes.scan_large):
            self.say(f"scan: {size:,} subscriptions, {self.sizes.renewals + self.sizes.boletos:,} due")
            self.seed(Day(size, self.sizes.renewals, self.sizes.boletos))
            times[size] = self._time_scan()
        small, large = times[self.sizes.scan_small], times[self.sizes.scan_large]
        self.stack.start_gateway(latency_ms=0)  # the invariants read its ledger (empty: nothing was charged)
        return Result(
            "5. scan + fan-out scaling",
            large * 1000,
            "ms",
            ratio=large / small,
            target=Target("<=", 1.5, on_ratio=True),
            violations=self.invariants(),
            note=f"{self.sizes.scan_small:,} subs: {small * 1000:.0f} ms; {self.sizes.scan_large:,}: "
            f"{large * 1000:.0f} ms (median of 3; same rows due)",
        )

    def _time_scan(self, repeats: int = 3) -> float:
        from jobs.billing_day import claim_run, scan_run
        from jobs.context import runtime

        with self.sessions() as session:
            claim_run(session, RUN_DATE)
            session.commit()
        timings = []
        for _ in range(repeats):
            self.redis.flushdb()
            with self.sessions() as session:
                started = time.perf_counter()
                scan_run(session, RUN_DATE, NOW, runtime().config)
                timings.append(time.perf_counter() - started)
        self.redis.flushdb()
        return statistics.median(timings)

    # --- 7. change requests under a renewal backlog ------------------------------------------------

    def change_requests(self) -> Result:
        day = self.sizes.day
        count = self.sizes.change_requests
        name = "7. change requests under backlog: p95"
        self.say(f"change requests: {count} card replacements while {day.renewals + day.boletos:,} renewals run")
        self.seed(day)
        self.stack.start_gateway(latency_ms=0)
        self.stack.start_web()
        self.stack.start_workers()
        violations: list[str] = []
        try:
            self.start_run()
            try:
                wait_for(lambda: self.billing_backlog() > 0, 60)
            except TimedOut:
                violations.append("the run's chunks were never seen queued")
            # Sent from a thread of their own while this one watches: a request is seen applied when it
            # is, not only once the last one has been sent.
            sent_at: dict[int, float] = {}
            backlog: list[int] = []
            sender = threading.Thread(
                target=self._post_change_requests, args=(day.first_not_due, count, sent_at, backlog), daemon=True
            )
            sender.start()
            seen_at: dict[int, float] = {}
            statuses: dict[int, str] = {}

            def all_processed() -> bool:
                sending = sender.is_alive()
                with self.sessions() as session:
                    rows = session.execute(
                        text("SELECT id, status FROM change_requests WHERE id = ANY(:ids) AND status <> 'pending'"),
                        {"ids": [i for i in list(sent_at) if i not in seen_at]},
                    ).all()
                now = time.perf_counter()
                for request_id, status in rows:
                    seen_at[request_id] = now
                    statuses[request_id] = status
                return not sending and len(seen_at) == len(sent_at)

            try:
                wait_for(all_processed, self.sizes.timeout_seconds, interval=0.02)
            except TimedOut:
                violations.append(f"{len(sent_at) - len(seen_at)} change requests never processed")
            # The invariants are checked on the finished day.
            wait_for(lambda: self.day_done(day), self.sizes.timeout_seconds)
        finally:
            self.stack.stop_workers()
            self.stack.stop_web()
        not_applied = sum(1 for status in statuses.values() if status != "applied")
        if not_applied:
            violations.append(f"{not_applied} change requests not applied")
        self.say(f"  queued before processing began: {self._queue_wait(list(sent_at))}")
        latencies = sorted(seen_at[i] - sent_at[i] for i in seen_at)
        p95 = latencies[max(0, round(0.95 * len(latencies)) - 1)] if latencies else None
        violations += self.invariants()
        return Result(
            name,
            p95,
            "s",
            target=Target("<=", 2),
            violations=violations,
            note=f"{count} card replacements over HTTP; billing chunks still queued at the last: "
            f"{backlog[0] if backlog else '?'}"
            + (f"; median {statistics.median(latencies):.2f} s" if latencies else ""),
        )

    def _queue_wait(self, ids: list[int]) -> str:
        """From a request's recording (created_at) to the start of its processing (processed_at holds
        the instant its processing began): the time it waited for a worker thread."""
        with self.sessions() as session:
            median, p95 = session.execute(
                text(
                    "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY w), percentile_cont(0.95) WITHIN GROUP"
                    " (ORDER BY w) FROM (SELECT extract(epoch FROM processed_at - created_at) AS w"
                    " FROM change_requests WHERE id = ANY(:ids)) AS waits"
                ),
                {"ids": ids},
            ).one()
        return "n/a" if median is None else f"median {median:.2f} s, p95 {p95:.2f} s"

    def _post_change_requests(
        self, first_organization: int, count: int, sent_at: dict[int, float], backlog: list[int]
    ) -> None:
        """POST the requests one after the other, noting when each was sent, then the billing backlog."""
        headers = {"Authorization": f"Bearer {self.stack.api_key}"}
        with httpx.Client(base_url=self.stack.web_url, headers=headers, timeout=30) as client:
            for n in range(count):
                organization = first_organization + n
                body = {
                    "organization_id": organization,
                    "requested_by": organization * 100 + 1,
                    "kind": "card",
                    "token": "tok_ok",
                    "brand": "mastercard",
                    "last4": "4444",
                    "exp_month": 11,
                    "exp_year": 2033,
                }
                started = time.perf_counter()
                response = client.post("/v1/change-requests", json=body, headers={"Idempotency-Key": f"bench-{n}"})
                response.raise_for_status()
                sent_at[int(response.json()["id"])] = started
        backlog.append(self.billing_backlog())
