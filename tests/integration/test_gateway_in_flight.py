"""`HttpGateway.charge_many` against a slow gateway: many charges in flight on one event loop, bounded.

Concurrency is measured where it matters, at the sandbox: requests carrying a `Sandbox-Probe` header
are counted there, and the most that were in flight at once is compared with the bound. No assertion
depends on how long anything took.
"""

from __future__ import annotations

import json
import multiprocessing
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from dramatiq.middleware.time_limit import TimeLimitExceeded
from dramatiq.threading import raise_thread_exception

from gateways.base import (
    Ambiguous,
    ChargeRequest,
    ChargeResult,
    Declined,
    GatewayError,
    GatewayRejected,
    IdempotencyConflict,
    Unavailable,
)
from gateways.http import DEFAULT_MAX_IN_FLIGHT, HttpGateway
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
    text, cause = str(outcome), outcome.__cause__
    if isinstance(cause, httpx.TransportError):
        # The sync and the async transport word the same socket timeout differently ('timed out' / '').
        text = text.replace(repr(cause), type(cause).__name__)
    return (type(outcome).__name__, text)


def sync_outcome(client: HttpGateway, request: ChargeRequest) -> ChargeResult | GatewayError:
    try:
        return client.charge(request.card_token, request.amount_cents, request.idempotency_key, request.description)
    except GatewayError as exc:
        return exc


def loop_threads() -> int:
    return sum(thread.name == "gateway-charges" for thread in threading.enumerate())


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
    # connections open, hence not an exact 64).
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


@pytest.mark.parametrize(
    "raised",
    [
        httpx.ConnectError("refused"),
        httpx.ConnectTimeout("slow connect"),
        httpx.PoolTimeout("pool exhausted"),
        httpx.ReadTimeout("slow answer"),
        httpx.WriteTimeout("slow send"),
        httpx.ReadError("connection reset by peer"),
        httpx.RemoteProtocolError("server disconnected"),
    ],
)
def test_transport_errors_are_classified_as_by_charge(raised: httpx.TransportError) -> None:
    def fail(request: httpx.Request) -> httpx.Response:
        raise raised

    request = ChargeRequest("tok_ok", 1_000, "charge:1:1", "x")
    with HttpGateway("http://gateway.test", "sk", 1.0, 1.0, transport=httpx.MockTransport(fail)) as client:
        [outcome] = client.charge_many([request])
        expected = sync_outcome(client, request)
    assert type(outcome) is type(expected) and str(outcome) == str(expected)


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
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=body)

    request = ChargeRequest("tok_ok", 1_000, "charge:1:1", "x")
    with HttpGateway("http://gateway.test", "sk", 1.0, 1.0, transport=httpx.MockTransport(answer)) as client:
        [outcome] = client.charge_many([request])
        same = sync_outcome(client, request)
    assert isinstance(outcome, expected)
    assert type(outcome) is type(same) and summary(outcome) == summary(same)


def test_the_request_is_the_one_charge_sends() -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(
            200, json={"id": "ch_1", "status": "succeeded", "amount_cents": 1_234, "idempotency_key": "charge:7:2"}
        )

    transport = httpx.MockTransport(answer)
    with HttpGateway("http://gateway.test/", "sk_secret", 1.0, 1.0, transport=transport) as client:
        [batched] = client.charge_many([ChargeRequest("tok_ok", 1_234, "charge:7:2", "CONECTA anual")])
        single = client.charge("tok_ok", 1_234, "charge:7:2", "CONECTA anual")
    assert batched == single
    sent_async, sent_sync = seen
    assert sent_async.headers["Idempotency-Key"] == "charge:7:2"
    assert sent_async.headers["Authorization"] == "Bearer sk_secret"
    assert (sent_async.method, sent_async.url, sent_async.content) == (
        sent_sync.method,
        sent_sync.url,
        sent_sync.content,
    )
    assert json.loads(sent_async.content) == {
        "card_token": "tok_ok",
        "amount_cents": 1_234,
        "description": "CONECTA anual",
    }
    # The same headers, but for the client's name in User-Agent.
    assert {k: v for k, v in sent_async.headers.items() if k != "user-agent"} == {
        k: v for k, v in sent_sync.headers.items() if k != "user-agent"
    }


def test_a_bug_in_one_request_is_ambiguous_for_it_alone() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if body["card_token"] == "tok_bug":
            raise RuntimeError("a bug in the transport")
        key = request.headers["Idempotency-Key"]
        return httpx.Response(
            200,
            json={
                "id": f"ch_{key}",
                "status": "succeeded",
                "amount_cents": body["amount_cents"],
                "idempotency_key": key,
            },
        )

    requests = [ChargeRequest(token, 100, f"k{i}", "x") for i, token in enumerate(["tok_ok", "tok_bug", "tok_ok"])]
    with HttpGateway("http://gateway.test", "sk", 1.0, 1.0, transport=httpx.MockTransport(answer)) as client:
        first, bug, last = client.charge_many(requests)
    assert isinstance(first, ChargeResult) and first.idempotency_key == "k0"
    assert isinstance(last, ChargeResult) and last.idempotency_key == "k2"
    assert isinstance(bug, Ambiguous) and isinstance(bug.__cause__, RuntimeError)


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
