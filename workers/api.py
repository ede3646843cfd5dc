"""The HTTP API: change requests, subscriptions and plan prices for the main application (Bearer API keys),
gateway webhooks (signed), and a health check and Prometheus metrics (`workers/metrics.py`) for operations."""

from __future__ import annotations

import functools
import hmac
import json
import logging
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal

import redis
from fastapi import APIRouter, Body, Depends, FastAPI, Header, HTTPException, Request, Response, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StringConstraints, field_validator
from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateways.webhooks import InvalidSignature, verify
from jobs.contract import MAX_ID, ChangeRequestIn, NameText, PlainText
from jobs.organizations import MAX_MEMBERS
from workers.api_common import (
    ERRORS,
    ChangeRequestOut,
    ContractRoute,
    DbId,
    ErrorBody,
    ErrorDetail,
    SessionDep,
    SubscriptionOut,
    change_request_out,
    clock_now,
    invalid,
    not_found,
    require_api_key,
    subscription_out,
)
from workers.api_reads import reads
from workers.metrics import MetricsSource, metrics_source, refusal, scrape
from workers.settings import Settings, get_settings, refuse_unsafe_production

if TYPE_CHECKING:
    from jobs.plans import PlanError


logger = logging.getLogger(__name__)

v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])
webhooks = APIRouter(prefix="/v1/webhooks")


# The columns of gateway_events.
EVENT_ID_LENGTH = 128
# A 503's Retry-After while PostgreSQL or Redis is out of reach.
RETRY_AFTER_SECONDS = 5
EVENT_TYPE_LENGTH = 64


MAX_EVENT_DEPTH = 32  # a gateway's events nest a few levels; deeper is not an event


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # and jsonb cannot hold it


def webhook_event(body: bytes, *, data_id: bool = False) -> tuple[str, str, dict[str, Any]]:
    """A gateway event's `id`, `type` and body: a JSON object with string `id` (1–128 characters) and
    `type` (1–64) and an object `data` (with a string `id` of 1–128 when `data_id`), no NUL, NaN or
    Infinity (PostgreSQL's jsonb holds neither) and no deeper than MAX_EVENT_DEPTH. ValueError if not."""
    try:
        event = json.loads(body, parse_constant=_reject_constant)
    except RecursionError:
        raise ValueError("nested too deep") from None
    if not isinstance(event, dict):
        raise ValueError("not an object")
    event_id, event_type, data = event.get("id"), event.get("type"), event.get("data")
    if not (isinstance(event_id, str) and 0 < len(event_id) <= EVENT_ID_LENGTH):
        raise ValueError("no id")
    if not (isinstance(event_type, str) and 0 < len(event_type) <= EVENT_TYPE_LENGTH):
        raise ValueError("no type")
    if not isinstance(data, dict):
        raise ValueError("no data")
    if data_id and not (isinstance(data.get("id"), str) and 0 < len(data["id"]) <= EVENT_ID_LENGTH):
        raise ValueError("no data.id")
    _check_values(event)
    return event_id, event_type, event


def _check_values(event: dict[str, Any]) -> None:
    """No NUL anywhere (keys included), no deeper than MAX_EVENT_DEPTH; iterative, so no depth can crash it."""
    pending: list[tuple[Any, int]] = [(event, 1)]
    while pending:
        value, depth = pending.pop()
        if isinstance(value, str):
            if "\x00" in value:
                raise ValueError("a NUL character")
        elif isinstance(value, dict | list):
            if depth > MAX_EVENT_DEPTH:
                raise ValueError("nested too deep")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str) and "\x00" in key:
                    raise ValueError("a NUL character")
                pending.append((item, depth + 1))


def _invalid_event(expected: str) -> HTTPException:
    return HTTPException(
        status.HTTP_400_BAD_REQUEST,
        detail={
            "code": "invalid_event",
            "message": f"expected {expected}: id (at most {EVENT_ID_LENGTH} characters), type (at most "
            f"{EVENT_TYPE_LENGTH}) and data, as a JSON object without NUL, NaN or Infinity, at most "
            f"{MAX_EVENT_DEPTH} levels deep",
        },
    )


