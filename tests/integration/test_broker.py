"""A real message through Redis, processed by a real Dramatiq worker, writing through the
per-message session; and a failing actor retried, then parked in the dead-letter queue."""

from __future__ import annotations

import dramatiq
from sqlalchemy import func, select, text

from jobs.context import current_session
from jobs.health import ping
from jobs.retries import retry_transient
from models.schema import AuditEvent
from tests.integration.conftest import wait_until
from workers.db import get_session_factory
from workers.queues import queue_depths

ATTEMPTS: list[int] = []


@dramatiq.actor(queue_name="billing", max_retries=2, min_backoff=10, max_backoff=20)
def always_fails(note: str) -> None:
    # The session is bound and the row is written, but the failure rolls it back.
    current_session().add(AuditEvent(actor="test", action="always_fails", target_id=note))
    ATTEMPTS.append(1)
    raise RuntimeError("boom")


@dramatiq.actor(queue_name="billing", retry_when=retry_transient(1), min_backoff=10, max_backoff=20)
def fails_with_a_bug(note: str) -> None:
    ATTEMPTS.append(1)
    raise KeyError(note)


@dramatiq.actor(queue_name="billing", retry_when=retry_transient(2), min_backoff=10, max_backoff=20)
def breaks_a_rule_checked_at_commit(note: str) -> None:
    # Returns normally: the duplicate is only found by the deferred constraint, at COMMIT.
    ATTEMPTS.append(1)
    current_session().execute(text("INSERT INTO commit_probe VALUES (1)"))


def count(action: str) -> int:
    with get_session_factory()() as session:
        return session.scalar(select(func.count()).where(AuditEvent.action == action)) or 0


def test_message_through_redis_writes_through_the_message_session(worker, broker):
    ping.send("token-1")
    row = wait_until(lambda: count("worker.ping"))
    assert row == 1
    with get_session_factory()() as session:
        event = session.scalars(select(AuditEvent)).one()
    assert (event.actor, event.target_id) == ("worker", "token-1")


def test_failing_actor_is_retried_then_dead_lettered(worker, broker):
    ATTEMPTS.clear()
    always_fails.send("x")
    dead = wait_until(lambda: queue_depths(broker_url(broker), ("billing",))[0].dead)
    assert dead == 1
    assert len(ATTEMPTS) == 3  # the first try and two retries
    assert count("always_fails") == 0  # each failed attempt was rolled back


def test_a_bug_is_not_retried_but_dead_lettered_at_once(worker, broker):
    ATTEMPTS.clear()
    fails_with_a_bug.send("y")
    wait_until(lambda: queue_depths(broker_url(broker), ("billing",))[0].dead)
    assert len(ATTEMPTS) == 1


def broker_url(broker) -> str:
    kwargs = broker.client.connection_pool.connection_kwargs
    return f"redis://{kwargs['host']}:{kwargs['port']}/{kwargs.get('db', 0)}"


BROKEN = {"now": True}


@dramatiq.actor(queue_name="billing", max_retries=0)
def fails_until_fixed(note: dict) -> None:
    if BROKEN["now"]:
        raise RuntimeError(f"not yet: {note['kind']}")
    current_session().add(AuditEvent(actor="test", action="fixed", target_id=note["kind"]))


def test_operators_list_and_requeue_dead_letters(worker, broker):
    from tests.integration.test_cli import renova

    BROKEN["now"] = True
    message = fails_until_fixed.send({"kind": "card", "token": "tok_secret_value"})
    wait_until(lambda: queue_depths(broker_url(broker), ("billing",))[0].dead)

    listed = renova("dead-letters", "list", "-Q", "billing", COLUMNS="300")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert message.message_id in listed.stdout
    assert "fails_until_fixed" in listed.stdout and "RuntimeError: not yet: card" in listed.stdout
    assert "tok_secret_value" not in listed.stdout

    refused = renova("dead-letters", "requeue", "--reason", "gateway fixed")
    assert refused.returncode == 1 and "--id" in refused.stdout

    BROKEN["now"] = False
    requeued = renova("dead-letters", "requeue", "--id", message.message_id, "--reason", "bug fixed", "--actor", "ana")
    assert requeued.returncode == 0, requeued.stdout + requeued.stderr
    assert "requeued 1 message(s)" in requeued.stdout
    wait_until(lambda: count("fixed"))
    assert queue_depths(broker_url(broker), ("billing",))[0].dead == 0
    with get_session_factory()() as session:
        audit = session.scalars(select(AuditEvent).where(AuditEvent.action == "dead_letter.requeue")).one()
    assert (audit.actor, audit.reason, audit.target_id) == ("ana", "bug fixed", message.message_id)


def test_errors_of_expired_dead_letters_are_forgotten(broker):
    from workers.dead_letters import dead_letters, record_error

    record_error(broker.client, "billing", "long-gone-message", RuntimeError("expired a week ago"))
    assert dead_letters(broker.client, ("billing",)) == []
    assert broker.client.hlen("dramatiq:billing.XQ.errors") == 0


def test_a_per_process_client_is_built_once_however_many_threads_ask_at_once() -> None:
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from workers.broker import _once

    built: list[object] = []
    start = threading.Barrier(16)

    @_once
    def client() -> object:
        time.sleep(0.05)  # long enough for every thread to arrive while the first one builds
        built.append(object())
        return built[-1]

    def ask(_: int) -> object:
        start.wait()
        return client()

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(16)))
    assert len(built) == 1 and all(answer is built[0] for answer in answers)


def test_a_commit_that_fails_after_the_actor_returned_is_not_acknowledged_as_done(worker, broker):
    from workers.dead_letters import dead_letters

    with get_session_factory()() as session:
        session.execute(
            text(
                "CREATE TABLE commit_probe (id int, CONSTRAINT commit_probe_once UNIQUE (id) "
                "DEFERRABLE INITIALLY DEFERRED)"
            )
        )
        session.execute(text("INSERT INTO commit_probe VALUES (1)"))
        session.commit()
    try:
        ATTEMPTS.clear()
        breaks_a_rule_checked_at_commit.send("z")
        wait_until(lambda: queue_depths(broker_url(broker), ("billing",))[0].dead)
        assert len(ATTEMPTS) == 1  # a unique violation is not transient: dead-lettered at once
        [letter] = [letter for letter in dead_letters(broker.client, ("billing",)) if letter.actor.startswith("breaks")]
        assert "UniqueViolation" in letter.error or "IntegrityError" in letter.error, letter.error
    finally:
        with get_session_factory()() as session:
            session.execute(text("DROP TABLE commit_probe"))
            session.commit()
