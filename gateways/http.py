"""The HTTP adapter for the gateway port (speaks the sandbox's API, which is shaped like Stripe's).

How a failure is classified decides whether money can be charged twice, so the rule is strict:
only failures that happen before the request could reach the gateway, or that the gateway itself
labels as "not processed", are `Unavailable`. Anything after the request was sent is `Ambiguous`.

Gateway error bodies look like `{"error": {"type", "code", "message", ...}}`. A 503 whose body says
`"processed": false` (error type "unavailable") is the gateway telling us it refused the request
before doing anything; any other 5xx is ambiguous. 408, 429 and 401/403 (`AuthenticationFailed`)
are not processed either. 402 is a decline; 409 "idempotency_error" an `IdempotencyConflict`; any
other 4xx a `GatewayRejected`. Read-only lookups (`find_charge`) change nothing, so every failure
there is `Unavailable`. Refunds go through the same mapping, except that no refund can be "declined":
a 402 there is a `GatewayRejected` like any other refusal.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from types import TracebackType
from typing import Any, Protocol, Self, TypeVar
from urllib.parse import quote

import httpx

from gateways.base import (
    HARD_DECLINE_CODES,
    Ambiguous,
    AuthenticationFailed,
    BoletoIssued,
    BoletoRequest,
    ChargeRequest,
    ChargeResult,
    Declined,
    GatewayError,
    GatewayRejected,
    IdempotencyConflict,
    Payer,
    RefundResult,
    Unavailable,
)

T = TypeVar("T")

# Failures that happen before any byte of the request can have reached the gateway.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.UnsupportedProtocol)


class GatewaySettings(Protocol):
    gateway_url: str
    gateway_api_key: Any  # a pydantic SecretStr
    gateway_connect_timeout: float
    gateway_read_timeout: float


class HttpGateway:
    """A `Gateway` over HTTP. Thread-safe: share one instance (and its connection pool) per process."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        connect_timeout: float = 2.0,
        read_timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
        *,
        max_concurrency: int = 8,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        self._max_concurrency = max_concurrency
        self._client = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {api_key}", "Accept": "application/json", **(headers or {})},
            # Writes get the read budget: a large body on a slow link is not a dead gateway.
            timeout=httpx.Timeout(connect=connect_timeout, read=read_timeout, write=read_timeout, pool=connect_timeout),
            limits=httpx.Limits(
                max_connections=max(max_concurrency, 10),
                max_keepalive_connections=max_concurrency,
                # Drop idle connections before a server's usual 5 s keep-alive would: reusing one the
                # server is closing fails after sending, which we would have to treat as ambiguous.
                keepalive_expiry=4.0,
            ),
            transport=transport,
        )
        self._executor: ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: GatewaySettings, **kwargs: Any) -> HttpGateway:
        """Build from any object with gateway_url, gateway_api_key (SecretStr or str) and timeouts."""
        api_key = settings.gateway_api_key
        if hasattr(api_key, "get_secret_value"):
            api_key = api_key.get_secret_value()
        return cls(
            settings.gateway_url,
            str(api_key),
            connect_timeout=settings.gateway_connect_timeout,
            read_timeout=settings.gateway_read_timeout,
            **kwargs,
        )

    # --- lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        with self._executor_lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)
        self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- the port --------------------------------------------------------------------------------

    def charge(self, card_token: str, amount_cents: int, idempotency_key: str, description: str) -> ChargeResult:
        body = {"card_token": card_token, "amount_cents": amount_cents, "description": description}
        response = self._send("POST", "/v1/charges", json=body, idempotency_key=idempotency_key)
        result = self._parse(_charge_result, response)
        if result.status == "failed":
            raise Declined(result.code or "declined", result.message or "", result.hard, result.gateway_id)
        return result

    def find_charge(self, idempotency_key: str) -> ChargeResult | None:
        response = self._send(
            "GET",
            "/v1/charges",
            params={"idempotency_key": idempotency_key},
            read_only=True,
            not_found_ok=True,
        )
        if response.status_code == 404:
            return None
        return self._parse(_charge_result, response, read_only=True)

    def issue_boleto(self, invoice: BoletoRequest, payer: Payer, due_date: date, idempotency_key: str) -> BoletoIssued:
        body = {
            "invoice_id": invoice.invoice_id,
            "amount_cents": invoice.amount_cents,
            "description": invoice.description,
            "payer": {"name": payer.name, "document": payer.document, "email": payer.email},
            "due_date": due_date.isoformat(),
        }
        response = self._send("POST", "/v1/boletos", json=body, idempotency_key=idempotency_key)
        return self._parse(_boleto_issued, response)

    def cancel_boleto(self, boleto_ref: str) -> None:
        # Cancelling is idempotent on the gateway, so no key is needed and retrying is always safe.
        self._send("POST", f"/v1/boletos/{quote(boleto_ref, safe='')}/cancel")

    def refund(self, gateway_charge_id: str, amount_cents: int, idempotency_key: str) -> RefundResult:
        path = f"/v1/charges/{quote(gateway_charge_id, safe='')}/refunds"
        try:
            response = self._send("POST", path, json={"amount_cents": amount_cents}, idempotency_key=idempotency_key)
        except Declined as exc:
            # The port promises callers of refund no Declined (that is a card issuer's answer to a
            # charge): a 402 here is the gateway refusing the refund, final like any other refusal.
            raise GatewayRejected(exc.code, exc.message, 402) from exc
        return self._parse(_refund_result, response)

    # --- concurrency -----------------------------------------------------------------------------

    def charge_many(self, requests: Sequence[ChargeRequest]) -> list[ChargeResult | GatewayError]:
        """Charge concurrently (at most `max_concurrency` in flight, shared by all callers of this
        instance); one outcome per request, in order: the result or the error instance."""
        if not requests:
            return []
        executor = self._pool()
        futures = [executor.submit(self._charge_outcome, request) for request in requests]
        return [future.result() for future in futures]

    def _charge_outcome(self, request: ChargeRequest) -> ChargeResult | GatewayError:
        try:
            return self.charge(request.card_token, request.amount_cents, request.idempotency_key, request.description)
        except GatewayError as exc:
            return exc
        except Exception as exc:
            # A bug must not hide whether this request reached the gateway: reconcile it like a timeout.
            error = Ambiguous(f"unexpected error while charging: {exc!r}")
            error.__cause__ = exc
            return error

    def _pool(self) -> ThreadPoolExecutor:
        with self._executor_lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self._max_concurrency, thread_name_prefix="gateway")
            return self._executor

    # --- transport and error mapping -------------------------------------------------------------

    def _send(
        self,
        method: str,
        path: str,
        *,
        json: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
        idempotency_key: str | None = None,
        read_only: bool = False,
        not_found_ok: bool = False,
    ) -> httpx.Response:
        """Send and return a 2xx response (or an explicit not-found when allowed); raise otherwise.

        `read_only` requests change nothing at the gateway, so every failure is merely `Unavailable`.
        """
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key is not None else None
        try:
            response = self._client.request(method, path, json=json, params=params, headers=headers)
        except _NOT_SENT as exc:
            raise Unavailable(f"gateway unreachable: {exc!r}") from exc
        except httpx.TransportError as exc:
            if read_only:
                raise Unavailable(f"gateway lookup failed: {exc!r}") from exc
            raise Ambiguous(f"no answer after sending {method} {path}: {exc!r}") from exc

        if response.is_success:
            return response
        error = _error_body(response)
        code = str(error.get("code") or f"http_{response.status_code}")
        message = str(error.get("message") or response.reason_phrase)
        status = response.status_code

        # Only the gateway's own "no such record" counts as not found: a 404 from a proxy or a wrong
        # URL must not make reconciliation believe a charge never happened.
        if status == 404 and not_found_ok and code == "resource_missing":
            return response
        if status == 402:
            hard = bool(error.get("hard", code in HARD_DECLINE_CODES))
            charge = error.get("charge")
            gateway_id = charge.get("id") if isinstance(charge, dict) else None
            raise Declined(code, message, hard, gateway_id)
        if status == 409 and code == "request_in_progress":
            # The same key is being processed right now by another request: its outcome is unknown.
            raise Ambiguous(f"{method} {path}: {message}")
        if status == 409 and error.get("type") == "idempotency_error":
            raise IdempotencyConflict(code, message, status)
        if status in (401, 403):
            raise AuthenticationFailed(f"gateway refused the credentials (HTTP {status}): {code}: {message}")
        if status in (408, 429) or (status == 503 and error.get("processed") is False):
            raise Unavailable(f"gateway refused {method} {path} without processing it: {code}: {message}")
        if status >= 500 or status < 400:
            if read_only:
                raise Unavailable(f"gateway lookup failed: HTTP {status}")
            raise Ambiguous(f"{method} {path} answered HTTP {status}: {message}")
        raise GatewayRejected(code, message, status)

    def _parse(self, parser: Callable[[Any], T], response: httpx.Response, *, read_only: bool = False) -> T:
        try:
            return parser(response.json())
        except (ValueError, KeyError, TypeError) as exc:
            # A success we cannot read may still be a charge that happened.
            kind = Unavailable if read_only else Ambiguous
            raise kind(f"unreadable gateway response (HTTP {response.status_code}): {exc!r}") from exc


