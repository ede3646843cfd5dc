"""What every route of the main application's API shares: the session and id types, "now", the
Bearer key, the error envelope (and the route class that answers a request of the wrong shape with
it), and the objects as the API shows them."""

from __future__ import annotations

import hmac
from collections.abc import Callable, Coroutine
from datetime import date, datetime
from typing import Annotated, Any, Literal

from fastapi import Depends, HTTPException, Path, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from jobs.contract import MAX_ID, describe_field_errors, field_errors
from workers.db import get_session
from workers.settings import Settings, get_settings

SessionDep = Annotated[Session, Depends(get_session)]


# An id in a path: a bigint, so anything beyond is a 422, not a database error.
DbId = Annotated[int, Path(ge=1, le=MAX_ID)]


def clock_now(session: Session) -> datetime:
    """ "now" for a request: the test clock's instant when one is set (development and test), else the
    wall clock's (`jobs.clock.now`)."""
    from jobs import clock
    from jobs.context import runtime

    return clock.now(session, runtime().config)


# Declared in the OpenAPI document (a generated client knows to send the key); Renova answers the 401 itself.
bearer = HTTPBearer(auto_error=False, description="An API key from RENOVA_API_KEYS")


def require_api_key(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)] = None,
    settings: Settings = Depends(get_settings),
) -> str:
    """`Authorization: Bearer <key>` (the OpenAPI document's `HTTPBearer` scheme)."""
    return check_api_key(f"Bearer {credentials.credentials}" if credentials else None, settings)


def check_api_key(authorization: str | None, settings: Settings) -> str:
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


class FieldError(BaseModel):
    field: str = Field(examples=["to_cycle"])
    code: str = Field(examples=["literal_error"])
    message: str


class ErrorDetail(BaseModel):
    code: str = Field(examples=["boleto_already_issued"])
    message: str = Field(description="pt-BR, for people")
    fields: list[FieldError] | None = Field(None, description="422 only: what is wrong with each field")
    details: dict[str, Any] | None = Field(None, description="facts behind a rejection, e.g. the deadline")


class ErrorBody(BaseModel):
    error: ErrorDetail


