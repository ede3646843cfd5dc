"""Error reporting hygiene: what leaves the process for Sentry and for the logs."""

from __future__ import annotations

import logging
import re
from typing import Any

import dramatiq
from dramatiq.broker import MessageProxy
from stdnum.br import cnpj, cpf

from jobs.contract import mask_card_numbers

SCRUBBED = "[scrubbed]"


def scrub_event(event: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any]:
    """Drop the message arguments (card tokens, e-mails, documents) that Sentry's Dramatiq
    integration attaches under `contexts.dramatiq.data`; keep the actor and message id."""
    dramatiq_context = (event.get("contexts") or {}).get("dramatiq")
    if isinstance(dramatiq_context, dict) and isinstance(dramatiq_context.get("data"), dict):
        data = dramatiq_context["data"]
        dramatiq_context["data"] = {
            key: (SCRUBBED if key in ("args", "kwargs") else value) for key, value in data.items()
        }
    return event


class PersonalDataFilter(logging.Filter):
    """Dramatiq logs a failed message as `actor(args…)` ("Failed to process message %s …"), and the
    arguments of a change request carry e-mails, tokens and, sent by mistake, card numbers: a log
    line names the actor and the message id instead, and any card number left in a line is masked.
    Installed on the handlers, so that it sees the records of every logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, _MESSAGES):
            record.msg = _describe(record.msg)
        if isinstance(record.args, tuple) and any(isinstance(arg, _MESSAGES) for arg in record.args):
            record.args = tuple(_describe(arg) if isinstance(arg, _MESSAGES) else arg for arg in record.args)
        # Whatever else a line carries (an error quoting its input, say): no card number, e-mail or
        # CPF/CNPJ leaves.
        text = record.getMessage()
        masked = mask_personal_data(text)
        if masked != text:
            record.msg, record.args = masked, ()
        return True


# A worker handles (and logs) a message wrapped in a MessageProxy.
_MESSAGES = (dramatiq.Message, MessageProxy)


def _describe(message: dramatiq.Message[Any] | MessageProxy) -> str:
    return f"{message.actor_name}[{message.message_id}]"


_EMAIL = re.compile(r"[\w.+\-]+@[\w\-]+(?:\.[\w\-]+)+")
_CPF = re.compile(r"(?<![\d.])\d{3}\.?\d{3}\.?\d{3}-?\d{2}(?![\d\-])")
_CNPJ = re.compile(r"(?<![\d.])\d{2}\.?\d{3}\.?\d{3}/?\d{4}-?\d{2}(?![\d\-])")


def mask_personal_data(text: str) -> str:
    """`text` with card numbers, e-mail addresses and valid CPFs/CNPJs replaced by a label."""
    text = mask_card_numbers(text)
    text = _EMAIL.sub("[e-mail]", text)
    text = _CNPJ.sub(lambda match: "[documento]" if cnpj.is_valid(match.group()) else match.group(), text)
    return _CPF.sub(lambda match: "[documento]" if cpf.is_valid(match.group()) else match.group(), text)


def install_log_filters() -> None:
    """Add PersonalDataFilter to every handler of the root logger that lacks it."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(existing, PersonalDataFilter) for existing in handler.filters):
            handler.addFilter(PersonalDataFilter())
