"""Retry policy shared by the actors: transient failures retry with backoff, a bounded number of
times; anything else (a bug, bad data) fails at once into the dead-letter queue, where operators
see it. Business outcomes (declines, rule violations) are recorded by the flows, never raised."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy.exc import DBAPIError, OperationalError

from gateways.base import Unavailable
from jobs.errors import TransientError

# TransientError: what the adapters raise for a failure worth another try (e.g. the SMTP mailer).
# OSError: a connection refused, reset or timed out, in any client built on the standard library.
# The runtime adds its own infrastructure's errors (e.g. Redis) with `register_transient`.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OperationalError,
    Unavailable,
    TransientError,
    OSError,
)


def register_transient(*error_types: type[BaseException]) -> None:
    """Also retry these errors: the runtime's own infrastructure (the broker's Redis client) can fail
    under any actor, and jobs do not import its library. Called while the runtime wires itself."""
    global TRANSIENT_ERRORS
    TRANSIENT_ERRORS += tuple(kind for kind in error_types if kind not in TRANSIENT_ERRORS)


def is_transient(error: BaseException) -> bool:
    if isinstance(error, TRANSIENT_ERRORS):
        return True
    # Serialization failures and deadlocks are worth another try; other database errors are not.
    return isinstance(error, DBAPIError) and getattr(error.orig, "sqlstate", None) in {"40001", "40P01"}


def retry_transient(max_retries: int) -> Callable[[int, BaseException], bool]:
    """A Dramatiq `retry_when` predicate (which replaces `max_retries`, so the bound lives here)."""

    def retry_when(retries_so_far: int, error: BaseException) -> bool:
        return retries_so_far < max_retries and is_transient(error)

    return retry_when


# Options for actors: (max retries, min backoff ms, max backoff ms).
STANDARD = {"retry_when": retry_transient(8), "min_backoff": 1_000, "max_backoff": 300_000}
LATENCY_SENSITIVE = {"retry_when": retry_transient(8), "min_backoff": 200, "max_backoff": 30_000}
