"""Months of billing in minutes: seeded people who subscribe, act and pay, and the days passing.

`Simulation` is the behaviour and the bookkeeping: who subscribes to what, what members ask for on
a given day, which boletos are paid on time, late or never, the counts of each day and, at the end,
the invariants. Where they act is a `World`:

- `InProcessWorld` (`renova simulate`): no broker and no workers. It drives the very functions the
  workers run, in this thread, with one session and explicit dates — `run_day` for each business
  date, `submit_request` for the members' change requests, `record_boleto_payment` /
  `record_boleto_expired` as the gateway's webhooks would — against a real gateway (an
  `HttpGateway` to the sandbox) whose boletos it pays through the sandbox's test endpoints. Messages
  the flows leave for after their commit (cancel a boleto at the gateway, issue a segunda via,
  execute a card refund) are run here, in order, instead of being sent to Redis; notices stay as
  rows (`notifications`), counted but not mailed.
- the demo's world (`workers.demo`, `renova demo`): the same people act through the HTTP API of a
  running stack, the test clock moves one day at a time, and the scheduler and workers do the work.

Everything random comes from `random.Random(seed)`, drawn in a fixed order (organizations by their
index, boletos by id). In process the sandbox runs with fault rates 0 (declines come from the card
tokens), so the same seed gives the same counts on a fresh database. At the end two invariants are
checked: `jobs.ledger_check.check_ledger` finds nothing, and the sandbox's ledger holds at most one
successful charge per idempotency key and per invoice.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, Protocol

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from gateways.base import Gateway
from jobs import clock
from jobs.billing_day import run_day
from jobs.boletos import (
    cancel_boleto_at,
    issue_boleto,
    record_boleto_expired,
    record_boleto_payment,
)
from jobs.changes import submit_request
from jobs.context import BillingConfig
from jobs.ledger_check import check_ledger
from jobs.organizations import MemberCopy, upsert_organization
from jobs.outbox import dispatch_with
from jobs.plans import set_prices
from jobs.refunds import execute_refund
from models.dunning import overdue_on
from models.schema import (
    Boleto,
    Card,
    Charge,
    ClockSetting,
    Invoice,
    Member,
    Notification,
    Organization,
    Refund,
    Subscription,
)
from models.states import BoletoStatus, ChargeStatus, InvoiceKind

logger = logging.getLogger(__name__)

PRODUCT = "conecta"
MONTHLY_PRICE_CENTS = 4_990
ANNUAL_PRICE_CENTS = 47_900
SOFT_DECLINE = "tok_insufficient_funds"
HARD_DECLINE = "tok_expired"
GOOD_CARD = "tok_ok"

# Seeded behaviour: how organizations subscribe, and how people act on a given day.
PLAN_WEIGHTS = {"monthly_card": 5, "annual_card": 3, "annual_boleto": 3}
SOFT_DECLINE_RATE = 0.2
HARD_DECLINE_RATE = 0.1
BOLETO_ORG_CARD_RATE = 0.6  # boleto payers with a card on file (they may switch to card)
PLANNED_SWITCH_RATE = 0.6  # annual boleto payers who ask to switch to card around T − 7
ACTION_RATE = 0.03  # per organization and day: somebody does something in "Minhas assinaturas"
FIX_CARD_RATE = 0.3  # per day while past due on a declining card: a new card
SECOND_COPY_RATE = 0.1  # per day while a boleto is overdue: the payer asks for a segunda via
BOLETO_FATES = {"on_time": 0.7, "late": 0.15, "never": 0.15}
EXPIRE_AFTER_OVERDUE_DAYS = 10  # a boleto nobody pays expires at the gateway (segunda via follows)
ACTIONS = {
    "billing_cycle": 3,
    "payment_method": 2,
    "card": 1,
    "cancel_or_resume": 2,
    "reissue_boleto": 1,
    "plain_member": 1,  # a member without the right to change billing tries anyway
}

COUNTERS = (
    "renewals_charged",
    "boletos_issued",
    "boletos_paid",
    "boletos_paid_late",
    "boletos_overdue",
    "boletos_expired",
    "declines",
    "retries",
    "suspensions",
    "reactivations",
    "requests_applied",
    "requests_rejected",
    "notices",
    "refunds",
)


class SandboxControl(Protocol):
    """The sandbox gateway's test endpoints (what a bank and the gateway's own clock would do)."""

    def pay_boleto(self, boleto_id: str, *, paid_on: date | None = None, amount_cents: int | None = None) -> Any: ...

    def expire_boleto(self, boleto_id: str) -> Any: ...

    def ledger(self) -> list[dict[str, Any]]: ...


class SandboxHttp:
    """`SandboxControl` over HTTP: `POST /sandbox/boletos/{id}/pay|expire`, `GET /sandbox/ledger`."""

    def __init__(self, base_url: str, api_key: str, timeout: float = 10.0) -> None:
        import httpx

        self._http = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=timeout)

    def pay_boleto(self, boleto_id: str, *, paid_on: date | None = None, amount_cents: int | None = None) -> Any:
        body: dict[str, Any] = {}
        if paid_on is not None:
            body["paid_on"] = paid_on.isoformat()
        if amount_cents is not None:
            body["amount_cents"] = amount_cents
        response = self._http.post(f"/sandbox/boletos/{boleto_id}/pay", json=body)
        response.raise_for_status()
        return response.json()

    def expire_boleto(self, boleto_id: str) -> Any:
        response = self._http.post(f"/sandbox/boletos/{boleto_id}/expire")
        response.raise_for_status()
        return response.json()

    def configure(self, **faults: Any) -> Any:
        """Change the sandbox's fault settings (`POST /sandbox/config`), e.g. `timeout_rate=0.03`."""
        response = self._http.post("/sandbox/config", json=faults)
        response.raise_for_status()
        return response.json()

    def ledger(self) -> list[dict[str, Any]]:
        response = self._http.get("/sandbox/ledger")
        response.raise_for_status()
        return list(response.json()["data"])

    def close(self) -> None:
        self._http.close()


