"""Dramatiq actors, one module per flow.

Importing this package declares nothing: an actor binds to the global broker when its decorator
runs, so the runtime (`workers.broker`) sets the broker first, then calls `register_actors()`.
"""

from __future__ import annotations

import importlib

ACTOR_MODULES: tuple[str, ...] = (
    "jobs.health",
    "jobs.notifications",
    "jobs.payments",
    "jobs.boletos",
    "jobs.gateway_events",
    "jobs.billing_day",
    "jobs.tick",
    "jobs.changes",
    "jobs.event_delivery",
)


def require_broker() -> None:
    """Refuse to declare actors before the runtime has set the broker (they would bind to another)."""
    import dramatiq.broker

    if dramatiq.broker.global_broker is None:
        raise RuntimeError("set the broker (import workers.broker) before importing actor modules")


def register_actors() -> None:
    for name in ACTOR_MODULES:
        importlib.import_module(name)
