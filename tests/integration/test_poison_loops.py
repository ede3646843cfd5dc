"""No poison loops (jobs.work_attempts): a change request, gateway event or notice whose processing
fails is retried by the tick with exponential backoff, needs attention after MAX_ATTEMPTS failures and
is then never re-enqueued until an operator retries it (`renova attention list|retry`, audited).

Messages are run as a worker runs them (a session bound per message, committed or rolled back) and
the tick's re-enqueues are counted in Redis; one test goes through a real Dramatiq worker. A test
clock fixes "now", so every backoff is exact."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, time, timedelta
from email.message import EmailMessage
from typing import Any

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from jobs import clock
from jobs.changes import process_change_request, record_change_request
from jobs.changes.outcome import HANDLERS
from jobs.context import BillingConfig, bind_session, runtime
from jobs.errors import PermanentError, TransientError
from jobs.gateway_events import process_gateway_event
from jobs.notifications import notify, send_notification
from jobs.tick import tick_once
from jobs.work_attempts import (
    MAX_ATTEMPTS,
    MAX_BACKOFF,
    AttentionError,
    backoff,
    count_needing_attention,
    describe_error,
    list_needing_attention,
    retry_now,
)
from models.schema import AuditEvent, ChangeRequest, GatewayEvent, Notification
from tests.integration.conftest import wait_until
from tests.integration.test_changes import payload, setup_organization, subscription_for
from tests.integration.test_cli import renova
from workers.db import get_session_factory

RUN_AT = time(6, 0)
# Far from the real date: nothing here passes by reading the wall clock.
T0 = datetime(2030, 1, 10, 15, 0, tzinfo=UTC)
QUEUE = {"change_request": "changes", "gateway_event": "payments", "notification": "notifications"}
FINDER = {"change_request": "change_requests", "gateway_event": "gateway_events", "notification": "notifications"}
BAD_EVENT = {"id": "evt_poison_1", "type": "boleto.paid", "data": {}}  # no boleto_id: KeyError, every time


# --- helpers ---------------------------------------------------------------------------------------


def set_clock(instant: datetime) -> None:
    with get_session_factory()() as own:
        clock.set_clock(own, instant, BillingConfig())
        own.commit()


def deliver(actor: Any, *args: Any) -> BaseException | None:
    """Run one message as a worker does: a session bound to it, committed when the actor returns,
    rolled back when it raises (workers.middleware.DatabaseSession). Returns what it raised."""
    own = get_session_factory()()
    bind_session(own)
    try:
        actor.fn(*args)
    except Exception as exc:
        own.rollback()
        return exc
    else:
        own.commit()
        return None
    finally:
        bind_session(None)
        own.close()


def tick(broker: Any, kind: str, now: datetime) -> tuple[int, int]:
    """The tick at `now`: (rows of `kind` it re-enqueued, messages then waiting on their queue). The
    queue is emptied afterwards, as a worker would."""
    with get_session_factory()() as own:
        result = tick_once(own, now, runtime().config, RUN_AT)
    waiting = broker.client.llen(f"dramatiq:{QUEUE[kind]}")
    broker.flush(QUEUE[kind])
    return result.requeued[FINDER[kind]], waiting


def fresh(model: type[Any], row_id: int) -> Any:
    with get_session_factory()() as own:
        return own.get_one(model, row_id)


def store_event(session: Session, event: dict[str, Any]) -> GatewayEvent:
    row = GatewayEvent(event_id=event["id"], type=event["type"], payload=event, received_at=T0 - timedelta(hours=1))
    session.add(row)
    session.commit()
    return row


MODELS: dict[str, type[Any]] = {
    "change_request": ChangeRequest,
    "gateway_event": GatewayEvent,
    "notification": Notification,
}


def fail_until_parked(broker: Any, kind: str, row_id: int, actor: Any, key: Any) -> datetime:
    """Fail a row's message, tick when its next attempt is due, and again, until it needs attention;
    checks the backoff on the way and returns the instant of the last failure."""
    broker.flush_all()  # e.g. the notice's own first message
    now = T0
    for attempt in range(1, MAX_ATTEMPTS + 1):
        set_clock(now)
        assert deliver(actor, key) is not None
        row = fresh(MODELS[kind], row_id)
        assert row.attempts == attempt
        if attempt == MAX_ATTEMPTS:
            assert row.needs_attention_at == now
            return now
        assert row.needs_attention_at is None and row.next_attempt_at == now + backoff(attempt)
        # Not before its backoff has passed, then once.
        assert tick(broker, kind, row.next_attempt_at - timedelta(seconds=1)) == (0, 0)
        assert tick(broker, kind, row.next_attempt_at) == (1, 1)
        now = row.next_attempt_at
    raise AssertionError("unreachable")


@pytest.fixture
def failing_cancel(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """The cancel flow raises a bug while `left` > 0 (then it works), counting the calls."""
    real = HANDLERS["cancel"]
    state = {"left": 10**6, "calls": 0}

    def flaky(run: Any, params: Any) -> None:
        state["calls"] += 1
        if state["left"] > 0:
            state["left"] -= 1
            raise RuntimeError("bug in the cancel flow")
        real(run, params)

    monkeypatch.setitem(HANDLERS, "cancel", flaky)
    return state


def cancel_request(session: Session) -> ChangeRequest:
    organization = setup_organization(session)
    subscription = subscription_for(session, organization, cycle="monthly", method="card", start=date(2030, 1, 1))
    # Made ten minutes before T0: stale for the tick (older than a minute) from the start.
    recorded = record_change_request(
        session, payload("cancel", subscription.id), source="api", now=T0 - timedelta(minutes=10)
    )
    session.commit()
    return recorded.request


class Mailer:
    """Raises a new error made by `error` at every send, or accepts the message."""

    def __init__(self) -> None:
        self.error: Callable[[], BaseException] | None = None
        self.sent: list[EmailMessage] = []

    def send(self, message: EmailMessage) -> None:
        if self.error is not None:
            raise self.error()
        self.sent.append(message)


def smtp_down() -> TransientError:
    """What the SMTP mailer raises when nothing listens: a neutral error over the protocol's own."""
    error = TransientError("mail server unavailable")
    error.__cause__ = ConnectionRefusedError(111, "Connection refused")
    return error


