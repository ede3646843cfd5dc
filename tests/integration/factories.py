"""Rows for tests: organizations with members and a card, plans, subscriptions with a paid period."""

from __future__ import annotations

from datetime import UTC, date, datetime, time
from time import monotonic, sleep
from typing import Literal

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from models.boleto import digitable_line, free_field_for, make_barcode, nosso_numero
from models.calendar import add_cycle
from models.schema import Boleto, Card, Charge, Event, Invoice, LedgerEntry, Member, Organization, Plan, Subscription
from models.states import BoletoStatus, ChargeStatus, InvoiceKind, InvoiceStatus, PaymentMethod

MONTHLY_PRICE = 4_990
ANNUAL_PRICE = 47_900
CNPJ = "11222333000181"

# `details["source"]` of the ledger entries the factories write, so that tests listing the entries a
# flow wrote can leave out the opening trail (tests.integration.test_changes.ledger_of).
FACTORY_SOURCE = "tests.integration.factories"

# How the paid period a factory subscription starts with was paid (`make_subscription(trail=...)`):
# - "migrated": before Renova, like a subscription imported from another system: a `credit_granted`
#   entry of its amount, applied to the invoice as its discount (`credit_applied`), so no money reached
#   our gateway and no charge or boleto row exists. The default, because many tests count every
#   charge, boleto or ledger entry the flows create (`select(Charge)).one()` and the like).
# - "gateway": through the gateway by the subscription's method: a `payment` entry of the invoice's
#   total, and a succeeded charge (card) or a paid boleto (boleto) for it.
Trail = Literal["migrated", "gateway"]


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
    trail: Trail = "migrated",
) -> Subscription:
    """A subscription in its (periods_elapsed)-th period after `anchor`, that period paid, with the
    money trail `renova ledger check` expects: the paid invoice's ledger entries and, for
    trail="gateway", its gateway-side record; and a `credit_granted` entry for `balance_cents`."""
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
    # Migrated: the whole amount was paid with the credit brought over, so nothing is left to pay here.
    discount = price if trail == "migrated" else 0
    invoice = Invoice(
        subscription_id=subscription.id,
        organization_id=organization.id,
        kind=InvoiceKind.SUBSCRIBE,
        cycle=cycle,
        period_start=start,
        period_end=end,
        amount_cents=price,
        discount_cents=discount,
        total_cents=price - discount,
        status=InvoiceStatus.PAID,
        method=method,
        due_date=start,
        paid_on=start,
        paid_at=noon(start),
    )
    session.add(invoice)
    session.flush()
    if discount:
        _ledger(session, subscription, "credit_granted", discount, "Período pago no sistema anterior")
        _ledger(session, subscription, "credit_applied", -discount, "Crédito aplicado à fatura", invoice.id)
    if invoice.total_cents:
        _paid_through_gateway(session, organization, invoice)
        _ledger(session, subscription, "payment", invoice.total_cents, f"Pagamento ({method})", invoice.id)
    if balance_cents:
        _ledger(session, subscription, "credit_granted", balance_cents, "Saldo inicial")
    session.flush()
    return subscription


def _ledger(
    session: Session,
    subscription: Subscription,
    kind: str,
    amount_cents: int,
    description: str,
    invoice_id: int | None = None,
) -> None:
    session.add(
        LedgerEntry(
            subscription_id=subscription.id,
            invoice_id=invoice_id,
            kind=kind,
            amount_cents=amount_cents,
            description=description,
            details={"source": FACTORY_SOURCE},
        )
    )


def _paid_through_gateway(session: Session, organization: Organization, invoice: Invoice) -> None:
    """What the gateway holds for a paid invoice: its succeeded charge, or its paid boleto."""
    assert invoice.paid_on is not None and invoice.paid_at is not None
    if invoice.method == PaymentMethod.CARD:
        card = session.scalar(select(Card).where(Card.organization_id == organization.id))
        session.add(
            Charge(
                invoice_id=invoice.id,
                attempt=1,
                idempotency_key=f"charge:{invoice.id}:1",
                amount_cents=invoice.total_cents,
                card_id=card.id if card else None,
                card_token="tok_ok",  # the charge succeeded, whatever card the organization has now
                card_last4=card.last4 if card else None,
                status=ChargeStatus.SUCCEEDED,
                # Never made at the sandbox gateway, which would not know a fake id either.
                gateway_id=None,
                resolved_at=invoice.paid_at,
            )
        )
        return
    # Invoice ids reach 13 digits in tests (conftest restarts the sequence at random): 13 + check digit.
    number = nosso_numero(invoice.id, width=13)
    barcode = make_barcode("999", invoice.total_cents, invoice.due_date, free_field_for(number))
    session.add(
        Boleto(
            invoice_id=invoice.id,
            sequence=1,
            gateway_id=f"bol_factory_{invoice.id}",
            nosso_numero=number,
            barcode=barcode,
            digitable_line=digitable_line(barcode),
            amount_cents=invoice.total_cents,
            due_date=invoice.due_date,
            status=BoletoStatus.PAID,
            paid_on=invoice.paid_on,
            paid_at=invoice.paid_at,
            paid_amount_cents=invoice.total_cents,
        )
    )


def noon(on: date) -> datetime:
    """An instant on business date `on` after the default run hour (09:00 in São Paulo)."""
    return datetime.combine(on, time(12), UTC)


def wait_for_events_visible(session: Session, timeout: float = 30.0) -> None:
    """Wait until every committed event can be read in order.

    An event is readable once every transaction that started before its own has ended — in the whole
    PostgreSQL cluster, so another test process's open transaction can hold it back for a moment."""
    from jobs.events import VISIBLE

    everything, visible = select(func.count(Event.id)), select(func.count(Event.id)).where(VISIBLE)
    deadline = monotonic() + timeout
    while session.scalar(visible) != session.scalar(everything):
        session.rollback()
        assert monotonic() < deadline, "events still not visible: a transaction has been open for too long"
        sleep(0.05)
    session.rollback()
