"""The closed vocabularies stored in the database (text columns guarded by CHECK constraints)."""

from __future__ import annotations

from enum import StrEnum


class Cycle(StrEnum):
    MONTHLY = "monthly"
    ANNUAL = "annual"


class PaymentMethod(StrEnum):
    CARD = "card"
    BOLETO = "boleto"


class SubscriptionStatus(StrEnum):
    ACTIVE = "active"
    PAST_DUE = "past_due"
    SUSPENDED = "suspended"
    CANCELED = "canceled"


class InvoiceStatus(StrEnum):
    OPEN = "open"
    PAID = "paid"
    VOID = "void"
    UNCOLLECTIBLE = "uncollectible"


class InvoiceKind(StrEnum):
    RENEWAL = "renewal"
    SUBSCRIBE = "subscribe"
    CYCLE_CHANGE = "cycle_change"


class ChargeStatus(StrEnum):
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    UNKNOWN = "unknown"


class BoletoStatus(StrEnum):
    ISSUED = "issued"
    PAID = "paid"
    OVERDUE = "overdue"
    CANCELED = "canceled"
    EXPIRED = "expired"


class RefundMethod(StrEnum):
    CARD = "card"
    PAYOUT = "payout"


class RefundStatus(StrEnum):
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    UNKNOWN = "unknown"
    PAID = "paid"  # a payout closed by on-call


class ChangeRequestStatus(StrEnum):
    PENDING = "pending"
    APPLIED = "applied"
    REJECTED = "rejected"


class NotificationStatus(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"


class Role(StrEnum):
    OWNER = "owner"
    ADMIN = "admin"
    MEMBER = "member"


def sql_in(values: type[StrEnum]) -> str:
    """`('a', 'b')` for a CHECK constraint over an enumeration."""
    return "(" + ", ".join(f"'{member.value}'" for member in values) + ")"