@pytest.fixture
def mailer(monkeypatch: pytest.MonkeyPatch) -> Iterator[Mailer]:
    fake = Mailer()
    monkeypatch.setattr(runtime(), "mailer_factory", lambda: fake)
    yield fake


def notice(session: Session) -> int:
    setup_organization(session)
    notification_id = notify(
        session,
        organization_id=1,
        kind="cancellation_scheduled",
        dedupe_key="poison:1",
        context={"ends_on": "2030-02-01"},
    )
    assert notification_id is not None
    session.commit()
    return notification_id


def unrenderable_notice(session: Session) -> int:
    """A notice stored without a key its template needs (as an older version could have written it)."""
    notification_id = notice(session)
    session.execute(text("UPDATE notifications SET context = '{}'::jsonb WHERE id = :id"), {"id": notification_id})
    session.commit()
    return notification_id


# --- the rule ------------------------------------------------------------------------------------


def test_backoff_doubles_from_a_minute_and_is_capped() -> None:
    assert [backoff(n) for n in range(1, 6)] == [timedelta(minutes=m) for m in (1, 2, 4, 8, 15)]
    assert backoff(1000) == MAX_BACKOFF == timedelta(minutes=15)


def test_last_error_is_one_short_line_without_personal_data() -> None:
    error = ValueError(
        "card tok_8f3a9c of ana.souza@example.com.br (CPF 123.456.789-09, 4111 1111 1111 1111) refused\n"
        "[parameters: {'email': 'ana.souza@example.com.br'}]"
    )
    described = describe_error(error)
    assert described.startswith("ValueError: card tok_*** of <e-mail>")
    assert "\n" not in described and "parameters" not in described
    for secret in ("ana.souza", "8f3a9c", "123.456", "4111"):
        assert secret not in described
    assert len(describe_error(RuntimeError("x" * 5000))) == 200
    # Under the neutral error a mailer raises, the protocol's own error is described.
    assert describe_error(smtp_down()) == "ConnectionRefusedError: [Errno 111] Connection refused"


# --- gateway events ------------------------------------------------------------------------------