def _error_body(response: httpx.Response) -> dict[str, Any]:
    try:
        payload = response.json()
    except ValueError:
        return {}
    error = payload.get("error") if isinstance(payload, dict) else None
    return error if isinstance(error, dict) else {}


def _charge_result(data: dict[str, Any]) -> ChargeResult:
    status = data["status"]
    if status not in ("succeeded", "failed"):
        raise ValueError(f"unknown charge status {status!r}")
    amount = data["amount_cents"]
    if not isinstance(amount, int):
        raise TypeError("amount_cents is not an integer")
    return ChargeResult(
        gateway_id=str(data["id"]),
        status=status,
        amount_cents=amount,
        idempotency_key=str(data["idempotency_key"]),
        code=data.get("failure_code"),
        message=data.get("failure_message"),
        hard=bool(data.get("hard_decline", False)),
    )


def _boleto_issued(data: dict[str, Any]) -> BoletoIssued:
    return BoletoIssued(
        gateway_id=str(data["id"]),
        nosso_numero=str(data["nosso_numero"]),
        barcode=str(data["barcode"]),
        digitable_line=str(data["digitable_line"]),
        due_date=date.fromisoformat(data["due_date"]),
        amount_cents=int(data["amount_cents"]),
    )


def _refund_result(data: dict[str, Any]) -> RefundResult:
    status = data["status"]
    if status != "succeeded":
        # Anything else (e.g. a PSP's "pending") is not money known to be back: let the caller reconcile.
        raise ValueError(f"unknown refund status {status!r}")
    amount = data["amount_cents"]
    if not isinstance(amount, int):
        raise TypeError("amount_cents is not an integer")
    return RefundResult(
        gateway_id=str(data["id"]),
        charge_gateway_id=str(data["charge_id"]),
        amount_cents=amount,
        idempotency_key=str(data["idempotency_key"]),
        status="succeeded",
    )
