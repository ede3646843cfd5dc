"""Messages that must leave only once the transaction that justifies them has committed.

A flow calls `send_after_commit(session, actor, *args)`; the message is sent right after that
session's next successful commit and dropped on rollback. If Redis refuses it at that moment the
database still holds the work, and the scheduler's tick finds it again.
"""

from __future__ import annotations

import logging
from typing import Any

from dramatiq import Actor
from sqlalchemy import event
from sqlalchemy.orm import Session

_KEY = "renova_outbox"
logger = logging.getLogger(__name__)


def send_after_commit(session: Session, actor: Actor[Any, Any], *args: Any, **kwargs: Any) -> None:
    session.info.setdefault(_KEY, []).append((actor, args, kwargs))


@event.listens_for(Session, "after_commit")
def _send(session: Session) -> None:
    for actor, args, kwargs in session.info.pop(_KEY, []):
        try:
            actor.send(*args, **kwargs)
        except Exception:
            logger.exception("could not enqueue %s%r after commit; the next tick re-enqueues it", actor, args)


@event.listens_for(Session, "after_rollback")
def _discard(session: Session) -> None:
    session.info.pop(_KEY, None)
