"""Dramatiq's dead-letter queues, for on-call: what failed for good, and putting it back.

The Redis broker keeps a dead message in `dramatiq:<queue>.XQ` (a sorted set by time of death) and
its body in `dramatiq:<queue>.XQ.msgs`, for `dead_message_ttl` (a week by default)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import dramatiq
import redis
from sqlalchemy.orm import Session

from jobs.contract import redact
from workers.queues import NAMESPACE, QUEUES

# Message arguments may carry gateway tokens and e-mail addresses: shown masked.
_MASKED_KEYS = frozenset({"token", "card_token", "email", "document"})
_RETRY_STATE = ("retries", "traceback", "requeue_timestamp", "redis_message_id")


@dataclass(frozen=True)
class DeadLetter:
    queue: str
    message_id: str  # Dramatiq's id, as in the workers' logs
    storage_id: str  # the key the Redis broker stores it under
    actor: str
    arguments: str
    retries: int
    error: str
    died_at: datetime


def _masked(value: Any) -> Any:
    """Arguments as on-call may read them: tokens, e-mails and documents starred, card numbers (under
    any key, or inside a text) redacted (`jobs.contract.redact`)."""
    return _starred(redact(value))


def _starred(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: "***" if key in _MASKED_KEYS else _starred(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_starred(item) for item in value]
    return value


def _last_line(traceback: str | None) -> str:
    lines = [line for line in (traceback or "").strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def _keys(queue: str) -> tuple[str, str]:
    return f"{NAMESPACE}:{queue}.XQ", f"{NAMESPACE}:{queue}.XQ.msgs"


def _errors_key(queue: str) -> str:
    return f"{NAMESPACE}:{queue}.XQ.errors"


def _forget_expired_errors(client: redis.Redis, queue: str, alive: set[bytes]) -> None:
    """Dramatiq's maintenance expires dead letters but knows nothing of their recorded errors."""
    stale = [storage_id for storage_id in client.hkeys(_errors_key(queue)) if storage_id not in alive]
    if stale:
        client.hdel(_errors_key(queue), *stale)


def record_error(client: redis.Redis, queue: str, storage_id: str | None, error: BaseException) -> None:
    if storage_id:
        client.hset(_errors_key(queue), storage_id, f"{type(error).__name__}: {error}"[:1000])


def dead_letters(client: redis.Redis, queues: tuple[str, ...] = QUEUES) -> list[DeadLetter]:
    found = []
    for queue in queues:
        dead_set, bodies = _keys(queue)
        entries = client.zrange(dead_set, 0, -1, withscores=True)
        _forget_expired_errors(client, queue, {storage_id for storage_id, _ in entries})
        if not entries:
            continue
        ids = [storage_id for storage_id, _ in entries]
        raw = client.hmget(bodies, ids)
        errors = client.hmget(_errors_key(queue), ids)
        for (storage_id, died_at), body, error in zip(entries, raw, errors, strict=True):
            if body is None:
                continue
            message = dramatiq.Message.decode(body)
            found.append(
                DeadLetter(
                    queue=queue,
                    message_id=message.message_id,
                    storage_id=storage_id.decode() if isinstance(storage_id, bytes) else storage_id,
                    actor=message.actor_name,
                    arguments=json.dumps(_masked(list(message.args)), ensure_ascii=False, default=str),
                    retries=int(message.options.get("retries", 0)),
                    error=error.decode() if error else _last_line(message.options.get("traceback")),
                    died_at=datetime.fromtimestamp(died_at / 1000, UTC),
                )
            )
    return found


def requeue(broker: dramatiq.Broker, client: redis.Redis, letter: DeadLetter) -> bool:
    """Put a dead message back on its queue with a fresh retry budget; False if it is gone.

    Enqueued first, removed from the dead letters second: a crash in between can only deliver a
    message twice, which every actor tolerates."""
    dead_set, bodies = _keys(letter.queue)
    body = client.hget(bodies, letter.storage_id)
    if body is None:
        return False
    message = dramatiq.Message.decode(body)
    options = {key: value for key, value in message.options.items() if key not in _RETRY_STATE}
    # Message.copy merges options; replace them so the retry count starts again.
    broker.enqueue(dataclasses.replace(message, options=options))
    with client.pipeline() as pipe:
        pipe.zrem(dead_set, letter.storage_id)
        pipe.hdel(bodies, letter.storage_id)
        pipe.hdel(_errors_key(letter.queue), letter.storage_id)
        pipe.execute()
    return True


def delete(client: redis.Redis, letter: DeadLetter) -> bool:
    """Drop a dead message for good (work that must not run again, e.g. made obsolete by a manual
    fix); False if it is already gone. Its body, its place in the dead-letter set and its recorded
    error go together."""
    dead_set, bodies = _keys(letter.queue)
    with client.pipeline() as pipe:
        pipe.zrem(dead_set, letter.storage_id)
        pipe.hdel(bodies, letter.storage_id)
        pipe.hdel(_errors_key(letter.queue), letter.storage_id)
        removed, _, _ = pipe.execute()
    return bool(removed)


def requeue_audited(
    session: Session,
    broker: dramatiq.Broker,
    client: redis.Redis,
    letters: list[DeadLetter],
    *,
    actor: str,
    reason: str,
) -> list[str]:
    """Requeue each letter and record who and why (`audit_events`, committed by the caller): the one
    way the CLI and the console do it. Returns the ids of the messages requeued."""
    from jobs import audit

    requeued = []
    for letter in letters:
        if requeue(broker, client, letter):
            requeued.append(letter.message_id)
            audit.record(
                session,
                actor=actor,
                action="dead_letter.requeue",
                target_type="message",
                target_id=letter.message_id,
                reason=reason,
                details={"queue": letter.queue, "actor_name": letter.actor, "error": letter.error},
            )
    return requeued


def delete_audited(
    session: Session, client: redis.Redis, letters: list[DeadLetter], *, actor: str, reason: str
) -> list[str]:
    """Delete each letter and record who and why (`audit_events`, committed by the caller), like
    `requeue_audited`. Returns the ids of the messages deleted."""
    from jobs import audit

    deleted = []
    for letter in letters:
        if delete(client, letter):
            deleted.append(letter.message_id)
            audit.record(
                session,
                actor=actor,
                action="dead_letter.delete",
                target_type="message",
                target_id=letter.message_id,
                reason=reason,
                details={"queue": letter.queue, "actor_name": letter.actor, "error": letter.error},
            )
    return deleted