def test_a_poison_gateway_event_backs_off_then_needs_attention_and_is_left_alone(session, broker) -> None:
    event = store_event(session, BAD_EVENT)
    # Failed at T0, due at T0 + 1 min (not a second before), failed again, due 2 min later …
    parked_at = fail_until_parked(broker, "gateway_event", event.id, process_gateway_event, event.event_id)
    row = fresh(GatewayEvent, event.id)
    assert (row.attempts, row.last_error, row.processed_at) == (MAX_ATTEMPTS, "KeyError: 'boleto_id'", None)
    assert parked_at == T0 + timedelta(minutes=1 + 2 + 4 + 8)

    for later in (parked_at + timedelta(minutes=15), parked_at + timedelta(days=3)):
        assert tick(broker, "gateway_event", later) == (0, 0)
    [stuck] = list_needing_attention(session)
    assert (stuck.kind, stuck.id, stuck.key, stuck.attempts) == ("gateway_event", event.id, "evt_poison_1", 5)
    assert (stuck.last_error, stuck.since) == ("KeyError: 'boleto_id'", parked_at)
    assert count_needing_attention(session) == {"change_request": 0, "gateway_event": 1, "notification": 0}

    # The operator retries it without fixing anything: one more attempt, parked again at once.
    retried_at = parked_at + timedelta(hours=1)
    retry_now(session, "gateway_event", event.id, "ana", "looks like a one-off", retried_at)
    session.commit()
    assert broker.client.llen("dramatiq:payments") == 1
    broker.flush("payments")
    set_clock(retried_at)
    assert deliver(process_gateway_event, event.event_id) is not None
    row = fresh(GatewayEvent, event.id)
    assert (row.attempts, row.needs_attention_at) == (6, retried_at)
    assert tick(broker, "gateway_event", retried_at + timedelta(days=1)) == (0, 0)

    # Fixed (here: the event's data), retried, applied once: it leaves the list.
    session.execute(text("UPDATE gateway_events SET type = 'boleto.unknown_kind' WHERE id = :id"), {"id": event.id})
    session.commit()
    retry_now(session, "gateway_event", event.id, "ana", "event type corrected", retried_at)
    session.commit()
    broker.flush("payments")
    assert deliver(process_gateway_event, event.event_id) is None
    row = fresh(GatewayEvent, event.id)
    assert row.processed_at is not None and row.attempts == 6
    assert list_needing_attention(session) == []
    assert tick(broker, "gateway_event", retried_at + timedelta(days=2)) == (0, 0)
    audits = session.scalars(select(AuditEvent).order_by(AuditEvent.id)).all()
    assert [(a.action, a.actor, a.target_type, a.target_id) for a in audits] == [
        ("attention.retry", "ana", "gateway_event", str(event.id))
    ] * 2
    assert audits[0].reason == "looks like a one-off" and audits[0].details["attempts"] == 5


def test_a_message_for_a_done_or_unknown_row_records_nothing(session, broker) -> None:
    event = store_event(session, {"id": "evt_done", "type": "boleto.unknown_kind", "data": {}})
    set_clock(T0)
    assert deliver(process_gateway_event, event.event_id) is None
    assert deliver(process_gateway_event, event.event_id) is None  # a duplicate
    row = fresh(GatewayEvent, event.id)
    assert row.processed_at == T0 and (row.attempts, row.last_error, row.next_attempt_at) == (0, None, None)
    # An event that was never stored (its transaction rolled back): an error, and no row to mark.
    assert isinstance(deliver(process_gateway_event, "evt_never_stored"), LookupError)
    assert session.scalar(select(func.count()).select_from(GatewayEvent)) == 1
    with pytest.raises(AttentionError, match="already done"):
        retry_now(session, "gateway_event", event.id, "ana", "why not", T0)


