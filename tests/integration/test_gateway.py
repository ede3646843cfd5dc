"""The gateway port end to end: each adapter against the sandbox serving its PSP's API, as a real process.

One contract, two adapters: every test that takes `sandbox_gateway` (or `gateway`) runs once with the
sandbox's own API and `HttpGateway`, and once with the Pagar.me v5 emulator and `PagarmeGateway`.

The property under test is the one billing depends on: a charge (or a refund) is made at most once
per idempotency key, and every failure is classified so the caller knows whether it may retry
(Unavailable), must reconcile (Ambiguous) or has a final answer (result, Declined, rejection).
"""

from __future__ import annotations

import base64
import signal
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from datetime import date
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from gateways import pagarme_webhooks
from gateways.base import (
    Ambiguous,
    AuthenticationFailed,
    BoletoRequest,
    ChargeRequest,
    ChargeResult,
    Declined,
    Gateway,
    GatewayError,
    GatewayRejected,
    IdempotencyConflict,
    Payer,
    RefundResult,
    Unavailable,
    charge_many,
)
from gateways.http import HttpGateway
from gateways.sandbox import LEDGER_TABLE, SCHEMA, STATE_FILE, clients
from gateways.sandbox.models import FLAVORS
from gateways.webhooks import SIGNATURE_HEADER, InvalidSignature, sign, verify
from models.boleto import is_valid_nosso_numero, parse_digitable_line
from tests.integration.gateway_fixtures import (
    GATEWAY_READ_TIMEOUT,
    ReceivedWebhook,
    SandboxGateway,
    WebhookReceiver,
    free_port,
    poll,
)


@pytest.fixture(scope="module", params=FLAVORS)
def sandbox_gateway(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SandboxGateway]:
    """The contract's gateway, in each flavor (this module's own, whatever TEST_GATEWAY says)."""
    sandbox = SandboxGateway(tmp_path_factory.mktemp(f"contract-{request.param}"), flavor=request.param)
    try:
        sandbox.start()
        yield sandbox
    finally:
        sandbox.close()


# How each PSP words the same contract's refusals: status codes, error codes, id prefixes.
WIRE: dict[str, dict[str, Any]] = {
    "sandbox": {
        "rejected": 400,
        "invalid_card": "invalid_card_token",
        "conflict": "idempotency_key_reused",
        "over_refund": "amount_exceeds_refundable",
        "not_refundable": ("charge_not_refundable", 400),
        "no_charge": ("charge_not_found", 404),
        "refund_prefix": "re_",
        "boleto_prefix": "bol_",
        "already_paid": "boleto_already_paid",
        "missing_boleto": "resource_missing",
    },
    "pagarme": {
        "rejected": 422,
        "invalid_card": "invalid_request",
        "conflict": "idempotency_conflict",
        "over_refund": "invalid_request",
        "not_refundable": ("invalid_request", 422),
        "no_charge": ("not_found", 404),
        "refund_prefix": "tran_",
        "boleto_prefix": "ch_",
        "already_paid": "invalid_request",
        "missing_boleto": "not_found",
    },
}


def wire(sandbox_gateway: SandboxGateway, name: str) -> Any:
    return WIRE[sandbox_gateway.flavor][name]


def authenticate(sandbox_gateway: SandboxGateway, hook: ReceivedWebhook) -> None:
    """Check a delivered webhook as its receiver must: the sandbox's HMAC, or Pagar.me's RS256
    signature (keys from the emulator's JWKS) and the endpoint's Basic credentials."""
    if sandbox_gateway.flavor == "sandbox":
        verify(sandbox_gateway.webhook_secret, hook.headers[SIGNATURE_HEADER.lower()], hook.body)
        return
    keys = pagarme_webhooks.public_keys(httpx.get(sandbox_gateway.jwks_url, timeout=5).json())
    pagarme_webhooks.verify(keys, hook.headers[pagarme_webhooks.SIGNATURE_HEADER.lower()], hook.body)
    credentials = f"{sandbox_gateway.webhook_username}:{sandbox_gateway.webhook_password}".encode()
    assert hook.headers["authorization"] == "Basic " + base64.b64encode(credentials).decode()


PAYER = Payer(name="Padaria Pão Quente Ltda", document="12.345.678/0001-95", email="financeiro@padaria.example")
DUE = date(2026, 3, 2)


def new_key(prefix: str = "charge") -> str:
    return f"{prefix}:{uuid.uuid4().hex}"


# --- cards -----------------------------------------------------------------------------------------


def test_adapter_satisfies_the_port(gateway: HttpGateway) -> None:
    assert isinstance(gateway, Gateway)


def test_successful_charge_is_in_the_ledger_once(gateway: HttpGateway, sandbox_gateway: SandboxGateway) -> None:
    key = new_key()
    result = gateway.charge("tok_ok", 19_90, key, "CONECTA mensal")

    assert result.status == "succeeded" and result.succeeded
    assert result.amount_cents == 19_90
    assert result.idempotency_key == key
    assert result.gateway_id.startswith("ch_")
    assert (result.code, result.message, result.hard) == (None, None, False)
    [entry] = sandbox_gateway.ledger(idempotency_key=key)
    assert (entry["id"], entry["amount_cents"], entry["card_token"]) == (result.gateway_id, 19_90, "tok_ok")


@pytest.mark.parametrize(
    ("token", "code", "hard"),
    [
        ("tok_insufficient_funds", "insufficient_funds", False),
        ("tok_do_not_honor", "do_not_honor", False),
        ("tok_expired", "expired_card", True),
        ("tok_stolen", "stolen_card", True),
    ],
)
def test_declines_are_final_and_replayed(
    gateway: HttpGateway, sandbox_gateway: SandboxGateway, token: str, code: str, hard: bool
) -> None:
    key = new_key()
    with pytest.raises(Declined) as first:
        gateway.charge(token, 5_000, key, "CONECTA mensal")
    assert (first.value.code, first.value.hard) == (code, hard)
    assert first.value.message
    assert first.value.gateway_id and first.value.gateway_id.startswith("ch_")

    # The decline is the stored answer for this key: retrying the key cannot turn it into a charge.
    with pytest.raises(Declined) as again:
        gateway.charge(token, 5_000, key, "CONECTA mensal")
    assert again.value.gateway_id == first.value.gateway_id

    found = gateway.find_charge(key)
    assert found == ChargeResult(
        gateway_id=first.value.gateway_id,
        status="failed",
        amount_cents=5_000,
        idempotency_key=key,
        code=code,
        message=first.value.message,
        hard=hard,
    )
    assert sandbox_gateway.ledger(idempotency_key=key) == []


