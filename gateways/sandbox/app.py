"""The sandbox's HTTP API, `create_app`.

API conventions (shaped like Stripe's):
- every /v1 and /sandbox route needs `Authorization: Bearer <api_key>`;
- POST /v1/charges, POST /v1/charges/{id}/refunds and POST /v1/boletos need an `Idempotency-Key`: the
  same key with the same body replays the stored response (header `Idempotent-Replayed: true`), with
  another body (or another charge, for a refund) → 409
  (error type "idempotency_error"). Stored responses are kept 24 h; refusals (400, 503) are never
  stored, so a retry is processed;
- errors are `{"error": {"type", "code", "message", ...}}`; a 503 with `"processed": false` (type
  "unavailable") promises the request was not processed;
- a charge can be refunded in parts, never beyond its amount; GET /sandbox/ledger lists each refund as
  a negative line next to the charge it gives back from;
- faults per process (`serve` options, POST /sandbox/config) or per request (headers
  `Sandbox-Latency-Ms`, `Sandbox-Timeout-Rate`, `Sandbox-Unavailable-Rate`, `Sandbox-Stall-Ms`);
  GET /sandbox/faults counts those injected since the start (`unavailable`, `stalled`);
- requests with a `Sandbox-Probe: NAME` header are counted under NAME, and GET /sandbox/probes/NAME
  tells how many were in flight at once at most (what a client's concurrency looks like from here).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import random
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from datetime import date
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from gateways.pagarme_webhooks import jwk
from gateways.sandbox import pagarme
from gateways.sandbox.models import (
    ApiError,
    BoletoIn,
    ChargeIn,
    ConfigUpdate,
    Faults,
    NotProcessed,
    PayIn,
    RefundIn,
    Reply,
    SandboxConfig,
    _error,
    _not_processed,
    fingerprint,
)
from gateways.sandbox.store import STATE_FILE, Store
from gateways.sandbox.webhooks import SIGNING_KEY_ID, WebhookDispatcher


def _header_number(
    request: Request, name: str, cast: type[int] | type[float], default: Any, low: float, high: float
) -> Any:
    raw = request.headers.get(name)
    if raw is None:
        return default
    try:
        value = cast(raw)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise ApiError(
            400,
            "invalid_request_error",
            "invalid_sandbox_header",
            f"{name} must be a number between {low} and {high}.",
        )
    return value


class _Probe:
    def __init__(self) -> None:
        self.in_flight = 0
        self.max_in_flight = 0
        self.requests = 0


class _CountProbes:
    """Counts the requests carrying a `Sandbox-Probe` header, per probe name, while they are handled.

    A name per test keeps each count apart from the others' requests (stalled ones included). Plain
    ASGI on the event loop, so no lock is needed.
    """

    def __init__(self, app: ASGIApp, probes: dict[str, _Probe]) -> None:
        self.app = app
        self.probes = probes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        name = None
        if scope["type"] == "http":
            name = next((value.decode() for key, value in scope["headers"] if key == b"sandbox-probe"), None)
        if not name:
            await self.app(scope, receive, send)
            return
        probe = self.probes.setdefault(name, _Probe())
        probe.requests += 1
        probe.in_flight += 1
        probe.max_in_flight = max(probe.max_in_flight, probe.in_flight)
        try:
            await self.app(scope, receive, send)
        finally:
            probe.in_flight -= 1


def create_app(config: SandboxConfig, data_dir: Path, stopping: threading.Event | None = None) -> FastAPI:
    """The sandbox application; `stopping` is set when the server starts shutting down."""
    stopping = stopping or threading.Event()
    pagarme_flavor = config.flavor == "pagarme"
    store = (
        Store(
            Path(data_dir) / STATE_FILE,
            boleto_prefix=pagarme.BOLETO_ID_PREFIX,
            refund_prefix=pagarme.REFUND_ID_PREFIX,
            write_event=pagarme.webhook_writer(config),
        )
        if pagarme_flavor
        else Store(Path(data_dir) / STATE_FILE)
    )
    # Kept with the state, so a restarted emulator signs with the key its receivers already hold.
    signing_key = pagarme.signing_key(Path(data_dir)) if pagarme_flavor else None
    dispatcher = WebhookDispatcher(store, config, signing_key)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        dispatcher.start()  # picks up deliveries left pending by a previous run
        try:
            yield
        finally:
            dispatcher.stop()
            store.close()

    title = "Renova sandbox gateway" + (" (Pagar.me v5)" if pagarme_flavor else "")
    app = FastAPI(title=title, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.store = store
    app.state.config = config
    probes: dict[str, _Probe] = {}
    app.add_middleware(_CountProbes, probes=probes)
    # Faults injected since the server started, by kind: what a fault-injection run reports.
    injected: Counter[str] = Counter()

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        if request.url.path.startswith(pagarme.PREFIX):
            errors = {".".join(str(part) for part in error["loc"]): [error["msg"]] for error in exc.errors()}
            return JSONResponse(pagarme.error_body("The request is invalid.", errors), status_code=422)
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc'] if part != 'body')}: {error['msg']}"
            for error in exc.errors()
        )
        return JSONResponse(_error("invalid_request_error", "invalid_request", problems), status_code=400)

    def require_api_key(authorization: Annotated[str | None, Header()] = None) -> None:
        expected = f"Bearer {config.api_key}".encode()
        if authorization is None or not hmac.compare_digest(authorization.encode(), expected):
            raise ApiError(401, "authentication_error", "unauthorized", "Missing or invalid API key.")

    def faults(request: Request) -> Faults:
        return Faults(
            latency_ms=_header_number(request, "Sandbox-Latency-Ms", int, config.latency_ms, 0, 600_000),
            timeout_rate=_header_number(request, "Sandbox-Timeout-Rate", float, config.timeout_rate, 0, 1),
            unavailable_rate=_header_number(request, "Sandbox-Unavailable-Rate", float, config.unavailable_rate, 0, 1),
            stall_ms=_header_number(request, "Sandbox-Stall-Ms", int, config.stall_ms, 0, 600_000),
        )

    async def front_door(request: Request) -> Faults:
        """Latency and random refusals, before anything is looked at or processed."""
        found = faults(request)
        if found.latency_ms:
            await asyncio.sleep(found.latency_ms / 1000)
        if found.unavailable_rate and random.random() < found.unavailable_rate:
            injected["unavailable"] += 1
            raise NotProcessed
        return found

    async def respond(reply: Reply, found: Faults) -> JSONResponse:
        if reply.processed and (reply.stall or random.random() < found.timeout_rate):
            # Done and stored, but the answer comes too late: the client cannot know it was charged.
            # A shutdown cuts the stall short, so stopping the sandbox never waits for it.
            injected["stalled"] += 1
            deadline = time.monotonic() + found.stall_ms / 1000
            while not stopping.is_set() and (remaining := deadline - time.monotonic()) > 0:
                await asyncio.sleep(min(remaining, 0.1))
        headers = {"Idempotent-Replayed": "true"} if reply.replayed else None
        return JSONResponse(reply.body, status_code=reply.status, headers=headers)

    def idempotency_key(key: str | None) -> str:
        if not key or len(key) > 255:
            raise ApiError(
                400,
                "invalid_request_error",
                "idempotency_key_required",
                "An Idempotency-Key header (1–255 characters) is required.",
            )
        return key

    @app.exception_handler(NotProcessed)
    async def _not_processed_handler(request: Request, __: NotProcessed) -> JSONResponse:
        if request.url.path.startswith(pagarme.PREFIX):
            # Pagar.me's rate limit: the one refusal it documents as "nothing was done".
            body = pagarme.error_body("Too many requests; the request was not processed.")
            return JSONResponse(body, status_code=429, headers={"Retry-After": "1"})
        return JSONResponse(
            _not_processed("Temporarily unavailable; the request was not processed."),
            status_code=503,
            headers={"Retry-After": "1"},
        )

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    if signing_key is not None:

        @app.get("/.well-known/jwks.json")
        async def jwks() -> dict[str, Any]:
            """The public key of the webhooks' signatures, as Pagar.me publishes its own."""
            return {"keys": [jwk(signing_key, SIGNING_KEY_ID)]}

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])

    @v1.post("/charges")
    async def create_charge(
        payload: ChargeIn,
        request: Request,
        key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
    ) -> JSONResponse:
        checked_key = idempotency_key(key)
        found = await front_door(request)
        request_fingerprint = fingerprint("POST", "/v1/charges", payload)
        reply = await run_in_threadpool(store.create_charge, checked_key, request_fingerprint, payload)
        return await respond(reply, found)

    @v1.get("/charges")
    async def find_charge(
        request: Request, idempotency_key: Annotated[str, Query(min_length=1, max_length=255)]
    ) -> JSONResponse:
        await front_door(request)
        charge = await run_in_threadpool(lambda: store.find_charge(key=idempotency_key))
        if charge is None:
            raise ApiError(404, "invalid_request_error", "resource_missing", "No charge with that idempotency key.")
        return JSONResponse(charge)

    @v1.get("/charges/{charge_id}")
    async def get_charge(charge_id: str, request: Request) -> JSONResponse:
        await front_door(request)
        charge = await run_in_threadpool(lambda: store.find_charge(charge_id=charge_id))
        if charge is None:
            raise ApiError(404, "invalid_request_error", "resource_missing", f"No charge {charge_id!r}.")
        return JSONResponse(charge)

    @v1.post("/charges/{charge_id}/refunds")
    async def create_refund(
        charge_id: str,
        payload: RefundIn,
        request: Request,
        key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
    ) -> JSONResponse:
        checked_key = idempotency_key(key)
        found = await front_door(request)
        # The path is part of the fingerprint: one key cannot refund two different charges.
        request_fingerprint = fingerprint("POST", f"/v1/charges/{charge_id}/refunds", payload)
        reply = await run_in_threadpool(store.create_refund, checked_key, request_fingerprint, charge_id, payload)
        return await respond(reply, found)

    @v1.post("/boletos")
    async def create_boleto(
        payload: BoletoIn,
        request: Request,
        key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
    ) -> JSONResponse:
        checked_key = idempotency_key(key)
        found = await front_door(request)
        request_fingerprint = fingerprint("POST", "/v1/boletos", payload)
        reply = await run_in_threadpool(store.create_boleto, checked_key, request_fingerprint, payload)
        return await respond(reply, found)

    @v1.get("/boletos/{boleto_id}")
    async def get_boleto(boleto_id: str, request: Request) -> JSONResponse:
        await front_door(request)
        boleto = await run_in_threadpool(store.get_boleto, boleto_id)
        if boleto is None:
            raise ApiError(404, "invalid_request_error", "resource_missing", f"No boleto {boleto_id!r}.")
        return JSONResponse(boleto)

    @v1.post("/boletos/{boleto_id}/cancel")
    async def cancel_boleto(boleto_id: str, request: Request) -> JSONResponse:
        await front_door(request)
        return JSONResponse(await run_in_threadpool(store.cancel_boleto, boleto_id))

    sandbox = APIRouter(prefix="/sandbox", dependencies=[Depends(require_api_key)])

    @sandbox.post("/boletos/{boleto_id}/pay")
    async def pay_boleto(boleto_id: str, payload: Annotated[PayIn | None, Body()] = None) -> JSONResponse:
        payment = payload or PayIn()
        result = await run_in_threadpool(
            store.pay_boleto,
            boleto_id,
            payment.paid_on or date.today(),
            payment.amount_cents,
            config.webhook_url,
            payment.via,
        )
        dispatcher.notify()
        return JSONResponse(result)

    @sandbox.post("/boletos/{boleto_id}/expire")
    async def expire_boleto(boleto_id: str) -> JSONResponse:
        result = await run_in_threadpool(store.expire_boleto, boleto_id, config.webhook_url)
        dispatcher.notify()
        return JSONResponse(result)

    @sandbox.get("/ledger")
    async def ledger(
        idempotency_key: str | None = None,
        kind: Annotated[str | None, Query(pattern="^(charge|boleto_payment|refund)$")] = None,
    ) -> JSONResponse:
        entries = await run_in_threadpool(lambda: store.ledger(idempotency_key=idempotency_key, kind=kind))
        return JSONResponse({"data": entries})

    @sandbox.get("/webhooks")
    async def webhooks() -> JSONResponse:
        return JSONResponse({"data": await run_in_threadpool(store.deliveries)})

    @sandbox.get("/probes/{name}")
    async def probe(name: str) -> JSONResponse:
        found = probes.get(name) or _Probe()
        return JSONResponse(
            {"in_flight": found.in_flight, "max_in_flight": found.max_in_flight, "requests": found.requests}
        )

    @sandbox.get("/faults")
    async def faults_injected() -> JSONResponse:
        return JSONResponse({"unavailable": injected["unavailable"], "stalled": injected["stalled"]})

    @sandbox.get("/config")
    async def get_config() -> JSONResponse:
        return JSONResponse(config.public())

    @sandbox.post("/config")
    async def set_config(update: ConfigUpdate) -> JSONResponse:
        for name, value in update.model_dump(exclude_unset=True).items():
            if value is not None:
                setattr(config, name, value)
        dispatcher.notify()
        return JSONResponse(config.public())

    @sandbox.get("/charges/{charge_id}")
    async def sandbox_charge(charge_id: str) -> JSONResponse:
        """A card charge as the store holds it, whatever the flavor (with `amount_refunded_cents`)."""
        charge = await run_in_threadpool(lambda: store.find_charge(charge_id=charge_id))
        if charge is None:
            raise ApiError(404, "invalid_request_error", "resource_missing", f"No charge {charge_id!r}.")
        return JSONResponse(charge)

    @sandbox.post("/charges/{charge_id}/chargeback")
    async def chargeback(charge_id: str) -> JSONResponse:
        """The cardholder's bank takes a paid card charge back (the pagarme flavor: `charge.chargedback`)."""
        if not pagarme_flavor:
            raise ApiError(404, "invalid_request_error", "resource_missing", "Chargebacks: the pagarme flavor only.")
        result = await run_in_threadpool(pagarme.charge_back, store, config, charge_id)
        dispatcher.notify()
        return JSONResponse(result)

    @sandbox.get("/boletos/{boleto_id}")
    async def sandbox_boleto(boleto_id: str) -> JSONResponse:
        """A boleto as the store holds it, whatever the flavor."""
        boleto = await run_in_threadpool(store.get_boleto, boleto_id)
        if boleto is None:
            raise ApiError(404, "invalid_request_error", "resource_missing", f"No boleto {boleto_id!r}.")
        return JSONResponse(boleto)

    app.include_router(pagarme.router(store, config, front_door, respond) if pagarme_flavor else v1)
    app.include_router(sandbox)
    return app
