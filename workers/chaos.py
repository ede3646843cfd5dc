"""`renova chaos`: the demo's customers and days on a stack of their own while the processes under
them fail — workers SIGKILLed while they hold messages, Redis killed with all its data, PostgreSQL
crashed and restarted, the scheduler killed, the sandbox answering 503 and stalling past the read
timeout — then, once the work has drained, proof from the database, the sandbox's ledger and the mail
sink that nothing was charged twice, lost, doubled or left stuck.

A killed process is started again at once, as a process supervisor would; any other process that
exits stops the run (`DemoError`): the processes must outlive their dependencies.

Imported only once the broker is wired to the chaos stack's Redis (it imports the demo's world).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import subprocess
import sys
import time
from collections import defaultdict
from datetime import date, timedelta
from datetime import time as time_of_day
from email import message_from_bytes, policy
from pathlib import Path
from typing import Any

import httpx
import redis
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, sessionmaker

from jobs.context import BillingConfig
from jobs.simulation import Outcome, SimulationResult
from models.schema import (
    BillingRun,
    ChangeRequest,
    Charge,
    Event,
    EventDelivery,
    GatewayEvent,
    Invoice,
    Notification,
    Refund,
)
from models.states import (
    UNRESOLVED_CHARGE,
    ChangeRequestStatus,
    ChargeStatus,
    InvoiceKind,
    NotificationStatus,
    RefundStatus,
    RunStatus,
)
from workers.chaos_plan import POSTGRES_RESTART, REDIS_WIPE, SCHEDULER_KILL, WORKER_KILL, ChaosPlan, ChaosReport, Strike
from workers.dead_letters import dead_letters
from workers.demo import STALL_MS, LiveWorld
from workers.demo_stack import DemoError, DemoStack
from workers.embedded import EmbeddedStack
from workers.queues import NAMESPACE, QUEUES

# How long a strike waits for messages in flight before it strikes anyway.
MOST_WAIT_FOR_WORK_SECONDS = 1.5
# After the last day: time moves on by this much, again and again, until no work is left.
DRAIN_STEP = timedelta(minutes=2)
DRAIN_TIMEOUT_SECONDS = 300.0
# A notice e-mailed again within this long after a fault was resent because of that fault (the
# documented window: sent, then the process died before its mark was committed).
RESEND_WINDOW_SECONDS = 120.0


class EventReceiver:
    """The main application's webhook endpoint, as the README tells it to be written: each delivery's
    Standard Webhooks signature verified, each event id handled once (deliveries are at least once)."""

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from standardwebhooks.webhooks import Webhook, WebhookVerificationError

        self.secret = ""
        self.first_arrival: dict[str, int] = {}  # event id → its place among first arrivals
        self.deliveries = 0
        self.refused = 0
        lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    event = Webhook(receiver.secret).verify(body, dict(self.headers))
                except WebhookVerificationError:
                    with lock:
                        receiver.refused += 1
                    status = 400
                else:
                    with lock:
                        receiver.deliveries += 1
                        receiver.first_arrival.setdefault(event["id"], len(receiver.first_arrival))
                    status = 204
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                """No line per request on the run's output."""

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/renova/events"
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class ChaosWorld(LiveWorld):
    """The demo's world, with the plan's faults struck during the days and the work drained after
    the last one."""

    def __init__(
        self,
        stack: DemoStack,
        session_factory: sessionmaker[Session],
        config: BillingConfig,
        run_at: time_of_day,
        plan: ChaosPlan,
        start: date,
        report: ChaosReport,
    ) -> None:
        super().__init__(stack, session_factory, config, run_at)
        self.plan = plan
        self.start = start
        self.last_day = start + timedelta(days=plan.days - 1)
        self.rng = random.Random(f"chaos:{plan.seed}")
        self.faults_by_day = plan.faults_by_day(self.rng)
        self.report = report
        self.embedded = EmbeddedStack(stack.root)
        self.receiver = EventReceiver()
        with session_factory() as session:
            from jobs.events import add_endpoint

            endpoint = add_endpoint(session, self.receiver.url, description="chaos receiver", require_https=False)
            session.commit()
            self.receiver.secret = endpoint.secret

    def __exit__(self, *exc_info: object) -> None:
        """The checks after the run still need the clients: `close` closes them."""

    def close(self) -> None:
        super().__exit__(None, None, None)
        self.receiver.close()

    def begin_days(self, first_day: date) -> None:
        super().begin_days(first_day)
        self.sandbox.configure(
            timeout_rate=self.plan.timeout_rate, unavailable_rate=self.plan.unavailable_rate, stall_ms=STALL_MS
        )

    def pass_day(self, day: date) -> None:
        self._at(self._run_instant(day))
        for kind in self.faults_by_day.get((day - self.start).days, []):
            self._strike(kind, day)
        super().pass_day(day)
        if day == self.last_day:
            self.drain()

    def submit(self, body: dict[str, Any], day: date) -> Outcome | None:
        """As the main application does: a 503 (a dependency of `renova web` out of reach) is sent
        again, with the same idempotency key, after its Retry-After."""
        for _ in range(10):
            try:
                return super().submit(body, day)
            except DemoError as exc:
                if ": 503 " not in str(exc):
                    raise
                time.sleep(1.0)
        return super().submit(body, day)

    # --- faults -------------------------------------------------------------------------------------------

    def _strike(self, kind: str, day: date) -> None:
        in_flight = self._wait_for_work()
        at = time.time()
        if kind == WORKER_KILL:
            self.stack.kill("worker")
            self.stack.respawn("worker")
        elif kind == SCHEDULER_KILL:
            self.stack.kill("scheduler")
            time.sleep(self.rng.uniform(0.2, 1.0))
            self.stack.respawn("scheduler")
        elif kind == REDIS_WIPE:
            # Dead letters live in Redis: count them before they are wiped, so none goes unseen.
            self.report.dead_letters_before_wipes += len(dead_letters(self.redis))
            port = self.embedded.kill_redis()
            time.sleep(self.rng.uniform(0.3, 2.0))
            self.embedded.start_redis(port)
        elif kind == POSTGRES_RESTART:
            self.embedded.crash_restart_postgres()
        else:
            raise ValueError(f"unknown fault {kind!r}")
        self.report.strikes.append(Strike(kind, day, at, in_flight))

    def _wait_for_work(self) -> int:
        """Until some message is being worked on (or a while has passed), then a moment more: a
        strike lands in the middle of the day's work, not after it."""
        deadline = time.monotonic() + self.rng.uniform(0.1, MOST_WAIT_FOR_WORK_SECONDS)
        in_flight = 0
        while time.monotonic() < deadline:
            in_flight = self._messages_in_flight()
            if in_flight:
                break
            time.sleep(0.01)
        time.sleep(self.rng.uniform(0.0, 0.2))
        return max(in_flight, self._messages_in_flight())

    def _messages_in_flight(self) -> int:
        with self.redis.pipeline(transaction=False) as pipe:
            for queue in QUEUES:
                pipe.hlen(f"{NAMESPACE}:{queue}.msgs")
            return int(sum(pipe.execute()))

    # --- draining -----------------------------------------------------------------------------------------

    def drain(self) -> None:
        """Time moves on within the last day until no work is left anywhere: lost messages are found
        again by the scheduler's ticks, retries come due, unknown charges are reconciled."""
        assert self.instant is not None
        instant = self.instant
        deadline = time.monotonic() + DRAIN_TIMEOUT_SECONDS
        while True:
            self.wait_idle()
            left = outstanding_work(self.session_factory, self.sandbox_deliveries())
            if not left:
                return
            if time.monotonic() > deadline:
                self.warnings.append(f"work still outstanding after draining: {describe(left)}")
                return
            instant += DRAIN_STEP
            self._at(instant)
            time.sleep(0.5)

    def sandbox_deliveries(self) -> list[dict[str, Any]]:
        response = self.sandbox._http.get("/sandbox/webhooks")
        response.raise_for_status()
        return list(response.json()["data"])

    def gateway_faults(self) -> dict[str, int]:
        response = self.sandbox._http.get("/sandbox/faults")
        response.raise_for_status()
        return dict(response.json())


