"""Sending notices: one at a time (`deliver_notification`) or a batch over one mail connection
(`deliver_batch`), each notice at most once however often its message is delivered.

Exactly once under batches. Every notice of a batch is its own small transaction on the message's
session: its row is locked (`FOR UPDATE SKIP LOCKED`), its state checked (a notice sent or failed
for good is left alone), it is sent, marked sent and committed before the next one starts. So:

- a batch retried, duplicated or redelivered after a worker died finds the notices it had sent
  marked `sent` and sends only the others;
- a notice another delivery holds right now is skipped: that delivery sends it, or records its
  failure and is retried itself;
- a worker that dies mid-batch loses at most the mark of the notice it was sending (its row lock
  goes with the connection, the row stays `pending` and the redelivery or the tick sends it again,
  with the same Message-ID): the same window as a single delivery, and no notice is ever lost.

A notice whose send fails has its own failed attempt recorded and committed
(`jobs.work_attempts.record_failure`, transient or not, exactly as when sent alone); its
batch-mates are still sent. The caller raises a failure afterwards, so that the message is retried
(transient) or dead-lettered, and its retry finds the sent ones done.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr
from typing import Final, Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session

from jobs.boleto_pdf import boleto_attachments
from jobs.context import Mailer
from jobs.errors import PermanentError, cause
from jobs.notice_rendering import RenderedEmail, render
from jobs.retries import is_transient
from jobs.work_attempts import NOTIFICATION, describe_error, record_apart, record_failure
from models.schema import Member, Notification, Organization
from models.states import NotificationStatus, Role

logger = logging.getLogger(__name__)

NO_RECIPIENTS: Final = "sem destinatários"


class BatchMailer(Mailer, Protocol):
    """A mailer that can keep one connection open for several messages (`workers.mail.SmtpMailer`)."""

    def connection(self) -> AbstractContextManager[Mailer]: ...


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


# --- one notice ---------------------------------------------------------------------------------


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
    notification: Notification,
    rendered: RenderedEmail,
    recipients: list[str],
    mail_from: str,
    now: datetime,
    attachments: Sequence[tuple[str, bytes]] = (),
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
    for filename, pdf in attachments:
        message.add_attachment(pdf, maintype="application", subtype="pdf", filename=filename)
    return message


def deliver_notification(
    session: Session,
    notification_id: int,
    mailer: Mailer,
    mail_from: str,
    now: datetime,
    *,
    clock_now: datetime | None = None,
    skip_locked: bool = False,
) -> str:
    """Send one notice unless it was sent already; returns what happened.

    "sent", "already_sent", "already_failed", "missing" (no such row: its transaction rolled back),
    "no_recipients" or "refused" (both final: status failed), or "locked" (with `skip_locked`: another
    delivery holds the row). When the notice cannot be sent (a mailer error, or it cannot be built)
    raises DeliveryFailed with the failed attempt recorded and flushed: commit, then re-raise
    `raised` so that a transient error is retried. `clock_now` is "now" as the scheduler's tick reads
    it (`jobs.clock.now`), from which the next attempt is scheduled (default `now`). The row stays
    locked during the SMTP exchange, so a concurrent duplicate waits (or skips it) and finds it sent.
    """
    notification = session.execute(
        select(Notification)
        .where(Notification.id == notification_id)
        .with_for_update(skip_locked=skip_locked)
        .execution_options(populate_existing=True)
    ).scalar_one_or_none()
    if notification is None:
        if skip_locked and session.scalar(select(Notification.id).where(Notification.id == notification_id)):
            return "locked"
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
        attachments = boleto_attachments(session, notification)
        mailer.send(build_message(notification, rendered, recipients, mail_from, now, attachments))
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


# --- a batch -------------------------------------------------------------------------------------


@dataclass
class BatchResult:
    """What a batch did: each notice's outcome (as `deliver_notification` names them, "failed" for a
    recorded failure), and for each failed notice what was raised."""

    outcomes: dict[int, str] = field(default_factory=dict)
    failures: dict[int, BaseException] = field(default_factory=dict)

    def error(self) -> BaseException | None:
        """The error the batch's message should fail with: a transient one when any failure was
        transient (the message is retried, and its retry sends only what is still pending), else
        the first failure (dead-lettered, as a single notice's message would be); None when none."""
        errors = list(self.failures.values())
        return next((error for error in errors if is_transient(error)), errors[0] if errors else None)


def _connection(mailer: Mailer) -> AbstractContextManager[Mailer]:
    # A mailer without batches (a test double, say) sends each message on its own.
    opener = getattr(mailer, "connection", None)
    return opener() if callable(opener) else nullcontext(mailer)


def deliver_batch(
    session: Session, notification_ids: Sequence[int], mailer: Mailer, mail_from: str, *, clock_now: datetime
) -> BatchResult:
    """Send the pending notices of `notification_ids` over one mail connection, each in a transaction
    of its own committed right after its send (see the module's doc); never raises for one notice's
    failure, which is recorded on its row and returned. The session must have no work of its own
    pending: it is committed and rolled back notice by notice."""
    ids = list(dict.fromkeys(notification_ids))
    result = BatchResult()
    # One read skips what is done already (a retried batch mostly is), without locking anything.
    statuses = dict(session.execute(select(Notification.id, Notification.status).where(Notification.id.in_(ids))).all())
    session.commit()
    done = {NotificationStatus.SENT.value: "already_sent", NotificationStatus.FAILED.value: "already_failed"}
    with _connection(mailer) as connection:
        for notification_id in ids:
            status = statuses.get(notification_id)
            if status != NotificationStatus.PENDING.value:
                result.outcomes[notification_id] = done.get(status or "", "missing")
                continue
            try:
                outcome = deliver_notification(
                    session,
                    notification_id,
                    connection,
                    mail_from,
                    datetime.now(UTC),
                    clock_now=clock_now,
                    skip_locked=True,
                )
            except DeliveryFailed as failure:
                session.commit()  # the failed attempt, on its own; the next notice starts afresh
                result.outcomes[notification_id] = "failed"
                result.failures[notification_id] = failure.raised
                continue
            except Exception as exc:
                # Failed before its attempt could be recorded (e.g. reading recipients): rolled back,
                # recorded in a transaction of its own, and the batch goes on.
                record_apart(session, NOTIFICATION, notification_id, exc, clock_now)
                result.outcomes[notification_id] = "failed"
                result.failures[notification_id] = exc
                continue
            # Marked sent (or failed for good) before the next send: a retry of this batch skips it.
            session.commit()
            result.outcomes[notification_id] = outcome
    if result.failures:
        logger.info("notices batch: %d of %d failed", len(result.failures), len(ids))
    return result
