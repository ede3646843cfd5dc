"""The ops console at `/console` on `renova web`: server-rendered pages (FastAPI + Jinja2, plain
forms, no JavaScript framework) for operations and on-call. Every action is also a CLI command and
both call the same functions in `jobs/`."""

from __future__ import annotations

from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import RedirectResponse, Response

from workers.console.auth import BadForm, Forbidden, LoginRequired
from workers.console.views import page
from workers.settings import Settings


def mount_console(app: FastAPI, settings: Settings) -> None:
    # A development CONSOLE_SECRET_KEY in production is refused before this, with the other unsafe
    # settings (`workers.settings.production_problems`, checked by `create_app`).
    from workers.console.pages import router

    @app.exception_handler(LoginRequired)
    async def _login_first(request: Request, _: LoginRequired) -> Response:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/console/login?next={quote(target, safe='')}", status_code=303)

    @app.exception_handler(RequestValidationError)
    async def _invalid_address(request: Request, exc: RequestValidationError) -> Response:
        if not request.url.path.startswith("/console"):
            return await request_validation_exception_handler(request, exc)
        message = "Esse endereço não leva a nada: confira o número na barra de endereços."
        return page(request, "error.html", {"title": "Não encontrado", "message": message}, status_code=404)

    @app.exception_handler(BadForm)
    async def _bad_form(request: Request, _: BadForm) -> Response:
        message = "O formulário tem um caractere de controle (NUL) que não pode ser guardado: nada foi feito."
        return page(request, "error.html", {"title": "Texto inválido", "message": message}, status_code=400)

    @app.exception_handler(Forbidden)
    async def _forbidden(request: Request, exc: Forbidden) -> Response:
        return page(request, "error.html", {"title": "Ação não permitida", "message": exc.message}, status_code=403)

    app.include_router(router)