@webhooks.post(
    "/gateway",
    status_code=status.HTTP_200_OK,
    responses={
        400: {
            "model": ErrorBody,
            "description": "invalid_signature (Renova-Signature missing, wrong or stale) or invalid_event "
            "(not a JSON object {id, type, data}: string id of 1-128 and type of 1-64 characters, object "
            "data; no NUL, NaN or Infinity; at most 32 levels deep); nothing is stored",
        }
    },
)
async def gateway_webhook(
    request: Request,
    session: SessionDep,
    settings: Settings = Depends(get_settings),
    renova_signature: Annotated[str | None, Header()] = None,
) -> dict[str, str]:
    """A signed gateway event (boleto paid or expired): stored once by its id, then processed on the
    `payments` queue. Answering 2xx acknowledges it; a redelivery of the same event is a no-op."""
    body = await request.body()
    try:
        verify(settings.gateway_webhook_secret.get_secret_value(), renova_signature, body)
    except InvalidSignature as exc:
        raise HTTPException(
            status.HTTP_400_BAD_REQUEST, detail={"code": "invalid_signature", "message": str(exc)}
        ) from None
    try:
        event_id, event_type, event = webhook_event(body)
    except ValueError:
        raise _invalid_event("{id, type, data}") from None
    return _store_gateway_event(session, event_id, event_type, event)


def _store_gateway_event(session: Session, event_id: str, event_type: str, event: dict[str, Any]) -> dict[str, str]:
    """Store an authenticated gateway event once by its id and hand it to the `payments` queue."""
    from jobs.gateway_events import process_gateway_event
    from jobs.outbox import send_after_commit
    from models.schema import GatewayEvent

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


@webhooks.post(
    "/pagarme",
    status_code=status.HTTP_200_OK,
    responses={
        400: {
            "model": ErrorBody,
            "description": "invalid_event (not a JSON object {id, type, data: {id}}: string ids of 1-128 and "
            "type of 1-64 characters; no NUL, NaN or Infinity; at most 32 levels deep); nothing is stored",
        },
        401: {
            "model": ErrorBody,
            "description": "invalid_signature (X-Webhook-Asymmetric-Signature missing or wrong) or "
            "invalid_credentials (the endpoint's Basic credentials); nothing is stored",
        },
        503: {"model": ErrorBody, "description": "Pagar.me's signing keys could not be fetched: send again later"},
    },
)
async def pagarme_webhook(
    request: Request,
    session: SessionDep,
    settings: Settings = Depends(get_settings),
    authorization: Annotated[str | None, Header()] = None,
    x_webhook_asymmetric_signature: Annotated[str | None, Header()] = None,
) -> dict[str, str]:
    """A Pagar.me webhook: authenticated (RS256 signature and/or Basic credentials), stored once by its
    `id`, then processed on the `payments` queue — where the charge is fetched from Pagar.me's API and
    only what the API says is acted on, never the body."""
    from gateways.pagarme_webhooks import KeysUnavailable

    body = await request.body()
    if not settings.pagarme_webhook_jwks_url and not settings.pagarme_webhook_username:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail={"code": "not_configured", "message": "Pagar.me webhooks are not configured here"},
        )
    if settings.pagarme_webhook_username and not _basic_credentials_match(authorization, settings):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail={"code": "invalid_credentials", "message": "wrong or missing Basic credentials"},
            headers={"WWW-Authenticate": 'Basic realm="pagarme-webhooks"'},
        )
    if settings.pagarme_webhook_jwks_url:
        try:
            await run_in_threadpool(
                _pagarme_keys(settings.pagarme_webhook_jwks_url).verify, x_webhook_asymmetric_signature, body
            )
        except InvalidSignature as exc:
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED, detail={"code": "invalid_signature", "message": str(exc)}
            ) from None
        except KeysUnavailable as exc:
            logger.warning("%s", exc)
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE,
                detail={"code": "keys_unavailable", "message": "Pagar.me's signing keys are out of reach"},
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            ) from None
    try:
        event_id, event_type, event = webhook_event(body, data_id=True)
    except ValueError:
        raise _invalid_event("Pagar.me's {id, type, data: {id}}") from None
    return _store_gateway_event(session, event_id, f"pagarme:{event_type}", event)


