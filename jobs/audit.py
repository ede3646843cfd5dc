"""The audit trail (table `audit_events`): who did what from the console, the CLI or the API, and why."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from models.schema import AuditEvent


def record(
    session: Session,
    *,
    actor: str,
    action: str,
    target_type: str | None,
    target_id: str | None,
    reason: str = "",
    details: dict[str, Any] | None = None,
) -> AuditEvent:
    """Add one audit event to the session; it is written with the change it records (the caller
    commits). `details` are facts, never personal data (no names or e-mails)."""
    event = AuditEvent(
        actor=actor,
        action=action,
        target_type=target_type,
        target_id=target_id,
        reason=reason,
        details=details if details is not None else {},
    )
    session.add(event)
    return event
