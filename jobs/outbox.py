"""Messages that must leave only once the transaction that justifies them has committed.

A flow calls `send_after_commit(session, actor, *args)`; the message is sent right after that
session's outermost transaction commits, and dropped if that transaction rolls back. Savepoints
(`begin_nested`) count as what they are: a message queued inside one is dropped when it rolls back
(and only it: what the enclosing transaction queued stays), and kept, not sent, when it is released.
SQLAlchemy's `after_commit` and `after_rollback` fire for savepoints too, so both are told apart here.
If Redis refuses a message at that moment the database still holds the work, and the scheduler's
tick finds it again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from dramatiq import Actor
from sqlalchemy import event
from sqlalchemy.orm import Session, SessionTransaction

_KEY = "renova_outbox"
_DISPATCHER = "renova_outbox_dispatcher"
logger = logging.getLogger(__name__)

# Where a message goes instead of the broker, for a session that has one (see `dispatch_with`).
Dispatcher = Callable[[Actor[Any, Any], tuple[Any, ...], dict[str, Any]], None]


def send_after_commit(session: Session, actor: Actor[Any, Any], *args: Any, **kwargs: Any) -> None:
    # Tagged with the savepoint it was queued in (None: the outermost transaction).
    session.info.setdefault(_KEY, []).append((session.get_nested_transaction(), actor, args, kwargs))


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
    released = session.get_nested_transaction()
    if released is not None:
        # A savepoint released: its messages now wait for the transaction around it.
        parent = released.parent if released.parent is not None and released.parent.nested else None
        session.info[_KEY] = [
            (parent if tag is released else tag, actor, args, kwargs)
            for tag, actor, args, kwargs in session.info.get(_KEY, [])
        ]
        return
    for _, actor, args, kwargs in session.info.pop(_KEY, []):
        try:
            send_now(session, actor, *args, **kwargs)
        except Exception:
            logger.exception("could not enqueue %s%r after commit; the next tick re-enqueues it", actor, args)


@event.listens_for(Session, "after_soft_rollback")
def _discard(session: Session, rolled_back: SessionTransaction) -> None:
    # A savepoint rolled back: only what it queued goes (the outermost transaction's end is `_forget`).
    if rolled_back.nested:
        session.info[_KEY] = [message for message in session.info.get(_KEY, []) if message[0] is not rolled_back]


@event.listens_for(Session, "after_transaction_end")
def _forget(session: Session, ended: SessionTransaction) -> None:
    # The outermost transaction ended without its commit sending them (a rollback, a close): they go.
    if ended.parent is None and not ended.nested:
        session.info.pop(_KEY, None)
