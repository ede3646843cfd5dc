"""The HTTP API the main application calls (Bearer API keys), and every rule of DESIGN §1 through both
entrances — `POST /v1/change-requests` and the `submit_change_request` queue message — processed by
real Dramatiq workers, then read back through `GET /v1/change-requests/{id}` and
`GET /v1/subscriptions/{id}` and checked against the rows.

Dates are relative to today: the change date is the day the request was recorded.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from jobs.changes import submit_change_request
from models.calendar import add_cycle
from models.schema import Boleto, Card, ChangeRequest, Charge, Invoice, Member, Organization, Subscription
from tests.integration.conftest import wait_until
from tests.integration.factories import ANNUAL_PRICE
from tests.integration.test_changes import (
    FINANCIAL,
    PLAIN_MEMBER,
    assert_balance_matches_ledger,
    card_body,
    ledger_of,
    money_ledger,
    notices,
    past_due_renewal,
    payload,
    renewal_boleto,
    setup_organization,
    subscription_for,
    today,
)
from workers.settings import get_settings

API_KEY = "test-key-2"
PATHS = ("api", "queue")


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    monkeypatch.setenv("RENOVA_API_KEYS", f"test-key-1, {API_KEY}")
    get_settings.cache_clear()
    from workers.api import create_app

    try:
        with TestClient(create_app()) as test_client:
            test_client.headers["Authorization"] = f"Bearer {API_KEY}"
            yield test_client
    finally:
        monkeypatch.delenv("RENOVA_API_KEYS")
        get_settings.cache_clear()


def change(client: TestClient, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """Send a change request through `path` and return it, processed, as the API shows it."""
    body = dict(body)
    key = body["idempotency_key"]
    if path == "api":
        del body["idempotency_key"]
        response = client.post("/v1/change-requests", json=body, headers={"Idempotency-Key": key})
        assert response.status_code == 202, response.text
        assert response.json()["status"] in ("pending", "applied", "rejected")
        request_id = response.json()["id"]
    else:
        submit_change_request.send(body)
        request_id = wait_until(lambda: _recorded_id(key))

    def processed() -> dict[str, Any] | None:
        shown = client.get(f"/v1/change-requests/{request_id}").json()
        return shown if shown["status"] != "pending" else None

    shown = wait_until(processed)
    assert shown["source"] == path
    return shown


def _recorded_id(key: str) -> int | None:
    from workers.db import get_session_factory

    with get_session_factory()() as fresh:
        return fresh.scalar(select(ChangeRequest.id).where(ChangeRequest.idempotency_key == key))


def subscription_json(client: TestClient, subscription_id: int) -> dict[str, Any]:
    response = client.get(f"/v1/subscriptions/{subscription_id}")
    assert response.status_code == 200
    return response.json()


# --- every rule through both entrances ---------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_monthly_to_annual_by_card(path, session, worker, client, billing_gateway, sandbox_gateway):
    organization = setup_organization(session)
    start = today() - timedelta(days=10)
    # 30-day period paid R$ 30,00: 20 days unused = 2000 of credit; due now 47900 − 2000.
    subscription = subscription_for(session, organization, cycle="monthly", method="card", start=start,
                                    end=start + timedelta(days=30), paid_cents=3000)  # fmt: skip
    session.commit()

    shown = change(client, path, payload("billing_cycle", subscription.id, to_cycle="annual"))

    assert shown["status"] == "applied" and shown["error"] is None
    quote = shown["result"]
    assert (quote["paid_cents"], quote["unused_cents"], quote["credit_cents"]) == (3000, 2000, 2000)
    assert (quote["amount_due_cents"], quote["balance_after_cents"]) == (ANNUAL_PRICE - 2000, 0)
    renewal = add_cycle(today(), "annual", 1)
    assert quote["renewal_date"] == renewal.isoformat()
    state = subscription_json(client, subscription.id)
    assert (state["cycle"], state["payment_method"], state["status"]) == ("annual", "card", "active")
    assert (state["current_period_start"], state["renewal_date"]) == (today().isoformat(), renewal.isoformat())
    assert (state["balance_cents"], state["open_invoices"]) == (0, [])
    charge = session.scalars(select(Charge)).one()
    assert len(sandbox_gateway.ledger(idempotency_key=charge.idempotency_key)) == 1
    assert ("payment", ANNUAL_PRICE - 2000, charge.invoice_id) in money_ledger(session, subscription.id)
    assert_balance_matches_ledger(session, subscription)


@pytest.mark.parametrize("path", PATHS)
def test_monthly_to_annual_by_boleto(path, session, worker, client, billing_gateway, sandbox_gateway):
    organization = setup_organization(session)
    subscription = subscription_for(session, organization, cycle="monthly", method="card", start=today(),
                                    end=today() + timedelta(days=30), paid_cents=3000)  # fmt: skip
    session.commit()

    body = payload("billing_cycle", subscription.id, to_cycle="annual", payment_method="boleto")
    shown = change(client, path, body)

    assert shown["status"] == "applied"
    assert shown["result"]["amount_due_cents"] == ANNUAL_PRICE - 3000  # nothing of the period used yet
    # Applied at once; the boleto follows from the gateway right after the commit.
    state = wait_until(lambda: (s := subscription_json(client, subscription.id))["open_invoices"][0]["boleto"] and s)
    assert (state["cycle"], state["payment_method"]) == ("annual", "boleto")
    [invoice] = state["open_invoices"]
    assert (invoice["kind"], invoice["total_cents"], invoice["method"]) == (
        "cycle_change",
        ANNUAL_PRICE - 3000,
        "boleto",
    )
    due = (today() + timedelta(days=3)).isoformat()
    assert invoice["due_date"] == invoice["boleto"]["due_date"] == due
    assert re.fullmatch(r"\d{5}\.\d{5} \d{5}\.\d{6} \d{5}\.\d{6} \d \d{14}", invoice["boleto"]["digitable_line"])
    shown = client.get(f"/v1/change-requests/{shown['id']}").json()
    assert shown["result"]["boleto"]["digitable_line"] == invoice["boleto"]["digitable_line"]


@pytest.mark.parametrize("path", PATHS)
def test_annual_to_monthly_extends_the_renewal_date(path, session, worker, client, billing_gateway):
    organization = setup_organization(session)
    start = today() - timedelta(days=65)
    # 365-day period paid 36500: 300 days unused = 30000. Six months of 4990 (29940) and 60 cents,
    # which buy no whole day (a day is ≥ 4990 / 31 = 160): renewal D + 6 months, balance 60.
    subscription = subscription_for(session, organization, cycle="annual", method="boleto", start=start,
                                    end=start + timedelta(days=365), paid_cents=36500)  # fmt: skip
    session.commit()

    shown = change(client, path, payload("billing_cycle", subscription.id, to_cycle="monthly"))

    assert shown["status"] == "applied"
    result = shown["result"]
    assert (result["unused_cents"], result["months"], result["extra_days"], result["balance_after_cents"]) == (
        30000,
        6,
        0,
        60,
    )
    renewal = add_cycle(today(), "monthly", 6)
    state = subscription_json(client, subscription.id)
    assert (state["cycle"], state["payment_method"], state["balance_cents"]) == ("monthly", "card", 60)
    assert (state["renewal_date"], state["billing_anchor"]) == (renewal.isoformat(), renewal.isoformat())
    assert session.scalar(select(Charge.id)) is None
    assert_balance_matches_ledger(session, subscription)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("days_before", "outcome"), [(8, "applied"), (7, "boleto_already_issued"),
                                                      (6, "boleto_already_issued")])  # fmt: skip
def test_boleto_to_card_until_seven_days_before_the_renewal(
    path, days_before, outcome, session, worker, client, billing_gateway
):
    organization = setup_organization(session)
    renewal = today() + timedelta(days=days_before)
    subscription = subscription_for(session, organization, cycle="annual", method="boleto",
                                    start=add_cycle(renewal, "annual", -1), end=renewal)  # fmt: skip
    session.commit()

    shown = change(client, path, payload("payment_method", subscription.id, to="card"))

    state = subscription_json(client, subscription.id)
    if outcome == "applied":
        assert shown["status"] == "applied"
        assert shown["result"]["effective_on"] == renewal.isoformat()
        assert (state["payment_method"], state["pending_payment_method"]) == ("boleto", "card")
        assert state["effective_payment_method"] == "card"
    else:
        assert (shown["status"], shown["error"]["code"]) == ("rejected", outcome)
        deadline = renewal - timedelta(days=8)
        assert deadline.strftime("%d/%m/%Y") in shown["error"]["message"]
        assert shown["error"]["details"]["deadline"] == deadline.isoformat()
        assert state["pending_payment_method"] is None


@pytest.mark.parametrize("path", PATHS)
def test_rule_refusals(path, session, worker, client, billing_gateway):
    """monthly → boleto; → card without a card; a forbidden role; a past-due invoice; the same cycle."""
    organization = setup_organization(session, card_token=None)
    monthly = subscription_for(session, organization, cycle="monthly", method="card", start=today())
    other = Organization(id=2, name="Beta", document=None)
    session.add(other)
    session.flush()
    session.add(Member(id=201, organization_id=2, email="dono@beta.example", role="owner"))
    session.add(Card(organization_id=2, token="tok_ok", brand="visa", last4="4242", exp_month=1, exp_year=2040))
    session.commit()
    past_due = Subscription(organization_id=2, cycle="monthly", payment_method="card", billing_anchor=today(),
                            current_period_start=today(), current_period_end=add_cycle(today(), "monthly", 1))  # fmt: skip
    session.add(past_due)
    session.flush()
    past_due_renewal(session, past_due)
    session.commit()

    cases = [
        (payload("payment_method", monthly.id, to="boleto"), "boleto_requires_annual"),
        (payload("billing_cycle", monthly.id, to_cycle="annual"), "no_card_on_file"),
        (payload("billing_cycle", monthly.id, to_cycle="annual", by=PLAIN_MEMBER), "forbidden"),
        (payload("billing_cycle", monthly.id, to_cycle="monthly"), "same_cycle"),
        ({**payload("billing_cycle", past_due.id, to_cycle="annual", by=201), "organization_id": 2},
         "outstanding_invoice"),
        ({**payload("payment_method", monthly.id, to="card"), "organization_id": 2, "requested_by": 201},
         "subscription_not_found"),
    ]  # fmt: skip
    for body, code in cases:
        shown = change(client, path, body)
        assert (shown["status"], shown["error"]["code"]) == ("rejected", code), body
        assert shown["error"]["message"]
    session.expire_all()
    assert ledger_of(session, monthly.id) == [] and ledger_of(session, past_due.id) == []
    assert subscription_json(client, monthly.id)["cycle"] == "monthly"
    assert len(notices(session, "change_request_rejected")) == len(cases)


@pytest.mark.parametrize("path", PATHS)
def test_a_declined_upgrade_changes_nothing(path, session, worker, client, billing_gateway):
    organization = setup_organization(session, card_token="tok_do_not_honor")
    subscription = subscription_for(session, organization, cycle="monthly", method="card", start=today())
    session.commit()
    before = subscription_json(client, subscription.id)

    shown = change(client, path, payload("billing_cycle", subscription.id, to_cycle="annual", by=FINANCIAL))

    assert (shown["status"], shown["error"]["code"]) == ("rejected", "payment_declined")
    assert "transação não autorizada" in shown["error"]["message"]
    assert subscription_json(client, subscription.id) == before
    session.expire_all()
    assert [invoice.status for invoice in session.scalars(select(Invoice).where(Invoice.kind == "cycle_change"))] == [
        "void"
    ]
    assert ledger_of(session, subscription.id) == []


@pytest.mark.parametrize("path", PATHS)
def test_a_new_card_retries_the_past_due_invoice(path, session, worker, client, billing_gateway, sandbox_gateway):
    organization = setup_organization(session, card_token="tok_insufficient_funds")
    subscription = subscription_for(session, organization, cycle="monthly", method="card",
                                    start=add_cycle(today(), "monthly", -1))  # fmt: skip
    past_due_renewal(session, subscription)
    session.commit()
    assert subscription_json(client, subscription.id)["status"] == "past_due"

    shown = change(client, path, payload("card", subscription.id, **card_body()))

    assert shown["status"] == "applied"
    assert shown["params"]["token"] == "…k_ok" and "tok_ok" not in json.dumps(shown)  # the token is not shown back
    invoice_id = shown["result"]["retried_invoice_ids"][0]
    # The retry is charged right after the card is saved; its outcome joins the result.
    shown = wait_until(
        lambda: "retries" in (r := client.get(f"/v1/change-requests/{shown['id']}").json())["result"] and r
    )
    assert shown["result"]["retries"] == [{"invoice_id": invoice_id, "charge_status": "succeeded"}]
    state = subscription_json(client, subscription.id)
    assert (state["status"], state["open_invoices"]) == ("active", [])
    retry = session.scalars(select(Charge).where(Charge.attempt == 2)).one()
    assert len(sandbox_gateway.ledger(idempotency_key=retry.idempotency_key)) == 1


@pytest.mark.parametrize("path", PATHS)
def test_subscribe_cancel_and_resume(path, session, worker, client, billing_gateway):
    setup_organization(session)
    session.commit()

    subscribed = change(client, path, payload("subscribe", cycle="monthly", payment_method="card"))
    assert subscribed["status"] == "applied"
    subscription_id = subscribed["subscription_id"]
    state = subscription_json(client, subscription_id)
    assert (state["status"], state["cycle"], state["renewal_date"]) == (
        "active",
        "monthly",
        add_cycle(today(), "monthly", 1).isoformat(),
    )
    again = change(client, path, payload("subscribe", cycle="annual", payment_method="card"))
    assert again["error"]["code"] == "already_subscribed"

    canceled = change(client, path, payload("cancel", subscription_id))
    assert (canceled["status"], canceled["result"]["ends_on"]) == ("applied", state["renewal_date"])
    assert subscription_json(client, subscription_id)["cancel_at_period_end"] is True
    resumed = change(client, path, payload("resume", subscription_id))
    assert resumed["status"] == "applied"
    assert subscription_json(client, subscription_id)["cancel_at_period_end"] is False
    session.expire_all()
    assert [kind for kind, _, _ in ledger_of(session, subscription_id)] == [
        "payment",
        "change_applied",
        "change_applied",
        "change_applied",
    ]


def test_cancel_inside_the_boleto_window_cancels_the_boleto(session, worker, client, billing_gateway, sandbox_gateway):
    organization = setup_organization(session)
    renewal = today() + timedelta(days=5)
    subscription = subscription_for(session, organization, cycle="annual", method="boleto",
                                    start=add_cycle(renewal, "annual", -1), end=renewal)  # fmt: skip
    session.commit()
    renewal_boleto(session, billing_gateway, subscription, today())
    assert subscription_json(client, subscription.id)["open_invoices"][0]["boleto"]["status"] == "issued"
    gateway_id = session.scalars(select(Boleto.gateway_id)).one()

    shown = change(client, "api", payload("cancel", subscription.id))

    assert shown["status"] == "applied"
    assert subscription_json(client, subscription.id)["open_invoices"] == []
    wait_until(lambda: sandbox_gateway.boleto(gateway_id)["status"] == "canceled")


# --- the HTTP contract itself ------------------------------------------------------------------


def test_every_route_needs_a_valid_api_key(client, session):
    for method, url in [("GET", "/v1/subscriptions/1"), ("GET", "/v1/change-requests/1"),
                        ("POST", "/v1/change-requests"), ("PUT", "/v1/organizations/1")]:  # fmt: skip
        missing = client.request(method, url, headers={"Authorization": ""})
        wrong = client.request(method, url, headers={"Authorization": "Bearer nope"})
        assert (missing.status_code, wrong.status_code) == (401, 401)
        assert wrong.json()["error"]["code"] == "unauthorized"
    other_key = client.get("/v1/subscriptions/1", headers={"Authorization": "Bearer test-key-1"})
    assert other_key.status_code == 404
    assert other_key.json() == {"error": {"code": "not_found", "message": "Assinatura não encontrada"}}


def test_openapi_documents_the_routes(client):
    schema = client.get("/openapi.json").json()
    assert {"/v1/organizations/{organization_id}", "/v1/change-requests", "/v1/change-requests/{change_request_id}",
            "/v1/subscriptions/{subscription_id}"} <= set(schema["paths"])  # fmt: skip
    assert client.get("/docs").status_code == 200


def test_put_organization_keeps_renovas_copy_current(client, session):
    body = {
        "name": "Acme Ltda",
        "document": "11.222.333/0001-81",
        "members": [
            {"id": 7, "name": "Dona", "email": "dona@acme.example", "role": "owner"},
            {"id": 8, "email": "fin@acme.example", "role": "member", "financial_responsible": True},
            {"id": 9, "email": "colab@acme.example", "role": "member"},
        ],
    }
    created = client.put("/v1/organizations/42", json=body)
    assert created.status_code == 200, created.text
    # What was stored comes back masked: no CPF/CNPJ or e-mail address in an API answer.
    assert created.json()["document"] == "**.***.***/****-81"
    assert [m["email"] for m in created.json()["members"]] == [
        "d***@acme.example",
        "f***@acme.example",
        "c***@acme.example",
    ]
    assert session.get_one(Organization, 42).document == "11222333000181"
    assert session.get_one(Member, 7).email == "dona@acme.example"
    assert [m["can_change_billing"] for m in created.json()["members"]] == [True, True, False]

    # Member 8 left the organization; member 9 became an admin.
    body["members"] = [body["members"][0], {"id": 9, "email": "colab@acme.example", "role": "admin"}]
    updated = client.put("/v1/organizations/42", json=body).json()
    assert [(m["id"], m["role"], m["active"]) for m in updated["members"]] == [
        (7, "owner", True),
        (8, "member", False),
        (9, "admin", True),
    ]
    session.expire_all()
    assert session.get_one(Member, 8).active is False

    invalid = client.put("/v1/organizations/42", json={**body, "document": "11.222.333/0001-82"})
    assert invalid.status_code == 422
    assert invalid.json()["error"]["code"] == "invalid_document"
    assert invalid.json()["error"]["fields"][0]["field"] == "document"
    shape = client.put("/v1/organizations/42", json={"members": [{"id": "x", "role": "boss"}]})
    assert shape.status_code == 422
    assert {f["field"] for f in shape.json()["error"]["fields"]} == {"name", "members.0.id", "members.0.role"}
    stolen = client.put("/v1/organizations/43", json={"name": "Outra", "members": [{"id": 7, "role": "owner"}]})
    assert (stolen.status_code, stolen.json()["error"]["code"]) == (409, "member_conflict")
    emptied = client.put("/v1/organizations/42", json={"name": "Acme Ltda", "members": []}).json()
    assert [m["active"] for m in emptied["members"]] == [False, False, False]
    assert emptied["document"] is None


def test_post_validates_shape_before_anything_is_recorded(client, session):
    setup_organization(session)
    session.commit()
    headers = {"Idempotency-Key": "k-1"}
    cases = [
        ({"organization_id": 1, "requested_by": 101, "kind": "billing_cycle", "subscription_id": 1}, {"to_cycle"}),
        ({"organization_id": 1, "requested_by": 101, "kind": "refund"}, {"kind"}),
        ({"organization_id": 1, "requested_by": "101", "kind": "cancel", "subscription_id": 1}, {"requested_by"}),
        ({"organization_id": 1, "requested_by": 101, "kind": "card", "token": "5555 5555 5555 4444", "brand": "visa",
          "last4": "4444", "exp_month": 13, "exp_year": 2030}, {"token", "exp_month"}),
    ]  # fmt: skip
    for body, fields in cases:
        response = client.post("/v1/change-requests", json=body, headers=headers)
        assert response.status_code == 422, body
        error = response.json()["error"]
        assert error["code"] == "invalid_request"
        assert {item["field"] for item in error["fields"]} == fields
        assert "5555" not in response.text  # a card number is never echoed back
    missing_key = client.post("/v1/change-requests", json={**cases[0][0], "to_cycle": "annual"})
    assert (missing_key.status_code, missing_key.json()["error"]["code"]) == (400, "idempotency_key_required")
    assert session.scalar(select(ChangeRequest.id)) is None  # nothing half-recorded


def test_idempotent_replays_and_a_reused_key(client, session, worker, billing_gateway):
    organization = setup_organization(session)
    subscription = subscription_for(session, organization, cycle="annual", method="card", start=today())
    session.commit()
    body = {"organization_id": 1, "requested_by": 101, "subscription_id": subscription.id, "kind": "payment_method",
            "to": "boleto"}  # fmt: skip
    headers = {"Idempotency-Key": "click-123"}

    first = client.post("/v1/change-requests", json=body, headers=headers)
    replay = client.post("/v1/change-requests", json=body, headers=headers)
    assert (first.status_code, replay.status_code) == (202, 202)
    assert replay.json()["id"] == first.json()["id"]
    assert replay.headers["Idempotent-Replayed"] == "true"
    wait_until(lambda: client.get(f"/v1/change-requests/{first.json()['id']}").json()["status"] == "applied")

    reused = client.post("/v1/change-requests", json={**body, "to": "card"}, headers=headers)
    assert reused.status_code == 409
    assert reused.json()["error"]["code"] == "idempotency_conflict"
    assert reused.json()["error"]["details"] == {"change_request_id": first.json()["id"]}
    # The same key through the queue with the same body is the same request, not a second one.
    submit_change_request.send({**body, "idempotency_key": "click-123"})
    after = client.post("/v1/change-requests", json=body, headers=headers).json()
    assert after["status"] == "applied" and after["id"] == first.json()["id"]
    session.expire_all()
    assert len(session.scalars(select(ChangeRequest)).all()) == 1
    assert [kind for kind, _, _ in ledger_of(session, subscription.id)] == ["change_applied"]
    assert subscription_json(client, subscription.id)["pending_payment_method"] == "boleto"


def test_unknown_ids_are_404(client, session):
    for url in ("/v1/change-requests/999", "/v1/subscriptions/999"):
        response = client.get(url)
        assert (response.status_code, response.json()["error"]["code"]) == (404, "not_found")


def test_a_rejected_request_shows_its_error_and_nothing_else_changed(client, session, worker, billing_gateway):
    organization = setup_organization(session, card_token=None)
    subscription = subscription_for(session, organization, cycle="annual", method="boleto", start=today(),
                                    paid_cents=ANNUAL_PRICE)  # fmt: skip
    session.commit()
    shown = change(client, "api", payload("billing_cycle", subscription.id, to_cycle="monthly"))
    assert shown["status"] == "rejected"
    assert shown["error"]["code"] == "no_card_on_file"
    assert "Formas de pagamento" in shown["error"]["message"]
    assert shown["result"] is None and shown["processed_at"] is not None
    assert subscription_json(client, subscription.id)["cycle"] == "annual"


def test_every_rejection_code_is_documented_in_the_readme():
    from models.policy import ERROR_CODES
    from tests.integration.conftest import ROOT

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    undocumented = [code for code in ERROR_CODES if f"`{code}`" not in readme]
    assert undocumented == []