def _basic_credentials_match(authorization: str | None, settings: Settings) -> bool:
    from gateways.pagarme_webhooks import basic_credentials

    user, password = basic_credentials(authorization) or ("", "")
    expected_password = settings.pagarme_webhook_password.get_secret_value()
    # Both compared whatever the first gives, so timing tells nothing.
    user_ok = hmac.compare_digest(user.encode(), settings.pagarme_webhook_username.encode())
    password_ok = hmac.compare_digest(password.encode(), expected_password.encode())
    return user_ok and password_ok and bool(user)


@functools.cache
def _pagarme_keys(url: str) -> Any:
    from gateways.pagarme_webhooks import Jwks

    return Jwks(url)


# --- the main application's API: organizations, change requests, subscriptions ------------------


Email = Annotated[PlainText, StringConstraints(strip_whitespace=True, min_length=3, max_length=254)]


class MemberIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: StrictInt = Field(
        gt=0, le=MAX_ID, description="The member's id in the main application (unique across organizations)"
    )
    name: Annotated[NameText, StringConstraints(max_length=200)] = ""
    email: Email | None = None
    role: Literal["owner", "admin", "member"]
    financial_responsible: StrictBool = False
    active: StrictBool = True

    @field_validator("email")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is not None and ("@" not in value or any(char.isspace() for char in value)):
            raise ValueError("e-mail inválido")
        return value


