"""`HttpGateway.charge_many` against a slow gateway: many charges in flight on one event loop, bounded.

Concurrency is measured where it matters, at the sandbox: requests carrying a `Sandbox-Probe` header
are counted there, and the most that were in flight at once is compared with the bound. No assertion
depends on how long anything took.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from typing import Any

import aiohttp
import httpx
import pytest
from dramatiq.middleware.time_limit import TimeLimitExceeded
from dramatiq.threading import raise_thread_exception

import gateways.http
from gateways.base import (
    Ambiguous,
    BoletoIssue,
    BoletoIssued,
    BoletoRequest,
    ChargeRequest,
    ChargeResult,
    Declined,
    GatewayError,
    GatewayRejected,
    IdempotencyConflict,
    Payer,
    Unavailable,
)
from gateways.http import DEFAULT_MAX_IN_FLIGHT, HttpGateway, _as_httpx_error, _transport_failure
from tests.integration.gateway_fixtures import SandboxGateway, free_port, poll
from workers.settings import load_settings

LATENCY_MS = "200"


def new_key() -> str:
    return f"charge:{uuid.uuid4().hex}"


def new_probe() -> str:
    return f"probe-{uuid.uuid4().hex}"


def probe(sandbox_gateway: SandboxGateway, name: str) -> dict[str, int]:
    """How many requests tagged `name` the sandbox saw, and the most it handled at once."""
    return sandbox_gateway._get(f"/sandbox/probes/{name}")


def summary(outcome: ChargeResult | GatewayError) -> tuple[Any, ...]:
    """An outcome without what differs between two keys (ids, the key itself)."""
    if isinstance(outcome, ChargeResult):
        return ("result", outcome.status, outcome.amount_cents, outcome.code, outcome.message, outcome.hard)
    if isinstance(outcome, Declined):
        return ("Declined", outcome.code, outcome.message, outcome.hard, outcome.gateway_id is not None)
    if isinstance(outcome, GatewayRejected):
        return (type(outcome).__name__, outcome.code, outcome.message, outcome.status_code)
    if isinstance(outcome.__cause__, httpx.TransportError | aiohttp.ClientError | TimeoutError):
        # httpx and aiohttp word the same socket failure differently: what it means is its class.
        return (type(outcome).__name__,)
    return (type(outcome).__name__, str(outcome))


def sync_outcome(client: HttpGateway, request: ChargeRequest) -> ChargeResult | GatewayError:
    try:
        return client.charge(request.card_token, request.amount_cents, request.idempotency_key, request.description)
    except GatewayError as exc:
        return exc


def loop_threads() -> int:
    return sum(thread.name == "gateway-batches" for thread in threading.enumerate())


@pytest.fixture
def running_sandbox(sandbox_gateway: SandboxGateway) -> SandboxGateway:
    if not sandbox_gateway.running:  # a test may have killed it
        sandbox_gateway.start()
    return sandbox_gateway


# --- many slow charges at once ---------------------------------------------------------------------


def test_200_slow_charges_are_in_flight_together(running_sandbox: SandboxGateway) -> None:
    name = new_probe()
    requests = [ChargeRequest("tok_ok", 1_000 + i, new_key(), f"CONECTA mensal {i}") for i in range(200)]
    headers = {"Sandbox-Latency-Ms": LATENCY_MS, "Sandbox-Probe": name}
    with running_sandbox.client(headers=headers) as client:
        assert client.max_in_flight == DEFAULT_MAX_IN_FLIGHT
        outcomes = client.charge_many(requests)

    assert [(o.succeeded, o.idempotency_key, o.amount_cents) for o in outcomes if isinstance(o, ChargeResult)] == [
        (True, r.idempotency_key, r.amount_cents) for r in requests
    ]
    seen = probe(running_sandbox, name)
    assert seen["requests"] == 200 and seen["in_flight"] == 0
    # One at a time would be 1; the bound is reached, never passed (a few may trail while the last
    # connections open, hence not exactly the bound).
    assert DEFAULT_MAX_IN_FLIGHT // 2 <= seen["max_in_flight"] <= DEFAULT_MAX_IN_FLIGHT, seen
    charged = [entry["idempotency_key"] for entry in running_sandbox.ledger(kind="charge")]
    keys = {request.idempotency_key for request in requests}
    assert sorted(key for key in charged if key in keys) == sorted(keys)  # each charged exactly once


def test_the_bound_from_the_setting_holds_over_all_calling_threads(
    running_sandbox: SandboxGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GATEWAY_URL", running_sandbox.url)
    monkeypatch.setenv("GATEWAY_API_KEY", running_sandbox.api_key)
    monkeypatch.setenv("GATEWAY_MAX_IN_FLIGHT", "8")
    name = new_probe()
    batches = [[ChargeRequest("tok_ok", 700, new_key(), "x") for _ in range(25)] for _ in range(4)]
    headers = {"Sandbox-Latency-Ms": LATENCY_MS, "Sandbox-Probe": name}
    with HttpGateway.from_settings(load_settings(), headers=headers) as client:
        assert client.max_in_flight == 8
        # Four worker threads sending their batches at the same moment share the one loop and bound.
        start = threading.Barrier(4)

        def send(batch: list[ChargeRequest]) -> list[ChargeResult | GatewayError]:
            start.wait()
            return client.charge_many(batch)

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(send, batches))
        assert loop_threads() >= 1

    for batch, outcomes in zip(batches, results, strict=True):
        assert [o.idempotency_key for o in outcomes if isinstance(o, ChargeResult)] == [
            r.idempotency_key for r in batch
        ]
    seen = probe(running_sandbox, name)
    assert seen["requests"] == 100
    assert seen["max_in_flight"] == 8, seen


def test_boletos_are_issued_together_and_each_outcome_is_what_issue_boleto_says(
    running_sandbox: SandboxGateway,
) -> None:
    name = new_probe()
    due = date(2027, 3, 10)

    def issue(n: int, document: str = "11.222.333/0001-81") -> BoletoIssue:
        request = BoletoRequest(900_000 + n, 59_880 + n, "CONECTA anual")
        return BoletoIssue(request, Payer("Organização", document), due, f"boleto:{uuid.uuid4().hex}")

    issues = [issue(n) for n in range(20)]
    refused = issue(99, document="")  # no CPF/CNPJ: the gateway refuses it
    with running_sandbox.client(headers={"Sandbox-Latency-Ms": LATENCY_MS, "Sandbox-Probe": name}) as client:
        *outcomes, refusal = client.issue_boleto_many([*issues, refused])
        again = client.issue_boleto_many(issues[:3])  # the same keys: the same boletos
        try:
            client.issue_boleto(refused.invoice, refused.payer, refused.due_date, f"boleto:{uuid.uuid4().hex}")
        except GatewayError as exc:
            expected_refusal: GatewayError = exc

    assert [(o.amount_cents, o.due_date) for o in outcomes if isinstance(o, BoletoIssued)] == [
        (i.invoice.amount_cents, due) for i in issues
    ]
    assert isinstance(refusal, GatewayRejected) and summary(refusal) == summary(expected_refusal)
    assert again == outcomes[:3]
    seen = probe(running_sandbox, name)
    assert seen["requests"] == 21 + 3 + 1 and seen["max_in_flight"] > 1, seen


def test_a_boleto_whose_answer_is_lost_is_ambiguous_and_the_same_key_completes_it(
    running_sandbox: SandboxGateway,
) -> None:
    request = BoletoRequest(900_100, 59_880, "CONECTA anual")
    lost = BoletoIssue(request, Payer("Organização", "11.222.333/0001-81"), date(2027, 3, 10), new_key())
    stalling = {"Sandbox-Timeout-Rate": "1", "Sandbox-Stall-Ms": "3000"}
    with running_sandbox.client(headers=stalling, read_timeout=1.0) as client:
        [outcome] = client.issue_boleto_many([lost])
    assert isinstance(outcome, Ambiguous)
    with running_sandbox.client() as client:
        first = client.issue_boleto(lost.invoice, lost.payer, lost.due_date, lost.idempotency_key)
        [second] = client.issue_boleto_many([lost])
    assert isinstance(second, BoletoIssued) and second == first


# --- the same outcomes as `charge` ----------------------------------------------------------------


def test_each_outcome_is_what_charge_says_and_a_bad_request_leaves_the_others_alone(
    running_sandbox: SandboxGateway,
) -> None:
    tokens = [
        "tok_ok",
        "tok_insufficient_funds",
        "tok_do_not_honor",
        "tok_expired",
        "tok_stolen",
        "tok_unknown",  # 400 invalid_card_token
        "tok_flaky",  # 503 "not processed" on its first request
        "tok_timeout",  # charged, the answer stalls past the read timeout
        "tok_ok",
    ]
    with running_sandbox.client() as client:
        reused = new_key()
        client.charge("tok_ok", 100, reused, "first")
        conflicting = ChargeRequest("tok_ok", 999, reused, "first")  # same key, another body
        batch = [ChargeRequest(token, 2_000, new_key(), "CONECTA") for token in tokens] + [conflicting]
        outcomes = client.charge_many(batch)
        expected = [sync_outcome(client, ChargeRequest(token, 2_000, new_key(), "CONECTA")) for token in tokens]
        expected.append(sync_outcome(client, conflicting))

    assert [summary(outcome) for outcome in outcomes] == [summary(outcome) for outcome in expected]
    ok, soft, soft2, hard, stolen, unknown, flaky, stalled, ok_again, conflict = outcomes
    assert isinstance(ok, ChargeResult) and ok.succeeded and isinstance(ok_again, ChargeResult)
    assert isinstance(soft, Declined) and not soft.hard and isinstance(soft2, Declined) and not soft2.hard
    assert isinstance(hard, Declined) and hard.hard and hard.code == "expired_card"
    assert isinstance(stolen, Declined) and stolen.hard
    assert isinstance(unknown, GatewayRejected) and unknown.code == "invalid_card_token"
    assert isinstance(flaky, Unavailable)
    assert isinstance(stalled, Ambiguous)
    assert isinstance(conflict, IdempotencyConflict)
    # Ambiguous was right: the stalled charge happened, and the janitor's lookup finds it.
    with running_sandbox.client() as client:
        found = client.find_charge(batch[7].idempotency_key)
    assert found is not None and found.succeeded


def test_a_gateway_that_says_not_processed_is_unavailable_in_a_batch(running_sandbox: SandboxGateway) -> None:
    request = ChargeRequest("tok_ok", 1_000, new_key(), "x")
    with running_sandbox.client(headers={"Sandbox-Unavailable-Rate": "1"}) as refusing:
        [outcome] = refusing.charge_many([request])
        expected = sync_outcome(refusing, ChargeRequest("tok_ok", 1_000, new_key(), "x"))
    assert isinstance(outcome, Unavailable) and summary(outcome) == summary(expected)
    assert running_sandbox.ledger(idempotency_key=request.idempotency_key) == []


def test_an_unreachable_gateway_is_unavailable_in_a_batch() -> None:
    with HttpGateway(f"http://127.0.0.1:{free_port()}", "sk", connect_timeout=1.0, read_timeout=1.0) as nowhere:
        outcomes = nowhere.charge_many([ChargeRequest("tok_ok", 1_000, new_key(), "x") for _ in range(3)])
    assert all(isinstance(outcome, Unavailable) for outcome in outcomes), outcomes


class ScriptedGateway:
    """A real HTTP server on a real socket that answers every request with what `answer` returns
    (status, body), or closes the connection without a word when it returns None; it keeps what it
    was sent. For the answers no honest gateway gives, which the sandbox therefore cannot."""

    def __init__(self, answer: Callable[[dict[str, Any]], tuple[int, bytes] | None]) -> None:
        self.seen: list[dict[str, Any]] = []
        scripted = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                request = {"method": "POST", "path": self.path, "headers": dict(self.headers), "body": body}
                scripted.seen.append(request)
                reply = answer(request)
                if reply is None:
                    self.close_connection = True
                    return
                status, content = reply
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@contextlib.contextmanager
def scripted(answer: Callable[[dict[str, Any]], tuple[int, bytes] | None]) -> Iterator[HttpGateway]:
    server = ScriptedGateway(answer)
    try:
        with HttpGateway(server.url, "sk_secret", 1.0, 1.0) as client:
            client.seen = server.seen  # type: ignore[attr-defined]
            yield client
    finally:
        server.close()


def test_a_connection_closed_without_an_answer_is_ambiguous_in_a_batch_as_in_charge() -> None:
    request = ChargeRequest("tok_ok", 1_000, "charge:1:1", "x")
    with scripted(lambda sent: None) as client:
        [outcome] = client.charge_many([request])
        expected = sync_outcome(client, request)
        assert len(client.seen) == 2  # type: ignore[attr-defined]  # both were sent: it may have charged
    assert isinstance(outcome, Ambiguous) and isinstance(expected, Ambiguous)


def _connector_error() -> aiohttp.ClientConnectorError:
    key = SimpleNamespace(host="gateway.test", port=443, ssl=False)
    return aiohttp.ClientConnectorError(key, ConnectionRefusedError(111, "refused"))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (_connector_error(), Unavailable),
        (aiohttp.ConnectionTimeoutError("slow connect"), Unavailable),
        (aiohttp.InvalidURL("gateway.test"), Unavailable),
        (aiohttp.SocketTimeoutError("slow answer"), Ambiguous),
        (TimeoutError(), Ambiguous),
        (aiohttp.ServerDisconnectedError(), Ambiguous),
        (aiohttp.ClientOSError(104, "connection reset by peer"), Ambiguous),
        (aiohttp.ClientPayloadError("truncated body"), Ambiguous),
        (aiohttp.ClientError("something else"), Ambiguous),
    ],
)
def test_aiohttp_failures_are_classified_as_their_httpx_equivalents(
    raised: aiohttp.ClientError | TimeoutError, expected: type[GatewayError]
) -> None:
    # Only a failure before any connection existed is "not sent"; anything later may have charged.
    outcome = _transport_failure(_as_httpx_error(raised), "POST", "/v1/charges", read_only=False)
    assert type(outcome) is expected, outcome
    assert type(raised).__name__ in str(outcome)


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (500, b"Internal Server Error", Ambiguous),
        (502, b"<html>Bad Gateway</html>", Ambiguous),
        (503, b'{"error": {"type": "unavailable"}}', Ambiguous),
        (503, b'{"error": {"type": "unavailable", "code": "busy", "processed": false}}', Unavailable),
        (429, b'{"error": {"type": "rate_limit", "code": "too_many_requests"}}', Unavailable),
        (409, b'{"error": {"type": "invalid_request_error", "code": "request_in_progress"}}', Ambiguous),
        (402, b'{"error": {"type": "card_error", "code": "expired_card", "message": "no"}}', Declined),
        (200, b"not json", Ambiguous),
        (200, b'{"id": "ch_1", "status": "pending", "amount_cents": 1, "idempotency_key": "k"}', Ambiguous),
        (404, b'{"detail": "Not Found"}', GatewayRejected),
    ],
)
def test_answers_are_mapped_as_by_charge(status: int, body: bytes, expected: type[GatewayError]) -> None:
    request = ChargeRequest("tok_ok", 1_000, "charge:1:1", "x")
    with scripted(lambda sent: (status, body)) as client:
        [outcome] = client.charge_many([request])
        same = sync_outcome(client, request)
    assert isinstance(outcome, expected)
    assert type(outcome) is type(same) and summary(outcome) == summary(same)


def test_the_request_is_the_one_charge_sends() -> None:
    def answer(sent: dict[str, Any]) -> tuple[int, bytes]:
        key = sent["headers"]["Idempotency-Key"]
        return 200, json.dumps(
            {"id": "ch_1", "status": "succeeded", "amount_cents": 1_234, "idempotency_key": key}
        ).encode()

    with scripted(answer) as client:
        [batched] = client.charge_many([ChargeRequest("tok_ok", 1_234, "charge:7:2", "CONECTA anual ção")])
        single = client.charge("tok_ok", 1_234, "charge:7:2", "CONECTA anual ção")
        sent_async, sent_sync = client.seen  # type: ignore[attr-defined]
    assert batched == single
    assert (sent_async["method"], sent_async["path"], sent_async["body"]) == (
        sent_sync["method"],
        sent_sync["path"],
        sent_sync["body"],
    )
    assert json.loads(sent_async["body"]) == {
        "card_token": "tok_ok",
        "amount_cents": 1_234,
        "description": "CONECTA anual ção",
    }
    for name in ("Idempotency-Key", "Authorization", "Accept", "Content-Type"):
        assert sent_async["headers"][name] == sent_sync["headers"][name], name
    assert sent_async["headers"]["Authorization"] == "Bearer sk_secret"
    assert sent_async["headers"]["Idempotency-Key"] == "charge:7:2"


def test_a_bug_in_one_request_is_ambiguous_for_it_alone(
    running_sandbox: SandboxGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_charge_from = gateways.http._charge_from

    def buggy_for_one(response: httpx.Response) -> ChargeResult:
        result = real_charge_from(response)
        if result.amount_cents == 101:
            raise RuntimeError("a bug while reading the answer")
        return result

    monkeypatch.setattr(gateways.http, "_charge_from", buggy_for_one)
    requests = [ChargeRequest("tok_ok", amount, new_key(), "x") for amount in (100, 101, 102)]
    with running_sandbox.client() as client:
        first, bug, last = client.charge_many(requests)
    assert isinstance(first, ChargeResult) and first.idempotency_key == requests[0].idempotency_key
    assert isinstance(last, ChargeResult) and last.idempotency_key == requests[2].idempotency_key
    assert isinstance(bug, Ambiguous) and isinstance(bug.__cause__, RuntimeError)
    # Ambiguous was right: it was charged, so the janitor will find it rather than charge again.
    assert len(running_sandbox.ledger(idempotency_key=requests[1].idempotency_key)) == 1


# --- lifecycle ------------------------------------------------------------------------------------


def test_close_ends_the_loop_and_a_batch_cut_short_is_ambiguous(running_sandbox: SandboxGateway) -> None:
    name = new_probe()
    before = loop_threads()
    client = running_sandbox.client(max_in_flight=2, headers={"Sandbox-Latency-Ms": "3000", "Sandbox-Probe": name})
    requests = [ChargeRequest("tok_ok", 1_000, new_key(), "x") for _ in range(4)]
    outcomes: list[ChargeResult | GatewayError] = []
    sender = threading.Thread(target=lambda: outcomes.extend(client.charge_many(requests)))
    sender.start()
    poll(lambda: probe(running_sandbox, name)["in_flight"] == 2, 10, "two charges in flight")
    assert loop_threads() == before + 1
    client.close()
    sender.join(10)
    assert not sender.is_alive()
    # Two were sent and two were still waiting for a slot: none is known, so all are reconciled.
    assert len(outcomes) == 4 and all(isinstance(outcome, Ambiguous) for outcome in outcomes), outcomes
    assert loop_threads() == before
    # A closed gateway sends nothing more, and still answers with one outcome per request.
    assert all(isinstance(outcome, Ambiguous) for outcome in client.charge_many(requests))
    assert probe(running_sandbox, name)["requests"] == 2


def test_a_time_limit_interrupts_a_waiting_caller_and_frees_its_slots(running_sandbox: SandboxGateway) -> None:
    # Dramatiq's time limit is an exception raised asynchronously in the worker thread; a thread blocked
    # for good on the batch would never see it.
    name = new_probe()
    headers = {"Sandbox-Latency-Ms": "3000", "Sandbox-Probe": name}
    with running_sandbox.client(max_in_flight=2, headers=headers, read_timeout=5.0) as client:
        raised: list[BaseException] = []

        def send() -> None:
            try:
                client.charge_many([ChargeRequest("tok_ok", 1_000, new_key(), "x") for _ in range(4)])
            except TimeLimitExceeded as exc:
                raised.append(exc)

        sender = threading.Thread(target=send)
        sender.start()
        poll(lambda: probe(running_sandbox, name)["in_flight"] == 2, 10, "two charges in flight")
        assert sender.ident is not None
        raise_thread_exception(sender.ident, TimeLimitExceeded)
        sender.join(5)
        assert not sender.is_alive() and len(raised) == 1
        # Its batch was cancelled: the slots are free for the next caller, whose charges go through.
        [after] = client.charge_many([ChargeRequest("tok_ok", 1_000, new_key(), "next")])
        assert isinstance(after, ChargeResult) and after.succeeded
    assert probe(running_sandbox, name)["requests"] == 3


def _charge_in_child(client: HttpGateway, key: str, results: Any) -> None:
    [outcome] = client.charge_many([ChargeRequest("tok_ok", 1_000, key, "child")])
    results.put(isinstance(outcome, ChargeResult) and outcome.succeeded)


def test_usable_in_a_forked_process(running_sandbox: SandboxGateway) -> None:
    # Dramatiq forks its worker processes: a gateway (and its loop) made before the fork must work after it.
    with running_sandbox.client() as client:
        [before] = client.charge_many([ChargeRequest("tok_ok", 1_000, new_key(), "parent")])
        assert isinstance(before, ChargeResult)
        context = multiprocessing.get_context("fork")
        results = context.Queue()
        key = new_key()
        child = context.Process(target=_charge_in_child, args=(client, key, results))
        child.start()
        child.join(30)
        assert child.exitcode == 0
        assert results.get(timeout=5) is True
        # The parent's loop was left alone by the child.
        [after] = client.charge_many([ChargeRequest("tok_ok", 1_000, new_key(), "parent")])
        assert isinstance(after, ChargeResult)
    assert len(running_sandbox.ledger(idempotency_key=key)) == 1


def test_from_settings_passes_the_bound() -> None:
    settings = SimpleNamespace(
        gateway_url="http://gateway.test",
        gateway_api_key="sk",
        gateway_connect_timeout=1.0,
        gateway_read_timeout=1.0,
        gateway_max_in_flight=12,
    )
    with HttpGateway.from_settings(settings) as client:
        assert client.max_in_flight == 12
    with pytest.raises(ValueError):
        HttpGateway("http://gateway.test", "sk", max_in_flight=0)


@pytest.fixture(autouse=True)
def _no_leaked_loops() -> Iterator[None]:
    before = loop_threads()
    yield
    # Every client above is closed by its test; its loop thread must be gone soon after.
    deadline = time.monotonic() + 5
    while loop_threads() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert loop_threads() <= before
