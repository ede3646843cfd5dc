"""The ops console in a real browser (Chromium driven by Playwright) against a real web server, worker,
database, Redis and sandbox gateway: what operators and on-call do there."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import Page, expect

from tests.integration.console_fixtures import Console, add_operator, log_in

pytestmark = pytest.mark.usefixtures("console_server")


def test_an_operator_logs_in_and_out(page: Page, console_server: Console):
    add_operator("ops@renova.example", "operator")

    page.goto(console_server.page_url("/console/subscriptions"))
    expect(page).to_have_url(re.compile(r"/console/login\?next=%2Fconsole%2Fsubscriptions"))
    page.fill("input[name=email]", "ops@renova.example")
    page.fill("input[name=password]", "errada-mas-comprida")
    page.click("button[type=submit]")
    expect(page.get_by_role("alert")).to_contain_text("E-mail ou senha incorretos")

    log_in(page, console_server, "ops@renova.example")
    expect(page.get_by_role("heading", level=1)).to_have_text("Visão geral")
    page.get_by_role("link", name="Assinaturas").click()
    expect(page).to_have_url(re.compile(r"/console/subscriptions$"))

    page.get_by_role("button", name="Sair").click()
    expect(page).to_have_url(re.compile(r"/console/login"))
    page.goto(console_server.page_url("/console/"))
    expect(page).to_have_url(re.compile(r"/console/login"))


def test_a_viewer_looks_but_cannot_act(page: Page, console_server: Console, broker):
    from tests.integration.test_console import dead_letter

    add_operator("leitura@renova.example", "viewer")
    dead_letter(broker)
    log_in(page, console_server, "leitura@renova.example")
    page.get_by_role("link", name="Dead letters").click()
    expect(page.get_by_role("cell", name="send_notification")).to_be_visible()

    page.fill("form.action input[name=reason]", "tentando mesmo assim")
    page.get_by_role("button", name="Reenfileirar").first.click()
    expect(page.get_by_role("alert")).to_contain_text("perfil é de leitura")
    assert broker.client.zcard("dramatiq:notifications.XQ") == 1


def test_a_form_without_its_csrf_token_is_refused(page: Page, console_server: Console, broker):
    from tests.integration.test_console import dead_letter

    add_operator("ops@renova.example", "operator")
    dead_letter(broker)
    log_in(page, console_server, "ops@renova.example")
    page.get_by_role("link", name="Dead letters").click()
    # A page elsewhere posting into the console: the form carries no (or a stale) token.
    page.evaluate("document.querySelectorAll('input[name=csrf_token]').forEach(input => input.value = 'forged')")
    page.fill("form.action input[name=reason]", "forjado")
    page.get_by_role("button", name="Reenfileirar").first.click()
    expect(page.get_by_role("alert")).to_contain_text("token CSRF")
    assert broker.client.zcard("dramatiq:notifications.XQ") == 1


def test_an_operator_requeues_a_dead_letter(page: Page, console_server: Console, broker, session):
    from sqlalchemy import select

    from models.schema import AuditEvent
    from tests.integration.test_console import dead_letter

    add_operator("ops@renova.example", "operator")
    dead_letter(broker)
    log_in(page, console_server, "ops@renova.example")
    page.get_by_role("link", name="Dead letters").click()
    page.fill("form.action input[name=reason]", "SMTP de volta")
    page.get_by_role("button", name="Reenfileirar").first.click()
    expect(page.get_by_role("status")).to_contain_text("reenfileirada")
    assert broker.client.zcard("dramatiq:notifications.XQ") == 0
    assert broker.client.llen("dramatiq:notifications") == 1
    event = session.scalars(select(AuditEvent).where(AuditEvent.action == "dead_letter.requeue")).one()
    assert (event.actor, event.reason) == ("ops@renova.example", "SMTP de volta")


def test_on_call_finds_a_declined_charge_and_retries_it(
    page: Page, console_server: Console, session, worker, billing_gateway, sandbox_gateway
):
    from sqlalchemy import select

    from models.schema import AuditEvent, Charge
    from tests.integration.conftest import wait_until
    from tests.integration.test_charge_review import declined_renewal, replace_card

    _, declined = declined_renewal(session, billing_gateway)
    replace_card(session, 1)  # the customer sent a new card
    add_operator("plantao@renova.example", "operator")
    log_in(page, console_server, "plantao@renova.example")

    page.get_by_role("link", name="Cobranças").click()
    page.select_option("select[name=status]", "failed")
    page.get_by_role("button", name="Filtrar").click()
    page.get_by_role("link", name=str(declined.id), exact=True).click()
    expect(page.locator("#charge-status")).to_have_text("recusada")
    expect(page.locator("#attempts")).to_contain_text("insufficient_funds")

    retry = page.locator("form[action$='/retry']")
    retry.locator("input[name=reason]").fill("cliente trocou o cartão")
    retry.get_by_role("button").click()
    expect(page.get_by_role("status")).to_contain_text("Nova tentativa 2 de R$")

    def new_attempt() -> Charge | None:
        session.expire_all()
        found = session.scalars(
            select(Charge).where(Charge.invoice_id == declined.invoice_id, Charge.attempt == 2)
        ).one_or_none()
        return found if found is not None and found.status == "succeeded" else None

    second = wait_until(new_attempt)
    assert len(sandbox_gateway.ledger(idempotency_key=second.idempotency_key)) == 1
    page.reload()
    expect(page.locator("#invoice-status")).to_have_text("paga")
    expect(page.locator("#attempts")).to_contain_text("aprovada")
    event = session.scalars(select(AuditEvent).where(AuditEvent.action == "charge.retry")).one()
    assert (event.actor, event.reason) == ("plantao@renova.example", "cliente trocou o cartão")


def test_a_viewer_sees_the_run_progress_move(page: Page, console_server: Console, session, broker, billing_gateway):
    import dramatiq

    from jobs.billing_day import scan_run
    from jobs.context import runtime
    from tests.integration.conftest import wait_until
    from tests.integration.factories import make_organization, make_subscription, noon, seed_plans
    from tests.integration.test_charge_review import ANCHOR, DAY

    seed_plans(session)
    for organization_id in (1, 2, 3):
        organization = make_organization(session, organization_id)
        make_subscription(session, organization, cycle="monthly", method="card", anchor=ANCHOR)
    session.commit()
    scan_run(session, DAY, noon(DAY), runtime().config)  # the run starts; no worker has taken it yet
    add_operator("leitura@renova.example", "viewer")
    log_in(page, console_server, "leitura@renova.example")
    expect(page.locator("#run-status")).to_have_text("em andamento")
    expect(page.locator("#run-due")).to_have_text("3")
    expect(page.locator("#run-done")).to_have_text("0")

    running = dramatiq.Worker(broker, worker_threads=2, worker_timeout=100)
    running.start()
    try:
        wait_until(lambda: broker.client.hlen("dramatiq:billing.msgs") == 0)
        page.reload()
        expect(page.locator("#run-done")).to_have_text("3")
        scan_run(session, DAY, noon(DAY), runtime().config)  # the re-scan finds nothing due: done
        page.reload()
        expect(page.locator("#run-status")).to_have_text("concluída")
    finally:
        running.stop()
        broker.middleware[:] = [m for m in broker.middleware if getattr(m, "worker", None) is not running]
