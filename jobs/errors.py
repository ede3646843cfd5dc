"""Failures of the outside world, in the flows' own words.

The adapters that speak a protocol (the runtime's SMTP mailer, for one) know which of its errors
are worth another try; they raise one of these `from` the protocol's error, which stays available
as `__cause__` (and through `cause`). Jobs decide on these types and never import the protocol's
library to classify its errors.
"""

from __future__ import annotations


class TransientError(Exception):
    """The dependency failed for now (down, slow, busy): retry the message with backoff.

    `jobs.retries.is_transient` says yes to it."""


class PermanentError(Exception):
    """The dependency refused for good (e.g. every recipient refused with a 5xx code): retrying
    cannot help. A flow records it as a final failure; raised out of an actor it is not retried."""


def cause(error: BaseException) -> BaseException:
    """What went wrong under a neutral error: the protocol's own error when an adapter translated
    it, else the error itself."""
    if isinstance(error, TransientError | PermanentError) and error.__cause__ is not None:
        return error.__cause__
    return error
