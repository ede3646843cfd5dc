"""Recording a change request once per (organization, idempotency key), and finding the ones still
pending."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from pydantic import ValidationError
from sqlalchemy import exists, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

import jobs
from jobs.changes.outcome import reject
from jobs.context import BillingConfig
from jobs.contract import (
    MAX_ID,
    canonical_payload,
    describe_field_errors,
    field_errors,
    has_control_characters,
    parse_change_request,
    payload_hash,
    redact,
)
from jobs.work_attempts import due_for_retry
from models import policy
from models.calendar import local_today
from models.policy import RuleViolation
from models.schema import ChangeRequest, Invoice
from models.states import ChangeRequestStatus

jobs.require_broker()

logger = logging.getLogger(__name__)


# What a rejected request's `kind` column may hold as sent (anything else is recorded as "invalid").
_KIND = re.compile(r"[a-z_]{1,32}")


class UnrecordableChangeRequest(ValueError):
    """A queue message without a usable organization_id or idempotency_key: it cannot be recorded
    (the row is keyed by them), so it is not retried but lands in the dead-letter queue."""


class IdempotencyKeyReused(Exception):
    """The organization already used this idempotency key for a different request."""

    def __init__(self, existing: ChangeRequest) -> None:
        super().__init__(f"idempotency key already used by change request {existing.id} with another payload")
        self.existing = existing


@dataclass(frozen=True)
class Recorded:
    request: ChangeRequest
    created: bool


def _identity(payload: Any) -> tuple[int, str]:
    if not isinstance(payload, dict):
        raise UnrecordableChangeRequest("a change request must be a JSON object")
    organization_id = payload.get("organization_id")
    key = payload.get("idempotency_key")
    if isinstance(organization_id, bool) or not isinstance(organization_id, int) or not 0 < organization_id <= MAX_ID:
        raise UnrecordableChangeRequest(
            "organization_id (a positive integer, at most 2^63 − 1) is required to record a request"
        )
    if not isinstance(key, str) or not key.strip() or len(key.strip()) > 255 or has_control_characters(key):
        raise UnrecordableChangeRequest(
            "idempotency_key (1 to 255 characters, no control characters) is required to record a request"
        )
    return organization_id, key.strip()


def _optional_id(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_ID else None


def record_change_request(session: Session, payload: Any, *, source: str, now: datetime) -> Recorded:
    """Persist a request once per (organization, idempotency key); does not commit.

    A payload of the wrong shape is recorded as `rejected` with `invalid_request` (with its card
    numbers, if any, redacted). The same key with the same payload returns the existing row; with a
    different payload it raises IdempotencyKeyReused.
    """
    organization_id, key = _identity(payload)
    violation: RuleViolation | None = None
    try:
        parsed = parse_change_request(payload)
        stored = canonical_payload(parsed)
        kind, subscription_id, requested_by = parsed.kind, parsed.subscription_id, parsed.requested_by
    except ValidationError as exc:
        fields = field_errors(exc.errors())
        violation = policy.invalid_request(describe_field_errors(fields), fields=fields)
        stored = redact(payload)
        raw_kind = payload.get("kind")
        kind = raw_kind if isinstance(raw_kind, str) and _KIND.fullmatch(raw_kind) else "invalid"
        subscription_id = _optional_id(payload.get("subscription_id"))
        requested_by = _optional_id(payload.get("requested_by"))
    digest = payload_hash(stored)
    request_id = session.scalar(
        insert(ChangeRequest)
        .values(
            organization_id=organization_id,
            subscription_id=subscription_id,
            requested_by=requested_by,
            idempotency_key=key,
            kind=kind,
            payload=stored,
            payload_hash=digest,
            source=source,
            created_at=now,
        )
        .on_conflict_do_nothing(index_elements=["organization_id", "idempotency_key"])
        .returning(ChangeRequest.id)
    )
    if request_id is None:
        existing = session.scalars(
            select(ChangeRequest)
            .where(ChangeRequest.organization_id == organization_id, ChangeRequest.idempotency_key == key)
            .execution_options(populate_existing=True)
        ).one()
        if existing.payload_hash != digest:
            raise IdempotencyKeyReused(existing)
        return Recorded(existing, created=False)
    request = session.get_one(ChangeRequest, request_id)
    if violation is not None:
        reject(session, request, violation, now=now)
    return Recorded(request, created=True)


def pending_change_request_ids(
    session: Session, older_than: datetime, limit: int = 500, *, now: datetime | None = None
) -> list[int]:
    """Pending requests created before `older_than` that no charge is deciding and that are due for
    another attempt at `now` (default `older_than`; never one that needs attention), for the tick to
    re-enqueue.

    A request whose card charge is in flight is the janitor's: its invoice exists, and the charge's
    consequence completes the request once the attempt is resolved.
    """
    in_flight = exists().where(Invoice.change_request_id == ChangeRequest.id)
    return list(
        session.scalars(
            select(ChangeRequest.id)
            .where(ChangeRequest.status == ChangeRequestStatus.PENDING, ChangeRequest.created_at < older_than)
            .where(~in_flight, due_for_retry(ChangeRequest, now or older_than))
            .order_by(ChangeRequest.created_at)
            .limit(limit)
        )
    )


def change_date(request: ChangeRequest, config: BillingConfig) -> date:
    """D: the business date on which the request was made (what the user saw when they clicked)."""
    return local_today(request.created_at, config.timezone)
