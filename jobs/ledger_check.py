"""`renova ledger check`: prove from the database alone that no money was kept or lost.

Every rule is one set-based SELECT over whole tables (GROUP BY and window functions, never a query
per row, so it runs on 100k subscriptions), and all rules are a single statement: they read one
snapshot, so a payment committed while the check runs can never look half-recorded, and the check
never writes (read-only by construction, safe to run on the primary while workers bill).

Ledger kinds and signs (DESIGN "Cycle change and proration", "Renewals, boletos, dunning", "Ending a
subscription and refunds"): `payment` (+) money that paid an invoice; `payment_to_credit` (+) money
for an invoice that no longer took it; `credit_applied` (−) credit used as an invoice's discount;
`credit_restored` (+) a voided open invoice's discount back; `unused_period_credit` (+) a voided paid
invoice's whole amount back; `proration_credit` (+) and `period_used` (−, not balance) the two halves
of a paid period left by a cycle change; `refund` (−) balance given back; `credit_granted` (+) credit
not coming from money; `change_applied` (0) audit only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from models.money import format_brl
from models.schema import Subscription

# The kinds whose entries move `subscriptions.balance_cents`: the balance is always their sum.
BALANCE_KINDS: Final = (
    "payment_to_credit",
    "credit_applied",
    "credit_restored",
    "unused_period_credit",
    "proration_credit",
    "refund",
    "credit_granted",
)

# Every rule the check enforces, in the order it reports them.
RULES: Final = (
    "balance",
    "ended_balance",
    "ended_open_invoice",
    "paid_invoice",
    "voided_paid_invoice",
    "voided_invoice_credit",
    "paid_twice",
    "money_received",
    "refunds",
    "proration",
    "overlap",
    "unused_period",
)


@dataclass(frozen=True)
class Violation:
    """One broken rule: what the numbers should be (`expected`) and what the database holds (`found`)."""

    rule: str
    subscription_id: int | None
    invoice_id: int | None
    expected: int | str
    found: int | str
    message: str


# Each rule selects (rule, subscription_id, invoice_id, expected, found, facts): expected and found as
# jsonb so that cents stay integers and dates/ranges stay text through one UNION; facts carries the
# extra numbers the message explains. `__SUBSCRIPTIONS__` / `__ROWS__` are replaced by constant
# scope conditions (never by input: the subscription id is a bound parameter).
_CHECK_SQL: Final = """
WITH
subs AS (
    SELECT id, status, balance_cents, current_period_end FROM subscriptions WHERE __SUBSCRIPTIONS__
),
invs AS (
    SELECT id, subscription_id, status, amount_cents, discount_cents, total_cents, period_start, period_end, paid_on
    FROM invoices WHERE __ROWS__
),
entries AS (
    SELECT subscription_id, invoice_id, kind, amount_cents, details FROM ledger_entries WHERE __ROWS__
),
by_subscription AS (
    SELECT subscription_id,
           coalesce(sum(amount_cents) FILTER (WHERE kind = ANY(:balance_kinds)), 0) AS balance,
           coalesce(sum(amount_cents) FILTER (WHERE kind IN ('payment', 'payment_to_credit')), 0) AS received,
           coalesce(-sum(amount_cents) FILTER (WHERE kind = 'refund'), 0) AS refunded
    FROM entries GROUP BY subscription_id
),
by_invoice AS (
    SELECT invoice_id,
           count(*) FILTER (WHERE kind = 'payment') AS payments,
           count(*) FILTER (WHERE kind = 'payment_to_credit') AS to_credit_entries,
           coalesce(sum(amount_cents) FILTER (WHERE kind = 'payment'), 0) AS paid,
           coalesce(sum(amount_cents) FILTER (WHERE kind = 'payment_to_credit'), 0) AS to_credit,
           coalesce(-sum(amount_cents) FILTER (WHERE kind = 'credit_applied'), 0) AS credit_applied,
           coalesce(sum(amount_cents) FILTER (WHERE kind = 'credit_restored'), 0) AS credit_restored,
           coalesce(sum(amount_cents) FILTER (WHERE kind = 'unused_period_credit'), 0) AS unused,
           count(*) FILTER (WHERE kind IN ('period_used', 'proration_credit')) AS proration_entries,
           coalesce(-sum(amount_cents) FILTER (WHERE kind = 'period_used'), 0) AS used,
           coalesce(sum(amount_cents) FILTER (WHERE kind = 'proration_credit'), 0) AS prorated,
           -- A malformed date must not abort the whole check: such a period simply stays in use.
           min(CASE WHEN details ->> 'on' ~ '^[0-9]{4}-[0-9]{2}-[0-9]{2}$' THEN CAST(details ->> 'on' AS date) END)
               FILTER (WHERE kind = 'period_used') AS used_until
    FROM entries WHERE invoice_id IS NOT NULL GROUP BY invoice_id
),
gateway_by_invoice AS (
    SELECT invoice_id, count(*) AS successes, sum(cents) AS cents FROM (
        SELECT c.invoice_id, c.amount_cents AS cents
        FROM charges c JOIN invs i ON i.id = c.invoice_id WHERE c.status = 'succeeded'
        UNION ALL
        -- What the payer actually paid; rows from before that column existed hold the boleto's amount.
        SELECT b.invoice_id, coalesce(b.paid_amount_cents, b.amount_cents)
        FROM boletos b JOIN invs i ON i.id = b.invoice_id WHERE b.status = 'paid'
    ) received GROUP BY invoice_id
),
gateway_by_subscription AS (
    SELECT i.subscription_id, sum(g.cents) AS cents, sum(g.successes) AS successes
    FROM gateway_by_invoice g JOIN invs i ON i.id = g.invoice_id GROUP BY i.subscription_id
),
refunds_by_subscription AS (
    -- A failed card refund is replaced by a payout for the same money: only the others count.
    SELECT subscription_id, sum(amount_cents) AS cents, count(*) AS refunds
    FROM refunds WHERE status <> 'failed' AND __ROWS__ GROUP BY subscription_id
),
card_refunds_by_charge AS (
    SELECT charge_id, min(subscription_id) AS subscription_id, sum(amount_cents) AS cents
    FROM refunds WHERE method = 'card' AND status <> 'failed' AND __ROWS__ GROUP BY charge_id
),
in_use AS (
    -- A period left by a cycle change is in use only until the change date (period_used.details.on).
    SELECT i.id, i.subscription_id,
           daterange(i.period_start,
                     greatest(i.period_start, least(i.period_end, coalesce(l.used_until, i.period_end)))) AS period
    FROM invs i LEFT JOIN by_invoice l ON l.invoice_id = i.id
    WHERE i.status <> 'void'
),
ordered AS (
    -- Sorted by start, an invoice overlaps an earlier one exactly when it starts before the latest
    -- end among those earlier ones; that latest one (its end, then its id, packed to sort as text)
    -- is the invoice it overlaps. O(n log n) per subscription instead of comparing every pair.
    SELECT id, subscription_id, period,
           max(to_char(upper(period), 'YYYYMMDD') || ':' || id) OVER (
               PARTITION BY subscription_id ORDER BY lower(period), id
               ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING
           ) AS latest_earlier
    FROM in_use WHERE NOT isempty(period)
)

