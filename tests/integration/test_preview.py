"""`POST /v1/change-requests/preview`: what a change request would do today, decided by the same
code that processes requests, with nothing written, charged, issued or sent."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select

from models.schema import AuditEvent, Boleto, ChangeRequest, Charge, Invoice, LedgerEntry, Notification, Subscription
from tests.integration.factories import ANNUAL_PRICE
from tests.integration.test_api import change, client  # noqa: F401 - the API client fixture
from tests.integration.test_changes import FINANCIAL, PLAIN_MEMBER, payload, setup_organization, subscription_for, today

TABLES = (ChangeRequest, Invoice, Charge, Boleto, LedgerEntry, Notification, Subscription, AuditEvent)


def counts(session) -> dict[str, int]:
    session.expire_all()
    return {table.__tablename__: session.scalar(select(func.count()).select_from(table)) for table in TABLES}


def preview_body(body: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in body.items() if key != "idempotency_key"}


def test_a_cycle_change_preview_is_the_quote_the_request_then_applies(session, worker, client, billing_gateway):  # noqa: F811
    organization = setup_organization(session)
    start = today() - timedelta(days=10)
    subscription = subscription_for(session, organization, cycle="monthly", method="card", start=start,
                                    end=start + timedelta(days=30), paid_cents=3000)  # fmt: skip
    session.commit()
    body = payload("billing_cycle", subscription.id, to_cycle="annual")
    before = counts(session)

    response = client.post("/v1/change-requests/preview", json=preview_body(body))

    assert response.status_code == 200, response.text
    preview = response.json()
    assert (preview["outcome"], preview["kind"], preview["on"]) == ("charge", "billing_cycle", today().isoformat())
    assert preview["charge_now_cents"] == ANNUAL_PRICE - 2000
    quote = preview["result"]
    assert (quote["credit_cents"], quote["amount_due_cents"], quote["payment_method"]) == (
        2000,
        ANNUAL_PRICE - 2000,
        "card",
    )
    assert counts(session) == before  # nothing recorded, charged or sent

    applied = change(client, "api", body)["result"]
    for key in ("credit_cents", "amount_due_cents", "renewal_date", "balance_after_cents", "payment_method"):
        assert applied[key] == quote[key], key


def test_a_method_switch_preview_names_the_effective_date_and_deadline(session, client, billing_gateway):  # noqa: F811
    organization = setup_organization(session)
    subscription = subscription_for(session, organization, cycle="annual", method="boleto",
                                    start=today() - timedelta(days=100))  # fmt: skip
    session.commit()

    response = client.post(
        "/v1/change-requests/preview", json=preview_body(payload("payment_method", subscription.id, to="card"))
    )

    preview = response.json()
    assert (response.status_code, preview["outcome"]) == (200, "applied")
    renewal = subscription.current_period_end
    assert preview["result"]["effective_on"] == renewal.isoformat()
    assert preview["result"]["boleto_switch_deadline"] == (renewal - timedelta(days=8)).isoformat()
    session.refresh(subscription)
    assert subscription.pending_payment_method is None


def test_a_refusal_is_previewed_with_its_code_and_message(session, client, billing_gateway):  # noqa: F811
    organization = setup_organization(session)
    subscription = subscription_for(session, organization, cycle="monthly", method="card", start=today())
    session.commit()
    before = counts(session)

    same = client.post(
        "/v1/change-requests/preview", json=preview_body(payload("billing_cycle", subscription.id, to_cycle="monthly"))
    )
    forbidden = client.post(
        "/v1/change-requests/preview",
        json=preview_body(payload("cancel", subscription.id, by=PLAIN_MEMBER)),
    )

    assert same.status_code == forbidden.status_code == 200
    assert same.json()["outcome"] == "rejected"
    assert same.json()["error"]["code"] == "same_cycle"
    assert forbidden.json()["error"]["code"] == "forbidden"
    assert forbidden.json()["error"]["message"]  # pt-BR, for people
    assert counts(session) == before  # not even the refusal notice


def test_a_subscribe_preview_creates_nothing(session, client, billing_gateway):  # noqa: F811
    setup_organization(session)
    session.commit()
    before = counts(session)

    response = client.post(
        "/v1/change-requests/preview",
        json=preview_body(payload("subscribe", cycle="annual", payment_method="boleto", by=FINANCIAL)),
    )

    preview = response.json()
    assert (response.status_code, preview["outcome"], preview.get("boleto_issued_now")) == (200, "applied", True)
    assert preview["result"]["amount_cents"] == ANNUAL_PRICE
    assert counts(session) == before


def test_a_preview_of_a_bad_body_is_a_422_with_the_field(client, session):  # noqa: F811
    response = client.post(
        "/v1/change-requests/preview",
        json={"organization_id": 1, "requested_by": 101, "kind": "billing_cycle", "subscription_id": 1,
              "to_cycle": "weekly", "idempotency_key": str(uuid.uuid4())},
    )  # fmt: skip
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert [field["field"] for field in error["fields"]] == ["to_cycle"]


def test_a_preview_needs_the_api_key(client, session):  # noqa: F811
    response = client.post("/v1/change-requests/preview", json={}, headers={"Authorization": "Bearer wrong"})
    assert response.status_code == 401