def noon_of(day: date) -> datetime:
    """The instant used for business date `day`: noon UTC (09:00 in São Paulo, after the 06:00 run)."""
    return datetime.combine(day, time(12), UTC)


def days_from(start: date, count: int) -> Iterator[date]:
    for offset in range(count):
        yield start + timedelta(days=offset)


def year_before(day: date) -> date:
    try:
        return day.replace(year=day.year - 1)
    except ValueError:  # Feb 29
        return day.replace(year=day.year - 1, day=28)


def cpf(rng: random.Random) -> str:
    """A CPF with valid check digits (fictitious)."""
    digits = [rng.randrange(10) for _ in range(9)]
    if len(set(digits)) == 1:
        digits[0] = (digits[0] + 1) % 10
    for length in (9, 10):
        total = sum(d * (length + 1 - i) for i, d in enumerate(digits[:length]))
        digits.append((total * 10 % 11) % 10)
    return "".join(map(str, digits))


@dataclass
class SimOrganization:
    index: int
    id: int
    owner: int
    admin: int
    member: int
    financial: int
    plan: str  # monthly_card | annual_card | annual_boleto
    token: str | None  # the card it starts with (None: no card on file)
    anchor: date
    subscription_id: int | None = None
    planned_switch: date | None = None
    requests: int = 0

    @property
    def billers(self) -> tuple[int, int, int]:
        return (self.owner, self.admin, self.financial)


@dataclass
class BoletoPlan:
    fate: str
    pay_on: date | None
    expire_on: date | None


