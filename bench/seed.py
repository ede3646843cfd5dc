"""Resetting the benchmark's database and seeding a renewal day with bulk SQL (`INSERT … SELECT
generate_series`): 200,000 subscriptions in seconds.

Ids are laid out so that what is due is known without asking: subscriptions 1..renewals are monthly
card renewals due on the run date; the next `boletos` are annual boleto subscriptions whose T − 7 boleto
is due on it; the rest renew later (monthly within 28 days, annual beyond the 30-day renewal notice),
so the run has exactly that work and nothing else. Organization n owns subscription n, has a card
(`tok_ok`), a CNPJ and an owner (member n·100 + 1) who is the financial responsible."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta

from sqlalchemy import text
from sqlalchemy.orm import Session

RUN_DATE = date(2027, 5, 10)
MONTHLY_CENTS = 4990
ANNUAL_CENTS = 47900
DOCUMENT = "11222333000181"
BOLETO_LEAD_DAYS = 7


@dataclass(frozen=True)
class Day:
    """What a seeded database holds: `subscriptions` in all, the first `renewals` due by card, the next
    `boletos` due a T − 7 boleto."""

    subscriptions: int
    renewals: int
    boletos: int

    @property
    def card_ids(self) -> range:
        return range(1, self.renewals + 1)

    @property
    def boleto_ids(self) -> range:
        return range(self.renewals + 1, self.renewals + self.boletos + 1)

    @property
    def first_not_due(self) -> int:
        return self.renewals + self.boletos + 1


def reset_database(session: Session, *, fresh: bool) -> None:
    """`fresh`: drop and recreate the schema and apply the migrations; otherwise empty every table."""
    from workers.db import resolved_urls
    from workers.migrate import upgrade

    if fresh:
        session.execute(text("DROP SCHEMA public CASCADE"))
        session.execute(text("CREATE SCHEMA public"))
        session.commit()
        upgrade(resolved_urls()[0])
        return
    tables = session.scalars(
        text("SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'alembic_version'")
    ).all()
    session.execute(text(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE"))
    session.commit()


def seed_day(session: Session, day: Day, on: date = RUN_DATE) -> None:
    from models.schema import Plan

    if day.renewals + day.boletos > day.subscriptions:
        raise ValueError("more subscriptions due than seeded")
    session.add_all(
        [
            Plan(product="conecta", cycle="monthly", price_cents=MONTHLY_CENTS),
            Plan(product="conecta", cycle="annual", price_cents=ANNUAL_CENTS),
        ]
    )
    n = {"n": day.subscriptions}
    # Seeded rows are the scenario's starting state, not changes anyone made: no events for them
    # (the triggers of migration 0008 are skipped for this transaction only).
    session.execute(text("SET LOCAL session_replication_role = replica"))
    session.execute(
        text(
            "INSERT INTO organizations (id, name, document) SELECT g, 'Org ' || g, :doc FROM generate_series(1, CAST(:n AS int)) g"
        ),
        {**n, "doc": DOCUMENT},
    )
    session.execute(
        text(
            "INSERT INTO members (id, organization_id, name, email, role, financial_responsible) "
            "SELECT g * 100 + 1, g, 'Dona ' || g, 'dona' || g || '@org.example', 'owner', true "
            "FROM generate_series(1, CAST(:n AS int)) g"
        ),
        n,
    )
    session.execute(
        text(
            "INSERT INTO cards (organization_id, token, brand, last4, exp_month, exp_year) "
            "SELECT g, 'tok_ok', 'visa', '4242', 12, 2035 FROM generate_series(1, CAST(:n AS int)) g"
        ),
        n,
    )
    # (id, cycle, method, period end); the period starts one cycle before its end.
    boleto_due = on + timedelta(days=BOLETO_LEAD_DAYS)
    session.execute(
        text(
            """
            INSERT INTO subscriptions (id, organization_id, cycle, payment_method, billing_anchor,
                                       current_period_start, current_period_end)
            SELECT g, g, plan.cycle, plan.method,
                   plan.period_end - CASE WHEN plan.cycle = 'annual' THEN interval '1 year' ELSE interval '1 month' END,
                   plan.period_end - CASE WHEN plan.cycle = 'annual' THEN interval '1 year' ELSE interval '1 month' END,
                   plan.period_end
            FROM generate_series(1, CAST(:n AS int)) g,
            LATERAL (SELECT
                CASE WHEN g <= :renewals THEN 'monthly' WHEN g <= :due THEN 'annual'
                     WHEN g % 4 = 0 THEN 'annual' ELSE 'monthly' END AS cycle,
                CASE WHEN g <= :renewals THEN 'card' WHEN g <= :due THEN 'boleto'
                     WHEN g % 8 = 0 THEN 'boleto' ELSE 'card' END AS method,
                CASE WHEN g <= :renewals THEN CAST(:on AS date) WHEN g <= :due THEN CAST(:boleto_due AS date)
                     WHEN g % 4 = 0 THEN CAST(:on AS date) + 31 + g % 300
                     ELSE CAST(:on AS date) + 1 + g % 28 END AS period_end) plan
            """
        ),
        {**n, "renewals": day.renewals, "due": day.renewals + day.boletos, "on": on, "boleto_due": boleto_due},
    )
    session.execute(text("SELECT setval('subscriptions_id_seq', :n)"), n)
    # The boleto renewals' 30-day notices went out already: the run's only work is the boleto itself.
    session.execute(
        text(
            "INSERT INTO notifications (organization_id, subscription_id, kind, dedupe_key, status) "
            "SELECT g, g, 'renewal_notice', 'renewal_notice:' || g || ':' || :renewal, 'sent' "
            "FROM generate_series(CAST(:first AS int), CAST(:last AS int)) g"
        ),
        {"first": day.renewals + 1, "last": day.renewals + day.boletos, "renewal": boleto_due.isoformat()},
    )
    session.commit()
    session.execute(text("ANALYZE"))
    session.commit()
