"""Notices in batches: written by one INSERT (`notify_many`), enqueued and re-enqueued BATCH_SIZE per
message, delivered over one SMTP connection to a real SMTP server (aiosmtpd), each exactly once,
each failure recorded on its own notice while its batch-mates are sent."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, time, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from jobs.context import BillingConfig, runtime
from jobs.errors import TransientError
from jobs.notice_delivery import BatchResult
from jobs.notifications import (
    BATCH_SIZE,
    NO_RECIPIENTS,
    NoticeSpec,
    deliver_batch,
    notify,
    notify_many,
    send_notification,
    send_notifications,
)
from jobs.retries import is_transient
from jobs.tick import tick_once
from jobs.work_attempts import backoff
from models.schema import Member, Notification, Organization
from tests.integration.conftest import wait_until
from workers.db import get_session_factory
from workers.embedded import free_port
from workers.mail import CONNECTION_HEADER, EmlWriter, MailSink, SmtpMailer

ORG_ID = 1
MAIL_FROM = "CONECTA Cobrança <cobranca@conecta.example>"
NOW = datetime(2026, 2, 23, 9, 0, tzinfo=UTC)


# --- fixtures and helpers ------------------------------------------------------------------------


@pytest.fixture
def mailbox(tmp_path: Path) -> Iterator[MailSink]:
    with MailSink(tmp_path / "mail") as running:
        yield running


@pytest.fixture
def smtp_target(mailbox: MailSink) -> Iterator[dict[str, str]]:
    """Point the runtime's mailer at this test's sink; change `["url"]` to simulate an outage."""
    target = {"url": mailbox.url}
    current = runtime()
    previous = current.mailer_factory
    current.mailer_factory = lambda: SmtpMailer(target["url"])
    yield target
    current.mailer_factory = previous


def billing_org(session: Session) -> None:
    session.add(Organization(id=ORG_ID, name="Acme Comunicação Ltda"))
    session.flush()
    session.add(Member(id=101, organization_id=ORG_ID, name="Dona", email="dona@acme.com.br", role="owner"))
    session.flush()


def spec(n: int, recipients: list[str] | None = None) -> NoticeSpec:
    return NoticeSpec(ORG_ID, "cancellation_scheduled", f"cancel:{n}", {"ends_on": "2026-05-31"}, None, recipients)


def fresh(notification_id: int) -> Notification:
    with get_session_factory()() as own:
        return own.get_one(Notification, notification_id)


def keys(messages: list[EmailMessage]) -> list[str]:
    return [message["X-Renova-Notification"] for message in messages]


def connections(messages: list[EmailMessage]) -> set[str]:
    return {message[CONNECTION_HEADER] for message in messages}


def queued(broker: Any) -> list[list[int]]:
    """The arguments of the messages waiting on the notifications queue."""
    import json

    ids = broker.client.lrange("dramatiq:notifications", 0, -1)
    bodies = [broker.client.hget("dramatiq:notifications.msgs", message_id) for message_id in ids]
    return [json.loads(body)["args"][0] for body in bodies]


class Server:
    """A real SMTP server whose handler refuses what a test says, and counts connections."""

    def __init__(self, directory: Path) -> None:
        self.refuse_rcpt: dict[str, str] = {}  # address -> SMTP reply
        self.data_reply: str | None = None  # e.g. a 421 for every message from now on
        self.accept_before_failing = 0  # messages accepted before data_reply applies
        self.per_connection: int | None = None  # messages a connection may carry (then 421 at MAIL FROM)
        server = self

        class Handler(EmlWriter):
            async def handle_RCPT(self, smtp: Any, session: Any, envelope: Any, address: str, options: Any) -> str:
                if address in server.refuse_rcpt:
                    return server.refuse_rcpt[address]
                envelope.rcpt_tos.append(address)
                return "250 OK"

            async def handle_MAIL(self, smtp: Any, session: Any, envelope: Any, address: str, options: Any) -> str:
                carried = getattr(session, "carried", 0)
                if server.per_connection is not None and carried >= server.per_connection:
                    return "421 4.7.0 too many messages on this connection"
                session.carried = carried + 1
                envelope.mail_from = address
                envelope.mail_options.extend(options)
                return "250 OK"

            async def handle_DATA(self, smtp: Any, session: Any, envelope: Any) -> str:
                if server.data_reply is not None:
                    if server.accept_before_failing <= 0:
                        return server.data_reply
                    server.accept_before_failing -= 1
                return await super().handle_DATA(smtp, session, envelope)

        self.directory = directory
        self.controller = Controller(Handler(directory), hostname="127.0.0.1", port=free_port())

    def __enter__(self) -> Server:
        self.controller.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.controller.stop()

    @property
    def mailer(self) -> SmtpMailer:
        return SmtpMailer(f"smtp://127.0.0.1:{self.controller.port}")

    def messages(self) -> list[EmailMessage]:
        return MailSink(self.directory).messages()


def batch(session: Session, ids: list[int], mailer: Any) -> Any:
    return deliver_batch(session, ids, mailer, MAIL_FROM, clock_now=NOW)


# --- notify_many ---------------------------------------------------------------------------------


def test_notify_many_writes_each_dedupe_key_once_and_enqueues_batches(session: Session, broker: Any) -> None:
    billing_org(session)
    session.commit()
    existing = notify(
        session,
        organization_id=ORG_ID,
        kind="cancellation_scheduled",
        dedupe_key="cancel:7",
        context={"ends_on": "2026-05-31"},
    )
    session.commit()
    broker.flush("notifications")

    notices = [spec(n) for n in range(2 * BATCH_SIZE + 5)] + [spec(3)]  # cancel:7 exists; cancel:3 twice
    ids = notify_many(session, notices)
    assert broker.client.llen("dramatiq:notifications") == 0  # nothing before the commit
    session.commit()

    assert len(ids) == len(set(ids)) == 2 * BATCH_SIZE + 4
    assert existing not in ids
    with get_session_factory()() as own:
        rows = own.scalars(select(Notification).where(Notification.id.in_(ids))).all()
        by_id = {row.id: row.dedupe_key for row in rows}
        assert [by_id[i] for i in ids] == [f"cancel:{n}" for n in range(2 * BATCH_SIZE + 5) if n != 7]  # caller's order
        assert own.scalar(select(func.count()).select_from(Notification)) == 2 * BATCH_SIZE + 5
    batches = queued(broker)
    assert len(batches) == math.ceil(len(ids) / BATCH_SIZE) == 3
    assert sorted(i for b in batches for i in b) == sorted(ids)
    assert all(len(b) <= BATCH_SIZE for b in batches)
    assert notify_many(session, notices[:3]) == []  # all written already: nothing, and no message
    session.commit()
    assert broker.client.llen("dramatiq:notifications") == 3


def test_notify_many_refuses_a_bad_notice_and_writes_none(session: Session, broker: Any) -> None:
    billing_org(session)
    session.commit()
    bad = NoticeSpec(ORG_ID, "cancellation_scheduled", "cancel:bad", {})
    with pytest.raises(ValueError, match="missing context keys: ends_on"):
        notify_many(session, [spec(1), bad, spec(2)])
    with pytest.raises(ValueError, match="dedupe_key"):
        notify_many(session, [spec(1), NoticeSpec(ORG_ID, "cancellation_scheduled", "", {"ends_on": "2026-05-31"})])
    session.commit()
    assert session.scalar(select(func.count()).select_from(Notification)) == 0
    assert broker.client.llen("dramatiq:notifications") == 0
    assert notify_many(session, []) == []


def test_the_tick_re_enqueues_unsent_notices_in_batches(session: Session, broker: Any) -> None:
    billing_org(session)
    ids = notify_many(session, [spec(n) for n in range(BATCH_SIZE + 1)])
    session.commit()
    broker.flush("notifications")  # as if those messages were lost
    later = datetime.now(UTC) + timedelta(minutes=2)
    result = tick_once(session, later, BillingConfig(), time(6, 0))
    assert result.requeued["notifications"] == BATCH_SIZE + 1
    batches = queued(broker)
    assert [len(b) for b in batches] == [BATCH_SIZE, 1]
    assert sorted(i for b in batches for i in b) == sorted(ids)


# --- delivery, as plain functions ------------------------------------------------------------------


def test_a_batch_goes_over_one_connection_each_notice_once(session: Session, tmp_path: Path) -> None:
    billing_org(session)
    ids = notify_many(session, [spec(n) for n in range(5)])
    session.commit()
    with Server(tmp_path) as server:
        result = batch(session, ids, server.mailer)
        assert result.outcomes == dict.fromkeys(ids, "sent") and result.error() is None
        again = batch(session, [*ids, 999_999], server.mailer)  # a duplicated / retried batch
        messages = server.messages()
    assert again.outcomes == {**dict.fromkeys(ids, "already_sent"), 999_999: "missing"}
    assert sorted(keys(messages)) == sorted(f"cancel:{n}" for n in range(5))
    assert len(connections(messages)) == 1
    assert all((fresh(i).status, fresh(i).attempts) == ("sent", 1) for i in ids)


def test_a_refused_or_bad_address_fails_only_its_notice(session: Session, tmp_path: Path) -> None:
    billing_org(session)
    ids = notify_many(
        session,
        [
            spec(0),
            spec(1, ["nao-existe@acme.com.br"]),  # refused for good (5xx): final
            spec(2, ["caixa-cheia@acme.com.br"]),  # refused for now (4xx): retried
            spec(3, ["sem-arroba"]),  # no valid address at all: final
            spec(4),
        ],
    )
    session.commit()
    with Server(tmp_path) as server:
        server.refuse_rcpt = {
            "nao-existe@acme.com.br": "550 5.1.1 mailbox unavailable",
            "caixa-cheia@acme.com.br": "452 4.2.2 mailbox full",
        }
        result = batch(session, ids, server.mailer)
        messages = server.messages()
    assert [result.outcomes[i] for i in ids] == ["sent", "refused", "failed", "no_recipients", "sent"]
    assert list(result.failures) == [ids[2]] and isinstance(result.error(), TransientError)
    assert keys(messages) == ["cancel:0", "cancel:4"] and len(connections(messages)) == 1
    refused, full, no_address = fresh(ids[1]), fresh(ids[2]), fresh(ids[3])
    assert refused.status == "failed" and "550" in refused.last_error and "nao-existe" not in refused.last_error
    assert (full.status, full.attempts, full.next_attempt_at) == ("pending", 1, NOW + backoff(1))
    assert "452" in full.last_error
    assert (no_address.status, no_address.last_error) == ("failed", NO_RECIPIENTS)


def test_a_server_failing_mid_batch_leaves_the_rest_for_a_retry(session: Session, tmp_path: Path) -> None:
    billing_org(session)
    ids = notify_many(session, [spec(n) for n in range(5)])
    session.commit()
    with Server(tmp_path) as server:
        server.data_reply, server.accept_before_failing = "421 4.3.2 shutting down", 2
        result = batch(session, ids, server.mailer)
        assert [result.outcomes[i] for i in ids] == ["sent", "sent", "failed", "failed", "failed"]
        error = result.error()
        assert isinstance(error, TransientError) and is_transient(error)
        for notification_id in ids[2:]:
            row = fresh(notification_id)
            assert (row.status, row.attempts) == ("pending", 1) and "421" in row.last_error

        server.data_reply = None  # back: the message's retry
        retried = batch(session, ids, server.mailer)
        messages = server.messages()
    assert [retried.outcomes[i] for i in ids] == ["already_sent"] * 2 + ["sent"] * 3
    assert sorted(keys(messages)) == sorted(f"cancel:{n}" for n in range(5))  # none twice
    assert [fresh(i).attempts for i in ids] == [1, 1, 2, 2, 2]


def test_a_connection_closed_by_the_server_is_opened_again(session: Session, tmp_path: Path) -> None:
    billing_org(session)
    ids = notify_many(session, [spec(n) for n in range(5)])
    session.commit()
    with Server(tmp_path) as server:
        server.per_connection = 2  # a 421 at MAIL FROM for the third: nothing of it was accepted
        result = batch(session, ids, server.mailer)
        messages = server.messages()
    assert result.outcomes == dict.fromkeys(ids, "sent")
    assert sorted(keys(messages)) == sorted(f"cancel:{n}" for n in range(5))
    assert len(connections(messages)) == 3


def test_an_unreachable_server_fails_each_notice_at_once(session: Session) -> None:
    billing_org(session)
    ids = notify_many(session, [spec(n) for n in range(3)])
    session.commit()
    result = batch(session, ids, SmtpMailer(f"smtp://127.0.0.1:{free_port()}"))
    assert set(result.failures) == set(ids) and is_transient(result.error())
    for notification_id in ids:
        row = fresh(notification_id)
        assert (row.status, row.attempts) == ("pending", 1)
        assert row.last_error.startswith("ConnectionRefusedError")


class Dies:
    """A mailer without batches (each message on its own) whose process dies at the `dies_at`-th send."""

    def __init__(self, dies_at: int) -> None:
        self.dies_at = dies_at
        self.sent: list[EmailMessage] = []

    def send(self, message: EmailMessage) -> None:
        self.sent.append(message)
        if len(self.sent) == self.dies_at:
            raise SystemExit("worker killed")  # not an Exception: nothing in the batch catches it


def test_a_batch_cut_short_sends_each_notice_once_when_run_again(session: Session) -> None:
    billing_org(session)
    ids = notify_many(session, [spec(n) for n in range(4)])
    session.commit()
    mailer = Dies(dies_at=3)
    with pytest.raises(SystemExit):
        batch(session, ids, mailer)
    session.rollback()  # what the runtime does with a message that did not finish
    assert [fresh(i).status for i in ids] == ["sent", "sent", "pending", "pending"]  # the third: not marked

    mailer.dies_at = 0
    again = batch(session, ids, mailer)  # the message's redelivery, or the tick's
    assert [again.outcomes[i] for i in ids] == ["already_sent"] * 2 + ["sent"] * 2
    # Only the notice in flight when the worker died could go twice (same Message-ID); none is lost.
    assert Counter(keys(mailer.sent)) == {"cancel:0": 1, "cancel:1": 1, "cancel:2": 2, "cancel:3": 1}


def test_a_notice_held_by_another_delivery_is_skipped(session: Session, tmp_path: Path) -> None:
    billing_org(session)
    ids = notify_many(session, [spec(n) for n in range(2)])
    session.commit()
    with Server(tmp_path) as server, get_session_factory()() as other:
        other.scalars(select(Notification).where(Notification.id == ids[0]).with_for_update()).one()
        result = batch(session, ids, server.mailer)
        other.rollback()
        assert result.outcomes == {ids[0]: "locked", ids[1]: "sent"} and result.error() is None
        assert keys(server.messages()) == ["cancel:1"]
    assert fresh(ids[0]).status == "pending"  # the holder's to send, or the tick's


def test_a_batch_fails_with_a_transient_error_when_it_has_one() -> None:
    result = BatchResult(outcomes={1: "refused"}, failures={})
    assert result.error() is None
    mixed = BatchResult(failures={1: TypeError("bad template"), 2: TransientError("down")})
    assert isinstance(mixed.error(), TransientError)
    assert isinstance(BatchResult(failures={1: TypeError("x")}).error(), TypeError)


# --- through the broker and a worker ---------------------------------------------------------------


def test_notices_written_together_arrive_over_one_connection(
    session: Session, worker: Any, broker: Any, smtp_target: dict[str, str], mailbox: MailSink
) -> None:
    billing_org(session)
    ids = notify_many(session, [spec(n) for n in range(6)])
    session.commit()  # one send_notifications message, sent now that the rows exist

    wait_until(lambda: all(fresh(i).status == "sent" for i in ids))
    send_notifications.send(ids)  # a duplicate batch
    send_notification.send(ids[0])  # and an old single-id message for one of them
    broker.join("notifications", timeout=10_000)
    worker.join()
    messages = mailbox.messages()
    assert sorted(keys(messages)) == sorted(f"cancel:{n}" for n in range(6))
    assert len(connections(messages)) == 1
    assert [fresh(i).attempts for i in ids] == [1] * 6


def test_an_old_single_id_message_is_still_delivered(
    session: Session, worker: Any, broker: Any, smtp_target: dict[str, str], mailbox: MailSink
) -> None:
    billing_org(session)
    notification_id = notify_many(session, [spec(1)])[0]
    session.commit()
    broker.flush("notifications")  # only the old-style message below remains
    send_notification.send(notification_id)
    wait_until(lambda: fresh(notification_id).status == "sent")
    assert keys(mailbox.messages()) == ["cancel:1"]


def test_smtp_down_a_batch_is_retried_and_each_notice_sent_once(
    session: Session, worker: Any, broker: Any, smtp_target: dict[str, str], mailbox: MailSink
) -> None:
    billing_org(session)
    ids = notify_many(session, [spec(n) for n in range(3)])
    smtp_target["url"] = f"smtp://127.0.0.1:{free_port()}"
    session.commit()
    broker.flush("notifications")
    # Short backoff for the test; the actor's own options (seconds to minutes) are otherwise the same.
    send_notifications.send_with_options(args=(ids,), min_backoff=100, max_backoff=400)

    wait_until(lambda: all(fresh(i).attempts >= 2 for i in ids))
    assert mailbox.paths() == []
    smtp_target["url"] = mailbox.url
    wait_until(lambda: all(fresh(i).status == "sent" for i in ids))
    broker.join("notifications", timeout=10_000)
    worker.join()
    assert sorted(keys(mailbox.messages())) == ["cancel:0", "cancel:1", "cancel:2"]