class OrganizationIn(BaseModel):
    """Renova's copy of an organization: sent whenever it changes in the main application."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[NameText, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
    document: PlainText | None = Field(None, description="CPF or CNPJ (alphanumeric CNPJ accepted); needed for boletos")
    members: list[MemberIn] = Field(
        default_factory=list,
        max_length=MAX_MEMBERS,
        description=f"All of them (at most {MAX_MEMBERS:,}): members absent become inactive",
    )


class MemberOut(BaseModel):
    id: int
    name: str
    email: str | None = Field(description="masked: its first character and its domain (`d***@acme.example`)")
    role: str
    financial_responsible: bool
    active: bool
    can_change_billing: bool


class OrganizationOut(BaseModel):
    id: int
    name: str
    document: str | None = Field(description="masked: the CPF's or CNPJ's check digits only (`**.***.***/****-81`)")
    members: list[MemberOut]


def _organization_out(session: Session, organization: Any) -> OrganizationOut:
    from jobs.lookups import masked_document, masked_email
    from models.policy import can_change_billing
    from models.schema import Member

    members = session.scalars(select(Member).where(Member.organization_id == organization.id).order_by(Member.id))
    return OrganizationOut(
        id=organization.id,
        name=organization.name,
        document=masked_document(organization.document),
        members=[
            MemberOut(
                id=member.id,
                name=member.name,
                email=masked_email(member.email),
                role=member.role,
                financial_responsible=member.financial_responsible,
                active=member.active,
                can_change_billing=can_change_billing(
                    role=member.role, financial_responsible=member.financial_responsible, active=member.active
                ),
            )
            for member in members
        ],
    )


contract = APIRouter(route_class=ContractRoute, responses=ERRORS)


@contract.put(
    "/organizations/{organization_id}",
    response_model=OrganizationOut,
    tags=["organizations"],
    responses={409: {"model": ErrorBody, "description": "a member id belongs to another organization"}},
)
def put_organization(organization_id: DbId, body: OrganizationIn, session: SessionDep) -> OrganizationOut:
    """Create or update Renova's copy of an organization, its CPF/CNPJ and its members.

    The main application sends it whenever any of it changes; members absent from the body become
    inactive (they can no longer change billing nor receive notices)."""
    from jobs.organizations import MEMBER_CONFLICT, MemberCopy, upsert_organization
    from models.policy import RuleViolation

    try:
        organization = upsert_organization(
            session,
            organization_id,
            name=body.name,
            document=body.document,
            members=[MemberCopy(**member.model_dump()) for member in body.members],
            now=clock_now(session),
        )
    except RuleViolation as violation:
        session.rollback()
        if violation.code == MEMBER_CONFLICT:
            raise HTTPException(
                status.HTTP_409_CONFLICT, detail={"code": violation.code, "message": violation.message}
            ) from None
        raise invalid(violation.details["field"], violation.message, code=violation.code) from None
    session.commit()
    return _organization_out(session, organization)


@contract.post(
    "/change-requests",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=ChangeRequestOut,
    tags=["change requests"],
    responses={
        400: {"model": ErrorBody, "description": "idempotency_key_required"},
        409: {"model": ErrorBody, "description": "idempotency_conflict: the key was used for another body"},
    },
)
def post_change_request(
    body: Annotated[ChangeRequestIn, Body()],
    session: SessionDep,
    response: Response,
    idempotency_key: Annotated[
        str | None, Header(description="Unique per organization and user action; replays return the same request")
    ] = None,
) -> ChangeRequestOut:
    """Record a change request and process it in the background (202, `status: pending`).

    Poll `GET /v1/change-requests/{id}` for `applied` (with its `result`) or `rejected` (with its
    `error`). The same Idempotency-Key with the same body returns the same request; with another body, 409.
    """
    from jobs.changes import IdempotencyKeyReused, process_change_request, record_change_request
    from jobs.outbox import send_after_commit

    key = (idempotency_key or "").strip()
    if not key or len(key) > 255:
        raise HTTPException(
            status.HTTP_400_BAD_REQUEST,
            detail={
                "code": "idempotency_key_required",
                "message": "Envie o cabeçalho Idempotency-Key (1 a 255 caracteres), único por ação do usuário.",
            },
        )
    if body.idempotency_key is not None and body.idempotency_key != key:
        raise invalid("idempotency_key", "difere do cabeçalho Idempotency-Key")
    data = body.model_dump(mode="json")
    data["idempotency_key"] = key
    try:
        recorded = record_change_request(session, data, source="api", now=clock_now(session))
    except IdempotencyKeyReused as exc:
        session.rollback()
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            detail={
                "code": "idempotency_conflict",
                "message": "Esta Idempotency-Key já foi usada para outra solicitação desta organização.",
                "details": {"change_request_id": exc.existing.id},
            },
        ) from None
    request = recorded.request
    if request.status == "pending":
        # After the commit: a worker must never look for a row that is not there yet. A replay of a
        # request still pending asks again, which is harmless.
        send_after_commit(session, process_change_request, request.id)
    if not recorded.created:
        response.headers["Idempotent-Replayed"] = "true"
    session.commit()
    return change_request_out(request)


class PreviewOut(BaseModel):
    outcome: Literal["applied", "charge", "wait", "rejected"] = Field(
        description="applied: would apply at once; charge: would apply once the card charge of "
        "`charge_now_cents` succeeds; wait: a charge of the subscription is in flight, the request would "
        "wait for it; rejected: see `error`"
    )
    kind: str
    on: date = Field(description="The business date (D) the preview was priced on")
    result: dict[str, Any] | None = Field(None, description="What the request would record as its result")
    charge_now_cents: int | None = None
    boleto_issued_now: bool | None = None
    message: str | None = None
    error: ErrorDetail | None = None


@contract.post(
    "/change-requests/preview",
    response_model=PreviewOut,
    response_model_exclude_none=True,
    tags=["change requests"],
)
def preview_change_request(body: Annotated[ChangeRequestIn, Body()], session: SessionDep) -> PreviewOut:
    """What the change request would do today (the same body, no Idempotency-Key), without doing it.

    The same rules and pricing decide it as a real request, then everything is rolled back: nothing
    is recorded, charged, issued or sent. A refusal is answered 200 with `outcome: rejected`.
    """
    from jobs.changes import preview_change_request as preview
    from jobs.context import runtime

    return PreviewOut.model_validate(preview(session, body, now=clock_now(session), config=runtime().config))


@contract.get(
    "/change-requests/{change_request_id}",
    response_model=ChangeRequestOut,
    tags=["change requests"],
    responses={404: {"model": ErrorBody}},
)
def get_change_request(change_request_id: DbId, session: SessionDep) -> ChangeRequestOut:
    """A change request: `pending`, `applied` with its `result`, or `rejected` with its `error`."""
    from models.schema import ChangeRequest

    request = session.get(ChangeRequest, change_request_id)
    if request is None:
        raise not_found("Solicitação")
    return change_request_out(request)


@contract.get(
    "/subscriptions/{subscription_id}",
    response_model=SubscriptionOut,
    tags=["subscriptions"],
    responses={404: {"model": ErrorBody}},
)
def get_subscription(subscription_id: DbId, session: SessionDep) -> SubscriptionOut:
    """A subscription as "Minhas assinaturas" shows it, with its open invoices and their boletos."""
    from models.schema import Subscription

    subscription = session.get(Subscription, subscription_id)
    if subscription is None:
        raise not_found("Assinatura")
    return subscription_out(session, subscription)


# --- plan prices ---------------------------------------------------------------------------------


class PlanPricesIn(BaseModel):
    """New prices for a product from a date on. Either price may be left out to change only that
    cycle, but not both. Money is integer cents of BRL."""

    model_config = ConfigDict(extra="forbid")

    monthly_cents: StrictInt | None = Field(None, description="Monthly price in cents (≥ 0)", examples=[4990])
    annual_cents: StrictInt | None = Field(None, description="Annual price in cents (≥ 0)", examples=[47900])
    effective_from: date | None = Field(
        None,
        description="First day the prices apply, YYYY-MM-DD: today (the default) or later, never before",
        examples=["2027-01-01"],
    )
    reason: Annotated[str, StringConstraints(max_length=500)] = Field("", description="Why (kept in the audit log)")

    @field_validator("effective_from", mode="before")
    @classmethod
    def _iso_date(cls, value: object) -> object:
        from jobs.plans import parse_iso_date

        if value is None:
            return None
        if not isinstance(value, str):
            raise ValueError("deve ser uma data AAAA-MM-DD")
        try:
            return parse_iso_date(value)
        except ValueError:
            raise ValueError("deve ser uma data AAAA-MM-DD") from None


class ScheduledPriceOut(BaseModel):
    effective_from: date
    price_cents: int


class PlanPriceOut(BaseModel):
    product: str
    cycle: str = Field(examples=["monthly"])
    currency: str = Field(examples=["BRL"])
    price_cents: int | None = Field(description="in force on `on`; null when the product only has future prices")
    effective_from: date | None = Field(description="since when the price in force applies")
    scheduled: list[ScheduledPriceOut] = Field(description="prices that take over after `on`, soonest first")


class PriceListOut(BaseModel):
    on: date = Field(description="the business date the prices are in force on (today)")
    prices: list[PlanPriceOut]


def _business_today(session: Session, settings: Settings) -> date:
    from models.calendar import local_today

    return local_today(clock_now(session), settings.billing_timezone)


def _price_list_out(session: Session, product: str | None, on: date) -> PriceListOut:
    from jobs.plans import price_list

    return PriceListOut(
        on=on,
        prices=[
            PlanPriceOut(
                product=row.product,
                cycle=row.cycle,
                currency=row.currency,
                price_cents=row.price_cents,
                effective_from=row.effective_from,
                scheduled=[
                    ScheduledPriceOut(effective_from=change.effective_from, price_cents=change.price_cents)
                    for change in row.scheduled
                ],
            )
            for row in price_list(session, product, on=on)
        ],
    )


def _plan_invalid(exc: PlanError) -> HTTPException:
    """A `jobs.plans.PlanError` as Renova's 422 body, naming the fields at fault."""
    detail: dict[str, Any] = {
        "code": exc.code,
        "message": exc.message,
        "fields": [{"field": name, "code": exc.code, "message": exc.message} for name in exc.fields],
    }
    if exc.details:
        detail["details"] = exc.details
    return HTTPException(422, detail=detail)


