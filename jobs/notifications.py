"""E-mail notices to the people who pay: written with the state change, delivered over SMTP once.

A notice is a `notifications` row (unique `dedupe_key`) inserted by `notify` in the same transaction
as the change that causes it. After that transaction commits, `notify` has `send_notification`
enqueued (through `jobs.outbox`, never before the row exists); the scheduler's tick re-enqueues rows still pending
(`pending_notification_ids`), so a lost message only delays a notice. Delivery locks the row, so a
duplicated message finds it sent and sends nothing.

Failures (SMTP, or a notice that cannot be rendered): the attempt is recorded on the row by
`jobs.work_attempts` (error, next attempt after a backoff, "needs attention" after too many) and
committed before the error is raised again, so it survives the rollback of the message's
transaction; the row stays `pending`, the message is retried with backoff when the error is
transient, and the tick re-enqueues it once its next attempt is due. Only two outcomes are final
failures, because retrying cannot help: no recipient at all, and every recipient refused by the
server with a permanent (5xx) code.

Context values are JSON-friendly: amounts in integer cents, dates as ISO `YYYY-MM-DD` strings.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr
from functools import cache
from pathlib import Path
from typing import Any, Final

import dramatiq
import jinja2
from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

import jobs
from jobs import clock
from jobs.context import Mailer, NotConfigured, current_session, runtime
from jobs.errors import PermanentError, cause
from jobs.outbox import send_after_commit
from jobs.retries import STANDARD
from jobs.work_attempts import NOTIFICATION, describe_error, due_for_retry, record_apart, record_failure
from models.calendar import format_date_br
from models.money import format_brl
from models.policy import cycle_name, payment_method_name
from models.schema import Member, Notification, Organization
from models.states import BoletoPurpose, NotificationStatus, RefundMethod, Role

jobs.require_broker()

QUEUE: Final = "notifications"

# --- kinds and their context -------------------------------------------------------------------

_BOLETO_KEYS: Final = ("invoice_id", "amount_cents", "due_date", "digitable_line", "period_start", "period_end")

# Required context keys of each kind. Templates may also read the optional keys listed below.
CONTEXT_KEYS: Final[dict[str, tuple[str, ...]]] = {
    "boleto_issued": _BOLETO_KEYS,
    "boleto_reminder": _BOLETO_KEYS,
    "boleto_overdue": ("invoice_id", "amount_cents", "due_date", "digitable_line", "suspend_on"),
    "charge_succeeded": (
        "invoice_id",
        "amount_cents",
        "card_brand",
        "card_last4",
        "period_start",
        "period_end",
        "paid_on",
    ),
    "charge_failed": ("invoice_id", "amount_cents", "code", "reason", "hard", "next_retry_on", "card_last4"),
    "subscription_suspended": ("invoice_id", "amount_cents", "reason"),
    "subscription_reactivated": ("invoice_id", "period_start", "period_end"),
    "payment_method_switch_scheduled": ("from_method", "to_method", "effective_on"),
    "payment_method_switch_applied": ("from_method", "to_method", "renewal_date"),
    "cycle_changed": ("from_cycle", "to_cycle", "quote", "payment_method"),
    "card_updated": ("brand", "last4", "exp_month", "exp_year"),
    "change_request_rejected": ("kind", "code", "message"),
    "renewal_notice": ("renewal_date", "amount_cents", "cycle", "payment_method"),
    "subscribed": ("cycle", "payment_method", "period_start", "period_end", "amount_cents"),
    "cancellation_scheduled": ("ends_on",),
    "subscription_canceled": ("ended_on",),
    "cancellation_undone": ("renewal_date",),
    "refund_created": ("subscription_id", "amount_cents", "method"),
}
KINDS: Final[tuple[str, ...]] = tuple(CONTEXT_KEYS)

# What a boleto pays (boleto_issued `purpose`); notices written before the key existed were renewals.
BOLETO_PURPOSES: Final = tuple(BoletoPurpose)
# How a refund reaches the customer (refund_created `method`): a card refund (estorno) through the
# gateway, or a bank transfer for money that came by boleto.
REFUND_METHODS: Final = tuple(RefundMethod)

# Optional context keys and the value templates see when a key is missing or null.
OPTIONAL_KEYS: Final[dict[str, dict[str, Any]]] = {
    "boleto_issued": {"purpose": "renewal"},
    # The open invoice's live boleto (none for a card invoice: the notice explains the card update).
    "subscription_suspended": {"digitable_line": None, "boleto_due_date": None},
    # Boleto renewals: the last day to move the renewal to card (T − lead − 1), while it is still ahead.
    "renewal_notice": {"switch_to_card_until": None, "boleto_lead_days": None},
    "payment_method_switch_scheduled": {"card_last4": None},
    "subscription_canceled": {"voided_invoice_ids": None, "credit_cents": None},
    "refund_created": {"card_last4": None},
}
# Values a key may take, where the templates word each one differently.
ALLOWED_VALUES: Final[dict[str, dict[str, tuple[str, ...]]]] = {
    "boleto_issued": {"purpose": BOLETO_PURPOSES},
    "refund_created": {"method": REFUND_METHODS},
}

# Required keys that may hold null (e.g. no retry left, a receipt covered by credit without a card).
NULLABLE_KEYS: Final[dict[str, frozenset[str]]] = {
    "charge_succeeded": frozenset({"card_brand", "card_last4"}),
    "charge_failed": frozenset({"reason", "next_retry_on", "card_last4"}),
}
QUOTE_KEYS: Final = (
    "paid_cents",
    "unused_cents",
    "balance_cents",
    "credit_cents",
    "amount_due_cents",
    "new_period_start",
    "new_period_end",
    "balance_after_cents",
)
# Optional quote keys the cycle_changed template uses when present: quote.months / quote.extra_days
# (annual → monthly). Other kinds' optional keys are in OPTIONAL_KEYS.

NO_RECIPIENTS: Final = "sem destinatários"


def _missing_keys(kind: str, context: Mapping[str, Any]) -> list[str]:
    nullable = NULLABLE_KEYS.get(kind, frozenset())
    missing = [
        key for key in CONTEXT_KEYS[kind] if context.get(key) is None and not (key in context and key in nullable)
    ]
    if kind == "cycle_changed" and isinstance(context.get("quote"), Mapping):
        quote = context["quote"]
        missing += [f"quote.{key}" for key in QUOTE_KEYS if quote.get(key) is None]
    return missing


def _unexpected_values(kind: str, context: Mapping[str, Any]) -> list[str]:
    return [
        f"{key}={context[key]!r} (expected one of {', '.join(allowed)})"
        for key, allowed in ALLOWED_VALUES.get(kind, {}).items()
        if context.get(key) is not None and context[key] not in allowed
    ]


def validate_context(kind: str, context: Mapping[str, Any]) -> dict[str, Any]:
    """The context as stored (dates as ISO strings), or ValueError naming what is wrong with it.

    Besides the required keys, the notice is rendered once here, so a value of the wrong type is
    refused while the caller can still fix it instead of failing later in the worker.
    """
    if kind not in CONTEXT_KEYS:
        raise ValueError(f"unknown notification kind {kind!r}; expected one of {', '.join(KINDS)}")
    stored = _json_friendly(dict(context))
    missing = _missing_keys(kind, stored)
    if missing:
        raise ValueError(f"{kind}: missing context keys: {', '.join(missing)}")
    unexpected = _unexpected_values(kind, stored)
    if unexpected:
        raise ValueError(f"{kind}: unexpected context values: {'; '.join(unexpected)}")
    try:
        render(Notification(kind=kind, context=stored, recipients=[]), "Organização")
    except (jinja2.TemplateError, TypeError, ValueError, AttributeError, KeyError) as exc:
        raise ValueError(f"{kind}: the context does not render: {exc}") from exc
    return stored


def _json_friendly(value: Any) -> Any:
    if isinstance(value, datetime):
        raise ValueError("notification context dates must be dates, not datetimes")
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(key): _json_friendly(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_friendly(item) for item in value]
    return value


# --- writing -----------------------------------------------------------------------------------


def notify(
    session: Session,
    *,
    organization_id: int,
    kind: str,
    dedupe_key: str,
    context: Mapping[str, Any],
    subscription_id: int | None = None,
    recipients: list[str] | None = None,
) -> int | None:
    """Record a notice in the caller's transaction; the new row's id, or None if `dedupe_key` exists.

    Its delivery is enqueued once that transaction commits (never before: the row must exist), and
    the scheduler's tick re-enqueues any notice whose message was lost.
    """
    if not dedupe_key or len(dedupe_key) > 255:
        raise ValueError("dedupe_key must be 1 to 255 characters")
    stored = validate_context(kind, context)
    statement = (
        insert(Notification)
        .values(
            organization_id=organization_id,
            subscription_id=subscription_id,
            kind=kind,
            dedupe_key=dedupe_key,
            recipients=[address.strip() for address in recipients or [] if address and address.strip()],
            context=stored,
        )
        .on_conflict_do_nothing(index_elements=[Notification.dedupe_key])
        .returning(Notification.id)
    )
    notification_id = session.execute(statement).scalar_one_or_none()
    if notification_id is not None:
        send_after_commit(session, send_notification, notification_id)
    return notification_id


def pending_notification_ids(
    session: Session, older_than: datetime, limit: int = 1000, *, now: datetime | None = None
) -> list[int]:
    """Pending notices created before `older_than` and due for another attempt at `now` (default
    `older_than`; never one that needs attention), oldest first (served by ix_notifications_unsent)."""
    statement = (
        select(Notification.id)
        .where(Notification.status == NotificationStatus.PENDING.value, Notification.created_at < older_than)
        .where(due_for_retry(Notification, now or older_than))
        .order_by(Notification.created_at)
        .limit(limit)
    )
    return list(session.scalars(statement))


# --- recipients ---------------------------------------------------------------------------------


def _plausible_address(address: str) -> bool:
    # Whitespace or line breaks would make an invalid header (and a message that can never be built).
    return "@" in address and not any(char.isspace() for char in address)


def _unique_addresses(addresses: Iterable[str | None]) -> list[str]:
    seen: set[str] = set()
    unique = []
    for raw in addresses:
        address = (raw or "").strip()
        if not _plausible_address(address) or address.casefold() in seen:
            continue
        seen.add(address.casefold())
        unique.append(address)
    return unique


def recipients_for(session: Session, notification: Notification) -> list[str]:
    """The explicit recipients, else the organization's active owners and financial responsibles."""
    if notification.recipients:
        return _unique_addresses(notification.recipients)
    members = select(Member.email).where(
        Member.organization_id == notification.organization_id,
        Member.active.is_(True),
        (Member.role == Role.OWNER.value) | Member.financial_responsible.is_(True),
        Member.email.is_not(None),
    )
    return _unique_addresses(session.scalars(members.order_by(Member.id)))


