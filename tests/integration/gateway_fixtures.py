"""Pytest plugin: the sandbox gateway as a real process, an adapter connected to it, and a webhook
receiver. Real processes on real sockets, so timeouts, kills and restarts behave as in production.

Fixtures:
- `gateway_flavor` (session): which API the sandbox serves, `sandbox` or `pagarme` (Pagar.me v5's),
  from TEST_GATEWAY (default sandbox); every adapter fixture speaks that flavor.
- `sandbox_webhook_url` (session): where the sandbox posts webhooks at start; "" (none) unless
  overridden, e.g. by a conftest pointing it at Renova's API.
- `sandbox_gateway` (session): the running `SandboxGateway`.
- `gateway` (function): an `HttpGateway` connected to it with a 1.5 s read timeout.
- `webhook_receiver` (function): a fresh `WebhookReceiver`; the sandbox posts to it during the test.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from gateways.http import HttpGateway
from gateways.sandbox import clients
from gateways.sandbox.models import FLAVORS, Flavor

ROOT = Path(__file__).resolve().parent.parent.parent
GATEWAY_READ_TIMEOUT = 1.5  # the sandbox's tok_timeout stall (30 s by default) must exceed it
START_TIMEOUT = 20.0

T = TypeVar("T")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def poll(predicate: Callable[[], T | None], timeout: float, what: str, interval: float = 0.05) -> T:
    """The first truthy value of `predicate()`, or AssertionError naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last value: {value!r})")
        time.sleep(interval)


# --- the sandbox process --------------------------------------------------------------------------


