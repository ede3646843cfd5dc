"""Notices in words: the pt-BR templates (`jobs/templates`) and what they need to render a notice.

`render` turns a `notifications` row into a subject, a plain-text body and an HTML alternative.
Kinds, their context and its validation are in `jobs.notifications`; sending is in
`jobs.notice_delivery`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any, Final

import jinja2

from models.calendar import format_date_br
from models.money import format_brl
from models.policy import cycle_name, payment_method_name
from models.schema import Notification

# Optional context keys and the value templates see when a key is missing or null.
OPTIONAL_KEYS: Final[dict[str, dict[str, Any]]] = {
    # The boleto the PDF attachment shows and its Pix code (absent from notices written before them).
    "boleto_issued": {"purpose": "renewal", "boleto_id": None, "pix_code": None},
    "boleto_reminder": {"boleto_id": None, "pix_code": None},
    "boleto_overdue": {"boleto_id": None, "pix_code": None},
    # The open invoice's live boleto (none for a card invoice: the notice explains the card update).
    "subscription_suspended": {"digitable_line": None, "boleto_due_date": None, "boleto_id": None, "pix_code": None},
    # Boleto renewals: the last day to move the renewal to card (T − lead − 1), while it is still ahead.
    "renewal_notice": {"switch_to_card_until": None, "boleto_lead_days": None},
    "payment_method_switch_scheduled": {"card_last4": None},
    "subscription_canceled": {"voided_invoice_ids": None, "credit_cents": None},
    "refund_created": {"card_last4": None},
}

TEMPLATES_DIR: Final = Path(__file__).resolve().parent / "templates"

_CARD_BRANDS: Final = {
    "visa": "Visa",
    "mastercard": "Mastercard",
    "master": "Mastercard",
    "amex": "American Express",
    "american_express": "American Express",
    "elo": "Elo",
    "hipercard": "Hipercard",
    "diners": "Diners Club",
    "discover": "Discover",
    "jcb": "JCB",
}
# Gateway decline codes in words a customer understands; other codes show the gateway's reason.
DECLINE_REASONS: Final = {
    "insufficient_funds": "saldo ou limite insuficiente",
    "do_not_honor": "transação não autorizada pelo banco emissor do cartão",
    "expired_card": "cartão vencido",
    "stolen_card": "cartão bloqueado por roubo ou perda",
    "lost_card": "cartão bloqueado por roubo ou perda",
    "invalid_card": "dados do cartão inválidos",
    "incorrect_number": "número do cartão inválido",
    "card_declined": "transação recusada pelo banco emissor do cartão",
}
# Change-request kinds, as "Solicitação de …".
REQUEST_NAMES: Final = {
    "change_cycle": "alteração do ciclo de cobrança",
    "cycle_change": "alteração do ciclo de cobrança",
    "switch_payment_method": "alteração da forma de pagamento",
    "payment_method_switch": "alteração da forma de pagamento",
    "change_payment_method": "alteração da forma de pagamento",
    "update_card": "atualização do cartão de crédito",
    "card_update": "atualização do cartão de crédito",
    "subscribe": "assinatura do CONECTA",
    "cancel": "cancelamento da assinatura",
    "undo_cancel": "reversão do cancelamento da assinatura",
    "undo_cancellation": "reversão do cancelamento da assinatura",
    "reissue_boleto": "segunda via do boleto",
}


@dataclass(frozen=True)
class RenderedEmail:
    subject: str
    text: str
    html: str


def _as_date(value: date | str) -> date:
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    if isinstance(value, str):
        return date.fromisoformat(value)
    raise TypeError(f"expected a date or an ISO date string, got {value!r}")


def _data(value: date | str) -> str:
    return format_date_br(_as_date(value))


def _periodo(start: date | str, end: date | str) -> str:
    # Periods are [start, end): people read the last day they have, not the renewal date.
    return f"{_data(start)} a {_data(_as_date(end) - timedelta(days=1))}"


def _plural(count: int, singular: str, plural: str) -> str:
    return f"{count} {singular if count == 1 else plural}"


def _brand(brand: str | None) -> str:
    return _CARD_BRANDS.get((brand or "").strip().lower(), (brand or "").strip().title() or "Cartão")


def _decline_reason(code: str | None, reason: str | None) -> str:
    return DECLINE_REASONS.get(code or "") or reason or "transação recusada pelo banco emissor do cartão"


@cache
def _environment() -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html",), default_for_string=False),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters.update(
        brl=format_brl,
        data=_data,
        forma=payment_method_name,
        ciclo=cycle_name,
        bandeira=_brand,
        solicitacao=lambda kind: REQUEST_NAMES.get(kind, "alteração da assinatura"),
    )
    environment.globals.update(periodo=_periodo, plural=_plural, motivo=_decline_reason)
    return environment


# ASCII whitespace only: the non-breaking space of "R$\xa01,00" must survive the clean-up.
_LAYOUT_SPACE: Final = " \t\r\n"


def _one_line(text: str) -> str:
    return re.sub(f"[{_LAYOUT_SPACE}]+", " ", text).strip(_LAYOUT_SPACE)


def _tidy(text: str) -> str:
    lines = [line.rstrip(_LAYOUT_SPACE) for line in text.strip(_LAYOUT_SPACE).splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)) + "\n"


def _paragraphs(text: str) -> list[list[str]]:
    return [block.splitlines() for block in text.strip(_LAYOUT_SPACE).split("\n\n") if block.strip(_LAYOUT_SPACE)]


def render(notification: Notification, organization_name: str) -> RenderedEmail:
    """Subject, plain-text body and an HTML alternative (the same text, escaped) in pt-BR."""
    environment = _environment()
    template = environment.get_template(f"{notification.kind}.txt")
    variables = {
        **notification.context,
        **{
            key: default
            for key, default in OPTIONAL_KEYS.get(notification.kind, {}).items()
            if notification.context.get(key) is None
        },
        "organization_name": organization_name,
        # Explicit recipients (e.g. who made a request) are not necessarily billing contacts.
        "billing_contacts": not notification.recipients,
    }
    subject = _one_line("".join(template.blocks["subject"](template.new_context(variables))))
    text = _tidy(template.render(variables))
    html = environment.get_template("_layout.html").render(subject=subject, paragraphs=_paragraphs(text))
    return RenderedEmail(subject=subject, text=text, html=html)