def test_through_a_real_worker_one_dead_letter_per_due_attempt(session, worker, broker) -> None:
    event = store_event(session, BAD_EVENT)
    set_clock(T0)
    process_gateway_event.send(event.event_id)
    wait_until(lambda: fresh(GatewayEvent, event.id).attempts == 1)
    wait_until(lambda: broker.client.zcard("dramatiq:payments.XQ") == 1)  # not transient: dead at once
    row = fresh(GatewayEvent, event.id)
    assert row.next_attempt_at == T0 + timedelta(minutes=1) and row.last_error == "KeyError: 'boleto_id'"

    with get_session_factory()() as own:
        assert tick_once(own, T0 + timedelta(seconds=59), runtime().config, RUN_AT).requeued["gateway_events"] == 0
    set_clock(T0 + timedelta(minutes=1))
    with get_session_factory()() as own:
        assert tick_once(own, T0 + timedelta(minutes=1), runtime().config, RUN_AT).requeued["gateway_events"] == 1
    wait_until(lambda: fresh(GatewayEvent, event.id).attempts == 2)
    wait_until(lambda: broker.client.zcard("dramatiq:payments.XQ") == 2)
    assert fresh(GatewayEvent, event.id).next_attempt_at == T0 + timedelta(minutes=1) + backoff(2)


# --- change requests -----------------------------------------------------------------------------


def test_a_failing_change_request_backs_off_then_needs_attention(session, broker, failing_cancel) -> None:
    request = cancel_request(session)
    parked_at = fail_until_parked(broker, "change_request", request.id, process_change_request, request.id)
    row = fresh(ChangeRequest, request.id)
    assert (row.status, row.last_error) == ("pending", "RuntimeError: bug in the cancel flow")
    assert failing_cancel["calls"] == MAX_ATTEMPTS
    assert tick(broker, "change_request", parked_at + timedelta(days=1)) == (0, 0)
    assert [(s.kind, s.id) for s in list_needing_attention(session, "change_request")] == [
        ("change_request", request.id)
    ]
    assert list_needing_attention(session, "notification") == []


def test_a_change_request_that_succeeds_on_its_second_attempt_is_applied_once(session, broker, failing_cancel) -> None:
    failing_cancel["left"] = 1
    request = cancel_request(session)
    set_clock(T0)
    assert deliver(process_change_request, request.id) is not None
    row = fresh(ChangeRequest, request.id)
    assert (row.status, row.attempts, row.next_attempt_at) == ("pending", 1, T0 + timedelta(minutes=1))

    assert tick(broker, "change_request", T0 + timedelta(minutes=1)) == (1, 1)
    set_clock(T0 + timedelta(minutes=1))
    assert deliver(process_change_request, request.id) is None
    assert deliver(process_change_request, request.id) is None  # a duplicated message
    row = fresh(ChangeRequest, request.id)
    # Applied once; the failure stays on record as history, and nothing needs attention.
    assert (row.status, row.attempts, row.needs_attention_at) == ("applied", 1, None)
    assert row.last_error == "RuntimeError: bug in the cancel flow"
    assert failing_cancel["calls"] == 2
    notices = session.scalars(select(Notification.kind)).all()
    assert notices == ["cancellation_scheduled"]
    assert tick(broker, "change_request", T0 + timedelta(hours=1)) == (0, 0)
    assert list_needing_attention(session) == []


# --- notifications -------------------------------------------------------------------------------


def test_a_notice_that_cannot_be_rendered_backs_off_then_needs_attention(session, broker, mailer) -> None:
    notification_id = unrenderable_notice(session)
    parked_at = fail_until_parked(broker, "notification", notification_id, send_notification, notification_id)
    row = fresh(Notification, notification_id)
    # One attempt counted per delivery, although the notices' path counts it when the attempt starts.
    assert (row.status, row.attempts) == ("pending", MAX_ATTEMPTS)
    assert row.last_error == "TypeError: expected a date or an ISO date string, got Undefined"
    assert tick(broker, "notification", parked_at + timedelta(days=1)) == (0, 0)
    assert mailer.sent == []