class ContractRoute(APIRoute):
    """Answers a request of the wrong shape with 422 and Renova's error body, field by field,
    without echoing the values (a misplaced card number must not come back in a response or a log)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                # FastAPI reads the body before it runs the dependencies: a caller without a valid key
                # learns that first, not what is wrong with its body.
                check_api_key(request.headers.get("authorization"), get_settings())
                fields = field_errors(list(exc.errors()), skip=("body",))
                raise HTTPException(
                    422,
                    detail={"code": "invalid_request", "message": describe_field_errors(fields), "fields": fields},
                ) from None

        return route


ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "missing or invalid API key"},
    422: {"model": ErrorBody, "description": "invalid_request: the body, path or headers have the wrong shape"},
}


class ChangeRequestOut(BaseModel):
    id: int
    organization_id: int
    subscription_id: int | None
    requested_by: int | None
    idempotency_key: str
    kind: str
    source: Literal["api", "queue"] | str
    status: Literal["pending", "applied", "rejected"] | str
    params: dict[str, Any] = Field(
        description="the kind's parameters as recorded (a card token shows only its last four characters)"
    )
    error: ErrorDetail | None
    result: dict[str, Any] | None = Field(description="e.g. the proration quote, the new renewal date, the boleto")
    created_at: datetime
    processed_at: datetime | None


class BoletoOut(BaseModel):
    digitable_line: str = Field(description="linha digitável")
    barcode: str
    due_date: date
    amount_cents: int
    status: str
    pix_code: str | None = Field(None, description="Pix copia e cola (BR Code) paying the same amount, any day")
    pdf_url: str = Field(description="The boleto's PDF (API key): FEBRABAN layout, barcode and Pix QR code")


class InvoiceOut(BaseModel):
    id: int
    subscription_id: int
    kind: str
    cycle: str
    period_start: date
    period_end: date
    amount_cents: int
    discount_cents: int
    total_cents: int
    status: str
    method: str
    due_date: date
    paid_on: date | None = None
    boleto: BoletoOut | None = Field(description="the boleto to pay (issued or overdue); null when none is live")


class SubscriptionOut(BaseModel):
    id: int
    organization_id: int
    product: str
    status: str
    cycle: str
    payment_method: str
    pending_payment_method: str | None
    effective_payment_method: str = Field(description="what pays the next renewal")
    billing_anchor: date
    current_period_start: date
    current_period_end: date
    renewal_date: date
    balance_cents: int = Field(description="credit discounted from the next invoice")
    cancel_at_period_end: bool
    canceled_at: datetime | None
    open_invoices: list[InvoiceOut]


def change_request_out(request: Any) -> ChangeRequestOut:
    from jobs.lookups import change_request_view

    return ChangeRequestOut.model_validate(change_request_view(request))


def not_found(what: str) -> HTTPException:
    return HTTPException(status.HTTP_404_NOT_FOUND, detail={"code": "not_found", "message": f"{what} não encontrada"})


def invalid(field: str, message: str, *, code: str = "invalid_request") -> HTTPException:
    return HTTPException(
        422,
        detail={"code": code, "message": message, "fields": [{"field": field, "code": code, "message": message}]},
    )


def invoice_out(invoice: Any, boleto: Any | None) -> InvoiceOut:
    return InvoiceOut(
        id=invoice.id,
        subscription_id=invoice.subscription_id,
        kind=invoice.kind,
        cycle=invoice.cycle,
        period_start=invoice.period_start,
        period_end=invoice.period_end,
        amount_cents=invoice.amount_cents,
        discount_cents=invoice.discount_cents,
        total_cents=invoice.total_cents,
        status=invoice.status,
        method=invoice.method,
        due_date=invoice.due_date,
        paid_on=invoice.paid_on,
        boleto=BoletoOut(
            digitable_line=boleto.digitable_line,
            barcode=boleto.barcode,
            due_date=boleto.due_date,
            amount_cents=boleto.amount_cents,
            status=boleto.status,
            pix_code=boleto.pix_code,
            pdf_url=f"/v1/invoices/{invoice.id}/boleto.pdf",
        )
        if boleto is not None
        else None,
    )


def invoices_with_live_boletos(session: Session, *criteria: Any) -> list[tuple[Any, Any]]:
    """(invoice, its live boleto or None): the boleto to pay is the issued or overdue one; an expired or
    replaced one is history."""
    from jobs.boletos import LIVE_BOLETO
    from models.schema import Boleto, Invoice

    return [
        (invoice, boleto)
        for invoice, boleto in session.execute(
            select(Invoice, Boleto)
            .outerjoin(Boleto, (Boleto.invoice_id == Invoice.id) & Boleto.status.in_(LIVE_BOLETO))
            .where(*criteria)
        ).all()
    ]


def subscription_out(session: Session, subscription: Any) -> SubscriptionOut:
    """A subscription as "Minhas assinaturas" shows it, with its open invoices and their boletos."""
    from models.schema import Invoice

    open_invoices = sorted(
        invoices_with_live_boletos(session, Invoice.subscription_id == subscription.id, Invoice.status == "open"),
        key=lambda pair: (pair[0].due_date, pair[0].id),
    )
    return SubscriptionOut(
        id=subscription.id,
        organization_id=subscription.organization_id,
        product=subscription.product,
        status=subscription.status,
        cycle=subscription.cycle,
        payment_method=subscription.payment_method,
        pending_payment_method=subscription.pending_payment_method,
        effective_payment_method=subscription.effective_payment_method,
        billing_anchor=subscription.billing_anchor,
        current_period_start=subscription.current_period_start,
        current_period_end=subscription.current_period_end,
        renewal_date=subscription.current_period_end,
        balance_cents=subscription.balance_cents,
        cancel_at_period_end=subscription.cancel_at_period_end,
        canceled_at=subscription.canceled_at,
        open_invoices=[invoice_out(invoice, boleto) for invoice, boleto in open_invoices],
    )
