"""The HTTP API: change requests and subscriptions for the main application (Bearer API keys),
gateway webhooks (signed), health and metrics for operations."""

from __future__ import annotations

import hmac
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Request, status
from fastapi.responses import JSONResponse
from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from gateways.webhooks import InvalidSignature, verify
from workers.settings import Settings, get_settings


def get_session() -> Iterator[Session]:
    from workers.db import get_session_factory

    with get_session_factory()() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def require_api_key(
    authorization: Annotated[str | None, Header()] = None,
    settings: Settings = Depends(get_settings),
) -> str:
    """`Authorization: Bearer <key>`, compared in constant time against every configured key."""
    scheme, _, presented = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not presented:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail={"code": "unauthorized", "message": "missing Bearer API key"},
            headers={"WWW-Authenticate": "Bearer"},
        )
    matched = False
    for key in settings.api_keys:
        matched |= hmac.compare_digest(presented.encode(), key.get_secret_value().encode())
    if not matched:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail={"code": "unauthorized", "message": "invalid API key"},
            headers={"WWW-Authenticate": "Bearer"},
        )
    return presented


v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])
webhooks = APIRouter(prefix="/v1/webhooks")


@webhooks.post("/gateway", status_code=status.HTTP_200_OK)
async def gateway_webhook(
    request: Request,
    session: SessionDep,
    settings: Settings = Depends(get_settings),
    renova_signature: Annotated[str | None, Header()] = None,
) -> dict[str, str]:
    """A signed gateway event (boleto paid or expired): stored once by its id, then processed on the
    `payments` queue. Answering 2xx acknowledges it; a redelivery of the same event is a no-op."""
    from jobs.outbox import send_after_commit
    from jobs.payments import process_gateway_event
    from models.schema import GatewayEvent

    body = await request.body()
    try:
        verify(settings.gateway_webhook_secret.get_secret_value(), renova_signature, body)
    except InvalidSignature as exc:
        raise HTTPException(
            status.HTTP_400_BAD_REQUEST, detail={"code": "invalid_signature", "message": str(exc)}
        ) from None
    try:
        event = json.loads(body)
        event_id, event_type = str(event["id"]), str(event["type"])
    except (ValueError, KeyError, TypeError):
        raise HTTPException(
            status.HTTP_400_BAD_REQUEST, detail={"code": "invalid_event", "message": "expected {id, type, data}"}
        ) from None
    stored = session.scalar(
        insert(GatewayEvent)
        .values(event_id=event_id, type=event_type, payload=event)
        .on_conflict_do_nothing(index_elements=["event_id"])
        .returning(GatewayEvent.id)
    )
    if stored is None:
        processed = session.scalar(select(GatewayEvent.processed_at).where(GatewayEvent.event_id == event_id))
        return {"status": "duplicate" if processed else "accepted"}
    send_after_commit(session, process_gateway_event, event_id)
    session.commit()
    return {"status": "accepted"}


def create_app() -> FastAPI:
    from workers import broker as _broker  # noqa: F401 - the actors must be bound before any send

    app = FastAPI(
        title="Renova",
        version="1",
        description="Subscription billing for CONECTA: change requests, subscriptions, gateway webhooks.",
    )

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok", "time": datetime.now(UTC).isoformat()}

    @app.exception_handler(HTTPException)
    async def error_body(request: Request, exc: HTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, dict) else {"code": "error", "message": str(exc.detail)}
        return JSONResponse({"error": detail}, status_code=exc.status_code, headers=exc.headers)

    app.include_router(webhooks)
    app.include_router(v1)
    return app
