"""The floor's no-op actor, loaded by the benchmark's workers next to `workers.broker` (which builds the
broker first, so the actor binds to it) and imported by the benchmark to send its messages."""

from __future__ import annotations

import dramatiq

from workers.broker import broker  # noqa: F401  (builds and sets the broker before the actor below binds)


@dramatiq.actor(queue_name="billing", max_retries=0)
def bench_noop(n: int) -> None:
    """Nothing: what a message costs by itself (the broker, the middleware, a database session opened)."""
