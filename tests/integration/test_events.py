"""Events to the main application: written by the database in the transaction of each change, read
in order with a cursor that never skips one (`GET /v1/events`), shaped as the API shows the objects."""

from __future__ import annotations

from datetime import date, timedelta

import pytest
from sqlalchemy import func, select, text

from jobs.events import EventError, event_body, list_events
from models.schema import Event, Subscription
from tests.integration.factories import wait_for_events_visible
from tests.integration.test_changes import payload, setup_organization, submit
from workers.db import get_session_factory

D = date(2027, 3, 10)


def types(session, **filters) -> list[str]:
    query = select(Event.type).order_by(Event.txid, Event.id)
    for name, value in filters.items():
        query = query.where(getattr(Event, name) == value)
    return list(session.scalars(query))


def test_a_subscribe_writes_its_events_with_the_change(session, billing_gateway):
    setup_organization(session)
    session.commit()

    request = submit(session, billing_gateway, payload("subscribe", product="conecta", cycle="monthly",
                                                         payment_method="card"), D)  # fmt: skip

    assert request.status == "applied", request.error_message
    subscription = session.scalars(select(Subscription)).one()
    assert types(session) == [
        "subscription.created",
        "invoice.created",
        "charge.succeeded",
        "invoice.paid",
        "subscription.activated",
        "change_request.applied",
    ]
    wait_for_events_visible(session)
    bodies = [event_body(event) for event in list_events(session).events]
    assert all(body["id"].startswith("evt_") and body["timestamp"].endswith("Z") for body in bodies)
    created = bodies[0]["data"]["object"]
    assert created["object"] == "subscription" and created["id"] == subscription.id
    assert created["status"] == "active" and created["cycle"] == "monthly"
    charge = bodies[2]["data"]["object"]
    assert charge["object"] == "charge" and charge["status"] == "succeeded" and "card_token" not in charge
    applied = bodies[-1]["data"]["object"]
    assert applied["object"] == "change_request" and applied["status"] == "applied"
    assert applied["subscription_id"] == subscription.id


def test_a_change_rolled_back_leaves_no_event(session, billing_gateway):
    from tests.integration.factories import make_subscription

    subscription = make_subscription(session, setup_organization(session), cycle="monthly", method="card", anchor=D)
    session.commit()
    before = types(session)
    suspend = text("UPDATE subscriptions SET status = 'suspended' WHERE id = :id")
    with get_session_factory()() as other:
        other.execute(suspend, {"id": subscription.id})
        assert "subscription.suspended" in types(other)  # written with the change, in its transaction…
        other.rollback()
    assert types(session) == before  # …and gone with it
    with get_session_factory()() as other:
        other.execute(suspend, {"id": subscription.id})
        other.commit()
    assert types(session) == [*before, "subscription.suspended"]


def test_the_cursor_never_passes_a_transaction_still_running(session, billing_gateway):
    organization = setup_organization(session)
    session.commit()
    from tests.integration.factories import make_subscription

    first = make_subscription(session, organization, cycle="monthly", method="card", anchor=D)
    session.commit()
    wait_for_events_visible(session)
    start = list_events(session).events[-1].id

    slow, quick = get_session_factory()(), get_session_factory()()
    try:
        # The slow transaction takes its transaction id first, then writes its event after the quick one.
        slow.execute(text("SELECT pg_current_xact_id()"))
        quick.execute(text("UPDATE subscriptions SET status = 'past_due' WHERE id = :id"), {"id": first.id})
        quick.commit()
        slow.execute(text("UPDATE subscriptions SET cancel_at_period_end = true WHERE id = :id"), {"id": first.id})

        page = list_events(session, after=f"evt_{start}")
        session.commit()
        assert page.events == []  # the quick event waits behind the running transaction

        slow.commit()
        wait_for_events_visible(session)
        page = list_events(session, after=f"evt_{start}")
        assert [event.type for event in page.events] == ["subscription.cancel_scheduled", "subscription.past_due"]
    finally:
        slow.close()
        quick.close()