@pytest.mark.parametrize("token", ["tok_unknown", "4111111111111111", ""])
def test_unknown_card_token_is_rejected_without_a_charge(
    gateway: HttpGateway, token: str, sandbox_gateway: SandboxGateway
) -> None:
    key = new_key()
    with pytest.raises(GatewayRejected) as rejected:
        gateway.charge(token, 1_000, key, "x")
    assert not isinstance(rejected.value, IdempotencyConflict)
    assert rejected.value.status_code == wire(sandbox_gateway, "rejected")
    assert rejected.value.code == ("invalid_request" if token == "" else wire(sandbox_gateway, "invalid_card"))
    assert gateway.find_charge(key) is None
    # A refusal is not stored as the key's answer: the corrected request is processed.
    assert gateway.charge("tok_ok", 1_000, key, "x").succeeded


@pytest.mark.parametrize("amount", [0, -100, 100_000_001])
def test_out_of_range_amount_is_rejected(gateway: HttpGateway, amount: int) -> None:
    key = new_key()
    with pytest.raises(GatewayRejected) as rejected:
        gateway.charge("tok_ok", amount, key, "x")
    assert rejected.value.code == "invalid_request"
    assert "amount" in rejected.value.message
    assert gateway.find_charge(key) is None


def test_retried_key_returns_the_same_charge(gateway: HttpGateway, sandbox_gateway: SandboxGateway) -> None:
    key = new_key()
    first = gateway.charge("tok_ok", 2_500, key, "CONECTA anual")
    second = gateway.charge("tok_ok", 2_500, key, "CONECTA anual")
    assert second == first
    assert len(sandbox_gateway.ledger(idempotency_key=key)) == 1


@pytest.mark.parametrize(
    "changed",
    [
        {"amount_cents": 2_501},
        {"card_token": "tok_do_not_honor"},
        {"description": "another invoice"},
    ],
)
def test_same_key_with_a_different_body_is_a_conflict(
    gateway: HttpGateway, sandbox_gateway: SandboxGateway, changed: dict[str, Any]
) -> None:
    key = new_key()
    request = {"card_token": "tok_ok", "amount_cents": 2_500, "description": "CONECTA anual"}
    original = gateway.charge(idempotency_key=key, **request)
    with pytest.raises(IdempotencyConflict) as conflict:
        gateway.charge(idempotency_key=key, **{**request, **changed})
    assert conflict.value.code == wire(sandbox_gateway, "conflict")
    assert conflict.value.status_code == 409
    assert gateway.find_charge(key) == original
    assert len(sandbox_gateway.ledger(idempotency_key=key)) == 1


def test_timeout_after_charging_is_ambiguous_and_reconciled(
    gateway: HttpGateway, sandbox_gateway: SandboxGateway
) -> None:
    key = new_key()
    started = time.monotonic()
    with pytest.raises(Ambiguous):
        gateway.charge("tok_timeout", 9_900, key, "CONECTA anual")
    elapsed = time.monotonic() - started
    assert GATEWAY_READ_TIMEOUT * 0.9 <= elapsed < GATEWAY_READ_TIMEOUT + 2

    found = gateway.find_charge(key)
    assert found is not None
    assert (found.status, found.amount_cents, found.idempotency_key) == ("succeeded", 9_900, key)
    [entry] = sandbox_gateway.ledger(idempotency_key=key)
    assert entry["id"] == found.gateway_id
    # Retrying the key is also safe: the stored response comes back at once, no second charge.
    assert gateway.charge("tok_timeout", 9_900, key, "CONECTA anual") == found
    assert len(sandbox_gateway.ledger(idempotency_key=key)) == 1


def test_flaky_gateway_is_unavailable_twice_then_charges_once(
    gateway: HttpGateway, sandbox_gateway: SandboxGateway
) -> None:
    key = new_key()
    for _ in range(2):
        with pytest.raises(Unavailable):
            gateway.charge("tok_flaky", 3_000, key, "CONECTA mensal")
        assert gateway.find_charge(key) is None
    result = gateway.charge("tok_flaky", 3_000, key, "CONECTA mensal")
    assert result.succeeded
    assert gateway.charge("tok_flaky", 3_000, key, "CONECTA mensal") == result
    assert len(sandbox_gateway.ledger(idempotency_key=key)) == 1


def test_find_charge_of_an_unknown_key_is_none(gateway: HttpGateway) -> None:
    assert gateway.find_charge(new_key()) is None


def test_wrong_api_key_is_an_unprocessed_configuration_error(sandbox_gateway: SandboxGateway) -> None:
    key = new_key()
    with clients.connect(sandbox_gateway.flavor, sandbox_gateway.url, "sk_wrong", read_timeout=2.0) as intruder:
        # Unavailable (retry once fixed), never a decline or a rejection of the customer's card.
        with pytest.raises(AuthenticationFailed) as refused:
            intruder.charge("tok_ok", 1_000, key, "x")
        assert isinstance(refused.value, Unavailable)
        assert "401" in str(refused.value)
        with pytest.raises(AuthenticationFailed):
            intruder.find_charge(key)
    assert sandbox_gateway.ledger(idempotency_key=key) == []


def test_concurrent_requests_with_one_key_charge_once(sandbox_gateway: SandboxGateway) -> None:
    key = new_key()
    request = ChargeRequest("tok_ok", 4_200, key, "CONECTA mensal")
    with sandbox_gateway.client(max_in_flight=6) as client:
        outcomes = client.charge_many([request] * 6)
    assert all(isinstance(outcome, ChargeResult) for outcome in outcomes), outcomes
    assert len({outcome.gateway_id for outcome in outcomes if isinstance(outcome, ChargeResult)}) == 1
    assert len(sandbox_gateway.ledger(idempotency_key=key)) == 1


# --- faults ---------------------------------------------------------------------------------------


def test_injected_unavailable_fault_processes_nothing(sandbox_gateway: SandboxGateway, gateway: HttpGateway) -> None:
    key = new_key()
    with (
        sandbox_gateway.client(headers={"Sandbox-Unavailable-Rate": "1"}) as refused,
        pytest.raises(Unavailable),
    ):
        refused.charge("tok_ok", 1_000, key, "x")
    assert gateway.find_charge(key) is None
    assert sandbox_gateway.ledger(idempotency_key=key) == []