class SandboxGateway:
    """Runs `renova gateway` in a subprocess and drives its test-only endpoints."""

    def __init__(
        self, data_dir: Path, *, webhook_url: str = "", port: int | None = None, flavor: Flavor = "sandbox"
    ) -> None:
        self.flavor = flavor
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = f"sk_test_{secrets.token_hex(8)}"
        self.webhook_secret = f"whsec_test_{secrets.token_hex(8)}"
        # The pagarme flavor's Basic credentials for its webhooks (it signs them with its own RSA key).
        self.webhook_username = f"pagarme_{secrets.token_hex(4)}"
        self.webhook_password = secrets.token_hex(12)
        self.webhook_url = webhook_url
        self.log_path = self.data_dir / "sandbox.log"
        self._process: subprocess.Popen[bytes] | None = None
        # Runtime settings changed through set_config, re-applied after a restart.
        self._overrides: dict[str, Any] = {}
        self._http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.api_key}"}, timeout=10.0)

    # lifecycle

    def start(self) -> None:
        if self.running:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable, "-m", "workers.cli", "gateway",
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--data-dir", str(self.data_dir),
            "--webhook-url", self.webhook_url,
            "--webhook-secret", self.webhook_secret,
            "--api-key", self.api_key,
            "--flavor", self.flavor,
            "--webhook-username", self.webhook_username,
            "--webhook-password", self.webhook_password,
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        poll(self._healthy, START_TIMEOUT, f"the sandbox gateway on port {self.port}")
        if self._overrides:
            self._post("/sandbox/config", json=self._overrides)

    def _healthy(self) -> bool:
        assert self._process is not None
        if self._process.poll() is not None:
            raise RuntimeError(f"sandbox gateway exited with {self._process.returncode}:\n{self.log_tail()}")
        try:
            return httpx.get(f"{self.url}/healthz", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, as a process manager would; SIGKILL if it does not exit in time."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, like a crash or an OOM kill."""
        if self._process is None:
            return
        if self._process.poll() is None:
            os.kill(self._process.pid, signal.SIGKILL)
        self._process.wait()
        self._process = None

    def restart(self) -> None:
        """Kill -9 and start again on the same port and data folder."""
        self.kill()
        self.start()

    def close(self) -> None:
        self.stop()
        self._http.close()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # clients and helpers

    @property
    def api_url(self) -> str:
        """The adapter's base URL (GATEWAY_URL)."""
        return clients.api_url(self.flavor, self.url)

    @property
    def jwks_url(self) -> str:
        return clients.jwks_url(self.url)

    def client(
        self, *, read_timeout: float = GATEWAY_READ_TIMEOUT, connect_timeout: float = 2.0, **kwargs: Any
    ) -> HttpGateway:
        """The flavor's adapter: `HttpGateway`, or `PagarmeGateway` for the pagarme flavor."""
        return clients.connect(
            self.flavor, self.url, self.api_key, connect_timeout=connect_timeout, read_timeout=read_timeout, **kwargs
        )

    def _post(self, path: str, json: dict[str, Any] | None = None) -> dict[str, Any]:
        response = self._http.post(path, json=json)
        response.raise_for_status()
        return response.json()

    def _get(self, path: str, **params: Any) -> Any:
        response = self._http.get(path, params={k: v for k, v in params.items() if v is not None})
        response.raise_for_status()
        return response.json()

    def ledger(self, idempotency_key: str | None = None, kind: str | None = None) -> list[dict[str, Any]]:
        """Every successful charge and boleto payment (positive) and refund (negative, with the
        refunded charge's `charge_id`) the sandbox has recorded, oldest first."""
        return self._get("/sandbox/ledger", idempotency_key=idempotency_key, kind=kind)["data"]

    def charge(self, charge_id: str) -> dict[str, Any]:
        """A charge as the sandbox holds it now, with `amount_refunded_cents`."""
        return self._get(f"/sandbox/charges/{charge_id}")

    def webhooks(self) -> list[dict[str, Any]]:
        """Every webhook delivery with its status, attempts and event."""
        return self._get("/sandbox/webhooks")["data"]

    def boleto(self, boleto_id: str) -> dict[str, Any]:
        """A boleto as the sandbox holds it (whatever the flavor): status, amounts, due date, lines."""
        return self._get(f"/sandbox/boletos/{boleto_id}")

    def pay_boleto(
        self, boleto_id: str, *, paid_on: date | None = None, amount_cents: int | None = None, via: str | None = None
    ) -> dict[str, Any]:
        """Pay as a bank would (or by the boleto's Pix code: `via="pix"`); returns {"boleto": ...,
        "event_id": ...} and a boleto.paid webhook follows."""
        body: dict[str, Any] = {} if via is None else {"via": via}
        if paid_on is not None:
            body["paid_on"] = paid_on.isoformat()
        if amount_cents is not None:
            body["amount_cents"] = amount_cents
        return self._post(f"/sandbox/boletos/{boleto_id}/pay", json=body)

    def expire_boleto(self, boleto_id: str) -> dict[str, Any]:
        return self._post(f"/sandbox/boletos/{boleto_id}/expire")

    def chargeback(self, charge_id: str) -> dict[str, Any]:
        """The cardholder's bank takes a paid card charge back (pagarme flavor); a webhook follows."""
        return self._post(f"/sandbox/charges/{charge_id}/chargeback")

    def set_config(self, **changes: Any) -> dict[str, Any]:
        """Change process-wide latency_ms, timeout_rate, unavailable_rate, stall_ms, webhook_url,
        webhook_max_attempts or webhook_retry_base_s; kept across restart()."""
        self._overrides.update(changes)
        return self._post("/sandbox/config", json=changes)

    @contextlib.contextmanager
    def configured(self, **changes: Any) -> Iterator[dict[str, Any]]:
        """set_config for the duration of a `with` block, then back to the previous values."""
        current = self._get("/sandbox/config")
        previous = {name: current[name] for name in changes}
        try:
            yield self.set_config(**changes)
        finally:
            self.set_config(**previous)


# --- webhook receiver -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ReceivedWebhook:
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    answered: int

    def json(self) -> Any:
        return json.loads(self.body)


class WebhookReceiver:
    """A tiny HTTP server that records every POST and answers with queued status codes (then 200)."""

    def __init__(self) -> None:
        self.received: list[ReceivedWebhook] = []
        self._answers: list[int] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with receiver._lock:
                    status = receiver._answers.pop(0) if receiver._answers else 200
                    receiver.received.append(
                        ReceivedWebhook(self.path, {k.lower(): v for k, v in self.headers.items()}, body, status)
                    )
                payload = b'{"received": true}' if status < 300 else b'{"error": "try again"}'
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep test output clean

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1/webhooks/gateway"
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="webhook-receiver", daemon=True
        )
        self._thread.start()

    def answer_next(self, *statuses: int) -> None:
        """The next deliveries get these status codes, in order; later ones get 200."""
        with self._lock:
            self._answers.extend(statuses)

    def matching(self, predicate: Callable[[ReceivedWebhook], bool]) -> list[ReceivedWebhook]:
        with self._lock:
            return [hook for hook in self.received if predicate(hook)]

    def for_event(self, event_id: str) -> list[ReceivedWebhook]:
        return self.matching(lambda hook: hook.json().get("id") == event_id)

    def wait_for_event(self, event_id: str, *, count: int = 1, timeout: float = 15.0) -> list[ReceivedWebhook]:
        """The first `count` deliveries of `event_id`, waiting for them to arrive."""
        return poll(
            lambda: hooks if len(hooks := self.for_event(event_id)) >= count else None,
            timeout,
            f"{count} deliveries of webhook event {event_id}",
        )[:count]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def gateway_flavor() -> Flavor:
    flavor = os.environ.get("TEST_GATEWAY", "sandbox")
    if flavor not in FLAVORS:
        raise pytest.UsageError(f"TEST_GATEWAY must be one of {', '.join(FLAVORS)}, not {flavor!r}")
    return flavor  # type: ignore[return-value]


@pytest.fixture(scope="session")
def sandbox_webhook_url() -> str:
    return ""


@pytest.fixture(scope="session")
def sandbox_gateway(
    tmp_path_factory: pytest.TempPathFactory, sandbox_webhook_url: str, gateway_flavor: Flavor
) -> Iterator[SandboxGateway]:
    sandbox = SandboxGateway(
        tmp_path_factory.mktemp("sandbox-gateway"), webhook_url=sandbox_webhook_url, flavor=gateway_flavor
    )
    try:
        sandbox.start()
        yield sandbox
    finally:
        sandbox.close()


@pytest.fixture
def gateway(sandbox_gateway: SandboxGateway) -> Iterator[HttpGateway]:
    if not sandbox_gateway.running:  # a test may have killed it
        sandbox_gateway.start()
    with sandbox_gateway.client() as client:
        yield client


@pytest.fixture
def webhook_receiver(sandbox_gateway: SandboxGateway) -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver()
    try:
        with sandbox_gateway.configured(webhook_url=receiver.url):
            yield receiver
    finally:
        receiver.close()