SELECT 'balance' AS rule, s.id AS subscription_id, NULL::bigint AS invoice_id,
       to_jsonb(coalesce(b.balance, 0)) AS expected, to_jsonb(s.balance_cents) AS found, NULL::jsonb AS facts
FROM subs s LEFT JOIN by_subscription b ON b.subscription_id = s.id
WHERE s.balance_cents <> coalesce(b.balance, 0)

UNION ALL
SELECT 'ended_balance', s.id, NULL, to_jsonb(0), to_jsonb(s.balance_cents),
       jsonb_build_object('refunds', coalesce(r.refunds, 0), 'refunded', coalesce(r.cents, 0))
FROM subs s LEFT JOIN refunds_by_subscription r ON r.subscription_id = s.id
WHERE s.status = 'canceled' AND s.balance_cents <> 0

UNION ALL
SELECT 'ended_open_invoice', s.id, i.id, to_jsonb('void'::text), to_jsonb(i.status),
       jsonb_build_object('total', i.total_cents)
FROM invs i JOIN subs s ON s.id = i.subscription_id
WHERE s.status = 'canceled' AND i.status = 'open'

UNION ALL
SELECT 'paid_invoice', i.subscription_id, i.id, to_jsonb(i.amount_cents),
       to_jsonb(coalesce(l.paid, 0) + coalesce(l.credit_applied, 0)),
       jsonb_build_object('paid', coalesce(l.paid, 0), 'credit', coalesce(l.credit_applied, 0))