def test_a_bad_cursor_is_an_error(session):
    with pytest.raises(EventError) as caught:
        list_events(session, after="evt_999999")
    assert caught.value.code == "invalid_cursor"
    with pytest.raises(EventError):
        list_events(session, after="banana")


# --- push: signed deliveries ------------------------------------------------------------------------------


class Receiver:
    """The main application's endpoint as the README tells it to be written: verify the Standard
    Webhooks signature with the endpoint's secret, answer 2xx fast, and handle each event id once."""

    def __init__(self, secret: str = "") -> None:
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from standardwebhooks.webhooks import Webhook, WebhookVerificationError

        self.secret = secret
        self.events: dict[str, dict] = {}  # event id → body, the first time it arrived
        self.arrivals: list[str] = []  # every delivery's event id, duplicates included
        self.refused: list[str] = []
        self.outage = 0  # answer 503 to this many deliveries
        lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with lock:
                    if receiver.outage > 0:
                        receiver.outage -= 1
                        return self._answer(503)
                    try:
                        event = Webhook(receiver.secret).verify(body, dict(self.headers))
                    except WebhookVerificationError as exc:
                        receiver.refused.append(str(exc))
                        return self._answer(400)
                    receiver.arrivals.append(event["id"])
                    receiver.events.setdefault(event["id"], event)
                self._answer(204)

            def _answer(self, status: int) -> None:
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                """No line per request on the test's output."""

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/renova/events"
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        self._json = json

    def types(self) -> list[str]:
        return [self.events[event_id]["type"] for event_id in dict.fromkeys(self.arrivals)]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def receiver():
    found = Receiver()
    yield found
    found.close()


def deliver_all(session, *, clock=None, rounds: int = 200) -> int:
    """What the workers do on each tick: deliver what is due, until nothing is pending."""
    import time as _time

    import httpx

    from jobs.event_delivery import deliver_due
    from jobs.events import Backoff
    from models.schema import EventDelivery

    attempted = 0
    with httpx.Client() as client:
        for _ in range(rounds):
            kwargs = {"clock": clock} if clock else {}
            attempted += deliver_due(session, client, backoff=Backoff(first=timedelta(milliseconds=20)), **kwargs)
            pending = session.scalar(select(func.count()).where(EventDelivery.status == "pending"))
            session.commit()
            if not pending:
                return attempted
            _time.sleep(0.02)
    raise AssertionError("deliveries still pending")


def subscribe(session, gateway, organization_id: int = 1) -> Subscription:
    body = payload("subscribe", product="conecta", cycle="monthly", payment_method="card")
    body["organization_id"] = organization_id
    body["requested_by"] = organization_id * 100 + 1
    request = submit(session, gateway, body, D)
    assert request.status == "applied", request.error_message
    wait_for_events_visible(session)
    return session.get_one(Subscription, request.subscription_id)


def test_deliveries_are_signed_in_order_and_survive_a_receiver_outage(session, billing_gateway, receiver):
    from jobs.events import add_endpoint

    endpoint = add_endpoint(session, receiver.url, require_https=False)
    receiver.secret = endpoint.secret
    setup_organization(session)
    session.commit()
    receiver.outage = 3  # the first three deliveries are refused: retried with backoff, order kept
    subscribe(session, billing_gateway)

    attempted = deliver_all(session)

    assert receiver.types() == types(session)  # every event, once each, in the order written
    assert attempted == len(receiver.events) + 3
    assert receiver.refused == []
    first = receiver.events[next(iter(receiver.events))]
    assert set(first) == {"id", "type", "timestamp", "organization_id", "subscription_id", "data"}
    assert first["data"]["object"]["object"] == "subscription"


