"""Gateway webhooks end to end: the sandbox gateway process pays a boleto and posts a signed event
to Renova's API (uvicorn on a real port); a real worker applies it once."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import date

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import func, select

from gateways.webhooks import sign
from jobs.billing_day import run_day
from jobs.context import runtime
from models.schema import Boleto, GatewayEvent, Invoice, Subscription
from tests.integration.conftest import serve_api, wait_until
from tests.integration.factories import make_organization, make_subscription, noon, seed_plans
from workers.settings import get_settings

SECRET = "whsec_test_webhooks"


@pytest.fixture(scope="module")
def api_url(sandbox_gateway) -> Iterator[str]:
    settings = get_settings().model_copy(update={"gateway_webhook_secret": SecretStr(sandbox_gateway.webhook_secret)})
    with serve_api(settings) as url:
        yield url


def issued_boleto(session, gateway) -> tuple[Subscription, Boleto]:
    seed_plans(session)
    organization = make_organization(session, card_token=None)
    subscription = make_subscription(session, organization, cycle="annual", method="boleto", anchor=date(2027, 3, 10))
    session.commit()
    issue_day = date(2028, 3, 3)
    run_day(session, gateway, issue_day, noon(issue_day), runtime().config)
    return subscription, session.scalars(select(Boleto)).one()


def test_a_paid_boleto_webhook_reactivates_a_suspended_subscription(
    session, worker, billing_gateway, sandbox_gateway, api_url
):
    subscription, boleto = issued_boleto(session, billing_gateway)
    for day in (date(2028, 3, 11), date(2028, 3, 15)):
        run_day(session, billing_gateway, day, noon(day), runtime().config)
    session.refresh(subscription)
    assert subscription.status == "suspended"

    with sandbox_gateway.configured(webhook_url=f"{api_url}/v1/webhooks/gateway"):
        paid = sandbox_gateway.pay_boleto(boleto.gateway_id, paid_on=date(2028, 3, 16))
        wait_until(lambda: invoice_status(boleto.invoice_id) == "paid")
    session.refresh(subscription)
    assert subscription.status == "active"
    event = session.scalars(select(GatewayEvent)).one()
    assert event.event_id == paid["event_id"] and event.processed_at is not None


def invoice_status(invoice_id: int) -> str:
    from workers.db import get_session_factory

    with get_session_factory()() as own:
        return own.scalar(select(Invoice.status).where(Invoice.id == invoice_id))


def post_event(api_url: str, event: dict, *, secret: str, timestamp: int | None = None) -> httpx.Response:
    body = json.dumps(event).encode()
    header = sign(secret, body, timestamp or int(time.time()))
    return httpx.post(
        f"{api_url}/v1/webhooks/gateway",
        content=body,
        headers={"Renova-Signature": header, "Content-Type": "application/json"},
    )


def test_signatures_are_checked_and_events_applied_once(session, worker, billing_gateway, sandbox_gateway, api_url):
    _, boleto = issued_boleto(session, billing_gateway)
    event = {
        "id": "evt_test_1",
        "type": "boleto.paid",
        "data": {"boleto_id": boleto.gateway_id, "amount_cents": boleto.amount_cents, "paid_on": "2028-03-05"},
    }
    secret = sandbox_gateway.webhook_secret

    forged = post_event(api_url, event, secret="whsec_wrong")
    assert forged.status_code == 400 and forged.json()["error"]["code"] == "invalid_signature"
    replayed = post_event(api_url, event, secret=secret, timestamp=int(time.time()) - 3600)
    assert replayed.status_code == 400
    assert session.scalar(select(func.count()).select_from(GatewayEvent)) == 0

    assert post_event(api_url, event, secret=secret).status_code == 200
    assert post_event(api_url, event, secret=secret).status_code == 200  # a redelivery
    wait_until(lambda: invoice_status(boleto.invoice_id) == "paid")
    assert session.scalar(select(func.count()).select_from(GatewayEvent)) == 1
    invoice = session.get(Invoice, boleto.invoice_id)
    assert invoice.paid_on == date(2028, 3, 5)
    payments = session.execute(
        select(func.count()).select_from(Invoice).where(Invoice.status == "paid", Invoice.kind == "renewal")
    ).scalar()
    assert payments == 1
    from models.schema import LedgerEntry

    assert session.scalar(select(func.count()).select_from(LedgerEntry).where(LedgerEntry.kind == "payment")) == 1


def test_a_malformed_event_is_refused(api_url, sandbox_gateway, clean_database):
    response = post_event(api_url, {"type": "boleto.paid"}, secret=sandbox_gateway.webhook_secret)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_event"
