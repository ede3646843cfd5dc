"""The outbox sends a message only once the outermost transaction commits: a savepoint's release is
not a commit, and a savepoint's rollback drops only what it queued (SQLAlchemy fires `after_commit`
and `after_rollback` for savepoints too)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import dramatiq
import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from jobs.outbox import dispatch_with, send_after_commit

pytestmark = pytest.mark.usefixtures("broker")


@dramatiq.actor(queue_name="billing")
def outbox_probe(label: str) -> None:
    """Never run: the tests capture what would be sent."""


@pytest.fixture
def sent(session: Session) -> Iterator[list[str]]:
    labels: list[str] = []

    def capture(actor: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        labels.append(args[0])

    with dispatch_with(session, capture):
        yield labels


def queue(session: Session, label: str) -> None:
    session.execute(text("SELECT 1"))
    send_after_commit(session, outbox_probe, label)


def test_a_released_savepoint_sends_nothing_until_the_commit(session: Session, sent: list[str]) -> None:
    queue(session, "outer")
    with session.begin_nested():
        queue(session, "in savepoint")
    assert sent == []
    session.commit()
    assert sent == ["outer", "in savepoint"]


def test_a_savepoint_rolled_back_drops_only_what_it_queued(session: Session, sent: list[str]) -> None:
    queue(session, "outer")
    with pytest.raises(ValueError), session.begin_nested():
        queue(session, "rolled back")
        raise ValueError
    with session.begin_nested():
        queue(session, "kept")
        with pytest.raises(ValueError), session.begin_nested():
            queue(session, "inner rolled back")
            raise ValueError
    session.commit()
    assert sent == ["outer", "kept"]


def test_a_rollback_or_a_close_drops_everything(session: Session, sent: list[str]) -> None:
    queue(session, "outer")
    with session.begin_nested():
        queue(session, "in savepoint")
    session.rollback()
    queue(session, "unfinished")
    session.close()
    session.commit()
    assert sent == []