def _unknown_product(product: str | None) -> HTTPException:
    """None: a name no product can have (a NUL, 5,000 characters), not echoed back."""
    named = f"o produto {product!r}" if product is not None else "esse produto"
    message = f"Nenhum preço cadastrado para {named}."
    return HTTPException(status.HTTP_404_NOT_FOUND, detail={"code": "unknown_product", "message": message})


@contract.put(
    "/plans/{product}",
    response_model=PriceListOut,
    tags=["plans"],
    responses={
        422: {
            "model": ErrorBody,
            "description": "invalid_request, invalid_product, invalid_price, "
            "price_required or retroactive_price (a date before today); nothing is written",
        }
    },
)
def put_plan_prices(
    product: str, body: PlanPricesIn, session: SessionDep, settings: Settings = Depends(get_settings)
) -> PriceListOut:
    """Set a product's prices from `effective_from` on (default today; never retroactively).

    Each subscription pays the new price from its next renewal on or after that date (an invoice
    already issued keeps its amount); the annual renewal notice, 30 days ahead, shows the new price.
    Setting prices again for the same date replaces them. Answers the product's price list."""
    from jobs.plans import PlanError, set_prices

    today = _business_today(session, settings)
    try:
        set_prices(
            session,
            product,
            monthly_cents=body.monthly_cents,
            annual_cents=body.annual_cents,
            effective_from=body.effective_from or today,
            today=today,
            actor="api",
            reason=body.reason,
        )
    except PlanError as exc:
        session.rollback()
        raise _plan_invalid(exc) from None
    session.commit()
    return _price_list_out(session, product, today)


