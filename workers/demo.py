"""`renova demo`: months of billing passing in minutes on a running stack (`workers.demo_stack`).

`LiveWorld` is the simulation's `World` on that stack: the seeded people of `jobs.simulation` act
through the HTTP API (prices, organizations, change requests), the sandbox pays or lets expire their
boletos and posts its signed webhooks to `renova web`, and the test clock moves one day at a time
while the scheduler's ticks and the workers do each day's work. Every step waits for its effects
(the request decided, the webhook recorded, the queues drained), so the next reads see them.

Imported only once the broker is wired to the demo's Redis (it imports the flows).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from datetime import time as time_of_day
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import redis
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from jobs import clock
from jobs.context import BillingConfig
from jobs.organizations import MemberCopy
from jobs.simulation import Outcome, SandboxHttp, SimulationResult, noon_of
from models.schema import BillingRun, Boleto
from models.states import BoletoStatus, RunStatus
from workers.demo_stack import DemoError, DemoStack
from workers.queues import NAMESPACE, QUEUES

# Faults of the sandbox once the days pass (set-up runs without them, as no scheduler reconciles yet).
TIMEOUT_RATE = 0.03
STALL_MS = 2_500
# How long one step may take before the demo says what it was waiting for.
STEP_TIMEOUT_SECONDS = 90.0
# Delayed messages (retries with back-off) are waited for this long, then left to finish later.
DELAYED_GRACE_SECONDS = 3.0


class LiveWorld:
    """The simulated people on a running stack: the API for what the main application sends, the
    sandbox's test endpoints for what payers and banks do, the test clock for the passing days."""

    def __init__(
        self,
        stack: DemoStack,
        session_factory: sessionmaker[Session],
        config: BillingConfig,
        run_at: time_of_day,
    ) -> None:
        self.stack = stack
        self.session_factory = session_factory
        self.config = config
        self.run_at = run_at
        self.api = httpx.Client(
            base_url=stack.web_url, headers={"Authorization": f"Bearer {stack.api_key}"}, timeout=30.0
        )
        self.sandbox = SandboxHttp(stack.gateway_url, stack.gateway_api_key)
        self.redis = redis.Redis.from_url(stack.env["REDIS_URL"])
        self.instant: datetime | None = None
        self.warnings: list[str] = []

    def __enter__(self) -> LiveWorld:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.api.close()
        self.sandbox.close()

    # --- the World protocol ------------------------------------------------------------------------------

    def set_prices(self, product: str, *, monthly_cents: int, annual_cents: int, day: date, reason: str) -> None:
        self._at(noon_of(day))
        self._ok(
            self.api.put(
                f"/v1/plans/{product}",
                json={"monthly_cents": monthly_cents, "annual_cents": annual_cents, "reason": reason},
            )
        )

    def save_organization(
        self, organization_id: int, *, name: str, document: str, members: list[MemberCopy], day: date
    ) -> None:
        self._at(noon_of(day))
        body = {
            "name": name,
            "document": document,
            "members": [
                {
                    "id": member.id,
                    "role": member.role,
                    "name": member.name,
                    "email": member.email,
                    "financial_responsible": member.financial_responsible,
                }
                for member in members
            ],
        }
        self._ok(self.api.put(f"/v1/organizations/{organization_id}", json=body))

    def submit(self, body: dict[str, Any], day: date) -> Outcome | None:
        if self.instant is None or self.instant.date() != day:
            self._at(noon_of(day))
        response = self.api.post("/v1/change-requests", json=body, headers={"Idempotency-Key": body["idempotency_key"]})
        if response.status_code in (400, 409, 422):
            error = response.json().get("error") or {}
            return Outcome("rejected", error.get("code", str(response.status_code)))
        request = self._ok(response)
        deadline = time.monotonic() + STEP_TIMEOUT_SECONDS / 3
        while request["status"] == "pending" and time.monotonic() < deadline:
            time.sleep(0.02)
            request = self._ok(self.api.get(f"/v1/change-requests/{request['id']}"))
        self.wait_idle()
        error = request.get("error") or {}
        return Outcome(request["status"], error.get("code"), request.get("result"))

    def begin_days(self, first_day: date) -> None:
        """The customers exist: faults on, the scheduler starts ticking."""
        self.sandbox.configure(timeout_rate=TIMEOUT_RATE, stall_ms=STALL_MS)
        self._at(self._run_instant(first_day))
        self.stack.start_scheduler()

    def pass_day(self, day: date) -> None:
        """The run hour of `day` strikes: the scheduler claims the run, the workers do it; then time
        moves on within the day (re-scans) until the run is done."""
        self._at(self._run_instant(day))
        self._until(lambda session: session.scalar(select(BillingRun.id).where(BillingRun.run_date == day)), day)
        self.wait_idle()
        instant = max(noon_of(day), self._run_instant(day) + timedelta(minutes=10))
        self._at(instant)
        deadline = time.monotonic() + STEP_TIMEOUT_SECONDS
        while True:
            with self.session_factory() as session:
                status = session.scalar(select(BillingRun.status).where(BillingRun.run_date == day))
            if status == RunStatus.DONE:
                break
            if time.monotonic() > deadline:
                self.warnings.append(f"{day.isoformat()}: the billing run was not done; the next days finish it")
                break
            if self.wait_idle():
                # Nothing left in the queues but the run is not done: let time pass so a tick re-scans it.
                instant += timedelta(minutes=6)
                self._at(instant)
            time.sleep(0.05)
        self.wait_idle()

    def pay_boleto(self, gateway_id: str, amount_cents: int, day: date) -> None:
        self.sandbox.pay_boleto(gateway_id, paid_on=day, amount_cents=amount_cents)
        self._until_boleto(gateway_id, BoletoStatus.PAID, day)

    def expire_boleto(self, gateway_id: str, day: date) -> None:
        self.sandbox.expire_boleto(gateway_id)
        self._until_boleto(gateway_id, BoletoStatus.EXPIRED, day)

    def gateway_ledger(self) -> list[dict[str, Any]]:
        return self.sandbox.ledger()

    # --- waiting --------------------------------------------------------------------------------------------

    def wait_idle(self, timeout: float = STEP_TIMEOUT_SECONDS) -> bool:
        """Until no message is waiting or being worked on (Dramatiq keeps a message's body until its
        ack, and a message sent by an actor is enqueued before that actor's own ack). Delayed
        messages — retries with back-off — get a short grace, then are left to finish later.
        Returns False if it gave up."""
        deadline = time.monotonic() + timeout
        only_delayed_since: float | None = None
        while time.monotonic() < deadline:
            with self.redis.pipeline(transaction=False) as pipe:
                for queue in QUEUES:
                    pipe.hlen(f"{NAMESPACE}:{queue}.msgs")
                for queue in QUEUES:
                    pipe.hlen(f"{NAMESPACE}:{queue}.DQ.msgs")
                depths = pipe.execute()
            busy, delayed = sum(depths[: len(QUEUES)]), sum(depths[len(QUEUES) :])
            if not busy and not delayed:
                return True
            if not busy:
                only_delayed_since = only_delayed_since or time.monotonic()
                if time.monotonic() - only_delayed_since > DELAYED_GRACE_SECONDS:
                    return True
            else:
                only_delayed_since = None
            self.stack.check_alive()
            time.sleep(0.02)
        self.warnings.append(f"the queues were still busy after {timeout:.0f} s")
        return False

    def _until(
        self, found: Callable[[Session], object], day: date, what: str = "the scheduler to claim the billing run"
    ) -> None:
        deadline = time.monotonic() + STEP_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            with self.session_factory() as session:
                if found(session):
                    return
            self.stack.check_alive()
            time.sleep(0.03)
        raise DemoError(f"{day.isoformat()}: waited {STEP_TIMEOUT_SECONDS:.0f} s for {what}; see {self.stack.logs}")

    def _until_boleto(self, gateway_id: str, status: str, day: date) -> None:
        """The sandbox's webhook reached `renova web` and a worker recorded it."""
        self._until(
            lambda session: session.scalar(select(Boleto.status).where(Boleto.gateway_id == gateway_id)) == status,
            day,
            f"the webhook of boleto {gateway_id} to be recorded as {status}",
        )
        self.wait_idle()

    # --- time -----------------------------------------------------------------------------------------------

    def _run_instant(self, day: date) -> datetime:
        """A minute after the run hour of `day`, in UTC."""
        local = datetime.combine(day, self.run_at, ZoneInfo(self.config.timezone)) + timedelta(minutes=1)
        return local.astimezone(UTC)

    def _at(self, instant: datetime) -> None:
        if instant == self.instant:
            return
        with self.session_factory() as session:
            clock.set_clock(session, instant, self.config)
            session.commit()
        self.instant = instant

    @staticmethod
    def _ok(response: httpx.Response) -> Any:
        if response.status_code >= 400:
            raise DemoError(
                f"{response.request.method} {response.request.url.path}: {response.status_code} {response.text}"
            )
        return response.json()


