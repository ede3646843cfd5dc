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

Single calls use a blocking `httpx.Client`. Batches (`charge_many`, `issue_boleto_many`) go through an
`aiohttp.ClientSession` on one event loop per process (`_BatchLoop`), so hundreds of slow PSP answers
can be awaited at once without a thread each. aiohttp, not httpx's async client, because on the
benchmark's two cores httpx's async pool spent more CPU per request than the sandbox did answering it
(≈ 400 charges/s against ≈ 2,500 with aiohttp). Both paths share the request building and the
response-to-outcome mapping below: an aiohttp answer is read into an `httpx.Response` and an aiohttp
failure is named by its httpx equivalent (`_as_httpx_error`), so a charge means the same whichever way
it was sent.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import threading
import weakref
from collections.abc import Callable, Coroutine, Mapping, Sequence
from datetime import date
from types import TracebackType
from typing import Any, Protocol, Self, TypeVar
from urllib.parse import quote

import aiohttp
import httpx

from gateways.base import (
    HARD_DECLINE_CODES,
    Ambiguous,
    AuthenticationFailed,
    BoletoIssue,
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
Item = TypeVar("Item")
Outcome = ChargeResult | GatewayError

# Failures that happen before any byte of the request can have reached the gateway.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.UnsupportedProtocol)

DEFAULT_MAX_IN_FLIGHT = 128
# Drop idle connections before a server's usual 5 s keep-alive would: reusing one the server is
# closing fails after sending, which we would have to treat as ambiguous.
KEEPALIVE_EXPIRY = 4.0
# A thread waiting for a batch wakes up this often: Dramatiq delivers its time limit and shutdown
# notifications as asynchronous exceptions, which only land while the thread runs Python code.
_WAKE_UP_SECONDS = 0.5
# The most close() waits for the batch loop to wind down (its thread is a daemon either way).
_CLOSE_TIMEOUT = 10.0


class GatewaySettings(Protocol):
    gateway_url: str
    gateway_api_key: Any  # a pydantic SecretStr
    gateway_connect_timeout: float
    gateway_read_timeout: float
    # and optionally gateway_max_in_flight: int (DEFAULT_MAX_IN_FLIGHT when absent)


class HttpGateway:
    """A `Gateway` over HTTP. Thread-safe: share one instance (and its connection pools) per process.

    `max_in_flight` bounds the charges `charge_many` has at the gateway at once, over all the threads
    that call it. `transport` replaces the network of single calls in tests (`httpx.MockTransport`);
    batches always go over real sockets.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        connect_timeout: float = 2.0,
        read_timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
        *,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self._max_in_flight = max_in_flight
        self._options: dict[str, Any] = {
            "base_url": base_url.rstrip("/"),
            "headers": {**self._auth_headers(api_key), "Accept": "application/json", **(headers or {})},
            # Writes get the read budget: a large body on a slow link is not a dead gateway.
            "timeout": httpx.Timeout(
                connect=connect_timeout, read=read_timeout, write=read_timeout, pool=connect_timeout
            ),
        }
        self._transport = transport
        self._client = self._new_client()
        self._lock = threading.Lock()
        self._batch_loop: _BatchLoop | None = None
        self._closed = False
        _LIVE.add(self)

    @classmethod
    def from_settings(cls, settings: GatewaySettings, **kwargs: Any) -> HttpGateway:
        """Build from any object with gateway_url, gateway_api_key (SecretStr or str), timeouts and
        gateway_max_in_flight (optional: the default when absent)."""
        api_key = settings.gateway_api_key
        if hasattr(api_key, "get_secret_value"):
            api_key = api_key.get_secret_value()
        kwargs.setdefault("max_in_flight", getattr(settings, "gateway_max_in_flight", DEFAULT_MAX_IN_FLIGHT))
        return cls(
            settings.gateway_url,
            str(api_key),
            connect_timeout=settings.gateway_connect_timeout,
            read_timeout=settings.gateway_read_timeout,
            **kwargs,
        )

    @property
    def max_in_flight(self) -> int:
        return self._max_in_flight

    # --- lifecycle -------------------------------------------------------------------------------

    def _new_client(self) -> httpx.Client:
        # Single calls come from worker threads, one request each.
        return httpx.Client(
            **self._options,
            limits=httpx.Limits(
                max_connections=max(self._max_in_flight, 10),
                max_keepalive_connections=10,
                keepalive_expiry=KEEPALIVE_EXPIRY,
            ),
            transport=self._transport,
        )

    def _new_charge_session(self) -> aiohttp.ClientSession:
        # Sized to the in-flight bound, which the semaphore enforces before a request asks the pool for
        # a connection: a charge never waits for one. The timeouts are httpx's: connect and each read.
        timeout: httpx.Timeout = self._options["timeout"]
        return aiohttp.ClientSession(
            headers=self._options["headers"],
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=timeout.connect, sock_read=timeout.read),
            connector=aiohttp.TCPConnector(limit=self._max_in_flight, keepalive_timeout=KEEPALIVE_EXPIRY),
            # Answers are read as they came; decoding a compressed body is left to httpx.Response.
            auto_decompress=False,
        )

    def close(self) -> None:
        """Stop the batch loop (a batch still running gets `Ambiguous` for what had not finished)
        and close both connection pools. The gateway cannot be used afterwards."""
        with self._lock:
            self._closed = True
            batch_loop, self._batch_loop = self._batch_loop, None
        if batch_loop is not None:
            batch_loop.close()
        self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _after_fork(self) -> None:
        """In a forked child: the parent's loop thread does not exist here, its lock may have been
        held at the moment of the fork and its pooled sockets are shared with the parent. Start
        afresh, leaving the parent's objects alone (closing them could disturb the parent)."""
        self._lock = threading.Lock()
        self._batch_loop = None
        if not self._closed:
            self._client = self._new_client()

    # --- the PSP's dialect: where each request goes, its body, and what each answer means ----------
    # A subclass for another PSP (gateways.pagarme) overrides these and the single calls below; the
    # transport, the batches and the rule of what a failure may have done stay here.

    @staticmethod
    def _auth_headers(api_key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {api_key}"}

    def _charge_call(self, request: ChargeRequest) -> tuple[str, dict[str, Any]]:
        return "/v1/charges", _charge_body(request.card_token, request.amount_cents, request.description)

    def _charge_outcome(self, response: httpx.Response, request: ChargeRequest) -> ChargeResult:
        """A charge's 2xx answer: the result, or `Declined` when the charge failed."""
        return _charge_from(response)

    def _boleto_call(self, issue: BoletoIssue) -> tuple[str, dict[str, Any]]:
        return "/v1/boletos", _boleto_body(issue.invoice, issue.payer, issue.due_date)

    def _boleto_outcome(self, response: httpx.Response, issue: BoletoIssue) -> BoletoIssued:
        return _parse(_boleto_issued, response)

    def _refusal(
        self, response: httpx.Response, method: str, path: str, *, read_only: bool, not_found_ok: bool
    ) -> GatewayError | None:
        """The error a non-2xx answer means, or None for an allowed not-found."""
        return _refusal(response, method, path, read_only=read_only, not_found_ok=not_found_ok)

    def _checked(
        self, response: httpx.Response, method: str, path: str, *, read_only: bool = False, not_found_ok: bool = False
    ) -> httpx.Response:
        """A 2xx response (or an explicit not-found when allowed), else the error it means, raised."""
        if response.is_success:
            return response
        error = self._refusal(response, method, path, read_only=read_only, not_found_ok=not_found_ok)
        if error is not None:
            raise error
        return response

    # --- the port --------------------------------------------------------------------------------

    def charge(self, card_token: str, amount_cents: int, idempotency_key: str, description: str) -> ChargeResult:
        request = ChargeRequest(card_token, amount_cents, idempotency_key, description)
        path, body = self._charge_call(request)
        return self._charge_outcome(self._send("POST", path, json=body, idempotency_key=idempotency_key), request)

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
        return _parse(_charge_result, response, read_only=True)

    def issue_boleto(self, invoice: BoletoRequest, payer: Payer, due_date: date, idempotency_key: str) -> BoletoIssued:
        issue = BoletoIssue(invoice, payer, due_date, idempotency_key)
        path, body = self._boleto_call(issue)
        return self._boleto_outcome(self._send("POST", path, json=body, idempotency_key=idempotency_key), issue)

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
        return _parse(_refund_result, response)

    # --- many at once ----------------------------------------------------------------------------

    def charge_many(self, requests: Sequence[ChargeRequest]) -> list[Outcome]:
        """Charge concurrently; one outcome per request, in order: the result or the error instance.

        The requests are awaited on this process's batch loop, at most `max_in_flight` at the
        gateway at once over all callers; the calling thread blocks until its batch is done. Nothing
        that goes wrong with one request touches the others, and whatever goes wrong beyond the
        known outcomes (a bug, the gateway being closed mid-batch) is `Ambiguous` for the requests it
        left unfinished: they may have been sent, so they are reconciled, never blindly repeated.
        """
        return self._run_many(requests, self._charge_async)

    def issue_boleto_many(self, issues: Sequence[BoletoIssue]) -> list[BoletoIssued | GatewayError]:
        """`issue_boleto` for each, concurrently, as `charge_many` does (same loop, same bound). An
        `Ambiguous` outcome is completed by issuing again with the same key."""
        return self._run_many(issues, self._issue_boleto_async)

    def _run_many(
        self,
        items: Sequence[Item],
        send: Callable[[aiohttp.ClientSession, Item], Coroutine[Any, Any, T]],
    ) -> list[T | GatewayError]:
        if not items:
            return []
        outcomes: list[T | GatewayError | None] = [None] * len(items)
        failure: BaseException | None = None
        try:
            batch_loop = self._running_loop()
            batch_loop.run(_send_all(batch_loop, items, send, outcomes))
        except Exception as exc:
            failure = exc
        return [
            outcome if outcome is not None else _unexpected(failure or RuntimeError("no outcome"))
            for outcome in outcomes
        ]

    def _running_loop(self) -> _BatchLoop:
        with self._lock:
            if self._closed:
                raise RuntimeError("the gateway is closed")
            if self._batch_loop is None:
                # Created on first use, so that it belongs to the process that uses it (Dramatiq
                # forks its worker processes) and costs nothing where no batch is ever sent.
                self._batch_loop = _BatchLoop(self._new_charge_session, self._max_in_flight)
            return self._batch_loop

    async def _charge_async(self, session: aiohttp.ClientSession, request: ChargeRequest) -> ChargeResult:
        """`charge`, awaited: the same request and the same mapping of its answer."""
        path, body = self._charge_call(request)
        return self._charge_outcome(await self._post_async(session, path, body, request.idempotency_key), request)

    async def _issue_boleto_async(self, session: aiohttp.ClientSession, issue: BoletoIssue) -> BoletoIssued:
        """`issue_boleto`, awaited."""
        path, body = self._boleto_call(issue)
        return self._boleto_outcome(await self._post_async(session, path, body, issue.idempotency_key), issue)

    async def _post_async(
        self, session: aiohttp.ClientSession, path: str, body: dict[str, Any], idempotency_key: str
    ) -> httpx.Response:
        """`_send` for a POST, awaited: a 2xx answer as an `httpx.Response`, or the error it means."""
        method = "POST"
        url = self._options["base_url"] + path
        headers = {"Content-Type": "application/json", **(_key_header(idempotency_key) or {})}
        try:
            async with session.request(method, url, data=_json_bytes(body), headers=headers) as answer:
                content = await answer.read()
                response = httpx.Response(
                    answer.status,
                    headers=list(answer.headers.items()),
                    content=content,
                    request=httpx.Request(method, url),
                )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _transport_failure(_as_httpx_error(exc), method, path, read_only=False) from exc
        return self._checked(response, method, path)

    # --- transport -------------------------------------------------------------------------------

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
        try:
            response = self._client.request(
                method, path, json=json, params=params, headers=_key_header(idempotency_key)
            )
        except httpx.TransportError as exc:
            raise _transport_failure(exc, method, path, read_only=read_only) from exc
        return self._checked(response, method, path, read_only=read_only, not_found_ok=not_found_ok)


class _BatchLoop:
    """One event loop in a daemon thread, with the aiohttp session and the in-flight semaphore that
    live on it. Threads hand it coroutines and block on their results (`run`)."""

    def __init__(self, session_factory: Callable[[], aiohttp.ClientSession], max_in_flight: int) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, name="gateway-batches", daemon=True)
        self._thread.start()
        # Made on the loop's own thread: an aiohttp session and asyncio primitives belong to the loop
        # that uses them.
        self.session, self.in_flight = self.run(self._start(session_factory, max_in_flight))

    @staticmethod
    async def _start(
        session_factory: Callable[[], aiohttp.ClientSession], max_in_flight: int
    ) -> tuple[aiohttp.ClientSession, asyncio.Semaphore]:
        return session_factory(), asyncio.Semaphore(max_in_flight)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
        finally:
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run `coroutine` on the loop and wait for it; an exception raised in this thread while
        waiting (a Dramatiq time limit) cancels it."""
        try:
            future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        except RuntimeError:  # the loop is closed: nothing was sent
            coroutine.close()
            raise
        try:
            while not future.done():
                concurrent.futures.wait((future,), timeout=_WAKE_UP_SECONDS)
                if not future.done() and not self._thread.is_alive():
                    # Handed over just as close() stopped the loop: it will never run.
                    future.cancel()
                    raise RuntimeError("the gateway's batch loop has stopped")
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        try:
            asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(_CLOSE_TIMEOUT)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(_CLOSE_TIMEOUT)

    async def _stop(self) -> None:
        # Cancelled batches report `Ambiguous` for what had not finished (see charge_many).
        current = asyncio.current_task()
        pending = [task for task in asyncio.all_tasks() if task is not current]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await self.session.close()


async def _send_all(
    batch_loop: _BatchLoop,
    items: Sequence[Item],
    send: Callable[[aiohttp.ClientSession, Item], Coroutine[Any, Any, T]],
    outcomes: list[T | GatewayError | None],
) -> None:
    async def one(index: int, item: Item) -> None:
        outcome: T | GatewayError
        try:
            async with batch_loop.in_flight:
                outcome = await send(batch_loop.session, item)
        except GatewayError as exc:
            outcome = exc
        except Exception as exc:
            # A bug must not hide whether this request reached the gateway: reconcile it like a timeout.
            outcome = _unexpected(exc)
        outcomes[index] = outcome

    await asyncio.gather(*(one(index, item) for index, item in enumerate(items)))


# Every gateway of this process, so that a forked child can drop what it inherited (see _after_fork).
_LIVE: weakref.WeakSet[HttpGateway] = weakref.WeakSet()


def _reset_after_fork() -> None:
    for gateway in list(_LIVE):
        gateway._after_fork()


os.register_at_fork(after_in_child=_reset_after_fork)


# --- requests and the mapping of answers to outcomes, shared by the blocking and the async path ---


def _key_header(idempotency_key: str | None) -> dict[str, str] | None:
    return {"Idempotency-Key": idempotency_key} if idempotency_key is not None else None


def _charge_body(card_token: str, amount_cents: int, description: str) -> dict[str, Any]:
    return {"card_token": card_token, "amount_cents": amount_cents, "description": description}


def _boleto_body(invoice: BoletoRequest, payer: Payer, due_date: date) -> dict[str, Any]:
    return {
        "invoice_id": invoice.invoice_id,
        "amount_cents": invoice.amount_cents,
        "description": invoice.description,
        "payer": {"name": payer.name, "document": payer.document, "email": payer.email},
        "due_date": due_date.isoformat(),
    }


def _json_bytes(body: dict[str, Any]) -> bytes:
    """A JSON body encoded as httpx encodes `json=` (compact, UTF-8), so both paths send the same bytes."""
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def _as_httpx_error(exc: aiohttp.ClientError | TimeoutError) -> httpx.TransportError:
    """The httpx name for what went wrong under aiohttp, so that `_transport_failure` alone decides
    what a failure may have done. Only the failures that happen before a connection exists are
    "not sent"; everything later, or unknown, may have reached the gateway."""
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout(text)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return httpx.ConnectError(text)
    if isinstance(exc, aiohttp.InvalidURL):
        return httpx.UnsupportedProtocol(text)
    if isinstance(exc, TimeoutError):  # a socket read past the read timeout
        return httpx.ReadTimeout(text)
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError | aiohttp.ClientResponseError):
        return httpx.RemoteProtocolError(text)
    return httpx.ReadError(text)


def _charge_from(response: httpx.Response) -> ChargeResult:
    """A charge's 2xx answer: the result, or `Declined` when the charge failed."""
    result = _parse(_charge_result, response)
    if result.status == "failed":
        raise Declined(result.code or "declined", result.message or "", result.hard, result.gateway_id)
    return result


def _unexpected(exc: BaseException) -> Ambiguous:
    error = Ambiguous(f"unexpected error while sending: {exc!r}")
    error.__cause__ = exc
    return error


def _transport_failure(exc: httpx.TransportError, method: str, path: str, *, read_only: bool) -> GatewayError:
    """What a request that got no answer may have done."""
    if isinstance(exc, _NOT_SENT):
        return Unavailable(f"gateway unreachable: {exc!r}")
    if read_only:
        return Unavailable(f"gateway lookup failed: {exc!r}")
    return Ambiguous(f"no answer after sending {method} {path}: {exc!r}")


def _refusal(
    response: httpx.Response, method: str, path: str, *, read_only: bool, not_found_ok: bool
) -> GatewayError | None:
    """What the sandbox's non-2xx answer means: the error to raise, or None for its own not-found."""
    error = _error_body(response)
    code = str(error.get("code") or f"http_{response.status_code}")
    message = str(error.get("message") or response.reason_phrase)
    status = response.status_code

    # Only the gateway's own "no such record" counts as not found: a 404 from a proxy or a wrong
    # URL must not make reconciliation believe a charge never happened.
    if status == 404 and not_found_ok and code == "resource_missing":
        return None
    if status == 402:
        hard = bool(error.get("hard", code in HARD_DECLINE_CODES))
        charge = error.get("charge")
        gateway_id = charge.get("id") if isinstance(charge, dict) else None
        return Declined(code, message, hard, gateway_id)
    if status == 409 and code == "request_in_progress":
        # The same key is being processed right now by another request: its outcome is unknown.
        return Ambiguous(f"{method} {path}: {message}")
    if status == 409 and error.get("type") == "idempotency_error":
        return IdempotencyConflict(code, message, status)
    if status in (401, 403):
        return AuthenticationFailed(f"gateway refused the credentials (HTTP {status}): {code}: {message}")
    if status in (408, 429) or (status == 503 and error.get("processed") is False):
        return Unavailable(f"gateway refused {method} {path} without processing it: {code}: {message}")
    if status >= 500 or status < 400:
        if read_only:
            return Unavailable(f"gateway lookup failed: HTTP {status}")
        return Ambiguous(f"{method} {path} answered HTTP {status}: {message}")
    return GatewayRejected(code, message, status)


def _parse(parser: Callable[[Any], T], response: httpx.Response, *, read_only: bool = False) -> T:
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
        pix_code=str(data["pix_code"]) if data.get("pix_code") else None,
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
