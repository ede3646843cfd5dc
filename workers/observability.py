"""Error reporting hygiene: what leaves the process for Sentry."""

from __future__ import annotations

from typing import Any

SCRUBBED = "[scrubbed]"


def scrub_event(event: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any]:
    """Drop the message arguments (card tokens, e-mails, documents) that Sentry's Dramatiq
    integration attaches under `contexts.dramatiq.data`; keep the actor and message id."""
    dramatiq_context = (event.get("contexts") or {}).get("dramatiq")
    if isinstance(dramatiq_context, dict) and isinstance(dramatiq_context.get("data"), dict):
        data = dramatiq_context["data"]
        dramatiq_context["data"] = {
            key: (SCRUBBED if key in ("args", "kwargs") else value) for key, value in data.items()
        }
    return event