@dataclass
class SimulationResult:
    seed: int
    organizations: int
    days: int
    start: date
    setup: dict[str, int] = field(default_factory=dict)
    per_day: list[tuple[date, dict[str, int]]] = field(default_factory=list)
    totals: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    statuses: dict[str, int] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    # Per day: cents collected by card and by boleto, and subscriptions by status at the day's end.
    revenue: list[tuple[date, int, int]] = field(default_factory=list)
    statuses_by_day: list[tuple[date, dict[str, int]]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def counts(self) -> dict[str, Any]:
        """Everything that must be identical for the same seed (database ids excluded)."""
        return {
            "setup": dict(self.setup),
            "per_day": [(day.isoformat(), dict(counts)) for day, counts in self.per_day],
            "totals": dict(self.totals),
            "rejected": dict(sorted(self.rejected.items())),
            "statuses": dict(sorted(self.statuses.items())),
            "revenue": [(day.isoformat(), card, boleto) for day, card, boleto in self.revenue],
            "statuses_by_day": [(day.isoformat(), dict(sorted(s.items()))) for day, s in self.statuses_by_day],
        }


@dataclass(frozen=True)
class Outcome:
    """What became of a change request: `applied` (with its result), `rejected` (with its code) or
    still `pending`."""

    status: str
    error_code: str | None = None
    result: dict[str, Any] | None = None


class World(Protocol):
    """Where the simulated people act and the days pass. Each method returns once the work it set off
    is done, so that what the simulation reads next from the database is settled."""

    def __enter__(self) -> World: ...

    def __exit__(self, *exc_info: object) -> None: ...

    def set_prices(self, product: str, *, monthly_cents: int, annual_cents: int, day: date, reason: str) -> None: ...

    def save_organization(
        self, organization_id: int, *, name: str, document: str, members: list[MemberCopy], day: date
    ) -> None: ...

    def submit(self, body: dict[str, Any], day: date) -> Outcome | None:
        """A member's change request on `day`; None when the body was refused before being recorded."""
        ...

    def begin_days(self, first_day: date) -> None:
        """The set-up is over: from now on the days pass one by one, from `first_day`."""
        ...

    def pass_day(self, day: date) -> None:
        """Move to `day` and return once its billing run, and the work it set off, is done."""
        ...

    def pay_boleto(self, gateway_id: str, amount_cents: int, day: date) -> None: ...

    def expire_boleto(self, gateway_id: str, day: date) -> None: ...

    def gateway_ledger(self) -> list[dict[str, Any]]:
        """Every successful charge and refund the gateway knows of (its own ledger)."""
        ...


class _LocalOutbox:
    """The flows' after-commit messages, kept here (`jobs.outbox.dispatch_with`) to run in this thread
    instead of going to Redis; the outbox still releases them only once their transaction committed."""

    def __init__(self) -> None:
        self.ready: list[tuple[Any, tuple[Any, ...], dict[str, Any]]] = []

    def __call__(self, actor: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.ready.append((actor, args, kwargs))

    def take_ready(self) -> list[tuple[Any, tuple[Any, ...], dict[str, Any]]]:
        ready, self.ready = self.ready, []
        return ready


class InProcessWorld:
    """The flows' own functions in this thread, one session, explicit dates; the test clock follows
    the simulated day (when the environment allows one) and is put back as it was at the end."""

    def __init__(
        self,
        session: Session,
        gateway: Gateway,
        sandbox: SandboxControl,
        config: BillingConfig,
        *,
        set_test_clock: bool = True,
    ) -> None:
        self.session = session
        self.gateway = gateway
        self.sandbox = sandbox
        self.config = config
        self.set_test_clock = set_test_clock and config.allow_future_dates
        self.outbox = _LocalOutbox()
        self._dispatch = contextlib.ExitStack()
        self._previous_clock: datetime | None = None

    def __enter__(self) -> InProcessWorld:
        self._previous_clock = self.session.scalar(select(ClockSetting.now).where(ClockSetting.id == clock.CLOCK_ID))
        self.session.commit()
        self._dispatch.enter_context(dispatch_with(self.session, self.outbox))
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self._dispatch.close()
        finally:
            self.session.rollback()
            if self.set_test_clock:
                if self._previous_clock is None:
                    clock.reset_clock(self.session)
                else:
                    clock.set_clock(self.session, self._previous_clock, self.config)
                self.session.commit()

    def set_prices(self, product: str, *, monthly_cents: int, annual_cents: int, day: date, reason: str) -> None:
        set_prices(
            self.session,
            product,
            monthly_cents=monthly_cents,
            annual_cents=annual_cents,
            effective_from=day,
            today=day,
            actor="simulation",
            reason=reason,
        )
        self.session.commit()

    def save_organization(
        self, organization_id: int, *, name: str, document: str, members: list[MemberCopy], day: date
    ) -> None:
        upsert_organization(
            self.session, organization_id, name=name, document=document, members=members, now=noon_of(day)
        )
        self.session.commit()

    def submit(self, body: dict[str, Any], day: date) -> Outcome | None:
        request = submit_request(self.session, self.gateway, body, now=noon_of(day), config=self.config)
        self._drain(noon_of(day))
        if request is None:
            return None
        self.session.refresh(request)
        return Outcome(request.status, request.error_code, request.result)

    def begin_days(self, first_day: date) -> None:
        """Nothing to start: every day's run is called from `pass_day` in this thread."""

    def pass_day(self, day: date) -> None:
        now = noon_of(day)
        if self.set_test_clock:
            clock.set_clock(self.session, now, self.config)
            self.session.commit()
        run_day(self.session, self.gateway, day, now, self.config)
        self._drain(now)

    def pay_boleto(self, gateway_id: str, amount_cents: int, day: date) -> None:
        self.sandbox.pay_boleto(gateway_id, paid_on=day, amount_cents=amount_cents)
        record_boleto_payment(self.session, gateway_id, amount_cents=amount_cents, paid_on=day, now=noon_of(day))
        self.session.commit()
        self._drain(noon_of(day))

    def expire_boleto(self, gateway_id: str, day: date) -> None:
        self.sandbox.expire_boleto(gateway_id)
        record_boleto_expired(self.session, gateway_id, on=day)
        self.session.commit()
        self._drain(noon_of(day))

    def gateway_ledger(self) -> list[dict[str, Any]]:
        return self.sandbox.ledger()

    def _drain(self, now: datetime) -> None:
        """The after-commit messages, here instead of the broker."""
        while ready := self.outbox.take_ready():
            for actor, args, _kwargs in ready:
                name = getattr(actor, "actor_name", "")
                if name == "cancel_boleto_at_gateway":
                    cancel_boleto_at(self.gateway, args[0])
                elif name == "issue_invoice_boleto":
                    issue_boleto(self.session, self.gateway, args[0], config=self.config)
                    self.session.commit()
                elif name == "process_refund":
                    execute_refund(self.session, self.gateway, args[0], now=now)
                    self.session.commit()
                # send_notification: the notice stays a row (counted, not mailed).


class Simulation:
    def __init__(
        self,
        session: Session,
        world: World,
        *,
        seed: int,
        organizations: int,
        days: int,
        start: date,
        on_day: Callable[[date, dict[str, int]], None] | None = None,
    ) -> None:
        if organizations < 1 or days < 1:
            raise ValueError("a simulation needs at least one organization and one day")
        self.session = session
        self.world = world
        self.rng = random.Random(seed)
        self.start = start
        self.days = days
        self.on_day = on_day
        self.result = SimulationResult(seed=seed, organizations=organizations, days=days, start=start)
        self.orgs: list[SimOrganization] = []
        self.boletos: dict[int, BoletoPlan] = {}  # boleto id → what its payer will do
        self.today_events: Counter[str] = Counter()
        self._count = organizations

    # --- the run ------------------------------------------------------------------------------------

    def run(self) -> SimulationResult:
        with self.world:
            before = self._snapshot()
            self._setup()
            self._discover_boletos(self.start)
            self.result.setup = self._delta(before, self._snapshot(), self.today_events)
            self.today_events = Counter()
            self.world.begin_days(self.start)
            for day in days_from(self.start, self.days):
                before = self._snapshot()
                money_before = self._money()
                self._day(day)
                counts = self._delta(before, self._snapshot(), self.today_events)
                self.today_events = Counter()
                self.result.per_day.append((day, counts))
                self.result.totals.update(counts)
                money_after = self._money()
                self.result.revenue.append(
                    (day, *(after - before for after, before in zip(money_after, money_before, strict=True)))
                )
                self.result.statuses_by_day.append((day, self._statuses()))
                if self.on_day is not None:
                    self.on_day(day, counts)
            self.result.statuses = self._statuses()
            self.result.violations = self._check()
        return self.result

    def _day(self, day: date) -> None:
        self.world.pass_day(day)
        self._discover_boletos(day)
        self._pay_and_expire(day)
        self._act(day)
        self._discover_boletos(day)

    # --- setup --------------------------------------------------------------------------------------

    def _setup(self) -> None:
        rng = self.rng
        first_org = (self.session.scalar(select(func.max(Organization.id))) or 0) + 1
        next_member = (self.session.scalar(select(func.max(Member.id))) or 0) + 1
        self.session.commit()
        plans = list(PLAN_WEIGHTS)
        for index in range(self._count):
            plan = rng.choices(plans, weights=[PLAN_WEIGHTS[name] for name in plans])[0]
            if plan == "annual_boleto":
                token = GOOD_CARD if rng.random() < BOLETO_ORG_CARD_RATE else None
            else:
                roll = rng.random()
                token = (
                    SOFT_DECLINE
                    if roll < SOFT_DECLINE_RATE
                    else HARD_DECLINE
                    if roll < SOFT_DECLINE_RATE + HARD_DECLINE_RATE
                    else GOOD_CARD
                )
            if plan == "monthly_card":
                anchor = self.start - timedelta(days=rng.randrange(30))
            else:
                # Customers for a while: some annual renewals fall inside the simulated days.
                anchor = year_before(self.start + timedelta(days=rng.randint(1, self.days + 90)))
            org = SimOrganization(
                index=index,
                id=first_org + index,
                owner=next_member,
                admin=next_member + 1,
                member=next_member + 2,
                financial=next_member + 3,
                plan=plan,
                token=token,
                anchor=anchor,
            )
            next_member += 4
            self.orgs.append(org)
        earliest = min(org.anchor for org in self.orgs)
        self.world.set_prices(
            PRODUCT,
            monthly_cents=MONTHLY_PRICE_CENTS,
            annual_cents=ANNUAL_PRICE_CENTS,
            day=earliest,
            reason=f"simulation, seed {self.result.seed}",
        )
        for org in sorted(self.orgs, key=lambda o: (o.anchor, o.index)):
            self._subscribe(org)
        for org in self.orgs:
            if org.plan == "annual_boleto" and org.subscription_id is not None and rng.random() < PLANNED_SWITCH_RATE:
                renewal = self._subscription(org).current_period_end
                org.planned_switch = renewal - timedelta(days=rng.randint(4, 12))

    def _subscribe(self, org: SimOrganization) -> None:
        day = org.anchor
        n = org.index + 1
        self.world.save_organization(
            org.id,
            name=f"Organização simulada {n}",
            document=cpf(self.rng),
            members=[
                MemberCopy(org.owner, "owner", f"Titular {n}", f"titular{n}@sim{org.id}.example"),
                MemberCopy(org.admin, "admin", f"Admin {n}", f"admin{n}@sim{org.id}.example"),
                MemberCopy(org.member, "member", f"Membro {n}", f"membro{n}@sim{org.id}.example"),
                MemberCopy(org.financial, "member", f"Financeiro {n}", f"financeiro{n}@sim{org.id}.example", True),
            ],
            day=day,
        )
        if org.token is not None:
            # The first charge must go through: a card that will decline is registered afterwards.
            self._card(org, day, GOOD_CARD)
        cycle, method = {
            "monthly_card": ("monthly", "card"),
            "annual_card": ("annual", "card"),
            "annual_boleto": ("annual", "boleto"),
        }[org.plan]
        outcome = self._submit(org, day, "subscribe", by=org.owner, product=PRODUCT, cycle=cycle, payment_method=method)
        if outcome is not None and outcome.status == "applied":
            org.subscription_id = int((outcome.result or {})["subscription_id"])
        if org.token is not None and org.token != GOOD_CARD:
            self._card(org, day, org.token)
        if method == "boleto" and org.subscription_id is not None:
            # The first year was paid: its boleto is paid the day it was issued.
            for boleto in self._boletos_where(Invoice.subscription_id == org.subscription_id):
                self._pay(boleto, day)

    # --- people ----------------------------------------------------------------------------------------

    def _act(self, day: date) -> None:
        rng = self.rng
        overdue = set(
            self.session.scalars(
                select(Invoice.organization_id)
                .join(Boleto, Boleto.invoice_id == Invoice.id)
                .where(Invoice.organization_id.in_(self._org_ids()), Boleto.status == BoletoStatus.OVERDUE)
            )
        )
        for org in self.orgs:
            if org.subscription_id is None:
                continue
            sub = self._subscription(org)
            if org.planned_switch == day:
                self._submit(org, day, "payment_method", to="card")
            card_token = self._card_token(org)
            if (
                sub.status == "past_due"
                and card_token in (SOFT_DECLINE, HARD_DECLINE)
                and (sub.pending_payment_method or sub.payment_method) == "card"
                and rng.random() < FIX_CARD_RATE
            ):
                self._card(org, day, GOOD_CARD)
                continue
            if org.id in overdue and rng.random() < SECOND_COPY_RATE:
                self._submit(org, day, "reissue_boleto")
                continue
            if rng.random() >= ACTION_RATE:
                continue
            action = rng.choices(list(ACTIONS), weights=list(ACTIONS.values()))[0]
            if action == "billing_cycle":
                if sub.cycle == "monthly":
                    method = rng.choice(["card", "boleto"])
                    self._submit(org, day, "billing_cycle", to_cycle="annual", payment_method=method)
                else:
                    self._submit(org, day, "billing_cycle", to_cycle="monthly")
            elif action == "payment_method":
                effective = sub.pending_payment_method or sub.payment_method
                self._submit(org, day, "payment_method", to="card" if effective == "boleto" else "boleto")
            elif action == "card":
                self._card(org, day, GOOD_CARD)
            elif action == "cancel_or_resume":
                self._submit(org, day, "resume" if sub.cancel_at_period_end else "cancel")
            elif action == "reissue_boleto":
                self._submit(org, day, "reissue_boleto")
            else:
                self._submit(org, day, "cancel", by=org.member)

    def _card(self, org: SimOrganization, day: date, token: str) -> None:
        last4 = {GOOD_CARD: "4242", SOFT_DECLINE: "9995", HARD_DECLINE: "0069"}[token]
        self._submit(
            org,
            day,
            "card",
            token=token,
            brand="visa",
            last4=last4,
            exp_month=12,
            exp_year=day.year + 4,
        )

    def _submit(
        self, org: SimOrganization, day: date, kind: str, *, by: int | None = None, **params: Any
    ) -> Outcome | None:
        org.requests += 1
        body: dict[str, Any] = {
            "organization_id": org.id,
            "requested_by": by if by is not None else self.rng.choice(org.billers),
            "idempotency_key": f"simulation-{self.result.seed}-{org.index}-{org.requests}",
            "kind": kind,
            **params,
        }
        if kind not in ("subscribe", "card") and org.subscription_id is not None:
            body["subscription_id"] = org.subscription_id
        outcome = self.world.submit(body, day)
        if outcome is None:
            return None
        if outcome.status == "applied":
            self.today_events["requests_applied"] += 1
            self.today_events[f"applied:{kind}"] += 1
        elif outcome.status == "rejected":
            code = outcome.error_code or "unknown"
            self.today_events["requests_rejected"] += 1
            self.today_events[f"rejected:{code}"] += 1
            self.result.rejected[code] += 1
        else:
            self.today_events["requests_pending"] += 1
        return outcome

    # --- boletos -------------------------------------------------------------------------------------

    def _boletos_where(self, *criteria: Any) -> list[Boleto]:
        statement: Select[Any] = (
            select(Boleto)
            .join(Invoice, Invoice.id == Boleto.invoice_id)
            .where(Invoice.organization_id.in_([org.id for org in self.orgs]), *criteria)
            .order_by(Boleto.id)
            .execution_options(populate_existing=True)
        )
        boletos = list(self.session.scalars(statement))
        self.session.commit()
        return boletos

    def _discover_boletos(self, day: date) -> None:
        """Decide, once per boleto, whether its payer pays it on time, late (once it is overdue) or never."""
        known = list(self.boletos)
        criteria = [Boleto.status == BoletoStatus.ISSUED]
        if known:
            criteria.append(Boleto.id.not_in(known))
        for boleto in self._boletos_where(*criteria):
            roll = self.rng.random()
            overdue = overdue_on(boleto.due_date)
            if roll < BOLETO_FATES["on_time"]:
                last = max(day + timedelta(days=1), boleto.due_date)
                pay_on: date | None = day + timedelta(days=self.rng.randint(1, max(1, (last - day).days)))
                plan = BoletoPlan("on_time", pay_on, None)
            elif roll < BOLETO_FATES["on_time"] + BOLETO_FATES["late"]:
                plan = BoletoPlan(
                    "late", max(overdue, day + timedelta(days=1)) + timedelta(days=self.rng.randint(0, 6)), None
                )
            else:
                plan = BoletoPlan("never", None, overdue + timedelta(days=EXPIRE_AFTER_OVERDUE_DAYS))
            self.boletos[boleto.id] = plan

    def _pay_and_expire(self, day: date) -> None:
        due_today = sorted(
            boleto_id for boleto_id, plan in self.boletos.items() if day in (plan.pay_on, plan.expire_on)
        )
        if not due_today:
            return
        for boleto in self._boletos_where(Boleto.id.in_(due_today)):
            if boleto.status not in (BoletoStatus.ISSUED, BoletoStatus.OVERDUE):
                continue  # replaced or cancelled meanwhile
            plan = self.boletos[boleto.id]
            if plan.pay_on == day:
                self._pay(boleto, day)
            else:
                self.world.expire_boleto(boleto.gateway_id, day)
                self.today_events["boletos_expired"] += 1

    def _pay(self, boleto: Boleto, day: date) -> None:
        late = boleto.overdue_on is not None
        self.world.pay_boleto(boleto.gateway_id, boleto.amount_cents, day)
        if late:
            self.today_events["boletos_paid_late"] += 1

    # --- counting -------------------------------------------------------------------------------------

    def _org_ids(self) -> list[int]:
        return [org.id for org in self.orgs]

    def _snapshot(self) -> dict[str, int]:
        ids = self._org_ids() or [-1]
        s = self.session

        def count(statement: Select[Any]) -> int:
            return int(s.scalar(statement) or 0)

        charges = select(func.count(Charge.id)).join(Invoice, Invoice.id == Charge.invoice_id)
        charges = charges.where(Invoice.organization_id.in_(ids))
        boletos = select(func.count(Boleto.id)).join(Invoice, Invoice.id == Boleto.invoice_id)
        boletos = boletos.where(Invoice.organization_id.in_(ids))
        notices = select(func.count(Notification.id)).where(Notification.organization_id.in_(ids))
        snapshot = {
            "renewals_charged": count(
                charges.where(Charge.status == ChargeStatus.SUCCEEDED, Invoice.kind == InvoiceKind.RENEWAL)
            ),
            "boletos_issued": count(boletos),
            "boletos_paid": count(boletos.where(Boleto.status == BoletoStatus.PAID)),
            "boletos_overdue": count(boletos.where(Boleto.overdue_on.is_not(None))),
            "declines": count(charges.where(Charge.status == ChargeStatus.FAILED)),
            "retries": count(charges.where(Charge.attempt > 1)),
            "suspensions": count(notices.where(Notification.kind == "subscription_suspended")),
            "reactivations": count(notices.where(Notification.kind == "subscription_reactivated")),
            "notices": count(notices),
            "refunds": count(select(func.count(Refund.id)).where(Refund.organization_id.in_(ids))),
        }
        self.session.commit()
        return snapshot

    def _money(self) -> tuple[int, int]:
        """Cents collected so far from these organizations: (by card, by boleto)."""
        ids = self._org_ids() or [-1]
        card = self.session.scalar(
            select(func.coalesce(func.sum(Charge.amount_cents), 0))
            .join(Invoice, Invoice.id == Charge.invoice_id)
            .where(Invoice.organization_id.in_(ids), Charge.status == ChargeStatus.SUCCEEDED)
        )
        boleto = self.session.scalar(
            select(func.coalesce(func.sum(Boleto.paid_amount_cents), 0))
            .join(Invoice, Invoice.id == Boleto.invoice_id)
            .where(Invoice.organization_id.in_(ids), Boleto.status == BoletoStatus.PAID)
        )
        self.session.commit()
        return int(card or 0), int(boleto or 0)

    def _delta(self, before: dict[str, int], after: dict[str, int], events: Counter[str]) -> dict[str, int]:
        counts = {name: after[name] - before[name] for name in before}
        counts.update(events)
        return {name: counts.get(name, 0) for name in COUNTERS} | {
            name: value for name, value in sorted(counts.items()) if name not in COUNTERS
        }

    def _statuses(self) -> dict[str, int]:
        rows = self.session.execute(
            select(Subscription.status, func.count())
            .where(Subscription.organization_id.in_(self._org_ids()))
            .group_by(Subscription.status)
        ).all()
        self.session.commit()
        return {status: int(n) for status, n in rows}

    def _subscription(self, org: SimOrganization) -> Subscription:
        return self.session.get_one(Subscription, org.subscription_id, populate_existing=True)

    def _card_token(self, org: SimOrganization) -> str | None:
        return self.session.scalar(select(Card.token).where(Card.organization_id == org.id))

    # --- invariants -----------------------------------------------------------------------------------

    def _check(self) -> list[str]:
        violations = [
            f"[{v.rule}] subscription {v.subscription_id}, invoice {v.invoice_id}: {v.message}"
            for v in check_ledger(self.session)
        ]
        rows = self.session.execute(
            select(Charge.idempotency_key, Charge.invoice_id)
            .join(Invoice, Invoice.id == Charge.invoice_id)
            .where(Invoice.organization_id.in_(self._org_ids()))
        ).all()
        self.session.commit()
        invoice_of = {key: invoice_id for key, invoice_id in rows}
        per_key: Counter[str] = Counter()
        per_invoice: Counter[int] = Counter()
        for entry in self.world.gateway_ledger():
            key = entry.get("idempotency_key")
            if entry.get("kind") != "charge" or key not in invoice_of:
                continue
            per_key[key] += 1
            per_invoice[invoice_of[key]] += 1
        violations += [
            f"[gateway] idempotency key {key}: {n} successful charges at the gateway"
            for key, n in sorted(per_key.items())
            if n > 1
        ]
        violations += [
            f"[gateway] invoice {invoice_id}: {n} successful charges at the gateway"
            for invoice_id, n in sorted(per_invoice.items())
            if n > 1
        ]
        return violations
