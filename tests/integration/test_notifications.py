"""Notices: written once per dedupe key, addressed to the people who pay, rendered in pt-BR, delivered
once through the real broker and worker to a real SMTP server (aiosmtpd), retried while it is down."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from email.message import EmailMessage
from email.utils import getaddresses
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from jobs import renewals
from jobs.billing_day import run_day, scan_renewal_notices
from jobs.context import runtime
from jobs.notifications import (
    BOLETO_PURPOSES,
    KINDS,
    NO_RECIPIENTS,
    DeliveryFailed,
    NoticeSpec,
    deliver_notification,
    notify,
    notify_many,
    pending_notification_ids,
    recipients_for,
    render,
    send_notification,
)
from jobs.payments import suspend
from jobs.retries import is_transient
from models.schema import Boleto, Invoice, Member, Notification, Organization, Subscription
from tests.integration.conftest import wait_until
from tests.integration.factories import ANNUAL_PRICE, make_organization, make_subscription, noon, seed_plans
from workers.db import get_session_factory
from workers.embedded import free_port
from workers.mail import (
    EmlWriter,
    MailSink,
    SmtpMailer,
    ensure_mail_sink,
    mailer_from_settings,
    read_messages,
    sink_answers,
    stop_mail_sink,
)
from workers.settings import Settings, SettingsError

ORG_ID = 1
ORG_NAME = "Acme Comunicação Ltda"
LINHA = "34191.09008 00015.710296 30132.800001 9 43950000002980"
MAIL_FROM = "CONECTA Cobrança <cobranca@conecta.example>"
NOW = datetime(2026, 2, 23, 9, 0, tzinfo=UTC)

SAMPLES: dict[str, dict[str, Any]] = {
    "boleto_issued": {
        "invoice_id": 41,
        "amount_cents": 178800,
        "due_date": "2026-03-02",
        "digitable_line": LINHA,
        "period_start": "2026-03-02",
        "period_end": "2027-03-02",
    },
    "boleto_reminder": {
        "invoice_id": 41,
        "amount_cents": 178800,
        "due_date": "2026-03-02",
        "digitable_line": LINHA,
        "period_start": "2026-03-02",
        "period_end": "2027-03-02",
    },
    "boleto_overdue": {
        "invoice_id": 41,
        "amount_cents": 178800,
        "due_date": "2026-03-02",
        "digitable_line": LINHA,
        "suspend_on": "2026-03-06",
    },
    "charge_succeeded": {
        "invoice_id": 7,
        "amount_cents": 14990,
        "card_brand": "visa",
        "card_last4": "4242",
        "period_start": "2026-01-31",
        "period_end": "2026-02-28",
        "paid_on": "2026-01-31",
    },
    "charge_failed": {
        "invoice_id": 7,
        "amount_cents": 14990,
        "code": "insufficient_funds",
        "reason": "Insufficient funds",
        "hard": False,
        "next_retry_on": "2026-02-01",
        "card_last4": "4242",
    },
    "subscription_suspended": {"invoice_id": 7, "amount_cents": 14990, "reason": "card"},
    "subscription_reactivated": {"invoice_id": 7, "period_start": "2026-02-10", "period_end": "2026-03-10"},
    "payment_method_switch_scheduled": {"from_method": "card", "to_method": "boleto", "effective_on": "2026-06-15"},
    "payment_method_switch_applied": {"from_method": "card", "to_method": "boleto", "renewal_date": "2026-06-15"},
    "cycle_changed": {
        "from_cycle": "monthly",
        "to_cycle": "annual",
        "payment_method": "card",
        "quote": {
            "paid_cents": 14990,
            "unused_cents": 7495,
            "balance_cents": 0,
            "credit_cents": 7495,
            "amount_due_cents": 171305,
            "new_period_start": "2026-01-16",
            "new_period_end": "2027-01-16",
            "balance_after_cents": 0,
        },
    },
    "card_updated": {"brand": "mastercard", "last4": "5454", "exp_month": 3, "exp_year": 2029},
    "change_request_rejected": {
        "kind": "switch_payment_method",
        "code": "boleto_requires_annual",
        "message": "A forma de pagamento boleto só está disponível para assinaturas com ciclo de cobrança anual.",
    },
    "renewal_notice": {
        "renewal_date": "2026-04-30",
        "amount_cents": 178800,
        "cycle": "annual",
        "payment_method": "boleto",
        "switch_to_card_until": "2026-04-22",  # T − 8
        "boleto_lead_days": 7,
    },
    "subscribed": {
        "cycle": "annual",
        "payment_method": "card",
        "period_start": "2026-01-15",
        "period_end": "2027-01-15",
        "amount_cents": 178800,
    },
    "cancellation_scheduled": {"ends_on": "2026-05-31"},
    "subscription_canceled": {"ended_on": "2026-05-31"},
    "cancellation_undone": {"renewal_date": "2026-05-31"},
    "refund_created": {"subscription_id": 3, "amount_cents": 123456, "method": "card", "card_last4": "4242"},
}

# What each rendered body must show (amounts as Babel writes them, with the non-breaking space).
EXPECTED: dict[str, list[str]] = {
    "boleto_issued": ["R$\xa01.788,00", "Vencimento: 02/03/2026", LINHA, "02/03/2026 a 01/03/2027"],
    "boleto_reminder": ["R$\xa01.788,00", "vence em 02/03/2026", LINHA],
    "boleto_overdue": ["R$\xa01.788,00", "venceu em 02/03/2026", LINHA, "suspensa em 06/03/2026"],
    "charge_succeeded": ["R$\xa0149,90", "Visa final 4242", "Data: 31/01/2026", "Próxima renovação: 28/02/2026"],
    "charge_failed": [
        "R$\xa0149,90",
        "final 4242",
        "saldo ou limite insuficiente",
        "nova tentativa de cobrança automaticamente em 01/02/2026",
        "Minhas assinaturas",
        "Alterar forma de pagamento",
        "Formas de pagamento",
    ],
    "subscription_suspended": ["R$\xa0149,90", "suspensa", "Formas de pagamento"],
    "subscription_reactivated": ["ativa novamente", "10/02/2026 a 09/03/2026", "Próxima renovação: 10/03/2026"],
    "payment_method_switch_scheduled": ["de cartão de crédito para boleto", "15/06/2026"],
    "payment_method_switch_applied": ["de cartão de crédito para boleto", "15/06/2026"],
    "cycle_changed": [
        "de mensal para anual",
        "R$\xa0149,90",
        "R$\xa074,95",
        "R$\xa01.713,05",
        "Próxima renovação: 16/01/2027",
    ],
    "card_updated": ["Mastercard final 5454", "Validade: 03/2029"],
    "change_request_rejected": [
        "alteração da forma de pagamento",
        "só está disponível para assinaturas com ciclo de cobrança anual",
        "Nenhuma alteração foi feita",
    ],
    "renewal_notice": [
        "renovada em 30/04/2026",
        "R$\xa01.788,00",
        "será paga via boleto, gerado 7 dias antes da data de renovação",
        "Para pagar com cartão de crédito, altere a forma de pagamento em Minhas assinaturas até 22/04/2026",
    ],
    "subscribed": ["Ciclo de cobrança: anual", "cartão de crédito", "R$\xa01.788,00", "15/01/2026 a 14/01/2027"],
    "cancellation_scheduled": ["cancelada em 31/05/2026"],
    "subscription_canceled": ["cancelada em 31/05/2026"],
    "cancellation_undone": ["renovada normalmente em 31/05/2026"],
    "refund_created": ["R$\xa01.234,56", "estorno no cartão de crédito final 4242", "fatura do cartão"],
}


# --- fixtures and helpers ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MailSink]:
    with MailSink(tmp_path_factory.mktemp("mail")) as running:
        yield running


@pytest.fixture
def mailbox(sink: MailSink) -> MailSink:
    for path in sink.paths():
        path.unlink()
    return sink


@pytest.fixture
def smtp_target(mailbox: MailSink) -> Iterator[dict[str, str]]:
    """Point the runtime's mailer at the test sink; change `["url"]` to simulate an outage."""
    target = {"url": mailbox.url}
    current = runtime()
    previous = current.mailer_factory
    current.mailer_factory = lambda: SmtpMailer(target["url"])
    yield target
    current.mailer_factory = previous


