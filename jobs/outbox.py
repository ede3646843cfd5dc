"""Messages that must leave only once the transaction that justifies them has committed.

A flow calls `send_after_commit(session, actor, *args)`; the message is sent right after that
session's next successful commit and dropped on rollback. If Redis refuses it at that moment the
database still holds the work, and the scheduler's tick finds it again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from dramatiq import Actor
from sqlalchemy import event
from sqlalchemy.orm import Session

_KEY = "renova_outbox"
_DISPATCHER = "renova_outbox_dispatcher"
logger = logging.getLogger(__name__)

# Where a message goes instead of the broker, for a session that has one (see `dispatch_with`).
Dispatcher = Callable[[Actor[Any, Any], tuple[Any, ...], dict[str, Any]], None]


def send_after_commit(session: Session, actor: Actor[Any, Any], *args: Any, **kwargs: Any) -> None:
    session.info.setdefault(_KEY, []).append((actor, args, kwargs))


def send_now(session: Session, actor: Actor[Any, Any], *args: Any, **kwargs: Any) -> None:
    """Send a message for work already committed (no transaction may be open around it)."""
    dispatcher: Dispatcher | None = session.info.get(_DISPATCHER)
    if dispatcher is not None:
        dispatcher(actor, args, kwargs)
    else:
        actor.send(*args, **kwargs)


@contextmanager
def dispatch_with(session: Session, dispatcher: Dispatcher) -> Iterator[None]:
    """Hand this session's messages to `dispatcher` instead of the broker (an in-process simulation
    runs them itself); they still leave only once their transaction has committed."""
    session.info[_DISPATCHER] = dispatcher
    try:
        yield
    finally:
        session.info.pop(_DISPATCHER, None)


@event.listens_for(Session, "after_commit")
def _send(session: Session) -> None:
    for actor, args, kwargs in session.info.pop(_KEY, []):
        try:
            send_now(session, actor, *args, **kwargs)
        except Exception:
            logger.exception("could not enqueue %s%r after commit; the next tick re-enqueues it", actor, args)


@event.listens_for(Session, "after_rollback")
def _discard(session: Session) -> None:
    session.info.pop(_KEY, None)
