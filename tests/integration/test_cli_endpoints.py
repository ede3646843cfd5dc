"""`renova endpoints` as a real process: add (the secret printed once), list, the delivery log, a
redelivery with its reason in the audit log, disable and enable; bad input gets a readable message."""

from __future__ import annotations

import re

from sqlalchemy import select

from models.schema import AuditEvent, EventDelivery, WebhookEndpoint
from tests.integration.test_changes import setup_organization
from tests.integration.test_cli import renova
from tests.integration.test_events import Receiver, deliver_all, subscribe


def output(result) -> str:
    return result.stdout + result.stderr


def test_an_endpoint_is_added_watched_and_redelivered(session, billing_gateway):
    receiver = Receiver()
    try:
        bad = renova("endpoints", "add", "ftp://app.example/hooks")
        assert bad.returncode == 2 and "is not an http(s) URL" in output(bad)
        unknown = renova("endpoints", "add", receiver.url, "--event", "subscription.exploded")
        assert unknown.returncode == 2 and "unknown event type(s) subscription.exploded" in output(unknown)

        added = renova("endpoints", "add", receiver.url, "-e", "subscription.created", "-e", "invoice.paid",
                       "--description", "app", "--actor", "ana")  # fmt: skip
        assert added.returncode == 0, output(added)
        secret = re.search(r"(whsec_\S+)", added.stdout)
        assert secret is not None
        endpoint = session.scalars(select(WebhookEndpoint)).one()
        assert endpoint.secret == secret.group(1)  # the receiver verifies with what was printed
        receiver.secret = secret.group(1)

        setup_organization(session)
        session.commit()
        receiver.outage = 1_000
        subscribe(session, billing_gateway)
        import httpx

        from jobs.clock import wall_clock
        from jobs.event_delivery import deliver_due
        from jobs.events import Backoff

        with httpx.Client() as client:
            deliver_due(session, client, backoff=Backoff(), clock=wall_clock)
        listed = renova("endpoints", "list")
        assert listed.returncode == 0 and receiver.url in listed.stdout
        assert (
            "subscription.created, invoice.paid" in listed.stdout
            or "invoice.paid, subscription.created" in listed.stdout
        )
        log = renova("endpoints", "deliveries", str(endpoint.id))
        assert log.returncode == 0 and "HTTP 503" in log.stdout and "subscription.created" in log.stdout

        receiver.outage = 0
        first = session.scalars(select(EventDelivery).order_by(EventDelivery.id)).first()
        missing = renova("endpoints", "redeliver", "999999", "--reason", "teste")
        assert missing.returncode == 2 and "no delivery 999999" in output(missing)
        again = renova("endpoints", "redeliver", str(first.id), "--reason", "receiver fixed", "--actor", "ana")
        assert again.returncode == 0, output(again)
        deliver_all(session)
        delivered = renova("endpoints", "deliveries", str(endpoint.id), "--status", "delivered")
        assert delivered.returncode == 0 and "delivered" in delivered.stdout
        assert set(receiver.types()) == {"subscription.created", "invoice.paid"}

        disabled = renova("endpoints", "disable", str(endpoint.id), "--reason", "app down for maintenance")
        assert disabled.returncode == 0 and "disabled" in disabled.stdout
        assert renova("endpoints", "enable", str(endpoint.id), "--reason", "back").returncode == 0
        actions = [
            (row.actor, row.action, row.reason) for row in session.scalars(select(AuditEvent).order_by(AuditEvent.id))
        ]
        assert ("ana", "webhook_endpoint.add", "") in actions
        assert ("ana", "event_delivery.redeliver", "receiver fixed") in actions
        assert [a for _, a, _ in actions][-2:] == ["webhook_endpoint.disable", "webhook_endpoint.enable"]
    finally:
        receiver.close()