def test_injected_timeout_fault_charges_then_stalls(sandbox_gateway: SandboxGateway, gateway: HttpGateway) -> None:
    key = new_key()
    with sandbox_gateway.client(headers={"Sandbox-Timeout-Rate": "1"}) as stalling, pytest.raises(Ambiguous):
        stalling.charge("tok_ok", 1_000, key, "x")
    found = gateway.find_charge(key)
    assert found is not None and found.succeeded
    assert len(sandbox_gateway.ledger(idempotency_key=key)) == 1


def test_sandbox_config_changes_faults_at_runtime(sandbox_gateway: SandboxGateway, gateway: HttpGateway) -> None:
    key = new_key()
    with sandbox_gateway.configured(unavailable_rate=1.0) as config:
        assert config["unavailable_rate"] == 1.0
        with pytest.raises(Unavailable):
            gateway.charge("tok_ok", 1_000, key, "x")
    assert gateway.charge("tok_ok", 1_000, key, "x").succeeded


def test_connection_refused_is_unavailable() -> None:
    with HttpGateway(f"http://127.0.0.1:{free_port()}", "sk", connect_timeout=1.0, read_timeout=1.0) as nowhere:
        with pytest.raises(Unavailable):
            nowhere.charge("tok_ok", 1_000, new_key(), "x")
        with pytest.raises(Unavailable):
            nowhere.find_charge(new_key())
        with pytest.raises(Unavailable):
            nowhere.issue_boleto(BoletoRequest(1, 1_000, "x"), PAYER, DUE, new_key("boleto"))
        with pytest.raises(Unavailable):
            nowhere.refund("ch_1", 1_000, new_key("refund"))


