"""How the console shows things: Jinja2 templates with Brazilian money and dates, pt-BR labels."""

from __future__ import annotations

from datetime import date, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from fastapi import Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from jobs.lookups import masked_document
from models.calendar import format_date_br
from models.money import format_brl
from workers.settings import get_settings

TEMPLATES = Path(__file__).resolve().parent.parent / "templates" / "console"

LABELS = {
    # statuses
    "active": "ativa",
    "past_due": "em atraso",
    "suspended": "suspensa",
    "canceled": "cancelada",
    "open": "em aberto",
    "paid": "paga",
    "void": "anulada",
    "uncollectible": "incobrável",
    "pending": "pendente",
    "succeeded": "aprovada",
    "failed": "recusada",
    "unknown": "desconhecida",
    "issued": "emitido",
    "overdue": "vencido",
    "expired": "expirado",
    "applied": "aplicada",
    "rejected": "rejeitada",
    "sent": "enviado",
    "delivered": "entregue",
    "running": "em andamento",
    "done": "concluída",
    # cycles and methods
    "monthly": "mensal",
    "annual": "anual",
    "card": "cartão",
    "boleto": "boleto",
}


def brl(cents: int | None) -> str:
    return "—" if cents is None else format_brl(cents)


def data(value: date | datetime | None) -> str:
    if value is None:
        return "—"
    if isinstance(value, datetime):
        value = _local(value).date()
    return format_date_br(value)


def datahora(value: datetime | None) -> str:
    if value is None:
        return "—"
    return _local(value).strftime("%d/%m/%Y %H:%M")


def _local(value: datetime) -> datetime:
    return value.astimezone(ZoneInfo(get_settings().billing_timezone))


def label(value: str | None) -> str:
    return "—" if value is None else LABELS.get(value, value)


templates = Jinja2Templates(directory=str(TEMPLATES))
templates.env.filters.update(brl=brl, data=data, datahora=datahora, label=label, documento=masked_document)


def page(request: Request, template: str, context: dict[str, Any], *, status_code: int = 200) -> HTMLResponse:
    return templates.TemplateResponse(request, template, context, status_code=status_code)


def unavailable_page(request: Request, what: str, retry_after_seconds: int) -> HTMLResponse:
    """503 while PostgreSQL or Redis is out of reach: a page, not the API's JSON, and nothing was done."""
    response = page(
        request,
        "error.html",
        {
            "title": "Serviço temporariamente indisponível",
            "message": f"Não foi possível acessar {what}. Nada foi alterado; tente de novo em instantes.",
        },
        status_code=503,
    )
    response.headers["Retry-After"] = str(retry_after_seconds)
    return response
