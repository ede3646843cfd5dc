"""The models and the migrations agree, and the migrations run both ways."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.exc import DataError, IntegrityError

from models import schema  # noqa: F401
from models.base import Base
from workers.db import get_engine
from workers.migrate import current_revision, downgrade, head_revision, upgrade


def test_autogenerate_finds_no_difference(migrated_database):
    with get_engine().connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        differences = compare_metadata(context, Base.metadata)
    assert differences == []


def test_database_is_at_head(migrated_database):
    assert current_revision(get_engine()) == head_revision(migrated_database)


def test_downgrade_to_base_and_back(migrated_database):
    downgrade(migrated_database, "base")
    assert inspect(create_engine(migrated_database)).get_table_names() == ["alembic_version"]
    upgrade(migrated_database)
    tables = set(inspect(get_engine()).get_table_names())
    assert {table.name for table in Base.metadata.sorted_tables} <= tables


def test_a_card_number_cannot_be_stored_as_last4(session):
    session.execute(text("INSERT INTO organizations (id, name) VALUES (1, 'Acme')"))
    with pytest.raises((DataError, IntegrityError)):
        session.execute(
            text(
                "INSERT INTO cards (organization_id, token, brand, last4, exp_month, exp_year) "
                "VALUES (1, 'tok_ok', 'visa', '4111111111111111', 12, 2030)"
            )
        )


def test_one_renewal_invoice_per_subscription_and_period(session):
    session.execute(text("INSERT INTO organizations (id, name) VALUES (1, 'Acme')"))
    session.execute(
        text(
            "INSERT INTO subscriptions (organization_id, cycle, payment_method, billing_anchor, "
            "current_period_start, current_period_end) VALUES (1, 'monthly', 'card', '2026-01-31', "
            "'2026-01-31', '2026-02-28')"
        )
    )
    insert = text(
        "INSERT INTO invoices (subscription_id, organization_id, cycle, period_start, period_end, "
        "amount_cents, total_cents, method, due_date) VALUES (1, 1, 'monthly', '2026-02-28', '2026-03-31', "
        "4990, 4990, 'card', '2026-02-28')"
    )
    session.execute(insert)
    with pytest.raises(IntegrityError):
        session.execute(insert)
