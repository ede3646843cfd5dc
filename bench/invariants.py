"""What must hold after every scenario, whatever its speed: one invoice per subscription and period, at
most one successful charge per invoice (and per idempotency key) in the sandbox's ledger, and a clean
`renova ledger check`. Each broken rule is one short line for the table."""

from __future__ import annotations

from collections import Counter

import httpx
from sqlalchemy import text
from sqlalchemy.orm import Session

_INVOICES_TWICE = text(
    "SELECT count(*) FROM (SELECT 1 FROM invoices GROUP BY subscription_id, period_start HAVING count(*) > 1) twice"
)


def check_invariants(session: Session, gateway_url: str, api_key: str) -> list[str]:
    from jobs.ledger_check import check_ledger

    broken: list[str] = []
    twice = session.scalar(_INVOICES_TWICE) or 0
    if twice:
        broken.append(f"{twice} periods invoiced twice")
    broken += sandbox_violations(gateway_url, api_key)
    violations = check_ledger(session)
    if violations:
        rules = Counter(violation.rule for violation in violations)
        broken.append("ledger check: " + ", ".join(f"{rule} ×{n}" for rule, n in rules.items()))
    return broken


def sandbox_violations(gateway_url: str, api_key: str) -> list[str]:
    try:
        response = httpx.get(
            f"{gateway_url}/sandbox/ledger",
            params={"kind": "charge"},
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=60,
        )
        response.raise_for_status()
    except httpx.HTTPError as exc:
        return [f"sandbox ledger unreadable ({exc.__class__.__name__})"]
    return charged_twice(response.json()["data"])


def charged_twice(entries: list[dict[str, object]]) -> list[str]:
    """Renova's keys are `charge:{invoice}:{attempt}`: count successful charges per key and per invoice."""
    keys = Counter(str(entry["idempotency_key"]) for entry in entries)
    invoices = Counter(key.split(":")[1] for key in keys.elements() if key.startswith("charge:"))
    broken = []
    if (n := sum(1 for count in keys.values() if count > 1)) > 0:
        broken.append(f"{n} idempotency keys charged twice")
    if (n := sum(1 for count in invoices.values() if count > 1)) > 0:
        broken.append(f"{n} invoices charged twice")
    return broken