# --- rendering ----------------------------------------------------------------------------------

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


# --- delivery -----------------------------------------------------------------------------------


class DeliveryFailed(Exception):
    """The notice could not be sent (the mailer raised, or it could not be built); the failed attempt
    is recorded on the row (`jobs.work_attempts.record_failure`) but not yet committed.

    `error` is what went wrong (the protocol's own error, under the mailer's neutral one); `raised`
    is what the mailer raised. Commit the session before propagating `raised` (the runtime rolls
    back a failed message, and `raised` decides whether it is retried).
    """

    def __init__(self, notification_id: int, error: BaseException, raised: BaseException) -> None:
        super().__init__(f"notification {notification_id}: {error!r}")
        self.notification_id = notification_id
        self.error = error
        self.raised = raised


def message_id(notification: Notification, mail_from: str) -> str:
    # Stable per notice: a copy sent again after a crash carries the same id, which mail clients
    # use to hide duplicates.
    domain = parseaddr(mail_from)[1].rpartition("@")[2] or "renova.invalid"
    digest = hashlib.sha256(notification.dedupe_key.encode()).hexdigest()[:20]
    return f"<notification-{notification.id}.{digest}@{domain}>"


def build_message(
    notification: Notification, rendered: RenderedEmail, recipients: list[str], mail_from: str, now: datetime
) -> EmailMessage:
    message = EmailMessage()
    message["From"] = mail_from
    message["To"] = ", ".join(recipients)
    message["Subject"] = rendered.subject
    message["Date"] = format_datetime(now)
    message["Message-ID"] = message_id(notification, mail_from)
    message["X-Renova-Notification"] = notification.dedupe_key
    message["Auto-Submitted"] = "auto-generated"  # RFC 3834: no vacation auto-replies
    # Quoted-printable keeps the accented text 7-bit safe for any relay.
    message.set_content(rendered.text, cte="quoted-printable")
    message.add_alternative(rendered.html, subtype="html", cte="quoted-printable")
    return message


