"""The closed vocabularies stored in the database (text columns guarded by CHECK constraints)."""

from __future__ import annotations

from enum import StrEnum
from typing import Final


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


# A charge whose outcome is not known yet: never retried blindly, only reconciled by its key. While a
# subscription has one, flows that compute from its money wait (jobs.payments.charge_in_flight).
UNRESOLVED_CHARGE: Final[tuple[ChargeStatus, ...]] = (ChargeStatus.PENDING, ChargeStatus.UNKNOWN)


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


class BoletoPurpose(StrEnum):
    """What a boleto pays, as its notice says: an invoice's kind, or a replacement (segunda via)."""

    RENEWAL = "renewal"
    SUBSCRIBE = "subscribe"
    CYCLE_CHANGE = "cycle_change"
    REISSUE = "reissue"


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


class RunStatus(StrEnum):
    """billing_runs.status: a run is `running` until a scan finds nothing left due (or gives up)."""

    RUNNING = "running"
    DONE = "done"


class LedgerKind(StrEnum):
    """ledger_entries.kind, with its sign (jobs/ledger_check.py proves the rules they obey)."""

    PAYMENT = "payment"  # (+) money that paid an invoice
    PAYMENT_TO_CREDIT = "payment_to_credit"  # (+) money for an invoice that no longer took it
    CREDIT_APPLIED = "credit_applied"  # (−) credit used as an invoice's discount
    CREDIT_RESTORED = "credit_restored"  # (+) a voided open invoice's discount back
    UNUSED_PERIOD_CREDIT = "unused_period_credit"  # (+) a voided paid invoice's whole amount back
    PRORATION_CREDIT = "proration_credit"  # (+) the unused part of a period left by a cycle change
    PERIOD_USED = "period_used"  # (−, not balance) the used part of that period
    REFUND = "refund"  # (−) balance given back
    CREDIT_GRANTED = "credit_granted"  # (+) credit not coming from money
    CHANGE_APPLIED = "change_applied"  # (0) audit only


# The ledger kinds whose entries move `subscriptions.balance_cents`: the balance is always their sum.
BALANCE_KINDS: Final[tuple[LedgerKind, ...]] = (
    LedgerKind.PAYMENT_TO_CREDIT,
    LedgerKind.CREDIT_APPLIED,
    LedgerKind.CREDIT_RESTORED,
    LedgerKind.UNUSED_PERIOD_CREDIT,
    LedgerKind.PRORATION_CREDIT,
    LedgerKind.REFUND,
    LedgerKind.CREDIT_GRANTED,
)


def sql_in(values: type[StrEnum]) -> str:
    """`('a', 'b')` for a CHECK constraint over an enumeration."""
    return "(" + ", ".join(f"'{member.value}'" for member in values) + ")"
