"""Plan prices: `jobs.plans` (set and list a price history), `renova plans set|list`, and
`PUT/GET /v1/plans…`, against the suite's PostgreSQL; a scheduled price change through the daily run.

Dates are relative to today's business date: a price cannot be set for a day before it.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from jobs.billing_day import run_day
from jobs.context import runtime
from jobs.invoicing import MissingPlan, plan_price
from jobs.plans import PlanError, parse_reais, price_list, set_prices
from models.calendar import add_cycle, local_today
from models.schema import AuditEvent, Invoice, Notification, Plan
from tests.integration.factories import (
    ANNUAL_PRICE,
    MONTHLY_PRICE,
    make_organization,
    make_subscription,
    noon,
    seed_plans,
)
from tests.integration.test_cli import renova
from workers.settings import get_settings

API_KEY = "plans-test-key"
NBSP = "\xa0"  # Babel writes `R$ 49,90` with a non-breaking space


def today() -> date:
    return local_today(datetime.now(UTC), get_settings().billing_timezone)


def plan_rows(session: Session) -> list[tuple[str, str, date, int]]:
    session.rollback()  # see what other connections (the CLI, the API) committed
    return [
        (plan.product, plan.cycle, plan.effective_from, plan.price_cents)
        for plan in session.scalars(select(Plan).order_by(Plan.product, Plan.cycle, Plan.effective_from))
    ]


def audit_count(session: Session) -> int:
    session.rollback()
    return session.scalar(select(func.count()).select_from(AuditEvent).where(AuditEvent.action == "plans.set")) or 0


def set_conecta(session: Session, monthly: int | None, annual: int | None, effective_from: date, **extra: Any) -> None:
    set_prices(
        session,
        "conecta",
        monthly_cents=monthly,
        annual_cents=annual,
        effective_from=effective_from,
        today=extra.pop("today", today()),
        actor=extra.pop("actor", "ana"),
        reason=extra.pop("reason", "launch"),
    )
    session.commit()


# --- jobs.plans ------------------------------------------------------------------------------------


def test_set_then_list_shows_the_prices_in_force_today(session: Session) -> None:
    plans = set_prices(
        session,
        "conecta",
        monthly_cents=4990,
        annual_cents=47900,
        effective_from=today(),
        today=today(),
        actor="ana",
        reason="fresh install",
    )
    session.commit()

    assert [(plan.cycle, plan.price_cents, plan.currency, plan.effective_from) for plan in plans] == [
        ("monthly", 4990, "BRL", today()),
        ("annual", 47900, "BRL", today()),
    ]
    rows = price_list(session, on=today())
    assert [(row.product, row.cycle, row.price_cents, row.effective_from, row.scheduled) for row in rows] == [
        ("conecta", "monthly", 4990, today(), []),
        ("conecta", "annual", 47900, today(), []),
    ]
    assert plan_price(session, "conecta", "monthly", today()) == 4990
    assert plan_price(session, "conecta", "annual", today()) == 47900


def test_setting_prices_writes_an_audit_event(session: Session) -> None:
    seed_plans(session)
    session.commit()
    on = today() + timedelta(days=10)
    set_conecta(session, 5990, None, on, actor="ana", reason="reajuste anual")

    event = session.scalars(select(AuditEvent)).one()
    assert (event.actor, event.action, event.target_type, event.target_id, event.reason) == (
        "ana",
        "plans.set",
        "plan",
        "conecta",
        "reajuste anual",
    )
    assert event.details == {
        "product": "conecta",
        "effective_from": on.isoformat(),
        "currency": "BRL",
        "monthly_cents": 5990,
        "previous": {"monthly_cents": MONTHLY_PRICE},
    }


def test_a_second_set_on_the_same_date_overwrites(session: Session) -> None:
    on = today() + timedelta(days=5)
    set_conecta(session, 4990, 47900, today())
    set_conecta(session, 5490, 52900, on)
    set_conecta(session, 5990, None, on, reason="typo in the first one")

    assert plan_rows(session) == [
        ("conecta", "annual", today(), 47900),
        ("conecta", "annual", on, 52900),
        ("conecta", "monthly", today(), 4990),
        ("conecta", "monthly", on, 5990),
    ]
    assert audit_count(session) == 3
    last = session.scalars(select(AuditEvent).order_by(AuditEvent.id.desc()).limit(1)).one()
    assert last.details["previous"] == {"monthly_cents": 5490}


def test_one_cycle_can_change_alone(session: Session) -> None:
    seed_plans(session)
    session.commit()
    set_conecta(session, None, 45900, today())

    assert plan_price(session, "conecta", "annual", today()) == 45900
    assert plan_price(session, "conecta", "monthly", today()) == MONTHLY_PRICE
    assert ("conecta", "monthly", today(), 4990) not in plan_rows(session)


def test_a_future_price_is_scheduled_and_leaves_todays_price_alone(session: Session) -> None:
    seed_plans(session)
    session.commit()
    assert plan_price(session, "conecta", "monthly", today()) == MONTHLY_PRICE  # cached in the session
    later = today() + timedelta(days=45)
    set_conecta(session, 5990, 57900, later)

    assert plan_price(session, "conecta", "monthly", today()) == MONTHLY_PRICE
    assert plan_price(session, "conecta", "monthly", later - timedelta(days=1)) == MONTHLY_PRICE
    assert plan_price(session, "conecta", "monthly", later) == 5990
    assert plan_price(session, "conecta", "annual", later) == 57900
    assert plan_price(session, "conecta", "annual", later + timedelta(days=400)) == 57900

    monthly, annual = price_list(session, "conecta", on=today())
    assert (monthly.cycle, monthly.price_cents, monthly.effective_from) == ("monthly", MONTHLY_PRICE, date(2000, 1, 1))
    assert [(change.effective_from, change.price_cents) for change in monthly.scheduled] == [(later, 5990)]
    assert [(change.effective_from, change.price_cents) for change in annual.scheduled] == [(later, 57900)]
    # On the day itself, the new price is in force and nothing is scheduled any more.
    assert [(row.price_cents, row.scheduled) for row in price_list(session, "conecta", on=later)] == [
        (5990, []),
        (57900, []),
    ]


def test_a_fresh_install_with_only_a_future_price_has_no_price_today(session: Session) -> None:
    later = today() + timedelta(days=3)
    set_conecta(session, 4990, 47900, later)

    with pytest.raises(MissingPlan):
        plan_price(session, "conecta", "monthly", today())
    rows = price_list(session, on=today())
    assert [(row.cycle, row.price_cents, row.effective_from) for row in rows] == [
        ("monthly", None, None),
        ("annual", None, None),
    ]
    assert [change.price_cents for change in rows[0].scheduled] == [4990]


def test_price_list_filters_by_product(session: Session) -> None:
    seed_plans(session)
    session.commit()
    set_prices(
        session,
        "conecta-pro",
        monthly_cents=9990,
        annual_cents=None,
        effective_from=today(),
        today=today(),
        actor="ana",
        reason="",
    )
    session.commit()

    assert [(row.product, row.cycle) for row in price_list(session, on=today())] == [
        ("conecta", "monthly"),
        ("conecta", "annual"),
        ("conecta-pro", "monthly"),
    ]
    assert [row.price_cents for row in price_list(session, "conecta-pro", on=today())] == [9990]
    assert price_list(session, "nothing", on=today()) == []


@pytest.mark.parametrize(
    ("product", "monthly", "annual", "days", "code", "fields"),
    [
        ("conecta", 4990, 47900, -1, "retroactive_price", ("effective_from",)),
        ("conecta", -1, 47900, 0, "invalid_price", ("monthly_cents",)),
        ("conecta", 4990, -47900, 0, "invalid_price", ("annual_cents",)),
        ("conecta", 10**10, None, 0, "invalid_price", ("monthly_cents",)),
        ("conecta", None, None, 0, "price_required", ("monthly_cents", "annual_cents")),
        ("Conecta", 4990, 47900, 0, "invalid_product", ("product",)),
        ("", 4990, 47900, 0, "invalid_product", ("product",)),
        ("x" * 65, 4990, 47900, 0, "invalid_product", ("product",)),
        ("conecta; drop", 4990, 47900, 0, "invalid_product", ("product",)),
    ],
)
def test_invalid_prices_are_refused_and_nothing_is_written(
    session: Session,
    product: str,
    monthly: int | None,
    annual: int | None,
    days: int,
    code: str,
    fields: tuple[str, ...],
) -> None:
    seed_plans(session)
    session.commit()
    before = plan_rows(session)
    with pytest.raises(PlanError) as refused:
        set_prices(
            session,
            product,
            monthly_cents=monthly,
            annual_cents=annual,
            effective_from=today() + timedelta(days=days),
            today=today(),
            actor="ana",
            reason="",
        )
    session.commit()
    assert refused.value.code == code
    assert refused.value.fields == fields
    assert refused.value.message
    assert plan_rows(session) == before
    assert audit_count(session) == 0


def test_a_retroactive_price_names_the_dates(session: Session) -> None:
    yesterday = today() - timedelta(days=1)
    with pytest.raises(PlanError) as refused:
        set_conecta(session, 4990, 47900, yesterday)
    assert "retroativamente" in refused.value.message
    assert refused.value.details == {"effective_from": yesterday.isoformat(), "today": today().isoformat()}


@pytest.mark.parametrize(
    ("text", "cents"),
    [
        ("49.90", 4990),
        ("49,90", 4990),
        ("49,9", 4990),
        ("49", 4900),
        ("479.00", 47900),
        (" 479,00 ", 47900),
        ("1234,56", 123456),
        ("0.29", 29),  # 0.29 * 100 is 28.999… in binary floating point
        ("1.15", 115),
        ("0", 0),
        ("99999999.99", 9_999_999_999),
    ],
)
def test_reais_are_converted_to_cents_exactly(text: str, cents: int) -> None:
    assert parse_reais(text) == cents


@pytest.mark.parametrize(
    "text",
    [
        "1.234,56",
        "1,234.56",
        "1.234",
        "49.901",
        "-49,90",
        "-1",
        "+5",
        "R$ 49,90",
        "49,",
        ",90",
        "4 9",
        "",
        "abc",
        "1e3",
        "NaN",
        "Infinity",
        "٤٩",  # Arabic-Indic digits are digits to `str.isdigit`, not to an operator
        "100000000.00",  # more than a boleto can carry
    ],
)
def test_garbage_money_is_refused(text: str) -> None:
    with pytest.raises(PlanError) as refused:
        parse_reais(text, "monthly_cents")
    assert refused.value.code == "invalid_price"
    assert refused.value.fields == ("monthly_cents",)


# --- the daily run ---------------------------------------------------------------------------------


def renewal_amounts(session: Session, subscription_id: int) -> list[tuple[date, int, str]]:
    return [
        (invoice.period_start, invoice.total_cents, invoice.status)
        for invoice in session.scalars(
            select(Invoice)
            .where(Invoice.subscription_id == subscription_id, Invoice.kind == "renewal")
            .order_by(Invoice.period_start)
            .execution_options(populate_existing=True)
        )
    ]


def test_a_scheduled_price_applies_from_each_subscriptions_next_renewal(session: Session, billing_gateway) -> None:
    """Renewals before the change's date pay the old price, renewals from it the new one; the
    annual renewal notice 30 days ahead already shows the new price."""
    seed_plans(session)
    # The change takes effect on the 15th of a month at least 40 days away (no month-end clamping).
    start = today() + timedelta(days=40)
    effective = date(start.year, start.month, 15) if start.day <= 15 else add_cycle(start.replace(day=15), "monthly", 1)
    before = make_subscription(
        session,
        make_organization(session, 1),
        cycle="monthly",
        method="card",
        anchor=add_cycle(effective - timedelta(days=1), "monthly", -1),
    )
    on_the_day = make_subscription(
        session,
        make_organization(session, 2),
        cycle="monthly",
        method="card",
        anchor=add_cycle(effective, "monthly", -1),
    )
    annual = make_subscription(
        session,
        make_organization(session, 3),
        cycle="annual",
        method="card",
        anchor=add_cycle(effective + timedelta(days=10), "annual", -1),
    )
    session.commit()
    assert before.current_period_end == effective - timedelta(days=1)
    assert on_the_day.current_period_end == effective
    set_conecta(session, 5990, 57900, effective, reason="reajuste")

    annual_renewal = annual.current_period_end
    notice_day = annual_renewal - timedelta(days=30)
    for day in sorted(
        {notice_day, effective - timedelta(days=1), effective, add_cycle(effective - timedelta(days=1), "monthly", 1)}
    ):
        run_day(session, billing_gateway, day, noon(day), runtime().config)

    assert renewal_amounts(session, before.id) == [
        (effective - timedelta(days=1), MONTHLY_PRICE, "paid"),
        (add_cycle(effective - timedelta(days=1), "monthly", 1), 5990, "paid"),
    ]
    assert renewal_amounts(session, on_the_day.id) == [(effective, 5990, "paid")]
    notice = session.scalars(
        select(Notification).where(Notification.kind == "renewal_notice", Notification.subscription_id == annual.id)
    ).one()
    assert notice.context["amount_cents"] == 57900
    assert notice.context["renewal_date"] == annual_renewal.isoformat()
    assert ANNUAL_PRICE != 57900
    # The last day run is after the annual renewal (the scans catch up with `≤`): it paid the new price.
    assert renewal_amounts(session, annual.id) == [(annual_renewal, 57900, "paid")]


# --- the HTTP API ------------------------------------------------------------------------------------


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    monkeypatch.setenv("RENOVA_API_KEYS", API_KEY)
    get_settings.cache_clear()
    from workers.api import create_app

    try:
        with TestClient(create_app()) as test_client:
            test_client.headers["Authorization"] = f"Bearer {API_KEY}"
            yield test_client
    finally:
        monkeypatch.delenv("RENOVA_API_KEYS")
        get_settings.cache_clear()


def test_api_put_then_get_prices(session: Session, client: TestClient) -> None:
    response = client.put("/v1/plans/conecta", json={"monthly_cents": 4990, "annual_cents": 47900})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["on"] == today().isoformat()
    assert body["prices"] == [
        {
            "product": "conecta",
            "cycle": "monthly",
            "currency": "BRL",
            "price_cents": 4990,
            "effective_from": today().isoformat(),
            "scheduled": [],
        },
        {
            "product": "conecta",
            "cycle": "annual",
            "currency": "BRL",
            "price_cents": 47900,
            "effective_from": today().isoformat(),
            "scheduled": [],
        },
    ]
    assert client.get("/v1/plans/conecta").json() == body
    assert client.get("/v1/plans").json() == body
    event = session.scalars(select(AuditEvent)).one()
    assert (event.actor, event.action, event.target_id) == ("api", "plans.set", "conecta")


def test_api_schedules_a_future_price(session: Session, client: TestClient) -> None:
    seed_plans(session)
    session.commit()
    later = today() + timedelta(days=30)
    response = client.put(
        "/v1/plans/conecta",
        json={"annual_cents": 52900, "effective_from": later.isoformat(), "reason": "reajuste 2027"},
    )
    assert response.status_code == 200, response.text
    monthly, annual = client.get("/v1/plans/conecta").json()["prices"]
    assert (monthly["price_cents"], monthly["scheduled"]) == (MONTHLY_PRICE, [])
    assert annual["price_cents"] == ANNUAL_PRICE
    assert annual["scheduled"] == [{"effective_from": later.isoformat(), "price_cents": 52900}]
    assert session.scalars(select(AuditEvent.reason)).one() == "reajuste 2027"


def test_api_unknown_product_is_404_with_a_body(session: Session, client: TestClient) -> None:
    seed_plans(session)
    session.commit()
    response = client.get("/v1/plans/nothing")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "unknown_product"
    assert client.get("/v1/plans").json()["prices"][0]["product"] == "conecta"


def test_api_requires_the_api_key(session: Session, client: TestClient) -> None:
    response = client.put("/v1/plans/conecta", json={"monthly_cents": 1}, headers={"Authorization": "Bearer wrong"})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"
    assert client.get("/v1/plans", headers={"Authorization": ""}).status_code == 401
    assert plan_rows(session) == []


@pytest.mark.parametrize(
    ("path", "body", "code", "field"),
    [
        ("conecta", {"monthly_cents": "49.90"}, "invalid_request", "monthly_cents"),
        ("conecta", {"monthly_cents": 49.9}, "invalid_request", "monthly_cents"),
        ("conecta", {"monthly_cents": True}, "invalid_request", "monthly_cents"),
        ("conecta", {"monthly_cents": -4990}, "invalid_price", "monthly_cents"),
        ("conecta", {"annual_cents": 10**12}, "invalid_price", "annual_cents"),
        ("conecta", {"monthly_cents": 4990, "price": 1}, "invalid_request", "price"),
        ("conecta", {}, "price_required", "monthly_cents"),
        ("conecta", {"monthly_cents": None, "annual_cents": None}, "price_required", "annual_cents"),
        ("conecta", {"monthly_cents": 4990, "effective_from": "2020-01-01"}, "retroactive_price", "effective_from"),
        ("conecta", {"monthly_cents": 4990, "effective_from": "01/01/2027"}, "invalid_request", "effective_from"),
        ("conecta", {"monthly_cents": 4990, "effective_from": "20270101"}, "invalid_request", "effective_from"),
        ("conecta", {"monthly_cents": 4990, "effective_from": 1798761600}, "invalid_request", "effective_from"),
        ("conecta", {"monthly_cents": 4990, "reason": "x" * 501}, "invalid_request", "reason"),
        ("Conecta!", {"monthly_cents": 4990}, "invalid_product", "product"),
    ],
)
def test_api_invalid_input_is_a_4xx_naming_the_field_and_writes_nothing(
    session: Session, client: TestClient, path: str, body: dict[str, Any], code: str, field: str
) -> None:
    response = client.put(f"/v1/plans/{path}", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert field in [item["field"] for item in error["fields"]]
    assert error["message"]
    assert plan_rows(session) == []
    assert audit_count(session) == 0


def test_api_body_that_is_not_json_is_a_422(session: Session, client: TestClient) -> None:
    response = client.put("/v1/plans/conecta", content=b"monthly=49.90", headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_request"
    assert plan_rows(session) == []


# --- the CLI ---------------------------------------------------------------------------------------


def test_cli_set_then_list(session: Session) -> None:
    result = renova("plans", "set", "conecta", "--monthly", "49,90", "--annual", "479.00", "--reason", "launch")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"R${NBSP}49,90" in result.stdout
    assert plan_rows(session) == [
        ("conecta", "annual", today(), 47900),
        ("conecta", "monthly", today(), 4990),
    ]
    event = session.scalars(select(AuditEvent)).one()
    assert (event.action, event.reason, event.details["monthly_cents"]) == ("plans.set", "launch", 4990)

    later = today() + timedelta(days=20)
    scheduled = renova("plans", "set", "conecta", "--monthly", "59.9", "--from", later.isoformat())
    assert scheduled.returncode == 0, scheduled.stdout + scheduled.stderr

    listed = renova("plans", "list", "--product", "conecta")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    lines = listed.stdout.splitlines()
    monthly = next(line for line in lines if "monthly" in line)
    annual = next(line for line in lines if "annual" in line)
    assert f"R${NBSP}49,90" in monthly
    assert today().isoformat() in monthly
    assert f"R${NBSP}59,90 from {later.isoformat()}" in monthly
    assert f"R${NBSP}479,00" in annual
    assert "59,90" not in annual


def test_cli_list_of_an_unknown_product_fails(session: Session) -> None:
    seed_plans(session)
    session.commit()
    result = renova("plans", "list", "--product", "nothing")
    assert result.returncode == 1
    assert "no prices for product 'nothing'" in result.stdout
    everything = renova("plans", "list")
    assert everything.returncode == 0, everything.stdout + everything.stderr
    assert f"R${NBSP}479,00" in everything.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--monthly", "1.234,56"), "--monthly: Valor inválido"),
        (("--monthly", "49.901"), "--monthly: Valor inválido"),
        (("--annual", "abc"), "--annual: Valor inválido"),
        (("--monthly", "-49,90"), "--monthly: O preço não pode ser negativo"),
        ((), "--monthly, --annual: Informe o preço mensal, o anual ou ambos"),
        (("--monthly", "49,90", "--from", "2020-01-01"), "--from: Um preço não pode ser alterado retroativamente"),
        (("--monthly", "49,90", "--from", "01/01/2027"), "--from must be a date YYYY-MM-DD"),
    ],
)
def test_cli_refuses_bad_input_with_exit_code_2_and_writes_nothing(
    session: Session, args: tuple[str, ...], message: str
) -> None:
    result = renova("plans", "set", "conecta", *args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in " ".join(result.stdout.split())
    assert plan_rows(session) == []
    assert audit_count(session) == 0


def test_cli_refuses_a_bad_product_name(session: Session) -> None:
    result = renova("plans", "set", "CONECTA", "--monthly", "49,90")
    assert result.returncode == 2
    assert "PRODUCT: Produto inválido" in result.stdout
    assert plan_rows(session) == []
