"""Webhook signatures: `Renova-Signature: t=<unix ts>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.

The timestamp is inside the signed payload, so a captured delivery cannot be replayed outside the
tolerance window; several `v1=` entries are accepted so a secret can be rotated without downtime.
"""

from __future__ import annotations

import hashlib
import hmac
import time

SIGNATURE_HEADER = "Renova-Signature"
DEFAULT_TOLERANCE_SECONDS = 300
_MAX_HEADER_LENGTH = 2048  # a handful of signatures; anything longer is not ours


class InvalidSignature(Exception):
    """The webhook is not provably from the gateway; `reason` says why (safe to log, never secret)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _digest(secret: str, body: bytes, timestamp: int) -> str:
    if not secret:
        raise ValueError("webhook secret is empty")
    payload = f"{timestamp}.".encode() + body
    return hmac.new(secret.encode(), payload, hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The signature header value for `body` sent at `timestamp` (unix seconds)."""
    return f"t={int(timestamp)},v1={_digest(secret, body, int(timestamp))}"


def verify(
    secret: str,
    header: str | None,
    body: bytes,
    *,
    now: float | None = None,
    tolerance_seconds: int = DEFAULT_TOLERANCE_SECONDS,
) -> None:
    """Return when `header` is a valid signature of `body`; raise InvalidSignature otherwise.

    `body` must be the raw request bytes, before any JSON parsing.
    """
    if not header:
        raise InvalidSignature("missing signature header")
    if len(header) > _MAX_HEADER_LENGTH:
        raise InvalidSignature("malformed signature header: too long")
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep:
            raise InvalidSignature("malformed signature header: expected key=value pairs")
        if name == "t":
            if timestamp is not None or not value.isascii() or not value.isdigit():
                raise InvalidSignature("malformed signature header: bad timestamp")
            timestamp = int(value)
        elif name == "v1":
            candidates.append(value)
        # Unknown schemes are ignored, so a future v2 can be added alongside v1.
    if timestamp is None:
        raise InvalidSignature("malformed signature header: no timestamp")
    if not candidates:
        raise InvalidSignature("malformed signature header: no v1 signature")

    expected = _digest(secret, body, timestamp)
    # Check every candidate (no early exit) so timing does not reveal which one matched.
    matched = False
    for candidate in candidates:
        matched |= hmac.compare_digest(expected.encode(), candidate.encode())
    if not matched:
        raise InvalidSignature("signature mismatch")

    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_seconds:
        raise InvalidSignature("timestamp outside the tolerance window")
