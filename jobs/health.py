"""A round trip through the queue, used by `renova doctor --ping` to prove a worker is consuming."""

from __future__ import annotations

import dramatiq
from sqlalchemy.orm import Session

import jobs
from jobs import audit
from jobs.context import current_session
from jobs.retries import STANDARD

jobs.require_broker()


def record_ping(session: Session, token: str) -> None:
    audit.record(session, actor="worker", action="worker.ping", target_type="ping", target_id=token)


@dramatiq.actor(queue_name="billing", **STANDARD)
def ping(token: str) -> None:
    record_ping(current_session(), token)
