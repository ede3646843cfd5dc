"""Rows for tests: organizations with members and a card, plans, subscriptions with a paid period."""

from __future__ import annotations

from datetime import UTC, date, datetime, time

from sqlalchemy.orm import Session

from models.calendar import add_cycle
from models.schema import Card, Invoice, Member, Organization, Plan, Subscription
from models.states import InvoiceKind, InvoiceStatus

MONTHLY_PRICE = 4_990
ANNUAL_PRICE = 47_900
CNPJ = "11222333000181"


def seed_plans(session: Session, monthly: int = MONTHLY_PRICE, annual: int = ANNUAL_PRICE) -> None:
    session.add_all(
        [
            Plan(product="conecta", cycle="monthly", price_cents=monthly),
            Plan(product="conecta", cycle="annual", price_cents=annual),
        ]
    )
    session.flush()


def make_organization(
    session: Session, organization_id: int = 1, *, card_token: str | None = "tok_ok", name: str = "Acme Ltda"
) -> Organization:
    organization = Organization(id=organization_id, name=name, document=CNPJ)
    session.add(organization)
    session.flush()
    session.add_all(
        [
            Member(
                id=organization_id * 100 + 1,
                organization_id=organization_id,
                name="Dona",
                email=f"dona{organization_id}@acme.example",
                role="owner",
            ),
            Member(
                id=organization_id * 100 + 2,
                organization_id=organization_id,
                name="Fin",
                email=f"financeiro{organization_id}@acme.example",
                role="member",
                financial_responsible=True,
            ),
            Member(
                id=organization_id * 100 + 3,
                organization_id=organization_id,
                name="Colaborador",
                email=f"colab{organization_id}@acme.example",
                role="member",
            ),
        ]
    )
    if card_token:
        session.add(
            Card(
                organization_id=organization_id,
                token=card_token,
                brand="visa",
                last4="4242",
                exp_month=12,
                exp_year=2035,
            )
        )
    session.flush()
    return organization


def make_subscription(
    session: Session,
    organization: Organization,
    *,
    cycle: str,
    method: str,
    anchor: date,
    period_start: date | None = None,
    periods_elapsed: int = 0,
    paid_cents: int | None = None,
    balance_cents: int = 0,
) -> Subscription:
    """A subscription in its (periods_elapsed)-th period after `anchor`, that period paid."""
    start = period_start or add_cycle(anchor, cycle, periods_elapsed)
    end = add_cycle(anchor, cycle, periods_elapsed + 1)
    subscription = Subscription(
        organization_id=organization.id,
        cycle=cycle,
        payment_method=method,
        billing_anchor=anchor,
        current_period_start=start,
        current_period_end=end,
        balance_cents=balance_cents,
    )
    session.add(subscription)
    session.flush()
    price = paid_cents if paid_cents is not None else (MONTHLY_PRICE if cycle == "monthly" else ANNUAL_PRICE)
    session.add(
        Invoice(
            subscription_id=subscription.id,
            organization_id=organization.id,
            kind=InvoiceKind.SUBSCRIBE,
            cycle=cycle,
            period_start=start,
            period_end=end,
            amount_cents=price,
            discount_cents=0,
            total_cents=price,
            status=InvoiceStatus.PAID,
            method=method,
            due_date=start,
            paid_on=start,
            paid_at=datetime.combine(start, time(12), UTC),
        )
    )
    session.flush()
    return subscription


def noon(on: date) -> datetime:
    """An instant on business date `on` after the default run hour (09:00 in São Paulo)."""
    return datetime.combine(on, time(12), UTC)
