"""What the main application reads back: lists (cursor-paginated, newest first) of an organization's
subscriptions, a subscription's invoices with their boletos, change requests by organization, status
and kind — and the events (`GET /v1/events`), in the order they happened, as a pull alternative to
the webhooks (`jobs.events`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query, Response, status
from pydantic import BaseModel, Field
from sqlalchemy import Select, select

from jobs.contract import MAX_ID
from workers.api_common import (
    ERRORS,
    ChangeRequestOut,
    ContractRoute,
    DbId,
    ErrorBody,
    InvoiceOut,
    SessionDep,
    SubscriptionOut,
    change_request_out,
    invoice_out,
    invoices_with_live_boletos,
    not_found,
    subscription_out,
)

reads = APIRouter(route_class=ContractRoute, responses=ERRORS)

Limit = Annotated[int, Query(ge=1, le=100, description="At most this many (1–100)")]
StartingAfter = Annotated[
    int | None,
    Query(ge=1, le=MAX_ID, description="The `id` of the last item of the previous page: the page after it"),
]


class SubscriptionPage(BaseModel):
    data: list[SubscriptionOut]
    has_more: bool = Field(description="true: ask again with `starting_after` = the last item's id")


class InvoicePage(BaseModel):
    data: list[InvoiceOut]
    has_more: bool


class ChangeRequestPage(BaseModel):
    data: list[ChangeRequestOut]
    has_more: bool


class EventOut(BaseModel):
    id: str = Field(examples=["evt_1042"], description="Stable: deliveries of the same event carry the same id")
    type: str = Field(examples=["subscription.suspended"])
    timestamp: str = Field(description="When it happened, UTC (ISO 8601, `Z`)")
    organization_id: int
    subscription_id: int | None
    data: dict[str, Any] = Field(description='`{"object": …}`: the object as the API shows it, at that moment')


class EventPage(BaseModel):
    data: list[EventOut]
    has_more: bool = Field(description="true: ask again with `after` = the last event's id")


def _page(
    session: SessionDep, query: Select[Any], id_column: Any, limit: int, starting_after: int | None
) -> tuple[list[Any], bool]:
    if starting_after is not None:
        query = query.where(id_column < starting_after)
    rows = list(session.scalars(query.order_by(id_column.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


@reads.get(
    "/organizations/{organization_id}/subscriptions",
    response_model=SubscriptionPage,
    tags=["subscriptions"],
    responses={404: {"model": ErrorBody}},
)
def list_subscriptions(
    organization_id: DbId, session: SessionDep, limit: Limit = 20, starting_after: StartingAfter = None
) -> SubscriptionPage:
    """An organization's subscriptions ("Minhas assinaturas"), newest first, canceled ones included."""
    from models.schema import Organization, Subscription

    if session.get(Organization, organization_id) is None:
        raise not_found("Organização")
    rows, has_more = _page(
        session,
        select(Subscription).where(Subscription.organization_id == organization_id),
        Subscription.id,
        limit,
        starting_after,
    )
    return SubscriptionPage(data=[subscription_out(session, row) for row in rows], has_more=has_more)


@reads.get(
    "/subscriptions/{subscription_id}/invoices",
    response_model=InvoicePage,
    tags=["subscriptions"],
    responses={404: {"model": ErrorBody}},
)
def list_invoices(
    subscription_id: DbId, session: SessionDep, limit: Limit = 20, starting_after: StartingAfter = None
) -> InvoicePage:
    """A subscription's invoices, newest first, each with its boleto to pay (linha digitável) when one is live."""
    from models.schema import Invoice, Subscription

    if session.get(Subscription, subscription_id) is None:
        raise not_found("Assinatura")
    rows, has_more = _page(
        session, select(Invoice).where(Invoice.subscription_id == subscription_id), Invoice.id, limit, starting_after
    )
    boletos = dict(invoices_with_live_boletos(session, Invoice.id.in_([row.id for row in rows])))
    return InvoicePage(data=[invoice_out(row, boletos.get(row)) for row in rows], has_more=has_more)


@reads.get(
    "/invoices/{invoice_id}/boleto.pdf",
    response_class=Response,
    tags=["subscriptions"],
    responses={
        200: {"content": {"application/pdf": {}}, "description": "The boleto, FEBRABAN layout, with its Pix QR code"},
        404: {"model": ErrorBody, "description": "not_found: no such invoice, or no boleto to pay for it"},
    },
)
def get_boleto_pdf(invoice_id: DbId, session: SessionDep) -> Response:
    """The PDF of the invoice's boleto to pay (issued or overdue): what "Minhas assinaturas" offers to
    download. The same boleto always gives the same bytes (`ETag`)."""
    from jobs.boleto_pdf import boleto_pdf, slip_for
    from jobs.boletos import live_boleto
    from jobs.context import runtime

    boleto = live_boleto(session, invoice_id)
    beneficiary = runtime().beneficiary
    if boleto is None or beneficiary is None:
        raise not_found("Boleto")
    slip = slip_for(session, boleto.id, beneficiary, grace_business_days=runtime().config.boleto_grace_business_days)
    if slip is None:
        raise not_found("Boleto")
    return Response(
        boleto_pdf(slip),
        media_type="application/pdf",
        headers={
            "Content-Disposition": f'inline; filename="boleto-{slip.nosso_numero}.pdf"',
            "ETag": f'"{slip.content_hash}"',
        },
    )


@reads.get("/change-requests", response_model=ChangeRequestPage, tags=["change requests"])
def list_change_requests(
    session: SessionDep,
    organization_id: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
    status_: Annotated[Literal["pending", "applied", "rejected"] | None, Query(alias="status")] = None,
    kind: Annotated[str | None, Query(max_length=32, pattern="^[a-z_]+$")] = None,
    limit: Limit = 20,
    starting_after: StartingAfter = None,
) -> ChangeRequestPage:
    """Change requests, newest first, by organization, status and kind (each optional)."""
    from models.schema import ChangeRequest

    query = select(ChangeRequest)
    if organization_id is not None:
        query = query.where(ChangeRequest.organization_id == organization_id)
    if status_ is not None:
        query = query.where(ChangeRequest.status == status_)
    if kind is not None:
        query = query.where(ChangeRequest.kind == kind)
    rows, has_more = _page(session, query, ChangeRequest.id, limit, starting_after)
    return ChangeRequestPage(data=[change_request_out(row) for row in rows], has_more=has_more)


@reads.get(
    "/events",
    response_model=EventPage,
    tags=["events"],
    responses={400: {"model": ErrorBody, "description": "invalid_cursor: `after` is no event kept (30 days)"}},
)
def list_events(
    session: SessionDep,
    after: Annotated[str | None, Query(max_length=40, description="The last event id you have (`evt_…`)")] = None,
    limit: Limit = 100,
) -> EventPage:
    """Events in the order they happened, after `after` (from the oldest kept, 30 days, without it).

    The same events the webhooks push, with the same ids: poll with the last id you processed. A
    page never skips an event committed later by a transaction that started earlier."""
    from jobs import events

    try:
        page = events.list_events(session, after=after, limit=limit)
    except events.EventError as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, detail={"code": exc.code, "message": exc.message}) from None
    return EventPage(
        data=[EventOut.model_validate(events.event_body(event)) for event in page.events], has_more=page.has_more
    )