def test_transient_mail_failures_back_off_without_needing_attention(session, broker, mailer) -> None:
    notification_id = notice(session)
    mailer.error = smtp_down
    broker.flush_all()
    set_clock(T0)
    for attempt in range(1, MAX_ATTEMPTS + 2):
        assert isinstance(deliver(send_notification, notification_id), TransientError)
        row = fresh(Notification, notification_id)
        assert (row.attempts, row.needs_attention_at) == (attempt, None)
    # An outage must not park every notice: it is still retried once its backoff has passed.
    assert row.next_attempt_at == T0 + backoff(MAX_ATTEMPTS + 1) == T0 + MAX_BACKOFF
    assert row.last_error == "ConnectionRefusedError: [Errno 111] Connection refused"
    assert tick(broker, "notification", T0 + MAX_BACKOFF - timedelta(seconds=1)) == (0, 0)
    assert tick(broker, "notification", T0 + MAX_BACKOFF) == (1, 1)

    mailer.error = None
    assert deliver(send_notification, notification_id) is None
    row = fresh(Notification, notification_id)
    assert (row.status, row.attempts, len(mailer.sent)) == ("sent", MAX_ATTEMPTS + 2, 1)
    assert deliver(send_notification, notification_id) is None  # a duplicate sends nothing
    assert len(mailer.sent) == 1


def test_a_notice_refused_for_good_is_final_not_stuck(session, broker, mailer) -> None:
    notification_id = notice(session)
    mailer.error = lambda: PermanentError("every recipient refused: {'dona1@acme.example': (550, b'unknown user')}")
    broker.flush_all()
    set_clock(T0)
    assert deliver(send_notification, notification_id) is None  # recorded, not raised
    row = fresh(Notification, notification_id)
    assert (row.status, row.attempts, row.needs_attention_at) == ("failed", 1, None)
    assert "550" in row.last_error and "dona1@" not in row.last_error
    assert tick(broker, "notification", T0 + timedelta(days=1)) == (0, 0)
    assert list_needing_attention(session) == []


# --- the operator's commands -----------------------------------------------------------------------


def test_attention_list_and_retry_from_the_command_line(session, broker, mailer) -> None:
    event = store_event(session, BAD_EVENT)
    notification_id = unrenderable_notice(session)
    fail_until_parked(broker, "gateway_event", event.id, process_gateway_event, event.event_id)
    parked_at = fail_until_parked(broker, "notification", notification_id, send_notification, notification_id)

    listed = renova("attention", "list")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert f"{event.id} (evt_poison_1)" in listed.stdout and "KeyError: 'boleto_id'" in listed.stdout
    assert "notification" in listed.stdout and "TypeError: expected a date" in listed.stdout
    only = renova("attention", "list", "--kind", "notification")
    assert only.returncode == 0 and "notification" in only.stdout and "evt_poison_1" not in only.stdout
    assert "nothing needs attention" in renova("attention", "list", "--kind", "change_request").stdout

    # Bad input: exit 2 with a clear message, and nothing changes.
    bad_kind = renova("attention", "list", "--kind", "invoice")
    assert bad_kind.returncode == 2 and "unknown kind 'invoice'" in bad_kind.stdout
    for args, says in (
        (("retry", "invoice", "1", "--reason", "x"), "unknown kind 'invoice'"),
        (("retry", "gateway_event", "999", "--reason", "x"), "no gateway_event with id 999"),
        (("retry", "gateway_event", str(event.id), "--reason", "  "), "--reason"),
        (("retry", "gateway_event", str(event.id)), "--reason"),
        (("retry", "gateway_event", "evt_poison_1", "--reason", "x"), "ID"),
    ):
        result = renova("attention", *args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert says in result.stdout + result.stderr, (args, result.stdout, result.stderr)
    assert session.scalar(select(func.count()).select_from(AuditEvent)) == 0
    assert broker.client.llen("dramatiq:payments") == 0

    broker.flush_all()
    retried = renova(
        "attention", "retry", "notification", str(notification_id), "--reason", "template fixed", "--actor", "ana"
    )
    assert retried.returncode == 0, retried.stdout + retried.stderr
    assert f"notification {notification_id} retried now" in retried.stdout
    assert broker.client.llen("dramatiq:notifications") == 1  # sent once the CLI committed
    row = fresh(Notification, notification_id)
    assert row.needs_attention_at is None and row.next_attempt_at == parked_at  # the test clock's "now"
    audit = session.scalars(select(AuditEvent)).one()
    assert (audit.actor, audit.action, audit.reason) == ("ana", "attention.retry", "template fixed")
    assert (audit.target_type, audit.target_id) == ("notification", str(notification_id))
    assert audit.details["last_error"].startswith("TypeError")

    after = renova("attention", "list")
    assert "evt_poison_1" in after.stdout and "TypeError" not in after.stdout