def describe(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {count}" for name, count in counts.items())


def outstanding_work(session_factory: sessionmaker[Session], deliveries: list[dict[str, Any]]) -> dict[str, int]:
    """Work not finished yet, by kind (absent when none)."""
    with session_factory() as session:
        counts = {
            "change requests pending": session.scalar(
                select(func.count()).where(ChangeRequest.status == ChangeRequestStatus.PENDING)
            ),
            "notices unsent": session.scalar(
                select(func.count()).where(Notification.status == NotificationStatus.PENDING)
            ),
            "gateway events unprocessed": session.scalar(
                select(func.count()).where(GatewayEvent.processed_at.is_(None))
            ),
            "charges unresolved": session.scalar(select(func.count()).where(Charge.status.in_(UNRESOLVED_CHARGE))),
            "refunds unresolved": session.scalar(
                select(func.count()).where(Refund.status.in_((RefundStatus.PENDING, RefundStatus.UNKNOWN)))
            ),
            "billing runs unfinished": session.scalar(select(func.count()).where(BillingRun.status != RunStatus.DONE)),
            "event deliveries pending": session.scalar(select(func.count()).where(EventDelivery.status == "pending")),
        }
    counts["sandbox webhooks undelivered"] = sum(1 for delivery in deliveries if delivery["status"] != "delivered")
    return {name: int(count or 0) for name, count in counts.items() if count}


# --- the checks --------------------------------------------------------------------------------------------


_RENEWALS_NOT_INVOICED = text(
    """
    SELECT count(*) FROM subscriptions
    WHERE status IN ('active', 'past_due') AND current_period_end <= :last_day
    """
)
_BOLETO_RENEWALS_NOT_INVOICED = text(
    """
    SELECT count(*) FROM subscriptions s
    WHERE s.status IN ('active', 'past_due') AND s.payment_method = 'boleto' AND NOT s.cancel_at_period_end
      AND s.pending_payment_method IS NULL
      AND s.current_period_end <= CAST(:last_day AS date) + :lead_days
      AND NOT EXISTS (
        SELECT 1 FROM invoices i WHERE i.subscription_id = s.id AND i.period_start = s.current_period_end
      )
    """
)
_NEEDS_ATTENTION = text(
    """
    SELECT (SELECT count(*) FROM notifications WHERE needs_attention_at IS NOT NULL AND status <> 'sent')
         + (SELECT count(*) FROM gateway_events WHERE needs_attention_at IS NOT NULL AND processed_at IS NULL)
         + (SELECT count(*) FROM change_requests WHERE needs_attention_at IS NOT NULL AND status = 'pending')
    """
)


def check(
    world: ChaosWorld, result: SimulationResult, mail_dir: Path, env: dict[str, str], report: ChaosReport
) -> None:
    """Fill `report.checks` and `report.figures` from what the run left behind."""
    config = world.config
    with world.session_factory() as session:
        renewals_missing = session.scalar(_RENEWALS_NOT_INVOICED, {"last_day": world.last_day}) or 0
        boletos_missing = (
            session.scalar(
                _BOLETO_RENEWALS_NOT_INVOICED, {"last_day": world.last_day, "lead_days": config.boleto_lead_days}
            )
            or 0
        )
        attention = session.scalar(_NEEDS_ATTENTION) or 0
        notices = session.execute(select(Notification.dedupe_key, Notification.status)).all()
        report.figures = _figures(session)
    report.checks["no invoice charged twice at the gateway"] = [
        line for line in result.violations if line.startswith("[gateway]")
    ]
    ledger = subprocess.run(
        [sys.executable, "-m", "workers.cli", "ledger", "check"], env=env, capture_output=True, text=True
    )
    report.checks["renova ledger check clean"] = (
        [] if ledger.returncode == 0 else [line for line in ledger.stdout.splitlines() if line.strip()][-10:]
    )
    report.checks["every due renewal invoiced"] = [
        message
        for message in (
            f"{renewals_missing} subscriptions past their period end not renewed" if renewals_missing else "",
            f"{boletos_missing} boleto renewals within {config.boleto_lead_days} days not invoiced"
            if boletos_missing
            else "",
        )
        if message
    ]
    lost, doubled, resent = _notice_problems(notices, mail_dir, report.strikes)
    report.figures["e-mails resent after a fault (same Message-ID)"] = resent
    report.checks["no lost notice"] = lost
    report.checks["no duplicate notice"] = doubled
    left = outstanding_work(world.session_factory, world.sandbox_deliveries())
    report.checks["no change request left pending"] = (
        [f"{left['change requests pending']} pending"] if "change requests pending" in left else []
    )
    stuck = {name: count for name, count in left.items() if name != "change requests pending"}
    report.checks["no work stuck"] = ([describe(stuck)] if stuck else []) + (
        [f"{attention} items waiting for on-call"] if attention else []
    )
    letters = dead_letters(world.redis)
    report.checks["no dead letter"] = [f"{letter.queue}: {letter.actor} — {letter.error}" for letter in letters[:10]]
    if report.dead_letters_before_wipes:
        report.checks["no dead letter"].append(f"{report.dead_letters_before_wipes} seen before a Redis wipe")
    report.gateway_faults = world.gateway_faults()
    report.checks["every event delivered, in order per subscription"] = _event_problems(world)


def _event_problems(world: ChaosWorld) -> list[str]:
    """Every event written reached the endpoint (signed), each subscription's in the order written."""
    receiver = world.receiver
    with world.session_factory() as session:
        written = session.execute(
            select(Event.id, Event.subscription_id, EventDelivery.status)
            .join(EventDelivery, EventDelivery.event_id == Event.id)
            .order_by(Event.txid, Event.id)
        ).all()
    problems = []
    missing = [event_id for event_id, _, _ in written if f"evt_{event_id}" not in receiver.first_arrival]
    if missing:
        problems.append(f"{len(missing)} events never received (e.g. evt_{missing[0]})")
    failed = sum(1 for _, _, status in written if status != "delivered")
    if failed:
        problems.append(f"{failed} deliveries not delivered")
    if receiver.refused:
        problems.append(f"{receiver.refused} deliveries with a bad signature")
    by_subscription: dict[int, list[int]] = defaultdict(list)
    for event_id, subscription_id, _ in written:
        if subscription_id is not None and f"evt_{event_id}" in receiver.first_arrival:
            by_subscription[subscription_id].append(receiver.first_arrival[f"evt_{event_id}"])
    out_of_order = [sub for sub, places in by_subscription.items() if places != sorted(places)]
    if out_of_order:
        problems.append(f"{len(out_of_order)} subscriptions' events arrived out of order (e.g. {out_of_order[0]})")
    world.report.figures["events written"] = len(written)
    world.report.figures["event deliveries received (duplicates included)"] = receiver.deliveries
    return problems


def _figures(session: Session) -> dict[str, int]:
    charges = dict(session.execute(select(Charge.status, func.count()).group_by(Charge.status)).all())
    return {
        "renewal invoices": session.scalar(select(func.count()).where(Invoice.kind == InvoiceKind.RENEWAL)) or 0,
        "charges succeeded": charges.get(ChargeStatus.SUCCEEDED, 0),
        "charges failed": charges.get(ChargeStatus.FAILED, 0),
        "notices sent": session.scalar(select(func.count()).where(Notification.status == NotificationStatus.SENT)) or 0,
        "change requests": session.scalar(select(func.count()).select_from(ChangeRequest)) or 0,
    }


def _notice_problems(notices: list[Any], mail_dir: Path, strikes: list[Strike]) -> tuple[list[str], list[str], int]:
    """(lost, doubled, resent): a notice is lost when it is not `sent` or no e-mail of it reached the
    sink; doubled when two of its e-mails carry different Message-IDs, or the same one with no fault
    struck in between (a resend only a crash explains). Returns the resends a fault explains too."""
    copies: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for path in sorted(mail_dir.glob("*.eml")):
        message = message_from_bytes(path.read_bytes(), policy=policy.default)
        key = message.get("X-Renova-Notification")
        if key:
            received = int(path.name.split("-", 1)[0]) / 1e9
            copies[str(key)].append((received, str(message.get("Message-ID"))))
    lost, doubled, resent = [], [], 0
    for key, status in notices:
        if status != NotificationStatus.SENT:
            lost.append(f"{key}: {status}")
        elif key not in copies:
            lost.append(f"{key}: marked sent, no e-mail received")
    fault_times = sorted(strike.at for strike in strikes)
    for key, received in copies.items():
        received.sort()
        if len({message_id for _, message_id in received}) > 1:
            doubled.append(f"{key}: {len(received)} e-mails with different Message-IDs")
            continue
        for (first, _), (second, _) in itertools.pairwise(received):
            if any(first - 1.0 <= at <= second and at - first <= RESEND_WINDOW_SECONDS for at in fault_times):
                resent += 1
            else:
                doubled.append(f"{key}: e-mailed twice with no fault in between")
    return lost[:20], doubled[:20], resent


# --- the run -------------------------------------------------------------------------------------------------


def run_chaos(
    stack: DemoStack,
    session_factory: sessionmaker[Session],
    config: BillingConfig,
    run_at: time_of_day,
    plan: ChaosPlan,
    start: date,
    on_day: Any = None,
) -> ChaosReport:
    """The plan on a started stack: the simulation with its faults, the drain, then the checks."""
    from jobs.simulation import Simulation

    started = time.monotonic()
    report = ChaosReport(plan)
    world = ChaosWorld(stack, session_factory, config, run_at, plan, start, report)
    try:
        with session_factory() as session:
            report.result = Simulation(
                session,
                world,
                seed=plan.seed,
                organizations=plan.organizations,
                days=plan.days,
                start=start,
                on_day=on_day,
            ).run()
        stack.check_alive()
        check(world, report.result, stack.mail, {**os.environ, **stack.env}, report)
    except (DemoError, httpx.HTTPError, redis.RedisError) as exc:
        report.error = f"{type(exc).__name__}: {exc}"
    finally:
        with contextlib.suppress(Exception):
            report.gateway_faults = report.gateway_faults or world.gateway_faults()
        report.warnings = world.warnings
        world.close()
        report.seconds = time.monotonic() - started
    return report
