"""Who is looking at the console: a signed session cookie, the CSRF token of every form, the roles.

The cookie holds only the operator's id, a per-login CSRF token and when it was issued, signed with
`CONSOLE_SECRET_KEY` (itsdangerous); it is HttpOnly, SameSite=Lax, limited to /console and Secure
outside development. Every POST carries the session's CSRF token in a hidden field; viewers may
look but not act.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Form, Request
from itsdangerous import BadSignature, URLSafeTimedSerializer
from sqlalchemy.orm import Session

from workers.db import get_session
from workers.settings import Settings, get_settings

COOKIE = "renova_console"
SESSION_MAX_AGE_SECONDS = 12 * 3600


class LoginRequired(Exception):
    """No valid session: the console redirects to its login page."""


class BadForm(Exception):
    """A form field holds a NUL: no text Renova keeps can (PostgreSQL refuses it), so nothing is done."""


async def refuse_nul_in_forms(request: Request) -> None:
    """Every console form, before anything else reads it (starlette keeps the parsed form for them)."""
    if request.method != "POST":
        return
    form = await request.form()
    if any(isinstance(value, str) and "\x00" in value for _, value in form.multi_items()):
        raise BadForm()


class Forbidden(Exception):
    """Logged in, but not allowed: a viewer acting, or a form without its CSRF token."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class ConsoleUser:
    id: int
    email: str
    role: str
    csrf_token: str

    @property
    def may_act(self) -> bool:
        return self.role == "operator"


def _serializer(settings: Settings) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(settings.console_secret_key.get_secret_value(), salt="renova-console")


def session_cookie(settings: Settings, operator_id: int) -> tuple[str, dict[str, Any]]:
    """The cookie's value and attributes for a new login (a fresh CSRF token each time)."""
    value = _serializer(settings).dumps({"operator": operator_id, "csrf": secrets.token_urlsafe(32)})
    attributes = {
        "httponly": True,
        "samesite": "lax",
        "secure": settings.renova_env == "production",
        "path": "/console",
        "max_age": SESSION_MAX_AGE_SECONDS,
    }
    return value, attributes


def _read_cookie(request: Request, settings: Settings) -> dict[str, Any] | None:
    raw = request.cookies.get(COOKIE)
    if not raw:
        return None
    try:
        data = _serializer(settings).loads(raw, max_age=SESSION_MAX_AGE_SECONDS)
    except BadSignature:
        return None
    return data if isinstance(data, dict) and isinstance(data.get("operator"), int) else None


def current_user(
    request: Request,
    session: Annotated[Session, Depends(get_session)],
    settings: Annotated[Settings, Depends(get_settings)],
) -> ConsoleUser:
    from jobs.operators import active_operator

    data = _read_cookie(request, settings)
    operator = active_operator(session, data["operator"]) if data else None
    if data is None or operator is None:
        raise LoginRequired
    return ConsoleUser(operator.id, operator.email, operator.role, str(data.get("csrf", "")))


def form_user(
    user: Annotated[ConsoleUser, Depends(current_user)],
    csrf_token: Annotated[str, Form()] = "",
) -> ConsoleUser:
    """For every POST: the form's CSRF token must be the session's."""
    if not user.csrf_token or not hmac.compare_digest(csrf_token, user.csrf_token):
        raise Forbidden(
            "O formulário expirou ou não veio do console (token CSRF ausente ou inválido). Recarregue a página."
        )
    return user


def acting_user(user: Annotated[ConsoleUser, Depends(form_user)]) -> ConsoleUser:
    """For every POST that changes something: a form of the console, sent by an operator."""
    if not user.may_act:
        raise Forbidden("Seu perfil é de leitura (viewer): você pode consultar, mas não agir.")
    return user


UserDep = Annotated[ConsoleUser, Depends(current_user)]
FormUserDep = Annotated[ConsoleUser, Depends(form_user)]
ActingUserDep = Annotated[ConsoleUser, Depends(acting_user)]