def closed_port_url() -> str:
    return f"smtp://127.0.0.1:{free_port()}"  # nothing listens there: connection refused


def add_organization(session: Session, members: list[dict[str, Any]], org_id: int = ORG_ID) -> None:
    session.add(Organization(id=org_id, name=ORG_NAME if org_id == ORG_ID else f"Org {org_id}"))
    session.flush()
    for index, member in enumerate(members, start=1):
        session.add(Member(id=org_id * 100 + index, organization_id=org_id, name=f"Pessoa {index}", **member))
    session.flush()


def billing_org(session: Session) -> None:
    add_organization(session, [{"email": "dona@acme.com.br", "role": "owner"}])


def new_notice(session: Session, kind: str = "boleto_issued", key: str | None = None, **kwargs: Any) -> int:
    notification_id = notify(
        session, organization_id=ORG_ID, kind=kind, dedupe_key=key or f"{kind}:1", context=SAMPLES[kind], **kwargs
    )
    assert notification_id is not None
    return notification_id


def fetch(notification_id: int) -> Notification:
    with get_session_factory()() as fresh:
        notification = fresh.get(Notification, notification_id)
        assert notification is not None
        return notification


def notification_count(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(Notification)) or 0


def settle(broker: Any, worker: Any) -> None:
    """Wait until the notifications queue is drained and the worker has finished what it holds."""
    broker.join("notifications", timeout=10_000)
    worker.join()


def plain_body(message: EmailMessage) -> str:
    # The .eml keeps the message as it travelled, with CRLF line ends.
    return message.get_body(("plain",)).get_content().replace("\r\n", "\n")


# --- notify --------------------------------------------------------------------------------------


