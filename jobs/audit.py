"""The audit trail (table `audit_events`): who did what from the console, the CLI or the API, and why.
`record` writes an event with the change it records; `list_audit` reads them back for on-call."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from jobs.filters import can_match
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


@dataclass(frozen=True)
class AuditRow:
    id: int
    created_at: datetime
    actor: str
    action: str
    target_type: str | None
    target_id: str | None
    reason: str
    details: dict[str, Any]


def list_audit(
    session: Session,
    *,
    actor: str | None = None,
    action: str | None = None,
    target_type: str | None = None,
    target_id: str | None = None,
    since: datetime | None = None,
    limit: int = 100,
) -> list[AuditRow]:
    """Audit events, newest first. `action` matches an action exactly or a family of them by its
    prefix (`charge` finds `charge.retry` and `charge.reconcile`); `since` is an instant."""
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    if not can_match(texts=[actor, action, target_type, target_id]):
        return []
    query = select(AuditEvent)
    if actor is not None:
        query = query.where(AuditEvent.actor == actor)
    if action is not None:
        family = action.rstrip(".")
        query = query.where((AuditEvent.action == family) | AuditEvent.action.startswith(f"{family}.", autoescape=True))
    if target_type is not None:
        query = query.where(AuditEvent.target_type == target_type)
    if target_id is not None:
        query = query.where(AuditEvent.target_id == target_id)
    if since is not None:
        query = query.where(AuditEvent.created_at >= since)
    events = session.scalars(query.order_by(AuditEvent.created_at.desc(), AuditEvent.id.desc()).limit(limit))
    return [
        AuditRow(
            id=event.id,
            created_at=event.created_at,
            actor=event.actor,
            action=event.action,
            target_type=event.target_type,
            target_id=event.target_id,
            reason=event.reason,
            details=dict(event.details),
        )
        for event in events
    ]
