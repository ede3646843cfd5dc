"""Read-only lookups for the ops console: finding a subscription or a change request, and everything
on record about a subscription. Plain rows, no rendering; nothing here changes anything."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import date
from typing import Any

from sqlalchemy import Select, func, or_, select
from sqlalchemy.orm import Session, selectinload

from jobs.filters import can_match
from models.schema import (
    ChangeRequest,
    Invoice,
    LedgerEntry,
    Notification,
    Organization,
    Subscription,
)

# Change-request fields that must never be shown whole (card tokens reach the payload by design).
SECRET_FIELDS = frozenset({"token", "card_token"})


@dataclass(frozen=True)
class SubscriptionHit:
    id: int
    organization_id: int
    organization_name: str
    document: str | None
    cycle: str
    payment_method: str
    status: str
    current_period_end: date


@dataclass
class SubscriptionRecord:
    subscription: Subscription
    organization: Organization
    invoices: list[Invoice] = field(default_factory=list)
    ledger: list[LedgerEntry] = field(default_factory=list)
    notices: list[Notification] = field(default_factory=list)
    change_requests: list[ChangeRequest] = field(default_factory=list)


def search_subscriptions(session: Session, term: str, *, limit: int = 50) -> list[SubscriptionHit]:
    """By organization id, subscription id (`#12`), CPF/CNPJ (with or without punctuation) or a part
    of the organization's name."""
    term = term.strip()
    if not can_match(texts=[term]):
        return []
    query: Select[Any] = (
        select(Subscription, Organization)
        .join(Organization, Organization.id == Subscription.organization_id)
        .order_by(Subscription.id.desc())
        .limit(limit)
    )
    if term.startswith("#") and term[1:].isdigit():
        if not can_match(ids=[int(term[1:])]):
            return []
        query = query.where(Subscription.id == int(term[1:]))
    elif term:
        document = re.sub(r"[.\-/\s]", "", term).upper()
        criteria = [Organization.name.ilike(f"%{_escape_like(term)}%"), Organization.document == document]
        if term.isdigit() and can_match(ids=[int(term)]):
            criteria.append(Organization.id == int(term))
        query = query.where(or_(*criteria))
    return [
        SubscriptionHit(
            sub.id,
            org.id,
            org.name,
            masked_document(org.document),
            sub.cycle,
            sub.effective_payment_method,
            sub.status,
            sub.current_period_end,
        )
        for sub, org in session.execute(query).all()
    ]


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def subscription_record(session: Session, subscription_id: int) -> SubscriptionRecord | None:
    """The subscription with its periods' invoices (charges and boletos), ledger, notices and change
    requests, newest first."""
    subscription = session.get(Subscription, subscription_id)
    if subscription is None:
        return None
    invoices = session.scalars(
        select(Invoice)
        .where(Invoice.subscription_id == subscription_id)
        .options(selectinload(Invoice.charges), selectinload(Invoice.boletos))
        .order_by(Invoice.period_start.desc(), Invoice.id.desc())
    ).all()
    ledger = session.scalars(
        select(LedgerEntry)
        .where(LedgerEntry.subscription_id == subscription_id)
        .order_by(LedgerEntry.created_at.desc(), LedgerEntry.id.desc())
    ).all()
    notices = session.scalars(
        select(Notification)
        .where(Notification.subscription_id == subscription_id)
        .order_by(Notification.created_at.desc(), Notification.id.desc())
    ).all()
    requests = session.scalars(
        select(ChangeRequest)
        .where(
            or_(
                ChangeRequest.subscription_id == subscription_id,
                (ChangeRequest.organization_id == subscription.organization_id)
                & ChangeRequest.subscription_id.is_(None),
            )
        )
        .order_by(ChangeRequest.created_at.desc(), ChangeRequest.id.desc())
    ).all()
    organization = session.get_one(Organization, subscription.organization_id)
    return SubscriptionRecord(subscription, organization, list(invoices), list(ledger), list(notices), list(requests))


def search_change_requests(
    session: Session,
    *,
    organization_id: int | None = None,
    status: str | None = None,
    kind: str | None = None,
    since: date | None = None,
    until: date | None = None,
    limit: int = 100,
) -> list[ChangeRequest]:
    if not can_match(texts=[status, kind], ids=[organization_id]):
        return []
    query = select(ChangeRequest).order_by(ChangeRequest.created_at.desc(), ChangeRequest.id.desc()).limit(limit)
    if organization_id is not None:
        query = query.where(ChangeRequest.organization_id == organization_id)
    if status:
        query = query.where(ChangeRequest.status == status)
    if kind:
        query = query.where(ChangeRequest.kind == kind)
    if since is not None:
        query = query.where(func.date(ChangeRequest.created_at) >= since)
    if until is not None:
        query = query.where(func.date(ChangeRequest.created_at) <= until)
    return list(session.scalars(query))


def masked_document(document: str | None) -> str | None:
    """A CPF or CNPJ as shown back to people and to the API: its check digits only."""
    if not document:
        return document
    if len(document) == 11:
        return f"***.***.***-{document[-2:]}"
    if len(document) == 14:
        return f"**.***.***/****-{document[-2:]}"
    return f"…{document[-2:]}"


def masked_email(email: str | None) -> str | None:
    """An e-mail address as shown back: its first character and its domain (`d***@acme.example`)."""
    if not email or "@" not in email:
        return email
    local, domain = email.rsplit("@", 1)
    return f"{local[:1]}***@{domain}"


# A request's payload fields that the API shows as the request's own, not among its `params`.
_COMMON_FIELDS = ("organization_id", "subscription_id", "requested_by", "idempotency_key", "kind")


def change_request_view(request: Any) -> dict[str, Any]:
    """A change request as the API shows it (`GET /v1/change-requests/{id}`, its events): the kind's
    parameters with the card token masked, the error with its fields and facts, the result."""
    params = masked_payload({key: value for key, value in (request.payload or {}).items() if key not in _COMMON_FIELDS})
    result = dict(request.result) if request.result else None
    error = None
    if request.error_code:
        details = (result or {}).pop("error_details", None)
        fields = details.get("fields") if isinstance(details, dict) else None
        error = {
            "code": request.error_code,
            "message": request.error_message or "",
            "fields": fields,
            "details": details,
        }
    return {
        "id": request.id,
        "organization_id": request.organization_id,
        "subscription_id": request.subscription_id,
        "requested_by": request.requested_by,
        "idempotency_key": request.idempotency_key,
        "kind": request.kind,
        "source": request.source,
        "status": request.status,
        "params": params,
        "error": error,
        "result": result or None,
        "created_at": request.created_at,
        "processed_at": request.processed_at,
    }


def masked_payload(payload: dict[str, Any]) -> dict[str, Any]:
    """The request's parameters as shown to people: card tokens cut to their last four characters."""
    return {
        name: (f"…{str(value)[-4:]}" if name in SECRET_FIELDS and value else value) for name, value in payload.items()
    }


def change_request_kinds(session: Session) -> list[str]:
    return list(session.scalars(select(ChangeRequest.kind).distinct().order_by(ChangeRequest.kind)))
