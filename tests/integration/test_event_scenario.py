"""The main application hears back, end to end: a live `renova web`, Dramatiq workers and the sandbox
gateway; two organizations subscribe through the API, renew, are declined, suspended; one comes back
with a new card, changes cycle and schedules its cancellation, the other cancels while suspended. A
receiver written from the README (Standard Webhooks verification, dedupe by id) gets every event, in
order per subscription, through an outage of several retries; the same events are pulled from
`GET /v1/events`. And a client generated from the live `/openapi.json` subscribes and reads back."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from datetime import time as time_of_day
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import pytest
import uvicorn
from sqlalchemy import func, select

from jobs import clock
from jobs.context import runtime
from jobs.events import add_endpoint
from jobs.tick import tick_once
from models.calendar import add_cycle
from models.schema import BillingRun, Event, EventDelivery, Subscription
from tests.integration.conftest import wait_until
from tests.integration.factories import seed_plans
from tests.integration.gateway_fixtures import free_port
from tests.integration.test_events import Receiver
from workers.db import get_session_factory
from workers.settings import get_settings

API_KEY = "scenario-key"
RUN_AT = time_of_day(6, 0)
START = date(2027, 3, 10)


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> Iterator[httpx.Client]:
    monkeypatch.setenv("RENOVA_API_KEYS", API_KEY)
    get_settings.cache_clear()
    from workers.api import create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, timeout=10)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        yield client
    server.should_exit = True
    thread.join(timeout=10)
    get_settings.cache_clear()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    found = Receiver()
    yield found
    found.close()


def at(day: date) -> datetime:
    """A minute after the run hour of `day`, in UTC; the test clock set there for every process."""
    instant = datetime.combine(day, RUN_AT, ZoneInfo(runtime().config.timezone)).astimezone(UTC) + timedelta(minutes=1)
    with get_session_factory()() as session:
        clock.set_clock(session, instant, runtime().config)
        session.commit()
    return instant


def run_day(day: date) -> None:
    """The day's billing run, as the scheduler's ticks and the workers do it."""
    now = at(day)

    def done() -> bool:
        with get_session_factory()() as session:
            tick_once(session, now, runtime().config, RUN_AT, rescan_after=timedelta(0))
            return session.scalar(select(BillingRun.status).where(BillingRun.run_date == day)) == "done"

    wait_until(done, timeout=30, interval=0.1)


def change(api: httpx.Client, organization_id: int, kind: str, **params: object) -> dict:
    """A change request as the main application sends it, waited for until decided."""
    body = {"organization_id": organization_id, "requested_by": organization_id * 10 + 1, "kind": kind, **params}
    posted = api.post("/v1/change-requests", json=body, headers={"Idempotency-Key": str(uuid.uuid4())})
    assert posted.status_code == 202, posted.text
    request_id = posted.json()["id"]
    decided = wait_until(
        lambda: (r := api.get(f"/v1/change-requests/{request_id}").json())["status"] != "pending" and r
    )
    assert decided["status"] == "applied", decided
    return decided


def card(token: str, last4: str) -> dict:
    return {"token": token, "brand": "visa", "last4": last4, "exp_month": 12, "exp_year": 2031}


def status_of(subscription_id: int) -> str:
    with get_session_factory()() as session:
        return session.get_one(Subscription, subscription_id).status


def test_a_receiver_gets_every_event_of_a_subscriptions_life(session, worker, api, receiver, billing_gateway):
    seed_plans(session)
    endpoint = add_endpoint(session, receiver.url, description="app", require_https=False)
    session.commit()
    receiver.secret = endpoint.secret
    receiver.outage = 4  # the receiver is down for the first deliveries: retried, order kept
    subscriptions = {}
    at(START)
    for organization_id in (1, 2):
        member = {"id": organization_id * 10 + 1, "name": "Dona", "email": f"dona{organization_id}@acme.example",
                  "role": "owner", "financial_responsible": True}  # fmt: skip
        put = api.put(f"/v1/organizations/{organization_id}", json={"name": f"Org {organization_id}",
                                                                    "members": [member]})  # fmt: skip
        assert put.status_code == 200, put.text
        change(api, organization_id, "card", **card("tok_ok", "4242"))
        subscribed = change(api, organization_id, "subscribe", product="conecta", cycle="monthly",
                            payment_method="card")  # fmt: skip
        subscriptions[organization_id] = subscribed["subscription_id"]
        # The card stops working before the renewal.
        change(api, organization_id, "card", **card("tok_insufficient_funds", "0341"))

    # The renewal is declined, retried, and both subscriptions end up suspended.
    renewal = add_cycle(START, "monthly", 1)
    day = renewal
    while any(status_of(s) != "suspended" for s in subscriptions.values()):
        assert day < renewal + timedelta(days=15), {o: status_of(s) for o, s in subscriptions.items()}
        run_day(day)
        day += timedelta(days=1)

    # Organization 1 comes back with a good card (the past-due invoice is charged at once), goes
    # annual and schedules its cancellation; organization 2 cancels while suspended (at once).
    change(api, 1, "card", **card("tok_ok", "4242"))
    wait_until(lambda: status_of(subscriptions[1]) == "active")
    change(api, 1, "billing_cycle", subscription_id=subscriptions[1], to_cycle="annual")
    change(api, 1, "cancel", subscription_id=subscriptions[1])
    change(api, 2, "cancel", subscription_id=subscriptions[2])
    assert status_of(subscriptions[2]) == "canceled"

    # The ticks go on; the workers deliver until nothing is pending.
    def delivered() -> bool:
        with get_session_factory()() as other:
            tick_once(other, at(day), runtime().config, RUN_AT)
            return not other.scalar(select(func.count()).where(EventDelivery.status == "pending"))

    wait_until(delivered, timeout=60, interval=0.2)

    session.expire_all()
    written = list(session.execute(select(Event.id, Event.type, Event.subscription_id).order_by(Event.txid, Event.id)))
    assert receiver.refused == [] and receiver.outage == 0
    assert set(receiver.events) == {f"evt_{event_id}" for event_id, _, _ in written}  # every event, once
    for subscription_id in subscriptions.values():
        # In order per subscription: the receiver's first arrivals follow the order written.
        mine = [f"evt_{event_id}" for event_id, _, sub in written if sub == subscription_id]
        arrived = [event_id for event_id in dict.fromkeys(receiver.arrivals) if event_id in set(mine)]
        assert arrived == mine
    lives = {
        organization_id: [
            receiver.events[f"evt_{event_id}"]["type"]
            for event_id, kind, sub in written
            if sub == subscription_id and kind.startswith("subscription.")
        ]
        for organization_id, subscription_id in subscriptions.items()
    }
    assert lives[1] == [
        "subscription.created",
        "subscription.activated",
        "subscription.past_due",
        "subscription.suspended",
        "subscription.reactivated",
        "subscription.cycle_changed",
        "subscription.cancel_scheduled",
    ]
    assert lives[2] == [
        "subscription.created",
        "subscription.activated",
        "subscription.past_due",
        "subscription.suspended",
        "subscription.canceled",
    ]
    seen = {body["type"] for body in receiver.events.values()}
    assert {"invoice.created", "invoice.paid", "charge.succeeded", "charge.failed", "change_request.applied"} <= seen
    suspended = next(body for body in receiver.events.values() if body["type"] == "subscription.suspended")
    assert suspended["data"]["object"]["status"] == "suspended"  # the object as it was at that moment

    # Pull: the same events, the same ids, the same order, page by page.
    pulled, after = [], None
    while True:
        page = api.get("/v1/events", params={"limit": 7, **({"after": after} if after else {})}).json()
        pulled += page["data"]
        if not page["has_more"]:
            break
        after = page["data"][-1]["id"]
    assert [event["id"] for event in pulled] == [f"evt_{event_id}" for event_id, _, _ in written]
    assert pulled[0] == receiver.events[pulled[0]["id"]]


def test_a_client_generated_from_the_live_openapi_subscribes_and_reads_back(
    session, worker, api, billing_gateway, tmp_path: Path
):
    seed_plans(session)
    session.commit()
    at(START)
    document = api.get("/openapi.json")
    assert document.status_code == 200
    assert document.json()["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    (tmp_path / "openapi.json").write_text(document.text)
    environment = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    generated = subprocess.run(
        [Path(sys.executable).parent / "openapi-python-client", "generate", "--path", "openapi.json",
         "--meta", "none", "--output-path", "renova_client"],
        cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert generated.returncode == 0, generated.stdout + generated.stderr
    sys.path.insert(0, str(tmp_path))
    try:
        client_module = importlib.import_module("renova_client")
        organizations = importlib.import_module("renova_client.api.organizations.put_organization")
        changes_post = importlib.import_module("renova_client.api.change_requests.post_change_request")
        changes_get = importlib.import_module("renova_client.api.change_requests.get_change_request")
        subscriptions_list = importlib.import_module("renova_client.api.subscriptions.list_subscriptions")
        models = importlib.import_module("renova_client.models")

        client = client_module.AuthenticatedClient(base_url=str(api.base_url), token=API_KEY)
        anonymous = client_module.Client(base_url=str(api.base_url))
        assert changes_get.sync_detailed(change_request_id=1, client=anonymous).status_code == 401

        saved = organizations.sync(
            organization_id=5,
            client=client,
            body=models.OrganizationIn(
                name="Gerada Ltda",
                members=[
                    models.MemberIn(
                        id=51, role=models.MemberInRole.OWNER, email="dona@gerada.example", financial_responsible=True
                    )
                ],
            ),
        )
        assert saved.id == 5 and saved.members[0].email == "d***@gerada.example"
        card_request = changes_post.sync(
            client=client,
            idempotency_key=str(uuid.uuid4()),
            body=models.CardUpdate(organization_id=5, requested_by=51, kind="card", token="tok_ok", brand="visa",
                                   last4="4242", exp_month=12, exp_year=2031),
        )  # fmt: skip
        wait_until(lambda: changes_get.sync(change_request_id=card_request.id, client=client).status == "applied")
        subscribe = changes_post.sync(
            client=client,
            idempotency_key=str(uuid.uuid4()),
            body=models.Subscribe(organization_id=5, requested_by=51, kind="subscribe", product="conecta",
                                  cycle=models.SubscribeCycle.MONTHLY,
                                  payment_method=models.SubscribePaymentMethod.CARD),
        )  # fmt: skip
        assert subscribe.status == "pending"
        decided = wait_until(
            lambda: (r := changes_get.sync(change_request_id=subscribe.id, client=client)).status != "pending" and r
        )
        assert decided.status == "applied"
        page = subscriptions_list.sync(organization_id=5, client=client)
        assert [item.id for item in page.data] == [decided.subscription_id]
        assert page.data[0].status == "active" and page.has_more is False
    finally:
        sys.path.remove(str(tmp_path))
        for name in [name for name in sys.modules if name.startswith("renova_client")]:
            del sys.modules[name]
