"""The console served for real (uvicorn on a free port, in this process so it shares the test's
database, broker and sandbox gateway) and a real browser driving it: Playwright with the system's
Chromium (`apt-get install chromium`; Playwright's own browser download is not used)."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx
import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from tests.integration.gateway_fixtures import free_port

PASSWORD = "senha-de-teste-longa"


def chromium_path() -> str | None:
    return os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or shutil.which("chromium-browser")


@dataclass
class Console:
    url: str

    def page_url(self, path: str) -> str:
        return f"{self.url}{path}"


@pytest.fixture
def console_server(clean_database: None) -> Iterator[Console]:
    import uvicorn

    from workers.api import create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="console-server", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 15
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            pytest.fail("the console's web server did not start")
        time.sleep(0.05)
    yield Console(url)
    server.should_exit = True
    thread.join(10)


def add_operator(email: str, role: str) -> None:
    from jobs.operators import add_operator as add
    from workers.db import get_session_factory

    with get_session_factory()() as session:
        add(session, email, PASSWORD, role, actor="test", now=datetime.now(UTC))
        session.commit()


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    executable = chromium_path()
    if executable is None:
        if os.environ.get("CI"):
            pytest.fail("Chromium is required for the browser tests in CI (apt-get install chromium)")
        pytest.skip("no Chromium here: apt-get install chromium (or set CHROMIUM_PATH) to run the browser tests")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, headless=True)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(locale="pt-BR")
    opened = context.new_page()
    opened.set_default_timeout(15_000)
    yield opened
    context.close()


def log_in(page: Page, console: Console, email: str) -> None:
    page.goto(console.page_url("/console/"))
    page.fill("input[name=email]", email)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
