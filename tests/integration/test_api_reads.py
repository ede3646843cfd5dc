"""What the main application reads back: cursor-paginated lists of an organization's subscriptions,
a subscription's invoices (with the live boleto) and change requests; the events; the error envelope
for every refusal."""

from __future__ import annotations

from datetime import date

from fastapi.testclient import TestClient
from sqlalchemy import select

from jobs.billing_day import run_day
from jobs.context import runtime
from models.schema import ChangeRequest, Invoice, Subscription
from tests.integration.factories import make_organization, make_subscription, noon, seed_plans, wait_for_events_visible
from tests.integration.test_changes import payload, setup_organization, submit


def pages(client: TestClient, path: str, **params: object) -> list[list[int]]:
    """Every page of a list, following `starting_after`, as lists of ids."""
    found, after = [], None
    while True:
        answer = client.get(path, params={**params, **({"starting_after": after} if after else {})})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        found.append([item["id"] for item in body["data"]])
        if not body["has_more"]:
            return found
        after = body["data"][-1]["id"]


def test_an_organizations_subscriptions_newest_first_page_by_page(api_client, session):
    seed_plans(session)
    organization = make_organization(session, 1)
    old = make_subscription(session, organization, cycle="monthly", method="card", anchor=date(2026, 1, 10))
    old.status = "canceled"
    new = make_subscription(session, organization, cycle="annual", method="card", anchor=date(2027, 1, 10))
    make_subscription(session, make_organization(session, 2), cycle="monthly", method="card", anchor=date(2027, 1, 1))
    session.commit()

    assert pages(api_client, "/v1/organizations/1/subscriptions", limit=1) == [[new.id], [old.id]]
    first = api_client.get("/v1/organizations/1/subscriptions").json()["data"][0]
    assert first["status"] == "active" and first["cycle"] == "annual" and "open_invoices" in first
    missing = api_client.get("/v1/organizations/999/subscriptions")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    too_many = api_client.get("/v1/organizations/1/subscriptions", params={"limit": 101})
    assert too_many.status_code == 422 and too_many.json()["error"]["code"] == "invalid_request"


def test_a_subscriptions_invoices_carry_the_boleto_to_pay(api_client, session, billing_gateway):
    seed_plans(session)
    organization = make_organization(session, 1, card_token=None)
    subscription = make_subscription(session, organization, cycle="annual", method="boleto", anchor=date(2027, 3, 10))
    session.commit()
    run_day(session, billing_gateway, date(2028, 3, 3), noon(date(2028, 3, 3)), runtime().config)  # T − 7

    answer = api_client.get(f"/v1/subscriptions/{subscription.id}/invoices")

    assert answer.status_code == 200, answer.text
    renewal, first = answer.json()["data"]
    assert (renewal["kind"], renewal["status"], renewal["period_start"]) == ("renewal", "open", "2028-03-10")
    assert len(renewal["boleto"]["digitable_line"]) >= 47 and renewal["boleto"]["status"] == "issued"
    assert first["status"] == "paid" and first["boleto"] is None and first["paid_on"] is not None
    assert api_client.get("/v1/subscriptions/999/invoices").status_code == 404
    ids = [row for row in session.scalars(select(Invoice.id).order_by(Invoice.id.desc()))]
    assert pages(api_client, f"/v1/subscriptions/{subscription.id}/invoices", limit=1) == [[ids[0]], [ids[1]]]


def test_change_requests_are_listed_by_organization_status_and_kind(api_client, session, billing_gateway):
    setup_organization(session)
    session.commit()
    subscribed = submit(session, billing_gateway, payload("subscribe", product="conecta", cycle="monthly",
                                                            payment_method="card"), date(2027, 3, 10))  # fmt: skip
    refused = submit(session, billing_gateway, payload("cancel", 999), date(2027, 3, 10))
    assert (subscribed.status, refused.status) == ("applied", "rejected")

    def ids(**params: object) -> list[int]:
        answer = api_client.get("/v1/change-requests", params=params)
        assert answer.status_code == 200, answer.text
        return [row["id"] for row in answer.json()["data"]]

    assert ids(organization_id=1) == [refused.id, subscribed.id]
    assert ids(status="rejected") == [refused.id]
    assert ids(kind="subscribe") == [subscribed.id]
    assert ids(organization_id=2) == []
    rejected = api_client.get("/v1/change-requests", params={"status": "rejected"}).json()["data"][0]
    assert rejected["error"]["code"] and rejected["status"] == "rejected"
    assert api_client.get("/v1/change-requests", params={"status": "lost"}).status_code == 422
    assert session.scalar(select(ChangeRequest.id).where(ChangeRequest.id == subscribed.id))


def test_events_are_read_after_a_cursor_and_a_bad_cursor_is_refused(api_client, session, billing_gateway):
    setup_organization(session)
    session.commit()
    submit(session, billing_gateway, payload("subscribe", product="conecta", cycle="monthly",
                                             payment_method="card"), date(2027, 3, 10))  # fmt: skip

    wait_for_events_visible(session)
    everything = api_client.get("/v1/events").json()
    assert [event["type"] for event in everything["data"]][:2] == ["subscription.created", "invoice.created"]
    second = everything["data"][1]["id"]
    after = api_client.get("/v1/events", params={"after": second, "limit": 2}).json()
    assert [event["id"] for event in after["data"]] == [event["id"] for event in everything["data"][2:4]]
    assert after["has_more"] is True
    for bad in ("evt_999999", "banana", "evt_-1"):
        refused = api_client.get("/v1/events", params={"after": bad})
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_cursor", bad
    anonymous = api_client.get("/v1/events", headers={"Authorization": ""})
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "unauthorized"
    assert session.scalar(select(Subscription.status)) == "active"
