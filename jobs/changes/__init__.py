"""Change requests from the main application (DESIGN §1, §2 "Change requests"), one module per flow.

`recording` keeps a request once per (organization, idempotency key); `processing` checks every rule
in a savepoint and applies the flow — `subscribe`, `cycle_change`, `payment_method`, `card`, `cancel`
(and resume), `reissue_boleto` — through the shared `outcome` step, reading with `queries`. A flow that
charges a card now lets the charge's consequence (registered per invoice kind) apply or reject it.
"""

from jobs.changes import cancel, card, cycle_change, payment_method, reissue_boleto, subscribe  # noqa: F401
from jobs.changes.outcome import WaitForCharge
from jobs.changes.processing import (
    preview_change_request,
    process_change_request,
    process_request,
    submit_change_request,
    submit_request,
)
from jobs.changes.recording import (
    IdempotencyKeyReused,
    Recorded,
    UnrecordableChangeRequest,
    change_date,
    pending_change_request_ids,
    record_change_request,
)

__all__ = [
    "IdempotencyKeyReused",
    "Recorded",
    "UnrecordableChangeRequest",
    "WaitForCharge",
    "change_date",
    "pending_change_request_ids",
    "preview_change_request",
    "process_change_request",
    "process_request",
    "record_change_request",
    "submit_change_request",
    "submit_request",
]
