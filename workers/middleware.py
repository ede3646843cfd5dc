"""Dramatiq middleware of the runtime."""

from __future__ import annotations

import logging
from typing import Any

import dramatiq
import redis
from dramatiq.middleware import Middleware, Retries
from sqlalchemy.orm import Session, sessionmaker

from jobs.context import bind_session
from jobs.retries import register_transient

logger = logging.getLogger(__name__)
_SESSION_OPTION = "_renova_session"

# The broker's Redis is the runtime's: an outage while an actor runs (an enqueue, say) is transient.
# Registered on import: `workers.broker` imports this module while it wires the runtime, before
# any actor runs.
register_transient(redis.RedisError)


class ScrubbedLogs(Middleware):
    """A worker process's log lines name a message by actor and id, never by its arguments
    (`workers.observability.PersonalDataFilter`)."""

    def before_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        from workers.observability import install_log_filters

        install_log_filters()  # Dramatiq has configured this process's logging by now


class RefuseUnsafeProduction(Middleware):
    """A worker process does not boot in production with a development default (`production_problems`),
    however it was started (`renova worker` refuses before that, with the same list)."""

    def before_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        from workers.settings import SettingsError, get_settings, refuse_unsafe_production

        try:
            refuse_unsafe_production(get_settings())
        except SettingsError as exc:
            logger.critical("%s", exc)
            # Dramatiq logs an exception raised here and boots anyway: only leaving stops the process.
            raise SystemExit(2) from None


class DatabaseSession(Middleware):
    """One database session per message: opened before the actor runs, committed when it returns,
    rolled back when it raises, and always closed."""

    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self.session_factory = session_factory
        self._sessions: dict[str, Session] = {}

    def before_process_message(self, broker: dramatiq.Broker, message: dramatiq.Message) -> None:
        session = self.session_factory()
        self._sessions[message.message_id] = session
        bind_session(session)

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: dramatiq.Message,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        session = self._sessions.pop(message.message_id, None)
        bind_session(None)
        if session is None:
            return
        try:
            if exception is None:
                session.commit()
            else:
                session.rollback()
        except Exception as failure:
            # The actor returned but its last work was not recorded (a deadlock, a constraint checked at
            # commit): the message must not be acknowledged as done. Dramatiq runs this hook before
            # Retries', which was told "no exception": hand it (and DeadLetterErrors) the failure now.
            session.rollback()
            logger.warning("%s[%s]: the final commit failed: %r", message.actor_name, message.message_id, failure)
            for middleware in reversed(broker.middleware):
                if isinstance(middleware, Retries | DeadLetterErrors):
                    middleware.after_process_message(broker, message, exception=failure)
        finally:
            session.close()

    def after_skip_message(self, broker: dramatiq.Broker, message: dramatiq.Message) -> None:
        self.after_process_message(broker, message, exception=RuntimeError("skipped"))


class DeadLetterErrors(Middleware):
    """Keep the error that killed a message next to its dead letter: the Redis broker parks the body
    as it was last enqueued, which does not carry the final failure. Must be listed before `Retries`
    (Dramatiq runs "after" hooks in reverse order), so that it sees whether Retries gave up."""

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: dramatiq.Message,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        if exception is None or not getattr(message, "failed", False):
            return
        from workers.dead_letters import record_error

        record_error(broker.client, message.queue_name, message.options.get("redis_message_id"), exception)