@contract.get("/plans", response_model=PriceListOut, tags=["plans"])
def get_plans(session: SessionDep, settings: Settings = Depends(get_settings)) -> PriceListOut:
    """Every product's prices in force today, per billing cycle, and the changes scheduled after today."""
    return _price_list_out(session, None, _business_today(session, settings))


@contract.get("/plans/{product}", response_model=PriceListOut, tags=["plans"], responses={404: {"model": ErrorBody}})
def get_plan(product: str, session: SessionDep, settings: Settings = Depends(get_settings)) -> PriceListOut:
    """A product's prices in force today, per billing cycle, and the changes scheduled after today."""
    from jobs.plans import PRODUCT_PATTERN

    if not PRODUCT_PATTERN.match(product):
        raise _unknown_product(None)  # no product has such a name (and PostgreSQL refuses a NUL)
    prices = _price_list_out(session, product, _business_today(session, settings))
    if not prices.prices:
        raise _unknown_product(product)
    return prices


v1.include_router(contract)
v1.include_router(reads)


PLAIN_ERROR_CODES = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed"}


def _plain_error(status_code: int, message: str) -> dict[str, str]:
    return {"code": PLAIN_ERROR_CODES.get(status_code, "error"), "message": message}


def create_app() -> FastAPI:
    from jobs.context import runtime
    from workers import broker as _broker  # noqa: F401 - the actors must be bound before any send
    from workers.db import get_session_factory
    from workers.startup import refuse_test_clock_in_production

    refuse_unsafe_production(get_settings())
    with get_session_factory()() as session:
        refuse_test_clock_in_production(session)

    app = FastAPI(
        title="Renova",
        version="1",
        description="Subscription billing for CONECTA: change requests, subscriptions, plan prices, events, "
        "gateway webhooks.",
        # Operation ids are the functions' names (`post_change_request`): what a generated client calls.
        generate_unique_id_function=lambda route: route.name,
    )

    @app.get("/healthz", include_in_schema=False)
    def healthz(session: SessionDep) -> dict[str, str]:
        """Liveness (200 while the process serves), what it depends on (`database`, `redis`: `up` or
        `down`, and `status` `degraded` when one is down), and which clock the processes read: `real`,
        or `test` with its frozen `now`."""
        from sqlalchemy import text
        from sqlalchemy.exc import SQLAlchemyError

        from jobs.clock import clock_state
        from workers.db import resolved_urls

        answer = {"status": "ok", "time": datetime.now(UTC).isoformat(), "clock": "real"}
        try:
            session.execute(text("SELECT 1"))
            answer["database"] = "up"
        except SQLAlchemyError:
            session.rollback()
            answer["database"] = "down"
        # retry=None: down is said within the second (redis-py's default retries take seconds more).
        client = redis.Redis.from_url(resolved_urls()[1], socket_timeout=1, socket_connect_timeout=1, retry=None)
        try:
            client.ping()
            answer["redis"] = "up"
        except (redis.RedisError, OSError):
            answer["redis"] = "down"
        finally:
            client.close()
        if "down" in (answer["database"], answer["redis"]):
            answer["status"] = "degraded"
        if runtime().config.allow_future_dates and answer["database"] == "up":  # production reads the real clock
            try:
                state = clock_state(session)
            except SQLAlchemyError:
                answer["clock"] = "unknown"
            else:
                if state is not None:
                    answer.update(clock="test", now=state.now.isoformat())
        return answer

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    @app.exception_handler(redis.ConnectionError)
    async def unavailable(request: Request, exc: Exception) -> Response:
        # PostgreSQL or Redis out of reach: nothing was done, and the same request can be sent again.
        redis_down = isinstance(exc, redis.RedisError)
        if request.url.path.startswith("/console"):
            from workers.console.views import unavailable_page

            return unavailable_page(request, "o Redis" if redis_down else "o banco de dados", RETRY_AFTER_SECONDS)
        what = "Redis" if redis_down else "the database"
        return JSONResponse(
            {"error": {"code": "unavailable", "message": f"{what} is unavailable; try again shortly"}},
            status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )

    @app.get("/metrics", include_in_schema=False)
    def metrics(
        source: Annotated[MetricsSource, Depends(metrics_source)],
        settings: Annotated[Settings, Depends(get_settings)],
        authorization: Annotated[str | None, Header()] = None,
    ) -> Response:
        """Prometheus text format for operations, behind METRICS_TOKEN (README "Metrics and alerts")."""
        refused = refusal(settings, authorization)
        if refused is not None:
            headers = {"WWW-Authenticate": "Bearer"} if refused.status == status.HTTP_401_UNAUTHORIZED else None
            raise HTTPException(
                refused.status, detail={"code": refused.code, "message": refused.message}, headers=headers
            )
        body, content_type = scrape(source, settings)
        return Response(body, media_type=content_type)

    # Starlette's own: the router's 404 (no such path) and 405 (no such method) answer the envelope too.
    @app.exception_handler(StarletteHTTPException)
    async def error_body(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, dict) else _plain_error(exc.status_code, str(exc.detail))
        return JSONResponse({"error": detail}, status_code=exc.status_code, headers=exc.headers)

    app.include_router(webhooks)
    app.include_router(v1)
    from workers.console import mount_console

    mount_console(app, get_settings())
    return app