def test_notify_is_idempotent_by_dedupe_key(session: Session) -> None:
    billing_org(session)
    first = notify(
        session,
        organization_id=ORG_ID,
        kind="boleto_issued",
        dedupe_key="boleto_issued:41",
        context=SAMPLES["boleto_issued"],
    )
    again = notify(
        session,
        organization_id=ORG_ID,
        kind="boleto_issued",
        dedupe_key="boleto_issued:41",
        context={**SAMPLES["boleto_issued"], "amount_cents": 1},
    )
    session.commit()
    assert isinstance(first, int)
    assert again is None
    assert notification_count(session) == 1
    stored = fetch(first)
    assert (stored.status, stored.attempts, stored.context["amount_cents"]) == ("pending", 0, 178800)


def test_notify_stores_dates_as_iso_strings(session: Session) -> None:
    billing_org(session)
    notification_id = notify(
        session,
        organization_id=ORG_ID,
        kind="cancellation_scheduled",
        dedupe_key="cancel:1",
        context={"ends_on": date(2026, 5, 31)},
    )
    session.commit()
    assert fetch(notification_id).context == {"ends_on": "2026-05-31"}


@pytest.mark.parametrize(
    ("kind", "context", "message"),
    [
        ("boleto_lost", {}, "unknown notification kind"),
        ("boleto_issued", {"invoice_id": 1, "amount_cents": 100}, "missing context keys: due_date, digitable_line"),
        ("card_updated", {"brand": "visa", "last4": None, "exp_month": 1, "exp_year": 2030}, "last4"),
        ("cycle_changed", {**SAMPLES["cycle_changed"], "quote": {"paid_cents": 1}}, "quote.unused_cents"),
        ("boleto_reminder", {**SAMPLES["boleto_reminder"], "amount_cents": "1.788,00"}, "does not render"),
        ("boleto_reminder", {**SAMPLES["boleto_reminder"], "due_date": "02/03/2026"}, "does not render"),
        ("boleto_issued", {**SAMPLES["boleto_issued"], "purpose": "gift"}, "purpose='gift'"),
        ("refund_created", {**SAMPLES["refund_created"], "method": "pix"}, "method='pix'"),
        ("refund_created", {"amount_cents": 100, "method": "card"}, "missing context keys: subscription_id"),
    ],
)
def test_notify_refuses_bad_notices_and_writes_nothing(
    session: Session, kind: str, context: dict[str, Any], message: str
) -> None:
    billing_org(session)
    with pytest.raises(ValueError, match=message):
        notify(session, organization_id=ORG_ID, kind=kind, dedupe_key="bad:1", context=context)
    session.commit()
    assert notification_count(session) == 0