FROM invs i LEFT JOIN by_invoice l ON l.invoice_id = i.id
WHERE i.status = 'paid' AND coalesce(l.paid, 0) + coalesce(l.credit_applied, 0) <> i.amount_cents

UNION ALL
-- A voided invoice that had been paid (by money, or entirely by credit: then only paid_on tells)
-- gives its whole amount back to the balance.
SELECT 'voided_paid_invoice', i.subscription_id, i.id, to_jsonb(i.amount_cents), to_jsonb(coalesce(l.unused, 0)),
       jsonb_build_object('paid', coalesce(l.paid, 0), 'credit', coalesce(l.credit_applied, 0))
FROM invs i LEFT JOIN by_invoice l ON l.invoice_id = i.id
WHERE i.status = 'void' AND (coalesce(l.payments, 0) > 0 OR i.paid_on IS NOT NULL)
  AND coalesce(l.unused, 0) <> i.amount_cents

UNION ALL
-- A voided invoice that was never paid gives back the credit that had been applied to it.
SELECT 'voided_invoice_credit', i.subscription_id, i.id, to_jsonb(coalesce(l.credit_applied, 0)),
       to_jsonb(coalesce(l.credit_restored, 0) + coalesce(l.unused, 0)), NULL
FROM invs i JOIN by_invoice l ON l.invoice_id = i.id
WHERE i.status = 'void' AND l.payments = 0 AND i.paid_on IS NULL
  AND l.credit_restored + l.unused <> l.credit_applied

UNION ALL
SELECT 'paid_twice', i.subscription_id, i.id, to_jsonb(1), to_jsonb(l.payments), jsonb_build_object('case', 'entries')
FROM invs i JOIN by_invoice l ON l.invoice_id = i.id
WHERE l.payments > 1

UNION ALL
-- Money the gateway took for an invoice (each succeeded charge, each paid boleto) must all be in the
-- ledger against it, as its payment or as credit. Compared in cents, not in entries: an overpaid
-- boleto is one gateway payment recorded as `payment` plus `payment_to_credit` for the excess.
SELECT 'paid_twice', i.subscription_id, i.id, to_jsonb(coalesce(g.cents, 0)),
       to_jsonb(coalesce(l.paid, 0) + coalesce(l.to_credit, 0)),
       jsonb_build_object('case', 'gateway', 'successes', coalesce(g.successes, 0),
                          'entries', coalesce(l.payments, 0) + coalesce(l.to_credit_entries, 0))
FROM invs i
LEFT JOIN gateway_by_invoice g ON g.invoice_id = i.id
LEFT JOIN by_invoice l ON l.invoice_id = i.id
WHERE (g.invoice_id IS NOT NULL OR l.invoice_id IS NOT NULL)
  AND coalesce(g.cents, 0) <> coalesce(l.paid, 0) + coalesce(l.to_credit, 0)

UNION ALL
SELECT 'money_received', s.id, NULL, to_jsonb(coalesce(g.cents, 0)), to_jsonb(coalesce(b.received, 0)),
       jsonb_build_object('successes', coalesce(g.successes, 0))
FROM subs s
LEFT JOIN gateway_by_subscription g ON g.subscription_id = s.id
LEFT JOIN by_subscription b ON b.subscription_id = s.id
WHERE coalesce(g.cents, 0) <> coalesce(b.received, 0)

UNION ALL
SELECT 'refunds', s.id, NULL, to_jsonb(coalesce(r.cents, 0)), to_jsonb(coalesce(b.refunded, 0)),
       jsonb_build_object('case', 'ledger', 'refunds', coalesce(r.refunds, 0))
FROM subs s
LEFT JOIN refunds_by_subscription r ON r.subscription_id = s.id
LEFT JOIN by_subscription b ON b.subscription_id = s.id
WHERE coalesce(r.cents, 0) <> coalesce(b.refunded, 0)

UNION ALL
-- Only money a charge actually took can be refunded on it.
SELECT 'refunds', r.subscription_id, c.invoice_id,
       to_jsonb(CASE WHEN c.status = 'succeeded' THEN c.amount_cents ELSE 0 END), to_jsonb(r.cents),
       jsonb_build_object('case', 'charge', 'charge_id', c.id, 'charge_status', c.status)
FROM card_refunds_by_charge r JOIN charges c ON c.id = r.charge_id
WHERE r.cents > CASE WHEN c.status = 'succeeded' THEN c.amount_cents ELSE 0 END