# --- the run -----------------------------------------------------------------------------------------------


def run_demo(
    stack: DemoStack,
    session_factory: sessionmaker[Session],
    config: BillingConfig,
    run_at: time_of_day,
    **simulation: Any,
) -> tuple[SimulationResult, list[str]]:
    """The seeded simulation (`jobs.simulation.Simulation` arguments) on the stack; returns its result
    and what the demo noticed on the way (steps that did not finish in time)."""
    from jobs.simulation import Simulation

    world = LiveWorld(stack, session_factory, config, run_at)
    with session_factory() as session:
        result = Simulation(session, world, **simulation).run()
    return result, world.warnings


def draw_chart(result: SimulationResult, path: Path) -> Path:
    """A PNG of the days: money collected per day by card and by boleto, subscriptions by status."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    days = [day for day, _, _ in result.revenue]
    card = [cents / 100 for _, cents, _ in result.revenue]
    boleto = [cents / 100 for _, _, cents in result.revenue]
    figure, (money, subscriptions) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    money.bar(days, card, label="card", color="#3b6fb6")
    money.bar(days, boleto, bottom=card, label="boleto", color="#e0a030")
    money.set_ylabel("R$ collected per day")
    money.set_title(
        f"Renova demo: {result.organizations} organizations, {result.days} days from {result.start.isoformat()}"
    )
    money.legend(loc="upper left")
    seen = {status for _, by_status in result.statuses_by_day for status in by_status}
    order = [status for status in ("active", "past_due", "suspended", "canceled") if status in seen]
    order += sorted(seen - set(order))
    colors = {"active": "#4caf50", "past_due": "#ffb300", "suspended": "#e53935", "canceled": "#9e9e9e"}
    subscriptions.stackplot(
        [day for day, _ in result.statuses_by_day],
        [[by_status.get(status, 0) for _, by_status in result.statuses_by_day] for status in order],
        labels=order,
        colors=[colors.get(status, "#7e57c2") for status in order],
    )
    subscriptions.set_ylabel("subscriptions by status")
    subscriptions.legend(loc="upper left")
    figure.autofmt_xdate()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
