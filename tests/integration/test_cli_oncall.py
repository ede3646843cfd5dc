"""The on-call commands as real processes: `renova runs`, `charges`, `invoices`, `audit` and
`dead-letters delete`, against the test database, Redis and the sandbox gateway process, with the
test clock set to the replayed business date (every process reads "now" from it)."""

from __future__ import annotations

import time
from datetime import date

import dramatiq
import pytest
from sqlalchemy import func, select, update

from jobs import clock
from jobs.billing_day import run_day
from jobs.context import runtime
from models.schema import AuditEvent, Card, Charge, Invoice, Subscription
from tests.integration.factories import make_organization, make_subscription, noon, seed_plans
from tests.integration.test_cli import renova

pytestmark = pytest.mark.usefixtures("ledger_checked")

DAY = date(2027, 3, 15)


def declined_renewal(session, gateway) -> Charge:
    """Organization 1's monthly renewal on DAY, declined (insufficient funds); the clock on DAY."""
    seed_plans(session)
    organization = make_organization(session, 1, card_token="tok_insufficient_funds", name="Padaria Pão Quente")
    make_subscription(session, organization, cycle="monthly", method="card", anchor=date(2027, 2, 15))
    session.commit()
    run_day(session, gateway, DAY, noon(DAY), runtime().config)
    clock.set_clock(session, noon(DAY), runtime().config)
    session.commit()
    return session.scalars(select(Charge).where(Charge.status == "failed")).one()


def at_sandbox(sandbox) -> dict[str, str]:
    """The environment that points a `renova` process at the sandbox gateway."""
    return {"GATEWAY_URL": sandbox.url, "GATEWAY_API_KEY": sandbox.api_key}


def audit_rows(session) -> list[tuple[str, str, str | None, str]]:
    return [
        (event.actor, event.action, event.target_id, event.reason)
        for event in session.scalars(select(AuditEvent).order_by(AuditEvent.id))
    ]


def output(result) -> str:
    return result.stdout + result.stderr


def test_review_and_retry_a_declined_charge(session, billing_gateway, sandbox_gateway):
    declined = declined_renewal(session, billing_gateway)
    charge_id, invoice_id = str(declined.id), str(declined.invoice_id)

    listed = renova("charges", "list")
    assert listed.returncode == 0, output(listed)
    assert charge_id in listed.stdout and "insufficient_funds" in listed.stdout
    assert "Padaria Pão Quente" in listed.stdout and "49,90" in listed.stdout
    assert "16/03/2027" in listed.stdout  # the next retry, as people write dates
    assert "no charges to review" in renova("charges", "list", "--code", "do_not_honor").stdout
    assert "no charges to review" in renova("charges", "list", "--since", "16/03/2099").stdout
    for bad in (("--status", "declined"), ("--since", "31/02/2027"), ("--limit", "0")):
        refused = renova("charges", "list", *bad)
        assert refused.returncode == 2, (bad, output(refused))

    shown = renova("charges", "show", charge_id)
    assert shown.returncode == 0, output(shown)
    for expected in ("Attempts of the invoice", f"Invoice {invoice_id}", "past_due", "Timeline", "charge_failed"):
        assert expected in shown.stdout, expected
    assert "@" not in shown.stdout  # no e-mail address, ever
    assert declined.gateway_id and declined.gateway_id in shown.stdout.replace("\n", "").replace("│", "")
    missing = renova("charges", "show", "999999999")
    assert missing.returncode == 2 and "no charge 999999999" in missing.stdout

    blank = renova("charges", "retry", charge_id, "--reason", "  ", **at_sandbox(sandbox_gateway))
    assert blank.returncode == 2 and "reason" in blank.stdout
    assert session.scalar(select(func.count()).select_from(Charge)) == 1  # nothing was charged

    session.execute(update(Card).values(token="tok_ok", last4="5454"))
    session.commit()
    retried = renova(
        "charges", "retry", charge_id, "--reason", "cliente trocou o cartão", "--actor", "ana",
        **at_sandbox(sandbox_gateway),
    )  # fmt: skip
    assert retried.returncode == 0, output(retried)
    assert "succeeded" in retried.stdout and f"invoice {declined.invoice_id} is paid" in retried.stdout
    assert len(sandbox_gateway.ledger(idempotency_key=f"charge:{invoice_id}:2")) == 1
    assert session.scalar(select(Subscription.status)) == "active"

    again = renova("charges", "retry", charge_id, "--reason", "de novo", **at_sandbox(sandbox_gateway))
    assert again.returncode == 2 and "invoice_paid" in again.stdout
    reconcile = renova("charges", "reconcile", charge_id, "--reason", "ver", **at_sandbox(sandbox_gateway))
    assert reconcile.returncode == 2 and "charge_resolved" in reconcile.stdout
    written_off = renova("invoices", "uncollectible", invoice_id, "--reason", "x", **at_sandbox(sandbox_gateway))
    assert written_off.returncode == 2 and "invoice_paid" in written_off.stdout

    assert audit_rows(session) == [("ana", "charge.retry", charge_id, "cliente trocou o cartão")]
    audit = renova("audit", "list", "--action", "charge", "--target", f"charge:{charge_id}")
    assert audit.returncode == 0, output(audit)
    assert "ana" in audit.stdout and "charge.retry" in audit.stdout and "cliente trocou o cartão" in audit.stdout
    assert "no audit events" in renova("audit", "list", "--actor", "nobody").stdout
    assert renova("audit", "list", "--since", "yesterday").returncode == 2