UNION ALL
SELECT 'proration', i.subscription_id, i.id, to_jsonb(i.amount_cents), to_jsonb(l.used + l.prorated),
       jsonb_build_object('used', l.used, 'credit', l.prorated)
FROM invs i JOIN by_invoice l ON l.invoice_id = i.id
WHERE l.proration_entries > 0 AND l.used + l.prorated <> i.amount_cents

UNION ALL
SELECT 'overlap', o.subscription_id, o.id,
       to_jsonb(format('[%s, %s)', lower(e.period), upper(e.period))),
       to_jsonb(format('[%s, %s)', lower(o.period), upper(o.period))),
       jsonb_build_object('other_invoice_id', e.id)
FROM ordered o JOIN in_use e ON e.id = CAST(split_part(o.latest_earlier, ':', 2) AS bigint)
WHERE o.latest_earlier IS NOT NULL AND lower(o.period) < upper(e.period)

UNION ALL
-- A live subscription may hold its next period paid ahead (a renewal boleto paid before T starts
-- exactly at current_period_end); anything later, or anything at or after an ended one's end, is
-- a period paid for and never served.
SELECT 'unused_period', s.id, i.id,
       to_jsonb(CAST(s.current_period_end AS text)), to_jsonb(CAST(i.period_start AS text)),
       jsonb_build_object('status', s.status, 'amount', i.amount_cents)
FROM invs i JOIN subs s ON s.id = i.subscription_id
WHERE i.status = 'paid'
  AND CASE WHEN s.status = 'canceled' THEN i.period_start >= s.current_period_end
           ELSE i.period_start > s.current_period_end END
