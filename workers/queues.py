"""Queue depth read straight from Dramatiq's Redis keys (its Prometheus metrics expose none)."""

from __future__ import annotations

from dataclasses import dataclass

import redis

NAMESPACE = "dramatiq"
QUEUES: tuple[str, ...] = ("billing", "changes", "payments", "notifications", "events")


@dataclass(frozen=True)
class QueueDepth:
    queue: str
    ready: int
    delayed: int
    dead: int


def queue_depths(redis_url: str, queues: tuple[str, ...] = QUEUES) -> list[QueueDepth]:
    """Ready (waiting in the list), delayed (including those a worker holds until due) and dead."""
    client = redis.Redis.from_url(redis_url)
    depths = []
    for queue in queues:
        delayed = f"{queue}.DQ"
        with client.pipeline(transaction=False) as pipe:
            pipe.llen(f"{NAMESPACE}:{queue}")
            pipe.hlen(f"{NAMESPACE}:{delayed}.msgs")
            pipe.zcard(f"{NAMESPACE}:{queue}.XQ")
            ready, delayed_count, dead = pipe.execute()
        depths.append(QueueDepth(queue, int(ready), int(delayed_count), int(dead)))
    return depths