def test_a_batch_renders_each_shape_once_and_still_refuses_a_value_of_another_type(
    session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    import jobs.notifications as notifications

    billing_org(session)
    rendered: list[str] = []
    real_render = notifications.render
    monkeypatch.setattr(notifications, "render", lambda *args: rendered.append(args[0].kind) or real_render(*args))
    good = [
        NoticeSpec(ORG_ID, "boleto_reminder", f"reminder:{n}", {**SAMPLES["boleto_reminder"], "amount_cents": 100 + n})
        for n in range(50)
    ]
    assert len(notify_many(session, good)) == 50
    assert rendered == ["boleto_reminder"]  # fifty receipts of one shape: rendered once
    wrong_type = NoticeSpec(ORG_ID, "boleto_reminder", "reminder:bad", {**good[0].context, "amount_cents": "1.788,00"})
    with pytest.raises(ValueError, match="does not render"):
        notify_many(session, [*good[:2], wrong_type])
    session.rollback()
    assert notification_count(session) == 0


def test_pending_notification_ids_are_the_old_unsent_ones(session: Session) -> None:
    billing_org(session)
    ids = [new_notice(session, "cancellation_scheduled", key=f"cancel:{n}") for n in range(3)]
    session.commit()
    session.get(Notification, ids[1]).status = "sent"
    session.commit()
    later = datetime.now(UTC) + timedelta(minutes=1)
    assert pending_notification_ids(session, later) == [ids[0], ids[2]]
    assert len(pending_notification_ids(session, later, limit=1)) == 1
    assert pending_notification_ids(session, datetime.now(UTC) - timedelta(hours=1)) == []


# --- recipients ----------------------------------------------------------------------------------


def test_recipients_are_active_owners_and_financial_responsibles(session: Session) -> None:
    add_organization(
        session,
        [
            {"email": "Dona@Acme.com.br", "role": "owner"},
            {"email": "financeiro@acme.com.br", "role": "member", "financial_responsible": True},
            {"email": "admin@acme.com.br", "role": "admin"},  # admin without the function: no
            {"email": "antiga@acme.com.br", "role": "owner", "active": False},
            {"email": "dona@acme.com.br ", "role": "member", "financial_responsible": True},  # same address
            {"email": None, "role": "owner"},
            {"email": "", "role": "owner"},
            {"email": "equipe@acme.com.br", "role": "member"},
            {"email": "admin.fin@acme.com.br", "role": "admin", "financial_responsible": True},
            {"email": "ex.fin@acme.com.br", "role": "member", "financial_responsible": True, "active": False},
        ],
    )
    add_organization(session, [{"email": "dono@outra.com.br", "role": "owner"}], org_id=2)
    notification = session.get(Notification, new_notice(session))
    assert recipients_for(session, notification) == [
        "Dona@Acme.com.br",
        "financeiro@acme.com.br",
        "admin.fin@acme.com.br",
    ]


def test_explicit_recipients_win(session: Session) -> None:
    billing_org(session)
    notification_id = new_notice(
        session, "change_request_rejected", recipients=["Quem.Pediu@acme.com.br", "quem.pediu@ACME.com.br", " "]
    )
    notification = session.get(Notification, notification_id)
    assert recipients_for(session, notification) == ["Quem.Pediu@acme.com.br"]


# --- rendering -----------------------------------------------------------------------------------


def test_every_kind_has_a_sample() -> None:
    assert set(SAMPLES) == set(KINDS) == set(EXPECTED)


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_renders_in_portuguese(kind: str) -> None:
    rendered = render(Notification(kind=kind, context=SAMPLES[kind], recipients=[]), ORG_NAME)
    assert rendered.subject and "\n" not in rendered.subject
    if "amount_cents" in SAMPLES[kind] and "R$" in rendered.subject:
        assert "R$\xa0" in rendered.subject  # the non-breaking space survives the clean-up
    for expected in EXPECTED[kind]:
        assert expected in rendered.text, expected
    assert ORG_NAME in rendered.text
    assert rendered.text.startswith("Olá,")
    for leftover in ("None", "{{", "{%", "}}", "Undefined", "True", "False"):
        assert leftover not in rendered.text and leftover not in rendered.subject, leftover
    assert "<p>" in rendered.html and "{{" not in rendered.html


def test_html_alternative_escapes_what_it_shows() -> None:
    rendered = render(
        Notification(kind="cancellation_undone", context=SAMPLES["cancellation_undone"], recipients=[]),
        "Silva & Souza <Ltda>",
    )
    assert "Silva & Souza <Ltda>" in rendered.text
    assert "Silva &amp; Souza &lt;Ltda&gt;" in rendered.html and "<Ltda>" not in rendered.html


def test_receipt_of_a_renewal_covered_by_credit_says_so() -> None:
    context = {**SAMPLES["charge_succeeded"], "amount_cents": 0, "card_brand": None, "card_last4": None}
    rendered = render(Notification(kind="charge_succeeded", context=context, recipients=[]), ORG_NAME)
    assert "coberta pelo seu crédito" in rendered.subject
    assert "R$\xa00,00 (coberto pelo crédito)" in rendered.text
    assert "nada foi cobrado no cartão de crédito" in rendered.text


def test_charge_failed_explains_hard_declines_and_the_last_attempt() -> None:
    hard = {**SAMPLES["charge_failed"], "code": "expired_card", "reason": None, "hard": True, "next_retry_on": None}
    text = render(Notification(kind="charge_failed", context=hard, recipients=[]), ORG_NAME).text
    assert "cartão vencido" in text and "não faremos novas tentativas" in text
    assert "Formas de pagamento" in text

    last = {**SAMPLES["charge_failed"], "code": "weird", "reason": "Do not try again", "next_retry_on": None}
    text = render(Notification(kind="charge_failed", context=last, recipients=[]), ORG_NAME).text
    assert "Motivo: Do not try again" in text and "última tentativa" in text


def test_cycle_change_to_monthly_shows_the_extension() -> None:
    context = {
        "from_cycle": "annual",
        "to_cycle": "monthly",
        "payment_method": "card",
        "quote": {
            "paid_cents": 178800,
            "unused_cents": 89400,
            "balance_cents": 500,
            "credit_cents": 89900,
            "amount_due_cents": 0,
            "new_period_start": "2026-07-01",
            "new_period_end": "2026-12-15",
            "balance_after_cents": 300,
            "months": 5,
            "extra_days": 1,
        },
    }
    text = render(Notification(kind="cycle_changed", context=context, recipients=[]), ORG_NAME).text
    assert "5 meses e 1 dia de assinatura" in text
    assert "Próxima renovação: 15/12/2026" in text
    assert "Crédito que a assinatura já tinha: R$\xa05,00" in text
    assert "descontado da próxima cobrança: R$\xa03,00" in text


def rendered(kind: str, context: dict[str, Any]) -> Any:
    return render(Notification(kind=kind, context=context, recipients=[]), ORG_NAME)


# The sentence that says what a boleto pays, for the sample's period 02/03/2026 to 01/03/2027.
PURPOSE_SENTENCES = {
    "renewal": "Este boleto paga a renovação da assinatura anual (período 02/03/2026 a 01/03/2027).",
    "subscribe": "Este boleto paga a nova assinatura, no ciclo de cobrança anual (período 02/03/2026 a 01/03/2027).",
    "cycle_change": (
        "Este boleto paga a alteração do plano (ciclo de cobrança) para o ciclo anual (período 02/03/2026 a 01/03/2027)."
    ),
    "reissue": "o boleto anterior foi cancelado e não deve mais ser pago. Pague somente este boleto.",
}


@pytest.mark.parametrize("purpose", BOLETO_PURPOSES)
def test_boleto_issued_says_what_it_pays(purpose: str) -> None:
    email = rendered("boleto_issued", {**SAMPLES["boleto_issued"], "purpose": purpose})
    assert PURPOSE_SENTENCES[purpose] in email.text
    for other, sentence in PURPOSE_SENTENCES.items():
        if other != purpose:
            assert sentence not in email.text, other
    assert LINHA in email.text and "R$\xa01.788,00" in email.text and "Vencimento: 02/03/2026" in email.text
    # Only a renewal's boleto says the renewal can no longer move to card.
    assert ("Como o boleto desta renovação já foi gerado" in email.text) == (purpose == "renewal")
    if purpose == "reissue":
        assert email.subject == "Segunda via do boleto da assinatura CONECTA: R$\xa01.788,00, vencimento em 02/03/2026"
        assert "A segunda via do boleto da assinatura CONECTA" in email.text
    else:
        assert email.subject.startswith("Boleto da assinatura CONECTA: R$\xa01.788,00")


@pytest.mark.parametrize("context", [SAMPLES["boleto_issued"], {**SAMPLES["boleto_issued"], "purpose": None}])
def test_boleto_issued_without_a_purpose_is_a_renewal(context: dict[str, Any]) -> None:
    text = rendered("boleto_issued", context).text
    assert PURPOSE_SENTENCES["renewal"] in text
    assert "segunda via" not in text.lower()


def test_renewal_notice_names_the_last_day_to_switch_a_boleto_renewal_to_card() -> None:
    text = rendered("renewal_notice", SAMPLES["renewal_notice"]).text
    assert "Esta renovação será paga via boleto, gerado 7 dias antes da data de renovação" in text
    assert "altere a forma de pagamento em Minhas assinaturas até 22/04/2026" in text
    # Once the deadline has passed the notice is sent without it, and promises no switch.
    late = {key: value for key, value in SAMPLES["renewal_notice"].items() if key != "switch_to_card_until"}
    text = rendered("renewal_notice", late).text
    assert "será paga via boleto" in text and "Para pagar com cartão de crédito" not in text
    card = {**SAMPLES["renewal_notice"], "payment_method": "card", "switch_to_card_until": None}
    text = rendered("renewal_notice", card).text
    assert "cobrado no cartão de crédito" in text and "via boleto" not in text


def test_suspension_notice_shows_the_open_boleto() -> None:
    context = {
        "invoice_id": 41,
        "amount_cents": 178800,
        "reason": "boleto",
        "digitable_line": LINHA,
        "boleto_due_date": "2026-03-02",
    }
    text = rendered("subscription_suspended", context).text
    assert "pagamento de R$\xa01.788,00 não foi identificado após o vencimento do boleto" in text
    assert "pague o boleto em aberto: o pagamento reativa a assinatura" in text
    assert "Vencimento do boleto: 02/03/2026\n\nLinha digitável:\n" + LINHA in text
    assert "Formas de pagamento" not in text  # the card update is for card invoices


def test_refund_notice_says_how_the_money_comes_back() -> None:
    card = rendered("refund_created", SAMPLES["refund_created"])
    assert card.subject == "Reembolso de R$\xa01.234,56 da assinatura CONECTA"
    assert "Valor do reembolso: R$\xa01.234,56" in card.text
    assert "Forma de devolução: estorno no cartão de crédito final 4242" in card.text
    assert "transferência bancária" not in card.text

    no_last4 = rendered("refund_created", {**SAMPLES["refund_created"], "card_last4": None}).text
    assert "Forma de devolução: estorno no cartão de crédito\n" in no_last4

    payout = rendered("refund_created", {"subscription_id": 3, "amount_cents": 5050, "method": "payout"}).text
    assert "Valor do reembolso: R$\xa050,50" in payout
    assert "Forma de devolução: transferência bancária" in payout
    assert "foi pago via boleto" in payout
    assert "Nossa equipe entrará em contato para solicitar os dados bancários" in payout
    assert "estorno" not in payout


def test_cancellation_notice_lists_voided_invoices_and_the_balance_to_refund() -> None:
    several = {"ended_on": "2026-05-31", "voided_invoice_ids": [12, 13], "credit_cents": 123456}
    text = rendered("subscription_canceled", several).text
    assert "As faturas nº 12 e nº 13, que estavam em aberto, foram canceladas: nada é devido por elas" in text
    assert "O saldo de R$\xa01.234,56 que a assinatura tinha será devolvido" in text

    one = rendered("subscription_canceled", {"ended_on": "2026-05-31", "voided_invoice_ids": [12]}).text
    assert "A fatura nº 12, que estava em aberto, foi cancelada" in one
    assert "O saldo de" not in one


# --- notices written by the billing flows ---------------------------------------------------------

RUN_DAY = date(2028, 2, 9)  # 30 days before 10/03/2028


def annual_subscription(
    session: Session, organization_id: int, *, method: str, renewal: date, status: str = "active"
) -> Subscription:
    organization = make_organization(session, organization_id, card_token="tok_ok" if method == "card" else None)
    anchor = renewal.replace(year=renewal.year - 1)
    subscription = make_subscription(session, organization, cycle="annual", method=method, anchor=anchor)
    assert subscription.current_period_end == renewal
    subscription.status = status
    session.flush()
    return subscription


def renewal_notices(session: Session) -> dict[int, dict[str, Any]]:
    notices = session.scalars(select(Notification).where(Notification.kind == "renewal_notice"))
    return {notice.subscription_id: notice.context for notice in notices}


def test_daily_run_sends_no_renewal_notice_to_a_suspended_subscription(session: Session, billing_gateway: Any) -> None:
    seed_plans(session)
    renewal = RUN_DAY + timedelta(days=30)
    active = annual_subscription(session, 1, method="card", renewal=renewal)
    suspended = annual_subscription(session, 2, method="card", renewal=renewal, status="suspended")
    session.commit()

    for day in (RUN_DAY, RUN_DAY + timedelta(days=1)):
        run_day(session, billing_gateway, day, noon(day), runtime().config)

    notices = renewal_notices(session)
    assert set(notices) == {active.id}, suspended.id
    assert notices[active.id]["renewal_date"] == "2028-03-10"


def test_suspended_subscription_is_skipped_by_the_scan_and_by_the_handler(
    session: Session, billing_gateway: Any
) -> None:
    seed_plans(session)
    renewal = RUN_DAY + timedelta(days=30)
    active = annual_subscription(session, 1, method="boleto", renewal=renewal)
    suspended = annual_subscription(session, 2, method="boleto", renewal=renewal, status="suspended")
    session.commit()

    due = set(session.scalars(scan_renewal_notices(RUN_DAY, runtime().config)))
    assert active.id in due and suspended.id not in due

    # A message naming it anyway (scanned before it was suspended) sends nothing either.
    work = renewals.Work(on=RUN_DAY, now=noon(RUN_DAY), config=runtime().config, gateway=billing_gateway)
    renewals.send_renewal_notice(session, suspended.id, work)
    renewals.send_renewal_notice(session, active.id, work)
    session.commit()
    assert set(renewal_notices(session)) == {active.id}
    assert work.done == 1


def test_boleto_renewal_notice_names_the_last_day_to_switch_to_card(session: Session, billing_gateway: Any) -> None:
    seed_plans(session)
    early = annual_subscription(session, 1, method="boleto", renewal=RUN_DAY + timedelta(days=30))
    switching = annual_subscription(session, 2, method="card", renewal=RUN_DAY + timedelta(days=30))
    switching.pending_payment_method = "boleto"  # the effective method pays the renewal
    last_day = annual_subscription(session, 3, method="boleto", renewal=RUN_DAY + timedelta(days=8))
    too_late = annual_subscription(session, 4, method="boleto", renewal=RUN_DAY + timedelta(days=7))
    card = annual_subscription(session, 5, method="card", renewal=RUN_DAY + timedelta(days=30))
    session.commit()

    run_day(session, billing_gateway, RUN_DAY, noon(RUN_DAY), runtime().config)

    notices = renewal_notices(session)
    assert set(notices) == {early.id, switching.id, last_day.id, too_late.id, card.id}
    # T − 8: boleto → card is accepted while today < T − 7, the day the boleto is issued.
    assert notices[early.id]["switch_to_card_until"] == "2028-03-02"
    assert (notices[switching.id]["payment_method"], notices[switching.id]["switch_to_card_until"]) == (
        "boleto",
        "2028-03-02",
    )
    assert notices[last_day.id]["switch_to_card_until"] == RUN_DAY.isoformat()
    assert "switch_to_card_until" not in notices[too_late.id]
    assert "switch_to_card_until" not in notices[card.id] and notices[card.id]["payment_method"] == "card"

    notice = session.scalars(select(Notification).where(Notification.subscription_id == early.id)).one()
    text = render(notice, "Acme Ltda").text
    assert "Valor da renovação: R$\xa0479,00" in text
    assert "Esta renovação será paga via boleto, gerado 7 dias antes da data de renovação" in text
    assert "altere a forma de pagamento em Minhas assinaturas até 02/03/2028" in text


def open_renewal_invoice(session: Session, subscription: Subscription, method: str) -> Invoice:
    start = subscription.current_period_end
    invoice = Invoice(
        subscription_id=subscription.id,
        organization_id=subscription.organization_id,
        kind="renewal",
        cycle=subscription.cycle,
        period_start=start,
        period_end=start.replace(year=start.year + 1),
        amount_cents=ANNUAL_PRICE,
        discount_cents=0,
        total_cents=ANNUAL_PRICE,
        status="open",
        method=method,
        due_date=start,
    )
    session.add(invoice)
    session.flush()
    return invoice


def test_suspension_notice_carries_the_live_boleto_or_the_card_update(session: Session) -> None:
    old_line = "34191.09008 00015.710296 30132.800001 1 11110000047900"
    by_boleto = annual_subscription(session, 1, method="boleto", renewal=date(2028, 3, 10), status="past_due")
    invoice = open_renewal_invoice(session, by_boleto, "boleto")
    session.add_all(
        [
            Boleto(
                invoice_id=invoice.id,
                sequence=1,
                gateway_id="bol_first",
                nosso_numero="1",
                barcode="",
                digitable_line=old_line,
                amount_cents=ANNUAL_PRICE,
                due_date=date(2028, 3, 10),
                status="canceled",
            ),
            Boleto(  # the segunda via
                invoice_id=invoice.id,
                sequence=2,
                gateway_id="bol_second",
                nosso_numero="2",
                barcode="",
                digitable_line=LINHA,
                amount_cents=ANNUAL_PRICE,
                due_date=date(2028, 3, 20),
                status="overdue",
                overdue_on=date(2028, 3, 21),
            ),
        ]
    )
    by_card = annual_subscription(session, 2, method="card", renewal=date(2028, 3, 10), status="past_due")
    card_invoice = open_renewal_invoice(session, by_card, "card")
    session.flush()

    suspend(session, by_boleto, invoice, now=noon(date(2028, 3, 24)), reason="boleto")
    suspend(session, by_card, card_invoice, now=noon(date(2028, 3, 24)), reason="card")
    session.commit()

    notices = {
        notice.subscription_id: notice
        for notice in session.scalars(select(Notification).where(Notification.kind == "subscription_suspended"))
    }
    boleto_notice = notices[by_boleto.id]
    assert boleto_notice.context["digitable_line"] == LINHA
    assert boleto_notice.context["boleto_due_date"] == "2028-03-20"
    text = render(boleto_notice, "Acme Ltda").text
    assert "Vencimento do boleto: 20/03/2028\n\nLinha digitável:\n" + LINHA in text
    assert old_line not in text
    assert "pague o boleto em aberto: o pagamento reativa a assinatura" in text

    card_notice = notices[by_card.id]
    assert "digitable_line" not in card_notice.context and "boleto_due_date" not in card_notice.context
    text = render(card_notice, "Acme Ltda").text
    assert "Linha digitável" not in text and "Formas de pagamento" in text


def test_a_boleto_renewal_suspended_by_the_daily_run_is_notified_with_its_boleto(
    session: Session, billing_gateway: Any
) -> None:
    seed_plans(session)
    subscription = annual_subscription(session, 1, method="boleto", renewal=date(2028, 3, 10))
    session.commit()
    day = date(2028, 3, 3)  # T − 7: the boleto is issued
    while day <= date(2028, 3, 15):  # overdue on the 11th, suspended three business days later
        run_day(session, billing_gateway, day, noon(day), runtime().config)
        day += timedelta(days=1)

    session.refresh(subscription)
    assert subscription.status == "suspended"
    boleto = session.scalars(select(Boleto)).one()
    notice = session.scalars(select(Notification).where(Notification.kind == "subscription_suspended")).one()
    assert notice.context["digitable_line"] == boleto.digitable_line
    assert notice.context["boleto_due_date"] == "2028-03-10"
    text = render(notice, "Acme Ltda").text
    assert "Linha digitável:\n" + boleto.digitable_line in text and "Vencimento do boleto: 10/03/2028" in text


# --- delivery, as plain functions ------------------------------------------------------------------


def test_smtp_failure_is_recorded_and_raised_for_a_retry(session: Session) -> None:
    billing_org(session)
    notification_id = new_notice(session)
    session.commit()
    with pytest.raises(DeliveryFailed) as failure:
        deliver_notification(session, notification_id, SmtpMailer(closed_port_url()), MAIL_FROM, NOW)
    assert isinstance(failure.value.error, ConnectionRefusedError)
    assert is_transient(failure.value.error)
    notification = session.get(Notification, notification_id)
    assert (notification.status, notification.attempts) == ("pending", 1)
    assert notification.last_error.startswith("ConnectionRefusedError")
    session.rollback()


def test_recipients_refused_for_good_mark_the_notice_failed(session: Session, tmp_path: Path) -> None:
    class RefusingHandler(EmlWriter):
        async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: Any) -> str:
            return "550 5.1.1 mailbox unavailable"

    billing_org(session)
    notification_id = new_notice(session)
    session.commit()
    controller = Controller(RefusingHandler(tmp_path), hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        mailer = SmtpMailer(f"smtp://127.0.0.1:{controller.port}")
        outcome = deliver_notification(session, notification_id, mailer, MAIL_FROM, NOW)
    finally:
        controller.stop()
    session.commit()
    assert outcome == "refused"
    notification = fetch(notification_id)
    assert notification.status == "failed" and "550" in notification.last_error
    assert deliver_notification(session, notification_id, mailer, MAIL_FROM, NOW) == "already_failed"
    assert deliver_notification(session, 999_999, mailer, MAIL_FROM, NOW) == "missing"


# --- delivery through the broker and a worker ----------------------------------------------------


def test_delivered_once_through_the_broker(
    session: Session, worker: Any, broker: Any, smtp_target: dict[str, str], mailbox: MailSink
) -> None:
    add_organization(
        session,
        [
            {"email": "dona@acme.com.br", "role": "owner"},
            {"email": "financeiro@acme.com.br", "role": "member", "financial_responsible": True},
        ],
    )
    notification_id = notify(
        session,
        organization_id=ORG_ID,
        kind="boleto_issued",
        dedupe_key="boleto_issued:41",
        context=SAMPLES["boleto_issued"],
    )
    session.commit()  # notify enqueued the delivery, sent now that the row exists

    wait_until(lambda: fetch(notification_id).status == "sent")
    [message] = mailbox.messages()
    assert [address for _, address in getaddresses([message["To"]])] == [
        "dona@acme.com.br",
        "financeiro@acme.com.br",
    ]
    assert message["From"] == MAIL_FROM
    assert message["Subject"] == "Boleto da assinatura CONECTA: R$\xa01.788,00, vencimento em 02/03/2026"
    assert message["X-Renova-Notification"] == "boleto_issued:41"
    assert message["Message-ID"].endswith("@conecta.example>")
    body = plain_body(message)
    assert "Linha digitável:\n" + LINHA in body and "R$\xa01.788,00" in body and "Vencimento: 02/03/2026" in body
    assert message.get_body(("html",)) is not None
    notification = fetch(notification_id)
    assert notification.attempts == 1 and notification.sent_at is not None


def test_nothing_is_enqueued_when_the_transaction_rolls_back(session: Session, broker: Any) -> None:
    billing_org(session)
    session.commit()
    new_notice(session)
    session.rollback()
    session.commit()  # a later commit of the same session does not resurrect the message
    assert broker.client.llen("dramatiq:notifications") == 0
    assert notification_count(session) == 0


def test_a_duplicated_message_sends_one_email(
    session: Session, worker: Any, broker: Any, smtp_target: dict[str, str], mailbox: MailSink
) -> None:
    billing_org(session)
    notification_id = new_notice(session)
    session.commit()
    send_notification.send(notification_id)
    send_notification.send(notification_id)

    wait_until(lambda: fetch(notification_id).status == "sent")
    settle(broker, worker)
    assert len(mailbox.paths()) == 1
    assert fetch(notification_id).attempts == 1


def test_smtp_down_is_retried_then_delivered_once(
    session: Session, worker: Any, broker: Any, smtp_target: dict[str, str], mailbox: MailSink
) -> None:
    billing_org(session)
    notification_id = new_notice(session)
    session.commit()
    smtp_target["url"] = closed_port_url()
    # Short backoff for the test; the actor's own options (seconds to minutes) are otherwise the same.
    send_notification.send_with_options(args=(notification_id,), min_backoff=100, max_backoff=400)

    # Each failed attempt is counted although the message's transaction is rolled back.
    wait_until(lambda: fetch(notification_id).attempts >= 2)
    notification = fetch(notification_id)
    assert notification.status == "pending" and notification.sent_at is None
    assert "ConnectionRefusedError" in notification.last_error
    assert mailbox.paths() == []

    smtp_target["url"] = mailbox.url
    wait_until(lambda: fetch(notification_id).status == "sent")
    settle(broker, worker)
    assert len(mailbox.paths()) == 1
    assert plain_body(mailbox.messages()[0]).startswith("Olá,")


def test_no_recipient_fails_without_retry(
    session: Session, worker: Any, broker: Any, smtp_target: dict[str, str], mailbox: MailSink
) -> None:
    add_organization(session, [{"email": "equipe@acme.com.br", "role": "member"}])
    notification_id = new_notice(session)
    session.commit()
    send_notification.send(notification_id)

    wait_until(lambda: fetch(notification_id).status == "failed")
    settle(broker, worker)
    notification = fetch(notification_id)
    assert (notification.attempts, notification.last_error) == (1, NO_RECIPIENTS)
    assert broker.client.zcard("dramatiq:notifications.XQ") == 0  # not dead-lettered either
    assert mailbox.paths() == []


# --- the mailer and the embedded sink ------------------------------------------------------------


def test_smtp_urls() -> None:
    tls = SmtpMailer("smtps://cobranca%40conecta.example:s%3Acreta@mail.example")
    assert (tls.use_tls, tls.starttls, tls.port) == (True, False, 465)
    assert (tls.username, tls.password) == ("cobranca@conecta.example", "s:creta")
    assert "s:creta" not in repr(tls) and "creta" not in tls.url
    submission = SmtpMailer("smtp://mail.example?starttls=1")
    assert (submission.use_tls, submission.starttls, submission.port) == (False, True, 587)
    assert SmtpMailer("smtp://127.0.0.1:2525").port == 2525
    with pytest.raises(ValueError):
        SmtpMailer("http://mail.example")


def test_mailer_from_settings() -> None:
    configured = mailer_from_settings(Settings(SMTP_URL="smtp://mail.example:2525"))
    assert (configured.host, configured.port) == ("mail.example", 2525)
    with pytest.raises(SettingsError, match="SMTP_URL"):
        mailer_from_settings(Settings(RENOVA_ENV="production", SMTP_URL=""))


def test_embedded_sink_is_started_once_reused_and_stopped(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    url = ensure_mail_sink(data_dir)
    try:
        pid = int((data_dir / "smtp" / "pid").read_text())
        assert ensure_mail_sink(data_dir) == url
        assert int((data_dir / "smtp" / "pid").read_text()) == pid

        message = EmailMessage()
        message["From"] = MAIL_FROM
        message["To"] = "dona@acme.com.br"
        message["Subject"] = "Teste de envio"
        message.set_content("Olá, tudo certo com a cobrança.")
        SmtpMailer(url).send(message)
        [received] = wait_until(lambda: read_messages(data_dir / "mail"))
        assert received["Subject"] == "Teste de envio"
        assert received["X-Envelope-To"] == "dona@acme.com.br"
        assert "tudo certo" in received.get_content()
    finally:
        assert stop_mail_sink(data_dir)
    port = int(url.rsplit(":", 1)[1])
    assert not sink_answers(port)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not stop_mail_sink(data_dir)