def deliver_notification(
    session: Session,
    notification_id: int,
    mailer: Mailer,
    mail_from: str,
    now: datetime,
    *,
    clock_now: datetime | None = None,
) -> str:
    """Send one notice unless it was sent already; returns what happened.

    "sent", "already_sent", "already_failed", "missing" (no such row: its transaction rolled back),
    "no_recipients" or "refused" (both final: status failed). When the notice cannot be sent (a
    mailer error, or it cannot be built) raises DeliveryFailed with the failed attempt recorded and
    flushed: commit, then re-raise `raised` so that a transient error is retried. `clock_now` is
    "now" as the scheduler's tick reads it (`jobs.clock.now`), from which the next attempt is
    scheduled (default `now`). The row stays locked during the SMTP exchange, so a concurrent
    duplicate waits and then finds it sent.
    """
    notification = session.execute(
        select(Notification)
        .where(Notification.id == notification_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).scalar_one_or_none()
    if notification is None:
        return "missing"
    if notification.status == NotificationStatus.SENT.value:
        return "already_sent"
    if notification.status == NotificationStatus.FAILED.value:
        return "already_failed"

    notification.attempts += 1
    recipients = recipients_for(session, notification)
    if not recipients:
        _mark_failed(notification, NO_RECIPIENTS)
        return "no_recipients"

    try:
        organization = session.get(Organization, notification.organization_id)
        rendered = render(notification, organization.name if organization else "")
        mailer.send(build_message(notification, rendered, recipients, mail_from, now))
    except PermanentError as exc:  # e.g. every recipient refused for good: retrying cannot help
        _mark_failed(notification, describe_error(exc))
        return "refused"
    except Exception as exc:
        # A notice that cannot be rendered fails the same way every time: counted like an SMTP
        # error, so that the tick backs off and finally leaves it to an operator.
        record_failure(session, notification, exc, clock_now or now, counted=True)
        raise DeliveryFailed(notification_id, cause(exc), exc) from exc

    notification.status = NotificationStatus.SENT.value
    notification.sent_at = now
    return "sent"


def _mark_failed(notification: Notification, error: str) -> None:
    notification.status = NotificationStatus.FAILED.value
    notification.last_error = error


@dramatiq.actor(queue_name=QUEUE, **STANDARD)
def send_notification(notification_id: int) -> None:
    rt = runtime()
    if rt.mailer_factory is None:
        raise NotConfigured("the runtime has no mailer_factory")
    session = current_session()
    # The notice's Date is the real time; its next attempt is scheduled on the clock the tick reads.
    clock_now = clock.now(session, rt.config)
    try:
        deliver_notification(
            session, notification_id, rt.mailer_factory(), rt.mail_from, datetime.now(UTC), clock_now=clock_now
        )
    except DeliveryFailed as failure:
        # The runtime rolls back a message that raises; the attempt and its error must survive it.
        session.commit()
        # What the mailer raised decides whether the message is retried (see jobs.retries).
        raise failure.raised from None
    except Exception as exc:
        # Failed before the attempt could be recorded in this transaction (e.g. reading recipients).
        record_apart(session, NOTIFICATION, notification_id, exc, clock_now)
        raise
