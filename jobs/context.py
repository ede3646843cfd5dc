"""What a running job needs from the runtime, bound by `workers` when it wires the system.

Jobs never build engines, brokers or HTTP clients themselves: the runtime binds a session per
message (see `workers.middleware.DatabaseSession`), a gateway factory and the billing settings.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from email.message import EmailMessage
from typing import TYPE_CHECKING, Protocol

from sqlalchemy.orm import Session, sessionmaker

if TYPE_CHECKING:
    from gateways.base import Gateway
    from jobs.boleto_pdf import Beneficiary


class Mailer(Protocol):
    """Delivers one e-mail; raises `jobs.errors.TransientError` when a retry may succeed (the message is
    retried) and `jobs.errors.PermanentError` when it cannot (the notice is marked refused)."""

    def send(self, message: EmailMessage) -> None: ...


@dataclass(frozen=True)
class BillingConfig:
    timezone: str = "America/Sao_Paulo"
    boleto_lead_days: int = 7
    boleto_due_days: int = 3
    dunning_retry_days: tuple[int, ...] = (1, 3, 5, 7)
    boleto_grace_business_days: int = 3
    product: str = "conecta"
    allow_future_dates: bool = True


@dataclass
class Runtime:
    session_factory: sessionmaker[Session]
    gateway_factory: Callable[[], Gateway]
    config: BillingConfig = field(default_factory=BillingConfig)
    mailer_factory: Callable[[], Mailer] | None = None
    mail_from: str = "CONECTA Cobrança <cobranca@conecta.example>"
    # The first wait before an event delivery is tried again (then × 4 each time, at most 12 h).
    event_retry_first: timedelta = timedelta(seconds=5)
    # Who receives boleto payments, as boletos' PDFs print it (`jobs.boleto_pdf.Beneficiary`).
    beneficiary: Beneficiary | None = None


_runtime: Runtime | None = None
_local = threading.local()


class NotConfigured(RuntimeError):
    """A job ran before the runtime bound its session, gateway or settings."""


def configure(runtime: Runtime) -> None:
    global _runtime
    _runtime = runtime


def runtime() -> Runtime:
    if _runtime is None:
        raise NotConfigured("the runtime is not wired: import workers.broker (or call jobs.context.configure)")
    return _runtime


def bind_session(session: Session | None) -> None:
    _local.session = session


def current_session() -> Session:
    """The session of the message being processed (opened and closed by the runtime's middleware)."""
    session = getattr(_local, "session", None)
    if session is None:
        raise NotConfigured("no database session is bound to this thread")
    return session
