"""`renova ledger check`: prove from the database alone that no money was kept or lost.

Every rule is one set-based SELECT over whole tables (GROUP BY and window functions, never a query
per row, so it runs on 100k subscriptions), and all rules are a single statement: they read one
snapshot, so a payment committed while the check runs can never look half-recorded, and the check
never writes (read-only by construction, safe to run on the primary while workers bill).

Ledger kinds and their signs are declared in `models.states.LedgerKind` (DESIGN "Cycle change and
proration", "Renewals, boletos, dunning", "Ending a subscription and refunds"); the SQL below names
them as literals because it is SQL.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from models.money import format_brl
from models.schema import Subscription
from models.states import BALANCE_KINDS, ChargeStatus, SubscriptionStatus  # BALANCE_KINDS: also imported from here

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
# extra numbers the message explains. The `__…__` markers are replaced by constant scope conditions
# (never by input: the subscription id is a bound parameter).
#
# Shape, for speed on 100k subscriptions: the ledger is aggregated once per invoice and once per
# subscription, the gateway's money once per invoice, and everything known about an invoice is joined
# once into `invoice_facts`; each invoice rule is then a plain filter over it, never another join of
# millions of rows.
_CHECK_SQL: Final = """
WITH
subs AS (
    SELECT id, status, balance_cents, current_period_end FROM subscriptions WHERE __SUBSCRIPTIONS__
),
by_subscription AS (
    SELECT subscription_id,
           sum(amount_cents) FILTER (WHERE kind = ANY(:balance_kinds)) AS balance,
           sum(amount_cents) FILTER (WHERE kind IN ('payment', 'payment_to_credit')) AS received,
           -sum(amount_cents) FILTER (WHERE kind = 'refund') AS refunded
    FROM ledger_entries WHERE __ROWS__ GROUP BY subscription_id
),
by_invoice AS (
    SELECT invoice_id,
           count(*) FILTER (WHERE kind = 'payment') AS payments,
           count(*) FILTER (WHERE kind = 'payment_to_credit') AS to_credit_entries,
           sum(amount_cents) FILTER (WHERE kind = 'payment') AS paid,
           sum(amount_cents) FILTER (WHERE kind = 'payment_to_credit') AS to_credit,
           -sum(amount_cents) FILTER (WHERE kind = 'credit_applied') AS credit_applied,
           sum(amount_cents) FILTER (WHERE kind = 'credit_restored') AS credit_restored,
           sum(amount_cents) FILTER (WHERE kind = 'unused_period_credit') AS unused,
           count(*) FILTER (WHERE kind IN ('period_used', 'proration_credit')) AS proration_entries,
           -sum(amount_cents) FILTER (WHERE kind = 'period_used') AS used,
           sum(amount_cents) FILTER (WHERE kind = 'proration_credit') AS prorated,
           -- A malformed date must not abort the whole check: such a period simply stays in use.
           min(CASE WHEN details ->> 'on' ~ '^[0-9]{4}-[0-9]{2}-[0-9]{2}$' THEN CAST(details ->> 'on' AS date) END)
               FILTER (WHERE kind = 'period_used') AS used_until
    FROM ledger_entries WHERE invoice_id IS NOT NULL AND __ROWS__ GROUP BY invoice_id
),
-- Money the gateway took, per invoice: succeeded charges, and paid boletos (what the payer actually
-- paid; rows from before that column existed hold the boleto's amount). Aggregated per table rather
-- than over a UNION, whose row count the planner cannot estimate.
charges_by_invoice AS (
    SELECT invoice_id, count(*) AS successes, sum(amount_cents) AS cents
    FROM charges WHERE status = 'succeeded' AND __INVOICE_ROWS__ GROUP BY invoice_id
),
boletos_by_invoice AS (
    SELECT invoice_id, count(*) AS successes, sum(coalesce(paid_amount_cents, amount_cents)) AS cents
    FROM boletos WHERE status = 'paid' AND __INVOICE_ROWS__ GROUP BY invoice_id
),
invoice_facts AS (
    SELECT i.id, i.subscription_id, i.status, i.amount_cents, i.total_cents, i.period_start, i.paid_on,
           (l.invoice_id IS NOT NULL) AS has_entries,
           (c.invoice_id IS NOT NULL OR b.invoice_id IS NOT NULL) AS has_gateway,
           coalesce(l.payments, 0) AS payments,
           coalesce(l.to_credit_entries, 0) AS to_credit_entries,
           coalesce(l.paid, 0) AS paid,
           coalesce(l.to_credit, 0) AS to_credit,
           coalesce(l.credit_applied, 0) AS credit_applied,
           coalesce(l.credit_restored, 0) AS credit_restored,
           coalesce(l.unused, 0) AS unused,
           coalesce(l.proration_entries, 0) AS proration_entries,
           coalesce(l.used, 0) AS used,
           coalesce(l.prorated, 0) AS prorated,
           coalesce(c.successes, 0) + coalesce(b.successes, 0) AS successes,
           coalesce(c.cents, 0) + coalesce(b.cents, 0) AS received,
           -- A period left by a cycle change is in use only until the change date (period_used.details.on).
           daterange(i.period_start,
                     greatest(i.period_start, least(i.period_end, coalesce(l.used_until, i.period_end)))) AS in_use
    FROM invoices i
    LEFT JOIN by_invoice l ON l.invoice_id = i.id
    LEFT JOIN charges_by_invoice c ON c.invoice_id = i.id
    LEFT JOIN boletos_by_invoice b ON b.invoice_id = i.id
    WHERE __ROWS__
),
gateway_by_subscription AS (
    SELECT subscription_id, sum(received) AS cents, sum(successes) AS successes
    FROM invoice_facts WHERE has_gateway GROUP BY subscription_id
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
overlapping AS (
    -- Sorted by start, an invoice overlaps an earlier one exactly when it starts before the latest end
    -- among those; that latest one is the invoice it overlaps. Its end (days since 1900) and its id
    -- (below 10^13) are packed into one bigint so that a single running max finds both: O(n log n) per
    -- subscription instead of comparing every pair of invoices.
    SELECT id, subscription_id, in_use, latest_earlier / 10000000000000 AS other_end_day,
           latest_earlier % 10000000000000 AS other_id
    FROM (
        SELECT id, subscription_id, in_use,
               max(CAST(upper(in_use) - DATE '1900-01-01' AS bigint) * 10000000000000 + id) OVER (
                   PARTITION BY subscription_id ORDER BY lower(in_use), id
                   ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING
               ) AS latest_earlier
        FROM invoice_facts WHERE status <> 'void' AND NOT isempty(in_use)
    ) ordered
    WHERE lower(in_use) - DATE '1900-01-01' < latest_earlier / 10000000000000
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
FROM invoice_facts i JOIN subs s ON s.id = i.subscription_id
WHERE s.status = 'canceled' AND i.status = 'open'

UNION ALL
SELECT 'paid_invoice', subscription_id, id, to_jsonb(amount_cents), to_jsonb(paid + credit_applied),
       jsonb_build_object('paid', paid, 'credit', credit_applied)
FROM invoice_facts
WHERE status = 'paid' AND paid + credit_applied <> amount_cents

UNION ALL
-- A voided invoice that had been paid (by money, or entirely by credit: then only paid_on tells)
-- gives its whole amount back to the balance.
SELECT 'voided_paid_invoice', subscription_id, id, to_jsonb(amount_cents), to_jsonb(unused),
       jsonb_build_object('paid', paid, 'credit', credit_applied)
FROM invoice_facts
WHERE status = 'void' AND (payments > 0 OR paid_on IS NOT NULL) AND unused <> amount_cents

UNION ALL
-- A voided invoice that was never paid gives back the credit that had been applied to it.
SELECT 'voided_invoice_credit', subscription_id, id, to_jsonb(credit_applied), to_jsonb(credit_restored + unused), NULL
FROM invoice_facts
WHERE status = 'void' AND payments = 0 AND paid_on IS NULL AND credit_restored + unused <> credit_applied

UNION ALL
SELECT 'paid_twice', subscription_id, id, to_jsonb(1), to_jsonb(payments), jsonb_build_object('case', 'entries')
FROM invoice_facts
WHERE payments > 1

UNION ALL
-- Money the gateway took for an invoice (each succeeded charge, each paid boleto) must all be in the
-- ledger against it, as its payment or as credit. Compared in cents, not in entries: an overpaid
-- boleto is one gateway payment recorded as `payment` plus `payment_to_credit` for the excess.
SELECT 'paid_twice', subscription_id, id, to_jsonb(received), to_jsonb(paid + to_credit),
       jsonb_build_object('case', 'gateway', 'successes', successes, 'entries', payments + to_credit_entries)
FROM invoice_facts
WHERE (has_gateway OR has_entries) AND received <> paid + to_credit

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
SELECT 'proration', subscription_id, id, to_jsonb(amount_cents), to_jsonb(used + prorated),
       jsonb_build_object('used', used, 'credit', prorated)
FROM invoice_facts
WHERE proration_entries > 0 AND used + prorated <> amount_cents

UNION ALL
SELECT 'overlap', o.subscription_id, o.id,
       to_jsonb(format('[%s, %s)', e.period_start, DATE '1900-01-01' + CAST(o.other_end_day AS integer))),
       to_jsonb(format('[%s, %s)', lower(o.in_use), upper(o.in_use))),
       jsonb_build_object('other_invoice_id', o.other_id)
FROM overlapping o JOIN invoices e ON e.id = o.other_id

UNION ALL
-- A live subscription may hold its next period paid ahead (a renewal boleto paid before T starts
-- exactly at current_period_end); anything later, or anything at or after an ended one's end, is
-- a period paid for and never served.
SELECT 'unused_period', s.id, i.id,
       to_jsonb(CAST(s.current_period_end AS text)), to_jsonb(CAST(i.period_start AS text)),
       jsonb_build_object('status', s.status, 'amount', i.amount_cents)
FROM invoice_facts i JOIN subs s ON s.id = i.subscription_id
WHERE i.status = 'paid'
  AND CASE WHEN s.status = 'canceled' THEN i.period_start >= s.current_period_end
           ELSE i.period_start > s.current_period_end END
"""


def _sql(subscription_id: int | None) -> str:
    if subscription_id is None:
        scopes = {"__SUBSCRIPTIONS__": "TRUE", "__ROWS__": "TRUE", "__INVOICE_ROWS__": "TRUE"}
    else:
        scopes = {
            "__SUBSCRIPTIONS__": "id = :subscription_id",
            "__ROWS__": "subscription_id = :subscription_id",
            "__INVOICE_ROWS__": "invoice_id IN (SELECT id FROM invoices WHERE subscription_id = :subscription_id)",
        }
    sql = _CHECK_SQL
    for marker, condition in scopes.items():
        sql = sql.replace(marker, condition)
    return sql


def check_ledger(session: Session, subscription_id: int | None = None) -> list[Violation]:
    """Every violation of the ledger rules, for one subscription or all of them (read-only)."""
    params: dict[str, Any] = {"balance_kinds": [kind.value for kind in BALANCE_KINDS]}
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
        status = facts["charge_status"]
        taken = f"took {_money(expected)}" if status == ChargeStatus.SUCCEEDED else f"is {status}"
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
    if facts["status"] == SubscriptionStatus.CANCELED:
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