class StubServer:
    """A plain HTTP server that answers every request with one fixed response."""

    def __init__(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        stub = self
        self.requests = 0

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                stub.requests += 1
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def stub_server(request: pytest.FixtureRequest) -> Iterator[StubServer]:
    server = StubServer(*request.param)
    yield server
    server.close()


@pytest.mark.parametrize(
    ("stub_server", "expected"),
    [
        ((500, b"Internal Server Error", "text/plain"), Ambiguous),
        ((502, b"<html>Bad Gateway</html>", "text/html"), Ambiguous),
        ((504, b"", "text/plain"), Ambiguous),
        # A 503 only means "not processed" when the gateway says so.
        ((503, b'{"error": {"type": "unavailable"}}'), Ambiguous),
        ((503, b'{"error": {"type": "unavailable", "code": "busy", "processed": false}}'), Unavailable),
        ((429, b'{"error": {"type": "rate_limit", "code": "too_many_requests"}}'), Unavailable),
        ((200, b"not json"), Ambiguous),
        ((200, b'{"id": "ch_1", "status": "pending", "amount_cents": 1, "idempotency_key": "k"}'), Ambiguous),
        ((404, b'{"detail": "Not Found"}'), GatewayRejected),
    ],
    indirect=["stub_server"],
)
def test_http_failures_after_sending_are_classified(stub_server: StubServer, expected: type[GatewayError]) -> None:
    client = HttpGateway(stub_server.url, "sk", connect_timeout=1.0, read_timeout=1.0)
    with client, pytest.raises(expected):
        client.charge("tok_ok", 1_000, new_key(), "x")
    assert stub_server.requests == 1


@pytest.mark.parametrize(
    "stub_server",
    [(500, b"oops", "text/plain"), (503, b""), (200, b"[]"), (404, b'{"detail": "Not Found"}')],
    indirect=True,
)
def test_find_charge_never_guesses(stub_server: StubServer) -> None:
    # Only the gateway's own "resource_missing" means never processed; anything else must not be None.
    client = HttpGateway(stub_server.url, "sk", connect_timeout=1.0, read_timeout=1.0)
    with client, pytest.raises((Unavailable, GatewayRejected)):
        client.find_charge(new_key())


@pytest.mark.parametrize(
    ("stub_server", "expected"),
    [
        ((500, b"Internal Server Error", "text/plain"), Ambiguous),
        ((503, b'{"error": {"type": "unavailable", "code": "busy", "processed": false}}'), Unavailable),
        ((200, b"not json"), Ambiguous),
        # A refund still being processed is not money known to be back.
        (
            (
                200,
                b'{"id": "re_1", "charge_id": "ch_1", "amount_cents": 1, "idempotency_key": "k", "status": "pending"}',
            ),
            Ambiguous,
        ),
        ((409, b'{"error": {"type": "idempotency_error", "code": "idempotency_key_reused"}}'), IdempotencyConflict),
        ((403, b'{"error": {"type": "authentication_error", "code": "forbidden"}}'), AuthenticationFailed),
        ((400, b'{"error": {"type": "invalid_request_error", "code": "amount_exceeds_refundable"}}'), GatewayRejected),
    ],
    indirect=["stub_server"],
)
def test_refund_failures_are_classified(stub_server: StubServer, expected: type[GatewayError]) -> None:
    client = HttpGateway(stub_server.url, "sk", connect_timeout=1.0, read_timeout=1.0)
    with client, pytest.raises(expected):
        client.refund("ch_1", 1_000, new_key("refund"))
    assert stub_server.requests == 1


@pytest.mark.parametrize(
    "stub_server", [(402, b'{"error": {"type": "card_error", "code": "refund_failed"}}')], indirect=True
)
def test_a_refused_refund_is_never_a_decline(stub_server: StubServer) -> None:
    # Declined belongs to charges: callers of refund handle GatewayRejected, and must get one.
    client = HttpGateway(stub_server.url, "sk", connect_timeout=1.0, read_timeout=1.0)
    with client, pytest.raises(GatewayRejected) as rejected:
        client.refund("ch_1", 1_000, new_key("refund"))
    assert not isinstance(rejected.value, Declined)
    assert (rejected.value.code, rejected.value.status_code) == ("refund_failed", 402)


@pytest.mark.parametrize(
    ("raised", "charge_error", "lookup_error"),
    [
        (httpx.ConnectError("refused"), Unavailable, Unavailable),
        (httpx.ConnectTimeout("slow connect"), Unavailable, Unavailable),
        (httpx.PoolTimeout("pool exhausted"), Unavailable, Unavailable),
        (httpx.ReadTimeout("slow answer"), Ambiguous, Unavailable),
        (httpx.WriteTimeout("slow send"), Ambiguous, Unavailable),
        (httpx.ReadError("connection reset by peer"), Ambiguous, Unavailable),
        (httpx.RemoteProtocolError("server disconnected"), Ambiguous, Unavailable),
    ],
)
def test_transport_errors_are_classified(
    raised: httpx.TransportError, charge_error: type[GatewayError], lookup_error: type[GatewayError]
) -> None:
    seen: list[httpx.Request] = []

    def fail(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        raise raised

    with HttpGateway("http://gateway.test", "sk_secret", 1.0, 1.0, transport=httpx.MockTransport(fail)) as client:
        with pytest.raises(charge_error):
            client.charge("tok_ok", 1_000, "charge:1:1", "x")
        with pytest.raises(lookup_error):
            client.find_charge("charge:1:1")
        # A refund moves money like a charge: a failure after sending may have refunded.
        with pytest.raises(charge_error):
            client.refund("ch_1/x", 1_000, "refund:7")
    assert seen[0].headers["Idempotency-Key"] == "charge:1:1"
    assert seen[0].headers["Authorization"] == "Bearer sk_secret"
    assert seen[2].url.raw_path == b"/v1/charges/ch_1%2Fx/refunds"
    assert seen[2].headers["Idempotency-Key"] == "refund:7"


def test_from_settings_reads_secret_and_timeouts() -> None:
    settings = SimpleNamespace(
        gateway_url="http://gateway.test/",
        gateway_api_key=SecretStr("sk_from_settings"),
        gateway_connect_timeout=0.5,
        gateway_read_timeout=7.0,
    )
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(404, json={"error": {"type": "invalid_request_error", "code": "resource_missing"}})

    with HttpGateway.from_settings(settings, transport=httpx.MockTransport(answer)) as client:
        assert client.find_charge("charge:9:1") is None
    assert seen[0].headers["Authorization"] == "Bearer sk_from_settings"
    assert seen[0].url == "http://gateway.test/v1/charges?idempotency_key=charge%3A9%3A1"
    assert seen[0].extensions["timeout"] == {"connect": 0.5, "read": 7.0, "write": 7.0, "pool": 0.5}


# --- concurrency ----------------------------------------------------------------------------------


def test_charge_many_returns_one_outcome_per_request(sandbox_gateway: SandboxGateway) -> None:
    tokens = ["tok_ok", "tok_insufficient_funds", "tok_stolen", "tok_unknown", "tok_flaky", "tok_ok"]
    requests = [ChargeRequest(token, 1_000 + i, new_key(), f"chunk item {i}") for i, token in enumerate(tokens)]
    with sandbox_gateway.client(max_in_flight=4) as client:
        outcomes = client.charge_many(requests)

    assert len(outcomes) == len(requests)
    ok, insufficient, stolen, unknown, flaky, ok_again = outcomes
    assert isinstance(ok, ChargeResult) and ok.succeeded and ok.amount_cents == 1_000
    assert isinstance(insufficient, Declined) and not insufficient.hard
    assert isinstance(stolen, Declined) and stolen.hard and stolen.code == "stolen_card"
    assert isinstance(unknown, GatewayRejected) and unknown.code == wire(sandbox_gateway, "invalid_card")
    assert isinstance(flaky, Unavailable)
    assert isinstance(ok_again, ChargeResult) and ok_again.idempotency_key == requests[5].idempotency_key
    charged = {entry["idempotency_key"] for entry in sandbox_gateway.ledger(kind="charge")}
    assert requests[0].idempotency_key in charged and requests[5].idempotency_key in charged
    assert not charged & {request.idempotency_key for request in requests[1:5]}


def test_charge_many_runs_concurrently(sandbox_gateway: SandboxGateway) -> None:
    # Measured at the sandbox (its Sandbox-Probe count), not with a clock: 8 requests of 400 ms, all at once.
    probe = f"probe-{uuid.uuid4().hex}"
    requests = [ChargeRequest("tok_ok", 500, new_key(), "x") for _ in range(8)]
    headers = {"Sandbox-Latency-Ms": "400", "Sandbox-Probe": probe}
    with sandbox_gateway.client(max_in_flight=8, headers=headers) as client:
        outcomes = client.charge_many(requests)
    assert all(isinstance(outcome, ChargeResult) and outcome.succeeded for outcome in outcomes)
    seen = sandbox_gateway._get(f"/sandbox/probes/{probe}")
    assert seen["requests"] == 8
    assert seen["max_in_flight"] == 8, seen


def test_charge_many_works_with_any_gateway() -> None:
    class OnlyCharges:
        def charge(self, card_token: str, amount_cents: int, idempotency_key: str, description: str) -> ChargeResult:
            if card_token == "tok_stolen":
                raise Declined("stolen_card", "Cartão com restrição.", True)
            return ChargeResult("ch_fake", "succeeded", amount_cents, idempotency_key)

    outcomes = charge_many(
        OnlyCharges(),  # type: ignore[arg-type]
        [ChargeRequest("tok_ok", 100, "a", "x"), ChargeRequest("tok_stolen", 100, "b", "x")],
    )
    assert isinstance(outcomes[0], ChargeResult) and outcomes[0].idempotency_key == "a"
    assert isinstance(outcomes[1], Declined) and outcomes[1].hard


# --- durability -----------------------------------------------------------------------------------


def test_state_survives_a_killed_sandbox(gateway: HttpGateway, sandbox_gateway: SandboxGateway) -> None:
    charged, declined, flaky = new_key(), new_key(), new_key()
    original = gateway.charge("tok_ok", 7_700, charged, "CONECTA anual")
    with pytest.raises(Declined) as decline:
        gateway.charge("tok_do_not_honor", 7_700, declined, "CONECTA anual")
    with pytest.raises(Unavailable):
        gateway.charge("tok_flaky", 7_700, flaky, "CONECTA anual")
    boleto = gateway.issue_boleto(BoletoRequest(77, 7_700, "CONECTA anual"), PAYER, DUE, new_key("boleto"))

    sandbox_gateway.restart()  # SIGKILL, then the same port and data folder

    assert gateway.find_charge(charged) == original
    assert gateway.charge("tok_ok", 7_700, charged, "CONECTA anual") == original
    with pytest.raises(Declined) as replayed:
        gateway.charge("tok_do_not_honor", 7_700, declined, "CONECTA anual")
    assert replayed.value.gateway_id == decline.value.gateway_id
    # The flaky card's refusal count was persisted: one more refusal, then the charge.
    with pytest.raises(Unavailable):
        gateway.charge("tok_flaky", 7_700, flaky, "CONECTA anual")
    assert gateway.charge("tok_flaky", 7_700, flaky, "CONECTA anual").succeeded
    # The nosso número sequence continues instead of restarting.
    after = gateway.issue_boleto(BoletoRequest(78, 7_700, "CONECTA anual"), PAYER, DUE, new_key("boleto"))
    assert int(after.nosso_numero[:-1]) > int(boleto.nosso_numero[:-1])
    assert len(sandbox_gateway.ledger(idempotency_key=charged)) == 1


def test_sigterm_stops_the_sandbox_cleanly(tmp_path: Path) -> None:
    sandbox = SandboxGateway(tmp_path / "sigterm")
    sandbox.start()
    process = sandbox._process
    assert process is not None
    started = time.monotonic()
    sandbox.close()
    # uvicorn re-raises the signal once shut down, so a clean stop ends "killed by SIGTERM", never SIGKILL.
    assert process.returncode in (0, -signal.SIGTERM), sandbox.log_tail()
    assert time.monotonic() - started < 5
    assert "Traceback" not in sandbox.log_tail()
    # The last SQLite connection closing checkpoints and removes the WAL: the shutdown hook ran.
    assert (sandbox.data_dir / "sandbox.sqlite3").exists()
    assert not (sandbox.data_dir / "sandbox.sqlite3-wal").exists()


# --- refunds --------------------------------------------------------------------------------------


def refunded_cents(sandbox_gateway: SandboxGateway, charge_id: str) -> int:
    return int(sandbox_gateway.charge(charge_id)["amount_refunded_cents"])


def test_full_refund_is_a_negative_ledger_line(gateway: HttpGateway, sandbox_gateway: SandboxGateway) -> None:
    charge = gateway.charge("tok_ok", 5_000, new_key(), "CONECTA mensal")
    key = new_key("refund")
    refund = gateway.refund(charge.gateway_id, 5_000, key)

    assert refund == RefundResult(
        gateway_id=refund.gateway_id,
        charge_gateway_id=charge.gateway_id,
        amount_cents=5_000,
        idempotency_key=key,
        status="succeeded",
    )
    assert refund.gateway_id.startswith(wire(sandbox_gateway, "refund_prefix"))
    [line] = sandbox_gateway.ledger(idempotency_key=key)
    assert (line["kind"], line["id"], line["amount_cents"]) == ("refund", refund.gateway_id, -5_000)
    assert (line["charge_id"], line["card_token"]) == (charge.gateway_id, "tok_ok")
    assert refunded_cents(sandbox_gateway, charge.gateway_id) == 5_000
    # Nothing is left to refund, so not even one more cent goes back.
    with pytest.raises(GatewayRejected) as nothing_left:
        gateway.refund(charge.gateway_id, 1, new_key("refund"))
    assert nothing_left.value.code == wire(sandbox_gateway, "over_refund")


def test_partial_refunds_never_exceed_the_charge(gateway: HttpGateway, sandbox_gateway: SandboxGateway) -> None:
    charge = gateway.charge("tok_ok", 10_000, new_key(), "CONECTA anual")
    first = gateway.refund(charge.gateway_id, 3_000, new_key("refund"))
    second = gateway.refund(charge.gateway_id, 5_000, new_key("refund"))
    assert first.gateway_id != second.gateway_id
    assert refunded_cents(sandbox_gateway, charge.gateway_id) == 8_000

    key = new_key("refund")
    with pytest.raises(GatewayRejected) as too_much:
        gateway.refund(charge.gateway_id, 2_001, key)
    assert not isinstance(too_much.value, IdempotencyConflict)
    assert (too_much.value.code, too_much.value.status_code) == (
        wire(sandbox_gateway, "over_refund"),
        wire(sandbox_gateway, "rejected"),
    )
    assert "2000" in too_much.value.message  # says what is left
    assert sandbox_gateway.ledger(idempotency_key=key) == []
    assert refunded_cents(sandbox_gateway, charge.gateway_id) == 8_000
    # The refusal is not stored as the key's answer: the corrected amount is refunded.
    assert gateway.refund(charge.gateway_id, 2_000, key).amount_cents == 2_000
    assert refunded_cents(sandbox_gateway, charge.gateway_id) == 10_000


def test_retried_refund_key_refunds_once(gateway: HttpGateway, sandbox_gateway: SandboxGateway) -> None:
    charge = gateway.charge("tok_ok", 4_000, new_key(), "CONECTA mensal")
    key = new_key("refund")
    first = gateway.refund(charge.gateway_id, 1_500, key)
    assert gateway.refund(charge.gateway_id, 1_500, key) == first
    assert len(sandbox_gateway.ledger(idempotency_key=key)) == 1
    assert refunded_cents(sandbox_gateway, charge.gateway_id) == 1_500


def test_refund_key_reused_with_another_request_is_a_conflict(
    gateway: HttpGateway, sandbox_gateway: SandboxGateway
) -> None:
    charge = gateway.charge("tok_ok", 4_000, new_key(), "CONECTA mensal")
    other_charge = gateway.charge("tok_ok", 4_000, new_key(), "CONECTA mensal")
    key = new_key("refund")
    original = gateway.refund(charge.gateway_id, 1_000, key)
    with pytest.raises(IdempotencyConflict) as other_amount:
        gateway.refund(charge.gateway_id, 1_500, key)
    assert (other_amount.value.code, other_amount.value.status_code) == (wire(sandbox_gateway, "conflict"), 409)
    # The charge is part of the request: one key cannot refund two charges.
    with pytest.raises(IdempotencyConflict):
        gateway.refund(other_charge.gateway_id, 1_000, key)
    [line] = sandbox_gateway.ledger(idempotency_key=key)
    assert (line["id"], line["amount_cents"]) == (original.gateway_id, -1_000)
    assert refunded_cents(sandbox_gateway, other_charge.gateway_id) == 0


def test_refund_of_a_declined_charge_is_rejected(gateway: HttpGateway, sandbox_gateway: SandboxGateway) -> None:
    with pytest.raises(Declined) as declined:
        gateway.charge("tok_do_not_honor", 2_000, new_key(), "CONECTA mensal")
    assert declined.value.gateway_id is not None
    key = new_key("refund")
    with pytest.raises(GatewayRejected) as rejected:
        gateway.refund(declined.value.gateway_id, 2_000, key)
    assert not isinstance(rejected.value, IdempotencyConflict)
    assert (rejected.value.code, rejected.value.status_code) == wire(sandbox_gateway, "not_refundable")
    assert sandbox_gateway.ledger(idempotency_key=key) == []


def test_refund_of_an_unknown_charge_is_rejected(gateway: HttpGateway, sandbox_gateway: SandboxGateway) -> None:
    key = new_key("refund")
    with pytest.raises(GatewayRejected) as rejected:
        gateway.refund("ch_does_not_exist", 1_000, key)
    assert (rejected.value.code, rejected.value.status_code) == wire(sandbox_gateway, "no_charge")
    assert sandbox_gateway.ledger(idempotency_key=key) == []


@pytest.mark.parametrize("amount", [0, -100])
def test_refund_needs_a_positive_amount(gateway: HttpGateway, amount: int) -> None:
    charge = gateway.charge("tok_ok", 1_000, new_key(), "x")
    with pytest.raises(GatewayRejected) as rejected:
        gateway.refund(charge.gateway_id, amount, new_key("refund"))
    assert rejected.value.code == "invalid_request"
    assert "amount" in rejected.value.message


def test_stalled_refund_is_ambiguous_and_the_same_key_finds_it(
    gateway: HttpGateway, sandbox_gateway: SandboxGateway
) -> None:
    charge = gateway.charge("tok_ok", 6_000, new_key(), "CONECTA mensal")
    key = new_key("refund")
    started = time.monotonic()
    with sandbox_gateway.client(headers={"Sandbox-Timeout-Rate": "1"}) as stalling, pytest.raises(Ambiguous):
        stalling.refund(charge.gateway_id, 2_500, key)
    assert time.monotonic() - started >= GATEWAY_READ_TIMEOUT * 0.9

    # The refund went through before the answer stalled: calling again with the key is the lookup.
    [line] = sandbox_gateway.ledger(idempotency_key=key)
    found = gateway.refund(charge.gateway_id, 2_500, key)
    assert (found.gateway_id, found.amount_cents, found.idempotency_key) == (line["id"], 2_500, key)
    assert len(sandbox_gateway.ledger(idempotency_key=key)) == 1
    assert refunded_cents(sandbox_gateway, charge.gateway_id) == 2_500


def test_unavailable_refund_processes_nothing(gateway: HttpGateway, sandbox_gateway: SandboxGateway) -> None:
    charge = gateway.charge("tok_ok", 6_000, new_key(), "CONECTA mensal")
    key = new_key("refund")
    with sandbox_gateway.configured(unavailable_rate=1.0), pytest.raises(Unavailable):
        gateway.refund(charge.gateway_id, 6_000, key)
    assert sandbox_gateway.ledger(idempotency_key=key) == []
    assert refunded_cents(sandbox_gateway, charge.gateway_id) == 0
    assert gateway.refund(charge.gateway_id, 6_000, key).amount_cents == 6_000


def test_concurrent_refunds_never_exceed_the_charge(sandbox_gateway: SandboxGateway) -> None:
    with sandbox_gateway.client(max_in_flight=8) as client:
        charge = client.charge("tok_ok", 10_000, new_key(), "CONECTA anual")

        def attempt(key: str) -> RefundResult | GatewayError:
            try:
                return client.refund(charge.gateway_id, 3_000, key)
            except GatewayError as exc:
                return exc

        with ThreadPoolExecutor(8) as pool:
            outcomes = list(pool.map(attempt, [new_key("refund") for _ in range(8)]))

    refunded = [outcome for outcome in outcomes if isinstance(outcome, RefundResult)]
    refused = [outcome for outcome in outcomes if isinstance(outcome, GatewayRejected)]
    assert (len(refunded), len(refused)) == (3, 5), outcomes
    assert {error.code for error in refused} == {wire(sandbox_gateway, "over_refund")}
    assert refunded_cents(sandbox_gateway, charge.gateway_id) == 9_000


def test_ledger_nets_charges_and_refunds(gateway: HttpGateway, sandbox_gateway: SandboxGateway) -> None:
    annual = gateway.charge("tok_ok", 7_000, new_key(), "CONECTA anual")
    monthly = gateway.charge("tok_ok", 3_000, new_key(), "CONECTA mensal")
    partial = gateway.refund(annual.gateway_id, 2_500, new_key("refund"))
    full = gateway.refund(monthly.gateway_id, 3_000, new_key("refund"))

    mine = {annual.gateway_id, monthly.gateway_id}
    lines = [line for line in sandbox_gateway.ledger() if line["charge_id"] in mine]
    assert sorted((line["kind"], line["amount_cents"]) for line in lines) == [
        ("charge", 3_000),
        ("charge", 7_000),
        ("refund", -3_000),
        ("refund", -2_500),
    ]
    assert sum(line["amount_cents"] for line in lines) == 7_000 + 3_000 - 2_500 - 3_000
    net = {
        charge_id: sum(line["amount_cents"] for line in lines if line["charge_id"] == charge_id) for charge_id in mine
    }
    assert net == {annual.gateway_id: 4_500, monthly.gateway_id: 0}

    refunds = sandbox_gateway.ledger(kind="refund")
    assert {partial.gateway_id, full.gateway_id} <= {line["id"] for line in refunds}
    assert all(line["kind"] == "refund" and line["amount_cents"] < 0 for line in refunds)
    charges = sandbox_gateway.ledger(kind="charge")
    assert mine <= {line["id"] for line in charges}
    assert all(line["amount_cents"] > 0 for line in charges)
    [found] = sandbox_gateway.ledger(idempotency_key=partial.idempotency_key, kind="refund")
    assert found["id"] == partial.gateway_id
    assert sandbox_gateway.ledger(idempotency_key=partial.idempotency_key, kind="charge") == []


# The ledger as sandboxes created it before refunds existed.
LEDGER_BEFORE_REFUNDS = """
CREATE TABLE ledger (
    entry INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL CHECK (kind IN ('charge', 'boleto_payment')),
    ref TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    amount_cents INTEGER NOT NULL,
    card_token TEXT,
    created REAL NOT NULL,
    UNIQUE (kind, ref)
);
"""


def test_state_from_before_refunds_is_migrated(tmp_path: Path) -> None:
    data_dir = tmp_path / "old-sandbox"
    data_dir.mkdir()
    assert LEDGER_TABLE.strip() in SCHEMA
    with closing(sqlite3.connect(data_dir / STATE_FILE)) as db:
        db.executescript(SCHEMA.replace(LEDGER_TABLE.strip(), LEDGER_BEFORE_REFUNDS))
        db.execute(
            "INSERT INTO ledger (entry, kind, ref, idempotency_key, amount_cents, card_token, created) "
            "VALUES (41, 'boleto_payment', 'bol_old', 'boleto:old', 9900, NULL, 1.0)"
        )
        db.commit()

    sandbox = SandboxGateway(data_dir)
    try:
        sandbox.start()
        with sandbox.client() as client:
            charge = client.charge("tok_ok", 2_000, new_key(), "x")
            refund = client.refund(charge.gateway_id, 500, new_key("refund"))
        sandbox.restart()  # the migrated file opens again as it is
        old, charged, refunded = sandbox.ledger()
    finally:
        sandbox.close()
    assert (old["entry"], old["id"], old["amount_cents"], old["charge_id"]) == (41, "bol_old", 9_900, None)
    assert (charged["entry"], charged["id"], charged["amount_cents"]) == (42, charge.gateway_id, 2_000)
    assert (refunded["id"], refunded["amount_cents"], refunded["charge_id"]) == (
        refund.gateway_id,
        -500,
        charge.gateway_id,
    )


# --- boletos --------------------------------------------------------------------------------------


def test_issued_boleto_is_valid_and_idempotent(gateway: HttpGateway, sandbox_gateway: SandboxGateway) -> None:
    key = new_key("boleto")
    invoice = BoletoRequest(invoice_id=4242, amount_cents=358_80, description="CONECTA anual 2026/2027")
    issued = gateway.issue_boleto(invoice, PAYER, DUE, key)

    assert issued.gateway_id.startswith(wire(sandbox_gateway, "boleto_prefix"))
    assert (issued.amount_cents, issued.due_date) == (358_80, DUE)
    assert is_valid_nosso_numero(issued.nosso_numero)
    bank, amount, due, free_field = parse_digitable_line(issued.digitable_line, reference=date(2026, 1, 1))
    assert (bank, amount, due) == ("999", 358_80, DUE)
    assert free_field.endswith(issued.nosso_numero)
    assert len(issued.barcode) == 44 and issued.barcode[:3] == "999" and issued.barcode.endswith(free_field)

    assert gateway.issue_boleto(invoice, PAYER, DUE, key) == issued
    other = gateway.issue_boleto(invoice, PAYER, DUE, new_key("boleto"))
    assert other.nosso_numero != issued.nosso_numero
    with pytest.raises(IdempotencyConflict):
        gateway.issue_boleto(BoletoRequest(4242, 358_81, invoice.description), PAYER, DUE, key)


@pytest.mark.parametrize(
    ("invoice", "payer", "due"),
    [
        (BoletoRequest(1, 0, "zero"), PAYER, DUE),
        (BoletoRequest(1, 10_000_000_000, "too much for the barcode"), PAYER, DUE),
        (BoletoRequest(1, 1_000, "x"), Payer("Fulano", "123", None), DUE),
        (BoletoRequest(1, 1_000, "x"), PAYER, date(1999, 1, 1)),
    ],
)
def test_invalid_boleto_requests_are_rejected(
    gateway: HttpGateway, invoice: BoletoRequest, payer: Payer, due: date, sandbox_gateway: SandboxGateway
) -> None:
    key = new_key("boleto")
    with pytest.raises(GatewayRejected) as rejected:
        gateway.issue_boleto(invoice, payer, due, key)
    assert rejected.value.status_code == wire(sandbox_gateway, "rejected")
    assert gateway.issue_boleto(BoletoRequest(1, 1_000, "x"), PAYER, DUE, key).amount_cents == 1_000


def test_cancel_boleto(gateway: HttpGateway, sandbox_gateway: SandboxGateway) -> None:
    issued = gateway.issue_boleto(BoletoRequest(5, 1_000, "x"), PAYER, DUE, new_key("boleto"))
    gateway.cancel_boleto(issued.gateway_id)
    assert sandbox_gateway.boleto(issued.gateway_id)["status"] == "canceled"
    gateway.cancel_boleto(issued.gateway_id)  # cancelling twice is harmless
    with pytest.raises(httpx.HTTPStatusError) as not_payable:
        sandbox_gateway.pay_boleto(issued.gateway_id)
    assert not_payable.value.response.status_code == 409

    paid = gateway.issue_boleto(BoletoRequest(6, 1_000, "x"), PAYER, DUE, new_key("boleto"))
    sandbox_gateway.pay_boleto(paid.gateway_id)
    with pytest.raises(GatewayRejected) as already_paid:
        gateway.cancel_boleto(paid.gateway_id)
    assert not isinstance(already_paid.value, IdempotencyConflict)
    assert already_paid.value.code == wire(sandbox_gateway, "already_paid")

    with pytest.raises(GatewayRejected) as missing:
        gateway.cancel_boleto(f"{wire(sandbox_gateway, 'boleto_prefix')}does_not_exist")
    assert missing.value.code == wire(sandbox_gateway, "missing_boleto")


# --- webhooks -------------------------------------------------------------------------------------


def test_paid_boleto_sends_a_signed_webhook(
    gateway: HttpGateway, sandbox_gateway: SandboxGateway, webhook_receiver: WebhookReceiver
) -> None:
    issued = gateway.issue_boleto(BoletoRequest(901, 358_80, "CONECTA anual"), PAYER, DUE, new_key("boleto"))
    payment = sandbox_gateway.pay_boleto(issued.gateway_id, paid_on=date(2026, 3, 1))

    [hook] = webhook_receiver.wait_for_event(payment["event_id"])
    authenticate(sandbox_gateway, hook)
    event = hook.json()
    if sandbox_gateway.flavor == "pagarme":
        # Pagar.me's charge event: the charge as it stands, with its order.
        assert event["type"] == "charge.paid"
        assert event["account"]["id"].startswith("acc_")
        charge = event["data"]
        assert (charge["id"], charge["status"], charge["payment_method"]) == (issued.gateway_id, "paid", "boleto")
        assert (charge["amount"], charge["paid_amount"], charge["paid_at"][:10]) == (358_80, 358_80, "2026-03-01")
        assert charge["order"]["id"].startswith("or_") and charge["order"]["metadata"]["invoice_id"] == "901"
    else:
        assert event["type"] == "boleto.paid"
    assert sandbox_gateway.flavor == "pagarme" or event["data"] == {
        "boleto_id": issued.gateway_id,
        "nosso_numero": issued.nosso_numero,
        "invoice_id": 901,
        "amount_cents": 358_80,
        "paid_on": "2026-03-01",
        "via": "boleto",  # or "pix": paid with the boleto's Pix code
    }
    assert hook.path == "/v1/webhooks/gateway"  # where the receiver listens (Renova's is per flavor)
    [entry] = [e for e in sandbox_gateway.ledger(kind="boleto_payment") if e["id"] == issued.gateway_id]
    assert entry["amount_cents"] == 358_80
    delivery = poll(
        lambda: next(
            (d for d in sandbox_gateway.webhooks() if d["event_id"] == event["id"] and d["status"] == "delivered"),
            None,
        ),
        5,
        "the delivery to be marked delivered",
    )
    assert delivery["attempts"] == 1


def test_expired_boleto_sends_a_webhook(
    gateway: HttpGateway, sandbox_gateway: SandboxGateway, webhook_receiver: WebhookReceiver
) -> None:
    issued = gateway.issue_boleto(BoletoRequest(902, 1_000, "x"), PAYER, DUE, new_key("boleto"))
    expiry = sandbox_gateway.expire_boleto(issued.gateway_id)
    [hook] = webhook_receiver.wait_for_event(expiry["event_id"])
    authenticate(sandbox_gateway, hook)
    if sandbox_gateway.flavor == "pagarme":
        assert hook.json()["type"] == "charge.payment_failed"
        assert (hook.json()["data"]["status"], hook.json()["data"]["paid_at"]) == ("failed", None)
    else:
        assert hook.json()["type"] == "boleto.expired"
        assert hook.json()["data"]["paid_on"] is None
    assert sandbox_gateway.boleto(issued.gateway_id)["status"] == "expired"


def test_webhook_is_redelivered_until_acknowledged(
    gateway: HttpGateway, sandbox_gateway: SandboxGateway, webhook_receiver: WebhookReceiver
) -> None:
    issued = gateway.issue_boleto(BoletoRequest(903, 1_000, "x"), PAYER, DUE, new_key("boleto"))
    webhook_receiver.answer_next(500)
    with sandbox_gateway.configured(webhook_retry_base_s=0.2):
        payment = sandbox_gateway.pay_boleto(issued.gateway_id)
        failed, acknowledged = webhook_receiver.wait_for_event(payment["event_id"], count=2)
    assert (failed.answered, acknowledged.answered) == (500, 200)
    assert failed.body == acknowledged.body  # same event, same id: the receiver can deduplicate
    for hook in (failed, acknowledged):
        authenticate(sandbox_gateway, hook)


def test_pending_webhook_survives_a_killed_sandbox(
    gateway: HttpGateway, sandbox_gateway: SandboxGateway, webhook_receiver: WebhookReceiver
) -> None:
    issued = gateway.issue_boleto(BoletoRequest(904, 1_000, "x"), PAYER, DUE, new_key("boleto"))
    webhook_receiver.answer_next(503)
    payment = sandbox_gateway.pay_boleto(issued.gateway_id)
    webhook_receiver.wait_for_event(payment["event_id"])
    sandbox_gateway.restart()  # the retry was only scheduled, in SQLite
    failed, acknowledged = webhook_receiver.wait_for_event(payment["event_id"], count=2)
    assert (failed.answered, acknowledged.answered) == (503, 200)


# --- signatures -----------------------------------------------------------------------------------

SECRET = "whsec_unit"
BODY = b'{"id":"evt_1","type":"boleto.paid"}'
NOW = 1_780_000_000


def test_signature_round_trip() -> None:
    header = sign(SECRET, BODY, NOW)
    assert header.startswith(f"t={NOW},v1=")
    verify(SECRET, header, BODY, now=NOW)
    verify(SECRET, header, BODY, now=NOW + 300)  # the edge of the window is still inside
    verify(SECRET, header, BODY, now=NOW - 300)


def test_any_matching_signature_is_accepted_for_secret_rotation() -> None:
    old = sign("whsec_old", BODY, NOW).split(",")[1]
    verify(SECRET, f"{sign(SECRET, BODY, NOW)},{old}", BODY, now=NOW)
    verify("whsec_old", f"{sign(SECRET, BODY, NOW)},{old}", BODY, now=NOW)


@pytest.mark.parametrize(
    ("header", "body", "now", "secret", "reason"),
    [
        (sign(SECRET, BODY, NOW), BODY.replace(b"paid", b"PAID"), NOW, SECRET, "signature mismatch"),
        (sign(SECRET, BODY, NOW), BODY + b" ", NOW, SECRET, "signature mismatch"),
        (sign(SECRET, BODY, NOW - 301), BODY, NOW, SECRET, "timestamp outside"),
        (sign(SECRET, BODY, NOW + 301), BODY, NOW, SECRET, "timestamp outside"),
        (sign("whsec_other", BODY, NOW), BODY, NOW, SECRET, "signature mismatch"),
        # A valid signature moved onto another timestamp must not verify.
        (f"t={NOW + 1}," + sign(SECRET, BODY, NOW).split(",")[1], BODY, NOW, SECRET, "signature mismatch"),
        (None, BODY, NOW, SECRET, "missing"),
        ("", BODY, NOW, SECRET, "missing"),
        ("garbage", BODY, NOW, SECRET, "malformed"),
        (f"t=soon,v1={'0' * 64}", BODY, NOW, SECRET, "malformed"),
        (f"v1={'0' * 64}", BODY, NOW, SECRET, "malformed"),
        (f"t={NOW}", BODY, NOW, SECRET, "malformed"),
        (f"t={NOW},t={NOW},v1={'0' * 64}", BODY, NOW, SECRET, "malformed"),
        (f"t={NOW},v1=é", BODY, NOW, SECRET, "signature mismatch"),
        ("t=1," + "v1=0," * 1000, BODY, NOW, SECRET, "malformed"),
    ],
)
def test_bad_signatures_are_rejected(header: str | None, body: bytes, now: int, secret: str, reason: str) -> None:
    with pytest.raises(InvalidSignature) as invalid:
        verify(secret, header, body, now=now)
    assert reason in invalid.value.reason
