"""The renewal day's set-based paths (`renewals.renew_many`, `renewal_outcomes.record_outcomes`) write
exactly the rows of the per-row reference path (`renew`, `record_charge_outcome`): each scenario runs
through both, switched by the modules' flags, and the resulting rows are compared."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator
from datetime import date, timedelta
from typing import Any

import pytest
from sqlalchemy import event, select, text

from jobs import renewal_outcomes, renewals
from jobs.billing_day import TASKS, process_ids, run_day
from jobs.context import runtime
from jobs.payments import charge_and_record, record_charge_outcome
from jobs.renewals import Work, renew_many
from models.schema import Charge, Invoice, LedgerEntry, Subscription
from tests.integration.conftest import _reset_between
from tests.integration.factories import (
    ANNUAL_PRICE,
    MONTHLY_PRICE,
    make_organization,
    make_subscription,
    noon,
    seed_plans,
)
from workers.db import get_engine, get_session_factory

pytestmark = pytest.mark.usefixtures("ledger_checked")


def snapshot(session) -> dict[str, list[tuple]]:
    """The billing rows, named by organization and period (ids differ from one run to the other); a
    notice's context without the invoice id, the boleto's id, line and Pix code (the gateway numbers each boleto)."""
    queries = {
        "subscriptions": "SELECT organization_id, status, payment_method, pending_payment_method, billing_anchor, "
        "current_period_start, current_period_end, balance_cents, suspended_at FROM subscriptions",
        "invoices": "SELECT organization_id, kind, cycle, period_start, period_end, amount_cents, discount_cents, "
        "total_cents, status, method, due_date, paid_on, paid_at FROM invoices",
        "charges": "SELECT i.organization_id, i.period_start, c.attempt, c.status, c.amount_cents, c.card_token, "
        "c.card_last4, c.gateway_code, c.hard_decline, c.next_retry_on, c.resolved_at IS NOT NULL, "
        "c.gateway_id IS NOT NULL FROM charges c JOIN invoices i ON i.id = c.invoice_id",
        "ledger": "SELECT s.organization_id, i.period_start, l.kind, l.amount_cents, l.description, l.details "
        "FROM ledger_entries l JOIN subscriptions s ON s.id = l.subscription_id "
        "LEFT JOIN invoices i ON i.id = l.invoice_id",
        "notifications": "SELECT n.organization_id, n.kind, "
        "(n.context - 'invoice_id' - 'digitable_line' - 'pix_code' - 'boleto_id')::text, "
        "regexp_replace(n.dedupe_key, ':[0-9]+$', ''), n.recipients::text FROM notifications n",
    }
    return {name: sorted(map(tuple, session.execute(text(sql)).all()), key=repr) for name, sql in queries.items()}


@pytest.fixture
def paths(monkeypatch) -> Iterator[Callable[[bool], None]]:
    def switch(on: bool) -> None:
        monkeypatch.setattr(renewals, "SET_BASED_RENEWALS", on)
        monkeypatch.setattr(renewal_outcomes, "SET_BASED_OUTCOMES", on)

    yield switch


@pytest.fixture
def taken(monkeypatch) -> dict[str, set[int]]:
    """What the set paths took: the subscriptions renewed as a set, the charges recorded as a set."""
    seen: dict[str, set[int]] = {"renewed": set(), "recorded": set()}
    original_renew_many, original_record = renewals.renew_many, renewal_outcomes.record_plain_successes

    def spy_renew_many(session, ids, work):
        left = original_renew_many(session, ids, work)
        seen["renewed"] |= set(ids) - set(left)
        return left

    def spy_record(session, outcomes, **kwargs):
        statuses = original_record(session, outcomes, **kwargs)
        seen["recorded"] |= set(statuses)
        return statuses

    monkeypatch.setattr(renewal_outcomes, "record_plain_successes", spy_record)
    monkeypatch.setitem(TASKS, "renew", dataclasses.replace(TASKS["renew"], handle_many=spy_renew_many))
    return seen


def both_paths(session, paths, scenario: Callable[[], Any], run: Callable[[], None]) -> dict[str, list[tuple]]:
    """`scenario` then `run` per-row, then again set-based from an empty database; the rows must match."""
    paths(False)
    scenario()
    session.commit()
    run()
    session.expire_all()
    per_row = snapshot(session)
    _reset_between(session)
    paths(True)
    scenario()
    session.commit()
    run()
    session.expire_all()
    set_based = snapshot(session)
    for table in per_row:
        assert set_based[table] == per_row[table], table
    return set_based


def travel(session, gateway, start: date, end: date) -> None:
    day = start
    while day <= end:
        run_day(session, gateway, day, noon(day), runtime().config)
        day += timedelta(days=1)


def mixed_chunk(session, renewal: date) -> None:
    """One subscription of each kind, all renewing on `renewal`."""
    seed_plans(session)
    monthly_anchor = renewal.replace(month=renewal.month - 1) if renewal.month > 1 else renewal.replace(day=1)
    monthly = {"cycle": "monthly", "method": "card", "anchor": monthly_anchor}
    make_subscription(session, make_organization(session, 1), **monthly)  # plain
    make_subscription(session, make_organization(session, 2), **monthly, balance_cents=1_000)  # partly credit
    make_subscription(session, make_organization(session, 3), **monthly, balance_cents=MONTHLY_PRICE + 7)  # credit
    make_subscription(session, make_organization(session, 4, card_token=None), **monthly, balance_cents=MONTHLY_PRICE)
    make_subscription(session, make_organization(session, 5, card_token="tok_insufficient_funds"), **monthly)
    make_subscription(session, make_organization(session, 6, card_token="tok_expired"), **monthly)
    make_subscription(session, make_organization(session, 7, card_token=None), **monthly)  # no card
    ending = make_subscription(session, make_organization(session, 8), **monthly)
    ending.cancel_at_period_end = True
    annual_anchor = renewal.replace(year=renewal.year - 1)
    to_card = make_subscription(
        session, make_organization(session, 9), cycle="annual", method="boleto", anchor=annual_anchor
    )
    to_card.pending_payment_method = "card"
    to_boleto = make_subscription(
        session, make_organization(session, 10), cycle="annual", method="card", anchor=annual_anchor
    )
    to_boleto.pending_payment_method = "boleto"
    covered_switch = make_subscription(
        session,
        make_organization(session, 11),
        cycle="annual",
        method="boleto",
        anchor=annual_anchor,
        balance_cents=ANNUAL_PRICE,
    )
    covered_switch.pending_payment_method = "card"
    past_due_covered = make_subscription(
        session, make_organization(session, 12), **monthly, balance_cents=MONTHLY_PRICE
    )
    past_due_covered.status = "past_due"
    past_due = make_subscription(session, make_organization(session, 13), **monthly)
    past_due.status = "past_due"
    make_subscription(session, make_organization(session, 14), cycle="annual", method="card", anchor=annual_anchor)


def test_a_mixed_chunk_is_renewed_and_recorded_as_per_row(session, billing_gateway, paths, taken):
    renewal = date(2027, 5, 10)
    rows = both_paths(
        session,
        paths,
        lambda: mixed_chunk(session, renewal),
        lambda: travel(session, billing_gateway, renewal, renewal + timedelta(days=8)),
    )
    organizations = dict(session.execute(select(Subscription.id, Subscription.organization_id)).all())
    renewed_as_set = sorted(organizations[subscription_id] for subscription_id in taken["renewed"])
    # Taken as sets: plain, partly and wholly credited (active), the switch to card (charged or covered),
    # the declining cards' first attempts (their outcomes are recorded one by one), a past-due card.
    assert renewed_as_set == [1, 2, 3, 4, 5, 6, 9, 11, 13, 14]
    recorded = session.scalars(
        select(Invoice.organization_id)
        .join(Charge, Charge.invoice_id == Invoice.id)
        .where(Charge.id.in_(taken["recorded"]))
    ).all()
    assert sorted(recorded) == [1, 2, 9, 14]  # past due (13) reactivates: one by one
    assert "charge_failed" in {kind for _, kind, *_ in rows["notifications"]}
    assert "payment_method_switch_applied" in {kind for _, kind, *_ in rows["notifications"]}
    assert "subscription_reactivated" in {kind for _, kind, *_ in rows["notifications"]}


@pytest.mark.parametrize(
    ("cycle", "anchor", "start", "end"),
    [
        ("monthly", date(2027, 12, 31), date(2028, 1, 31), date(2028, 4, 30)),  # 31st: Feb 29, Mar 31, Apr 30
        ("annual", date(2024, 2, 29), date(2027, 2, 28), date(2028, 3, 1)),  # Feb 29 anchor: Feb 28, then Feb 29
    ],
)
def test_month_end_and_leap_day_anchors_in_a_chunk(session, billing_gateway, paths, taken, cycle, anchor, start, end):
    def scenario() -> None:
        seed_plans(session)
        for number, balance in ((1, 0), (2, 1_000), (3, ANNUAL_PRICE * 2)):
            make_subscription(
                session,
                make_organization(session, number),
                cycle=cycle,
                method="card",
                anchor=anchor,
                periods_elapsed=(start.year - anchor.year - 1) if cycle == "annual" else 0,
                balance_cents=balance,
            )
        make_subscription(
            session,
            make_organization(session, 4, card_token="tok_do_not_honor"),
            cycle=cycle,
            method="card",
            anchor=anchor,
            periods_elapsed=(start.year - anchor.year - 1) if cycle == "annual" else 0,
        )

    def run() -> None:
        if cycle == "monthly":
            travel(session, billing_gateway, start - timedelta(days=1), end)
        else:  # the two renewals, a year apart, each with its days of dunning
            travel(session, billing_gateway, start - timedelta(days=1), start + timedelta(days=8))
            travel(session, billing_gateway, end - timedelta(days=2), end + timedelta(days=8))

    rows = both_paths(session, paths, scenario, run)
    periods = {(organization, period_start) for organization, _, _, period_start, *_ in rows["invoices"]}
    expected = {date(2028, 2, 29), date(2028, 3, 31), date(2028, 4, 30)} if cycle == "monthly" else {date(2028, 2, 29)}
    assert expected <= {period_start for organization, period_start in periods if organization == 1}
    assert taken["renewed"] and taken["recorded"]


def test_a_duplicate_chunk_message_changes_nothing(session, billing_gateway, sandbox_gateway, taken):
    renewal = date(2027, 5, 10)
    mixed_chunk(session, renewal)
    session.commit()
    ids = sorted(session.scalars(select(Subscription.id)))
    config = runtime().config
    before = len(sandbox_gateway.ledger(kind="charge"))
    process_ids(session, "renew", ids, on=renewal, now=noon(renewal), gateway=billing_gateway, config=config)
    session.expire_all()
    once = snapshot(session)
    charged = len(sandbox_gateway.ledger(kind="charge")) - before
    process_ids(session, "renew", ids, on=renewal, now=noon(renewal), gateway=billing_gateway, config=config)
    session.expire_all()
    assert snapshot(session) == once
    assert len(sandbox_gateway.ledger(kind="charge")) - before == charged
    assert taken["recorded"]


def test_a_chunk_of_phase_1_sent_twice_records_each_outcome_once(session, billing_gateway, sandbox_gateway):
    """The same prepared charges reach phase 3 twice (a duplicated message after phase 1): the second
    time the gateway replays its answers and nothing is recorded again."""
    renewal = date(2027, 5, 10)
    mixed_chunk(session, renewal)
    session.commit()
    ids = sorted(session.scalars(select(Subscription.id)))
    work = Work(on=renewal, now=noon(renewal), config=runtime().config, gateway=billing_gateway)
    renew_many(session, ids, work)
    session.commit()
    prepared = list(work.charges)
    config = runtime().config
    first = charge_and_record(session, billing_gateway, prepared, on=renewal, now=noon(renewal), config=config)
    session.expire_all()
    once = snapshot(session)
    for again in (prepared, prepared + prepared):  # as a set (each found resolved), then one by one
        assert charge_and_record(session, billing_gateway, again, on=renewal, now=noon(renewal), config=config) == first
        session.expire_all()
        assert snapshot(session) == once
    payments = session.scalars(
        select(LedgerEntry.invoice_id).where(
            LedgerEntry.kind == "payment",
            LedgerEntry.invoice_id.in_(select(Charge.invoice_id).where(Charge.id.in_(list(first)))),
        )
    ).all()
    assert len(payments) == len(set(payments)) == sum(status == "succeeded" for status in first.values())


def test_an_outcome_recorded_meanwhile_by_another_worker_is_not_recorded_again_as_a_set(session, billing_gateway):
    """Another worker (the janitor) holds a charge's lock and records its success; the chunk's set
    path waits for the lock, then finds it resolved and records nothing for it."""
    renewal = date(2027, 5, 10)
    seed_plans(session)
    for number in (1, 2, 3):
        make_subscription(
            session, make_organization(session, number), cycle="monthly", method="card", anchor=date(2027, 4, 10)
        )
    session.commit()
    ids = sorted(session.scalars(select(Subscription.id)))
    config = runtime().config
    work = Work(on=renewal, now=noon(renewal), config=config, gateway=billing_gateway)
    assert renew_many(session, ids, work) == []
    session.commit()
    charges = session.scalars(select(Charge).order_by(Charge.id)).all()  # held by this session: pending
    contested = charges[1]
    request = next(item.request for item in work.charges if item.charge_id == contested.id)
    found = billing_gateway.charge(
        request.card_token, request.amount_cents, request.idempotency_key, request.description
    )

    janitor = get_session_factory()()
    try:
        record_charge_outcome(janitor, contested.id, found, on=renewal, now=noon(renewal), config=config)
        janitor.flush()  # the charge and its subscription stay locked until the janitor commits
        statuses: dict[int, str] = {}
        chunk = threading.Thread(
            target=lambda: statuses.update(
                charge_and_record(session, billing_gateway, work.charges, on=renewal, now=noon(renewal), config=config)
            )
        )
        chunk.start()
        chunk.join(timeout=1.0)
        assert chunk.is_alive()  # waiting on the janitor's lock
        janitor.commit()
        chunk.join(timeout=15)
        assert not chunk.is_alive()
    finally:
        janitor.close()
    assert set(statuses.values()) == {"succeeded"}
    session.expire_all()
    kinds = session.execute(select(LedgerEntry.invoice_id, LedgerEntry.kind).where(LedgerEntry.kind == "payment")).all()
    assert sorted(invoice for invoice, _ in kinds) == sorted(charge.invoice_id for charge in charges)
    assert session.get_one(Charge, contested.id).status == "succeeded"
    assert session.scalar(select(Charge.gateway_id).where(Charge.id == contested.id)) == found.gateway_id


def test_an_invoice_voided_while_its_charge_was_in_flight_becomes_credit_as_per_row(session, billing_gateway, paths):
    """Not a plain success: the money goes to credit through `record_charge_outcome`."""
    renewal = date(2027, 5, 10)
    config = runtime().config

    def scenario() -> None:
        seed_plans(session)
        for number in (1, 2):
            make_subscription(
                session, make_organization(session, number), cycle="monthly", method="card", anchor=date(2027, 4, 10)
            )

    def run() -> None:
        ids = sorted(session.scalars(select(Subscription.id)))
        work = Work(on=renewal, now=noon(renewal), config=config, gateway=billing_gateway)
        for subscription_id in renewals.renew_many(session, ids, work):
            renewals.renew(session, subscription_id, work)
        session.commit()
        voided = session.scalars(select(Invoice).where(Invoice.organization_id == 2, Invoice.kind == "renewal")).one()
        voided.status = "void"  # as a change would while the charge was in flight (no credit was applied)
        session.commit()
        charge_and_record(session, billing_gateway, work.charges, on=renewal, now=noon(renewal), config=config)

    rows = both_paths(session, paths, scenario, run)
    assert any(kind == "payment_to_credit" for _, _, kind, *_ in rows["ledger"])


def count_statements(run: Callable[[], None]) -> int:
    count = 0

    def counter(*args: Any) -> None:
        nonlocal count
        count += 1

    event.listen(get_engine(), "before_cursor_execute", counter)
    try:
        run()
    finally:
        event.remove(get_engine(), "before_cursor_execute", counter)
    return count


def test_phase_3_of_plain_successes_costs_a_few_statements_per_chunk(session, billing_gateway, paths):
    """Per-row phase 3 costs several statements per charge; the set path a fixed few per chunk."""
    renewal = date(2027, 5, 10)
    config = runtime().config
    counts = {}
    for set_based in (False, True):
        paths(set_based)
        _reset_between(session)
        seed_plans(session)
        for number in range(1, 21):
            make_subscription(
                session, make_organization(session, number), cycle="monthly", method="card", anchor=date(2027, 4, 10)
            )
        session.commit()
        work = Work(on=renewal, now=noon(renewal), config=config, gateway=billing_gateway)
        for subscription_id in renewals.renew_many(session, sorted(session.scalars(select(Subscription.id))), work):
            renewals.renew(session, subscription_id, work)
        session.commit()
        counts[set_based] = count_statements(
            lambda work=work: charge_and_record(
                session, billing_gateway, work.charges, on=renewal, now=noon(renewal), config=config
            )
        )
    print(f"phase 3 of 20 plain successes: {counts[False]} statements one by one, {counts[True]} as a set")
    assert counts[True] <= 8  # lock charges, lock subscriptions, 2 updates, ledger and notices inserts
    assert counts[False] >= 6 * 20