"""


def _sql(subscription_id: int | None) -> str:
    scoped = subscription_id is not None
    return _CHECK_SQL.replace("__SUBSCRIPTIONS__", "id = :subscription_id" if scoped else "TRUE").replace(
        "__ROWS__", "subscription_id = :subscription_id" if scoped else "TRUE"
    )


def check_ledger(session: Session, subscription_id: int | None = None) -> list[Violation]:
    """Every violation of the ledger rules, for one subscription or all of them (read-only)."""
    params: dict[str, Any] = {"balance_kinds": list(BALANCE_KINDS)}
    if subscription_id is not None:
        params["subscription_id"] = subscription_id
    rows = session.execute(text(_sql(subscription_id)), params).all()
    violations = [
        Violation(
            rule=row.rule,
            subscription_id=row.subscription_id,
            invoice_id=row.invoice_id,
            expected=row.expected,
            found=row.found,
            message=_MESSAGES[row.rule](row.subscription_id, row.invoice_id, row.expected, row.found, row.facts or {}),
        )
        for row in rows
    ]
    order = {rule: index for index, rule in enumerate(RULES)}
    return sorted(violations, key=lambda v: (order[v.rule], v.subscription_id or 0, v.invoice_id or 0, str(v.expected)))


def subscriptions_checked(session: Session, subscription_id: int | None = None) -> int:
    """How many subscriptions `check_ledger` looks at with the same arguments."""
    statement = select(func.count()).select_from(Subscription)
    if subscription_id is not None:
        statement = statement.where(Subscription.id == subscription_id)
    return session.scalar(statement) or 0


# --- messages ------------------------------------------------------------------------------------

Message = Callable[[int | None, int | None, Any, Any, dict[str, Any]], str]


def _money(cents: int) -> str:
    # Babel writes a non-breaking space after "R$"; a terminal table wraps better on a plain one.
    return format_brl(int(cents)).replace("\xa0", " ")


def _balance(sub: int | None, inv: int | None, expected: Any, found: Any, facts: dict[str, Any]) -> str:
    return (
        f"subscription {sub} has a balance of {_money(found)} but its balance ledger entries add up to "
        f"{_money(expected)}: {_money(abs(found - expected))} of credit was "
        f"{'created' if found > expected else 'lost'} without a ledger entry"
    )


def _ended_balance(sub: int | None, inv: int | None, expected: Any, found: Any, facts: dict[str, Any]) -> str:
    return (
        f"subscription {sub} is canceled but still holds {_money(found)} of credit "
        f"({facts['refunds']} refund(s) of {_money(facts['refunded'])} recorded): an ended subscription's "
        "balance must be refunded, never kept"
    )


def _ended_open_invoice(sub: int | None, inv: int | None, expected: Any, found: Any, facts: dict[str, Any]) -> str:
    return (
        f"invoice {inv} ({_money(facts['total'])} due) is still open on canceled subscription {sub}: "
        "nothing is owed for service never given, it should have been voided"
    )


def _paid_invoice(sub: int | None, inv: int | None, expected: Any, found: Any, facts: dict[str, Any]) -> str:
    return (
        f"paid invoice {inv} of subscription {sub} is for {_money(expected)} but its ledger shows "
        f"{_money(facts['paid'])} paid plus {_money(facts['credit'])} of credit applied = {_money(found)}"
    )


def _voided_paid_invoice(sub: int | None, inv: int | None, expected: Any, found: Any, facts: dict[str, Any]) -> str:
    return (
        f"invoice {inv} of subscription {sub} was paid ({_money(facts['paid'])} of money, "
        f"{_money(facts['credit'])} of credit) and then voided, but only {_money(found)} of its "
        f"{_money(expected)} went back to the balance as unused period credit"
    )


def _voided_invoice_credit(sub: int | None, inv: int | None, expected: Any, found: Any, facts: dict[str, Any]) -> str:
    return (
        f"unpaid invoice {inv} of subscription {sub} was voided after {_money(expected)} of credit was applied "
        f"to it, but {_money(found)} came back to the balance"
    )


def _paid_twice(sub: int | None, inv: int | None, expected: Any, found: Any, facts: dict[str, Any]) -> str:
    if facts.get("case") == "entries":
        return f"invoice {inv} of subscription {sub} has {found} payment ledger entries: an invoice is paid once"
    return (
        f"the gateway received {_money(expected)} for invoice {inv} of subscription {sub} "
        f"({facts['successes']} succeeded charge(s) or paid boleto(s)) but the ledger records {_money(found)} "
        f"for it as payment or credit ({facts['entries']} entries): a second payment must become credit"
    )


def _money_received(sub: int | None, inv: int | None, expected: Any, found: Any, facts: dict[str, Any]) -> str:
    return (
        f"subscription {sub} received {_money(expected)} at the gateway ({facts['successes']} succeeded charge(s) "
        f"and paid boleto(s)) but its ledger records {_money(found)} of payments and payments to credit"
    )


def _refunds(sub: int | None, inv: int | None, expected: Any, found: Any, facts: dict[str, Any]) -> str:
    if facts.get("case") == "charge":
        taken = f"took {_money(expected)}" if facts["charge_status"] == "succeeded" else f"is {facts['charge_status']}"
        return (
            f"card refunds of {_money(found)} were made against charge {facts['charge_id']} of invoice {inv}, "
            f"which {taken}: a charge cannot give back more than it took"
        )
    return (
        f"subscription {sub} has {_money(expected)} in {facts['refunds']} refund(s) (not failed) but its ledger "
        f"refund entries take {_money(found)} out of the balance"
    )


def _proration(sub: int | None, inv: int | None, expected: Any, found: Any, facts: dict[str, Any]) -> str:
    return (
        f"invoice {inv} of subscription {sub} paid {_money(expected)} for its period, but a cycle change split it "
        f"into {_money(facts['used'])} used plus {_money(facts['credit'])} of credit = {_money(found)}: "
        "paid must equal used + credit"
    )


def _overlap(sub: int | None, inv: int | None, expected: Any, found: Any, facts: dict[str, Any]) -> str:
    return (
        f"invoice {inv} of subscription {sub} covers {found} while invoice {facts['other_invoice_id']} is in use "
        f"for {expected}: the same days are billed twice"
    )


def _unused_period(sub: int | None, inv: int | None, expected: Any, found: Any, facts: dict[str, Any]) -> str:
    if facts["status"] == "canceled":
        where = f"on or after {expected}, when canceled subscription {sub} ended"
    else:
        where = f"after {expected}, the end of subscription {sub}'s current period and its next renewal"
    return (
        f"paid invoice {inv} ({_money(facts['amount'])}) is for a period starting {found}, {where}: "
        "a paid period that is never served must be voided into credit"
    )


_MESSAGES: Final[dict[str, Message]] = {
    "balance": _balance,
    "ended_balance": _ended_balance,
    "ended_open_invoice": _ended_open_invoice,
    "paid_invoice": _paid_invoice,
    "voided_paid_invoice": _voided_paid_invoice,
    "voided_invoice_credit": _voided_invoice_credit,
    "paid_twice": _paid_twice,
    "money_received": _money_received,
    "refunds": _refunds,
    "proration": _proration,
    "overlap": _overlap,
    "unused_period": _unused_period,
}