def test_a_forged_or_stale_delivery_is_refused_by_the_receiver(session, receiver):
    from jobs.event_delivery import signed_request
    from jobs.events import add_endpoint, new_secret
    from models.schema import Event
    from tests.integration.factories import make_organization, make_subscription, seed_plans

    seed_plans(session)
    make_subscription(session, make_organization(session, 1), cycle="monthly", method="card", anchor=D)
    endpoint = add_endpoint(session, receiver.url, require_https=False)
    session.commit()
    receiver.secret = endpoint.secret
    event = session.scalars(select(Event)).first()
    import httpx

    from jobs.clock import wall_clock

    forged = endpoint.__class__(url=endpoint.url, secret=new_secret())
    body, headers = signed_request(forged, event, wall_clock())
    assert httpx.post(receiver.url, content=body, headers=headers).status_code == 400
    body, headers = signed_request(endpoint, event, wall_clock() - timedelta(minutes=10))
    assert httpx.post(receiver.url, content=body, headers=headers).status_code == 400
    body, headers = signed_request(endpoint, event, wall_clock())
    assert httpx.post(receiver.url, content=body.replace(b"monthly", b"annual"), headers=headers).status_code == 400
    assert httpx.post(receiver.url, content=body, headers=headers).status_code == 204
    assert len(receiver.refused) == 3


def test_an_endpoint_gets_only_the_types_it_asked_for(session, billing_gateway, receiver):
    from jobs.events import add_endpoint

    wanted = add_endpoint(session, receiver.url, ["invoice.paid", "subscription.activated"], require_https=False)
    receiver.secret = wanted.secret
    setup_organization(session)
    session.commit()
    subscribe(session, billing_gateway)

    deliver_all(session)

    assert receiver.types() == ["invoice.paid", "subscription.activated"]


def test_a_worker_killed_after_sending_delivers_again_after_its_lease(session, billing_gateway, receiver):
    import httpx

    from jobs.clock import wall_clock
    from jobs.event_delivery import LEASE, claim_deliveries, send
    from jobs.events import add_endpoint
    from models.schema import Event, EventDelivery, WebhookEndpoint

    endpoint = add_endpoint(session, receiver.url, ["subscription.created"], require_https=False)
    receiver.secret = endpoint.secret
    setup_organization(session)
    session.commit()
    subscribe(session, billing_gateway)
    # A worker claims the delivery, sends it, and dies before recording the answer.
    [claimed] = claim_deliveries(session, wall_clock())
    session.commit()
    delivery = session.get_one(EventDelivery, claimed)
    with httpx.Client() as client:
        send(client, session.get_one(WebhookEndpoint, delivery.endpoint_id), session.get_one(Event, delivery.event_id))
    assert claim_deliveries(session, wall_clock()) == []  # leased: nobody else sends it meanwhile
    session.commit()

    deliver_all(session, clock=lambda: wall_clock() + LEASE + timedelta(seconds=1))

    assert len(receiver.arrivals) == 2 and len(receiver.events) == 1  # at least once; deduped by id


def test_a_delivery_gives_up_after_three_days_and_can_be_sent_again(session, billing_gateway, receiver):
    import httpx

    from jobs.clock import wall_clock
    from jobs.event_delivery import deliver_due, redeliver
    from jobs.events import Backoff, add_endpoint
    from models.schema import AuditEvent, EventDelivery

    endpoint = add_endpoint(session, receiver.url, ["subscription.created"], require_https=False)
    receiver.secret = endpoint.secret
    setup_organization(session)
    session.commit()
    subscribe(session, billing_gateway)
    receiver.outage = 1_000
    # The workers keep trying, hours apart (the wall clock moved on by 6 h each time), for 3 days.
    later = wall_clock()
    with httpx.Client() as client:
        for hours in range(0, 80, 6):
            deliver_due(session, client, backoff=Backoff(), clock=lambda h=hours: later + timedelta(hours=h))
    delivery = session.scalars(select(EventDelivery)).one()
    assert delivery.status == "failed" and delivery.last_status_code == 503 and delivery.attempts > 3

    receiver.outage = 0
    redeliver(session, delivery.id, actor="ana", reason="endpoint fixed", now=wall_clock())
    session.commit()
    deliver_all(session)
    session.refresh(delivery)
    assert delivery.status == "delivered" and receiver.types() == ["subscription.created"]
    assert session.scalars(select(AuditEvent.action).order_by(AuditEvent.id)).all() == [
        "webhook_endpoint.add",
        "event_delivery.redeliver",
    ]