def test_write_off_an_invoice_from_the_command_line(session, billing_gateway, sandbox_gateway):
    declined = declined_renewal(session, billing_gateway)

    blank = renova("invoices", "uncollectible", str(declined.invoice_id), "--reason", "")
    assert blank.returncode == 2 and "reason" in blank.stdout
    unknown = renova("invoices", "uncollectible", "999999999", "--reason", "x")
    assert unknown.returncode == 2 and "no invoice 999999999" in unknown.stdout

    result = renova(
        "invoices", "uncollectible", str(declined.invoice_id), "--reason", "empresa fechou", "--actor", "bia",
        **at_sandbox(sandbox_gateway),
    )  # fmt: skip
    assert result.returncode == 0, output(result)
    assert "uncollectible" in result.stdout and "past_due → suspended" in result.stdout
    assert f"scheduled retries dropped: charge(s) {declined.id}" in result.stdout
    assert session.scalar(select(Invoice.status).where(Invoice.id == declined.invoice_id)) == "uncollectible"
    assert session.scalar(select(Charge.next_retry_on).where(Charge.id == declined.id)) is None
    assert audit_rows(session) == [("bia", "invoice.uncollectible", str(declined.invoice_id), "empresa fechou")]


def test_runs_list_and_show(session, billing_gateway):
    declined_renewal(session, billing_gateway)

    runs = renova("runs", "--limit", "5")
    assert runs.returncode == 0, output(runs)
    assert "15/03/2027" in runs.stdout and "done" in runs.stdout
    shown = renova("runs", "show", "2027-03-15")
    assert shown.returncode == 0, output(shown)
    assert "Billing run 15/03/2027" in shown.stdout and "renew" in shown.stdout
    assert renova("runs", "show", "15/03/2027").returncode == 0
    absent = renova("runs", "show", "2030-01-01")
    assert absent.returncode == 2 and "no billing run for 2030-01-01" in absent.stdout
    assert renova("runs", "show", "tomorrow").returncode == 2


def test_reconcile_a_timed_out_charge_from_the_command_line(session, billing_gateway, sandbox_gateway):
    seed_plans(session)
    organization = make_organization(session, 1, card_token="tok_timeout")
    make_subscription(session, organization, cycle="monthly", method="card", anchor=date(2027, 2, 15))
    session.commit()
    with sandbox_gateway.configured(stall_ms=3000):
        run_day(session, billing_gateway, DAY, noon(DAY), runtime().config)
    clock.set_clock(session, noon(DAY), runtime().config)
    session.commit()
    charge = session.scalars(select(Charge).where(Charge.status == "unknown")).one()

    listed = renova("charges", "list", "--status", "unknown")
    assert listed.returncode == 0 and str(charge.id) in listed.stdout
    result = renova(
        "charges", "reconcile", str(charge.id), "--reason", "timeout", "--actor", "ana", **at_sandbox(sandbox_gateway)
    )
    assert result.returncode == 0, output(result)
    assert "unknown → succeeded" in result.stdout
    assert len(sandbox_gateway.ledger(idempotency_key=charge.idempotency_key)) == 1
    assert audit_rows(session) == [("ana", "charge.reconcile", str(charge.id), "timeout")]


def test_dead_letters_delete(session, broker):
    message = dramatiq.Message(
        queue_name="billing", actor_name="process_chunk", args=("renew", "2027-03-15", [1], "x"), kwargs={}, options={}
    )
    broker.client.zadd("dramatiq:billing.XQ", {message.message_id: int(time.time() * 1000)})
    broker.client.hset("dramatiq:billing.XQ.msgs", message.message_id, message.encode())

    for bad in (
        ("--reason", "obsolete"),  # neither --id nor --all
        ("--id", message.message_id, "--reason", "  "),
        ("--id", "no-such-message", "--reason", "obsolete"),
        ("--all", "-Q", "nowhere", "--reason", "obsolete"),
    ):
        refused = renova("dead-letters", "delete", *bad)
        assert refused.returncode == 2, (bad, output(refused))
    assert broker.client.zcard("dramatiq:billing.XQ") == 1

    deleted = renova(
        "dead-letters", "delete", "--id", message.message_id, "--reason", "fixed by hand", "--actor", "bia"
    )
    assert deleted.returncode == 0, output(deleted)
    assert "deleted 1 message(s)" in deleted.stdout
    assert broker.client.zcard("dramatiq:billing.XQ") == 0
    assert broker.client.hlen("dramatiq:billing.XQ.msgs") == 0
    assert "no dead letters" in renova("dead-letters", "list").stdout
    assert audit_rows(session) == [("bia", "dead_letter.delete", message.message_id, "fixed by hand")]


@pytest.mark.parametrize(
    "command",
    [
        ("charges", "show"),
        ("charges", "retry", "{id}", "--reason", "x"),
        ("invoices", "uncollectible", "{id}", "--reason", "x"),
        ("refunds", "mark-paid", "{id}", "--reference", "TED 1", "--reason", "x"),
        ("attention", "retry", "gateway_event", "{id}", "--reason", "x"),
        ("endpoints", "redeliver", "1", "{id}", "--reason", "x"),
        ("charges", "list", "--organization", "{id}"),
    ],
)
def test_an_id_no_row_can_have_is_refused_by_the_cli(session, command: tuple[str, ...]) -> None:
    for bad in ("0", str(2**63)):
        args = [part.replace("{id}", bad) for part in command]
        if "{id}" not in command:
            args.append(bad)
        refused = renova(*args)
        assert refused.returncode == 2, output(refused)
        assert "is not in the range" in output(refused) and "Traceback" not in output(refused)
