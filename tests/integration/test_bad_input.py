"""Odd input gets a 4xx with the error envelope (or a recorded rejection), never a 500, and nothing
reaches the database unvalidated: ids beyond PostgreSQL's bigint, NUL and other control characters,
over-long webhook fields, a card number where a brand goes, a malformed body without a key."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import func, select

from gateways.webhooks import sign
from jobs.changes import submit_change_request
from models.schema import ChangeRequest, GatewayEvent, Organization
from tests.integration.conftest import wait_until
from workers.settings import get_settings

API_KEY = "bad-input-key"
WEBHOOK_SECRET = "whsec_bad_input"
BEYOND_BIGINT = 2**63
CARD_NUMBER = "4012888888881881"


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch, clean_database: None) -> Iterator[TestClient]:
    monkeypatch.setenv("RENOVA_API_KEYS", API_KEY)
    get_settings.cache_clear()
    from workers.api import create_app

    app = create_app()
    settings = get_settings().model_copy(update={"gateway_webhook_secret": SecretStr(WEBHOOK_SECRET)})
    app.dependency_overrides[get_settings] = lambda: settings
    try:
        with TestClient(app, raise_server_exceptions=False) as test_client:
            test_client.headers["Authorization"] = f"Bearer {API_KEY}"
            yield test_client
    finally:
        get_settings.cache_clear()


def assert_envelope(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"], error
    return error


def organization_body(**changes: Any) -> dict[str, Any]:
    member = {"id": 101, "name": "Ana", "email": "ana@example.com", "role": "owner", "financial_responsible": True}
    return {"name": "Padaria Alfa", "document": "11.222.333/0001-81", "members": [member], **changes}


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("PUT", f"/v1/organizations/{BEYOND_BIGINT}"),
        ("PUT", "/v1/organizations/0"),
        ("GET", f"/v1/change-requests/{BEYOND_BIGINT}"),
        ("GET", f"/v1/subscriptions/{BEYOND_BIGINT}"),
        ("GET", f"/v1/subscriptions/{10**30}"),
    ],
)
def test_an_id_beyond_a_bigint_in_a_path_is_a_422(client: TestClient, method: str, path: str) -> None:
    body = organization_body() if method == "PUT" else None
    assert_envelope(client.request(method, path, json=body), 422, "invalid_request")


def test_a_member_id_beyond_a_bigint_is_a_422_and_nothing_is_written(client: TestClient, session) -> None:
    body = organization_body(members=[{"id": BEYOND_BIGINT, "name": "Ana", "role": "owner"}])
    error = assert_envelope(client.put("/v1/organizations/7", json=body), 422, "invalid_request")
    assert [field["field"] for field in error["fields"]] == ["members.0.id"]
    assert session.scalar(select(func.count()).select_from(Organization)) == 0


@pytest.mark.parametrize(
    "changes",
    [
        {"name": "Padaria\x00Alfa"},
        {"document": "11.222.333/0001-81\x00"},
        {"members": [{"id": 101, "name": "A\x00na", "role": "owner"}]},
        {"members": [{"id": 101, "email": "ana\x00@example.com", "role": "owner"}]},
        {"name": "Padaria\x07Alfa"},
    ],
)
def test_control_characters_in_an_organization_are_a_422(client: TestClient, session, changes: dict) -> None:
    error = assert_envelope(
        client.put("/v1/organizations/7", json=organization_body(**changes)), 422, "invalid_request"
    )
    assert "\x00" not in json.dumps(error, ensure_ascii=False)
    assert session.scalar(select(func.count()).select_from(Organization)) == 0


def card_update(**changes: Any) -> dict[str, Any]:
    body = {
        "organization_id": 7,
        "requested_by": 101,
        "kind": "card",
        "token": "tok_ok",
        "brand": "visa",
        "last4": "4242",
        "exp_month": 12,
        "exp_year": 2035,
    }
    return {**body, **changes}


@pytest.mark.parametrize("brand", ["vi\x00sa", CARD_NUMBER, "cartão", ""])
def test_a_brand_outside_the_known_list_is_refused_and_never_echoed(client: TestClient, brand: str) -> None:
    response = client.post("/v1/change-requests", json=card_update(brand=brand), headers={"Idempotency-Key": "k1"})
    error = assert_envelope(response, 422, "invalid_request")
    assert [field["field"] for field in error["fields"]] == ["brand"]
    assert CARD_NUMBER not in response.text and "\\u0000" not in response.text


def test_a_brand_is_taken_in_any_case(client: TestClient) -> None:
    from jobs.contract import parse_change_request

    assert parse_change_request(card_update(brand=" VISA ", idempotency_key="k")).brand == "visa"


def test_a_queue_message_with_control_characters_is_recorded_rejected(worker, session) -> None:
    payload = card_update(brand="vi\x00sa", idempotency_key="nul-brand", kind="card")
    payload["last4"] = "42\x0042"
    submit_change_request.send(payload)
    request = wait_until(
        lambda: session.scalar(
            select(ChangeRequest)
            .where(ChangeRequest.idempotency_key == "nul-brand")
            .execution_options(populate_existing=True)
        )
    )
    wait_until(lambda: session.refresh(request) or request.status != "pending")
    assert (request.status, request.error_code) == ("rejected", "invalid_request")
    assert request.payload["brand"] == "vi\ufffdsa" and "\x00" not in json.dumps(request.payload)


def test_a_queue_message_whose_kind_has_a_nul_is_recorded_as_invalid(worker, session) -> None:
    submit_change_request.send(card_update(kind="ca\x00rd", idempotency_key="nul-kind"))
    request = wait_until(
        lambda: session.scalar(select(ChangeRequest).where(ChangeRequest.idempotency_key == "nul-kind"))
    )
    assert (request.kind, request.status, request.error_code) == ("invalid", "rejected", "invalid_request")


def signed(client: TestClient, event: dict[str, Any]) -> Any:
    body = json.dumps(event).encode()
    signature = sign(WEBHOOK_SECRET, body, int(time.time()))
    return client.post("/v1/webhooks/gateway", content=body, headers={"Renova-Signature": signature})


@pytest.mark.parametrize(
    "event",
    [
        {"id": "evt_" + "x" * 300, "type": "boleto.paid", "data": {}},
        {"id": "evt_1", "type": "boleto." + "p" * 100, "data": {}},
        {"id": "evt_\x001", "type": "boleto.paid", "data": {}},
        {"id": "evt_2", "type": "boleto.paid", "data": {"boleto_id": "bol_\x00"}},
        {"id": "", "type": "boleto.paid", "data": {}},
    ],
)
def test_a_signed_webhook_with_fields_the_database_cannot_hold_is_a_400(client: TestClient, session, event) -> None:
    assert_envelope(signed(client, event), 400, "invalid_event")
    assert session.scalar(select(func.count()).select_from(GatewayEvent)) == 0


@pytest.mark.parametrize(
    "body",
    [
        b'{"id": "evt_3", "type": "boleto.paid", "data": {"boleto_id": "bol_1", "amount_cents": NaN}}',
        b'{"id": "evt_4", "type": "boleto.paid", "data": {"amount_cents": Infinity}}',
        b'{"id": "evt_5", "type": "boleto.paid", "data": {"x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}}",
        b'{"id": "evt_6", "type": "boleto.paid", "data": {"x": ' + b"[" * 40 + b"]" * 40 + b"}}",
        b'{"id": 7, "type": "boleto.paid", "data": {}}',
        b'{"id": "evt_8", "type": ["boleto.paid"], "data": {}}',
        b'{"id": "evt_9", "type": "boleto.paid"}',
        b'{"id": "evt_10", "type": "boleto.paid", "data": "bol_1"}',
        b"[]",
        b"",
    ],
)
def test_a_signed_webhook_that_is_not_an_event_is_a_400(client: TestClient, session, body: bytes) -> None:
    signature = sign(WEBHOOK_SECRET, body, int(time.time()))
    response = client.post("/v1/webhooks/gateway", content=body, headers={"Renova-Signature": signature})
    assert_envelope(response, 400, "invalid_event")
    assert session.scalar(select(func.count()).select_from(GatewayEvent)) == 0


def test_authentication_comes_before_the_body(client: TestClient) -> None:
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}):
        response = client.post(
            "/v1/change-requests", content=b"{not json", headers={**headers, "Content-Type": "application/json"}
        )
        assert_envelope(response, 401, "unauthorized")
    # With the key, the same body is what is wrong.
    response = client.post("/v1/change-requests", content=b"{not json", headers={"Content-Type": "application/json"})
    assert_envelope(response, 422, "invalid_request")


def test_an_organization_takes_up_to_max_members_set_based_and_no_more(client: TestClient, session) -> None:
    from jobs.organizations import MAX_MEMBERS
    from models.schema import Member

    def member(n: int, **changes: Any) -> dict[str, Any]:
        return {"id": 10_000 + n, "name": f"Membro {n}", "role": "member", **changes}

    too_many = organization_body(members=[member(n) for n in range(MAX_MEMBERS + 1)])
    error = assert_envelope(client.put("/v1/organizations/7", json=too_many), 422, "invalid_request")
    assert [field["field"] for field in error["fields"]] == ["members"]

    everyone = [member(n) for n in range(2_500)]
    assert client.put("/v1/organizations/7", json=organization_body(members=everyone)).status_code == 200
    # Sent again: one left, one renamed; the rest unchanged.
    again = [member(n, name="Renomeado") if n == 1 else member(n) for n in range(2_500) if n != 0]
    assert client.put("/v1/organizations/7", json=organization_body(members=again)).status_code == 200
    rows = {m.id: m for m in session.scalars(select(Member).execution_options(populate_existing=True))}
    assert len(rows) == 2_500
    assert not rows[10_000].active and rows[10_001].name == "Renomeado" and rows[12_499].active


@pytest.mark.parametrize("name", ["Padaria 4012 8888 8888 1881", "4012-8888-8888-1881", "Ana 4012888888881881"])
def test_a_card_number_in_a_name_is_refused_and_never_echoed(client: TestClient, session, name: str) -> None:
    for body in (organization_body(name=name), organization_body(members=[{"id": 5, "name": name, "role": "owner"}])):
        response = client.put("/v1/organizations/7", json=body)
        assert_envelope(response, 422, "invalid_request")
        assert "4012" not in response.text
    assert session.scalar(select(func.count()).select_from(Organization)) == 0


def test_numbers_that_are_not_card_numbers_stay(client: TestClient) -> None:
    from jobs.contract import card_numbers_in, redact

    assert card_numbers_in("Padaria 4012 8888 8888 1882 Ltda") == []  # fails the Luhn check
    assert card_numbers_in("Loja 123") == []
    body = organization_body(name="Padaria 4012 8888 8888 1882")
    assert client.put("/v1/organizations/7", json=body).status_code == 200
    assert redact({"note": "cartão 4012 8888 8888 1881, ok"}) == {"note": "cartão [redacted], ok"}


def test_the_webhook_documents_its_refusals(client: TestClient) -> None:
    answers = client.get("/openapi.json").json()["paths"]["/v1/webhooks/gateway"]["post"]["responses"]
    assert answers["400"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}


def test_no_such_route_or_method_answers_the_error_envelope(client: TestClient) -> None:
    assert_envelope(client.get("/v1/nothing-here"), 404, "not_found")
    assert_envelope(client.get("/v1/subscriptions"), 404, "not_found")
    assert_envelope(client.delete("/v1/plans/conecta"), 405, "method_not_allowed")


@pytest.mark.parametrize("product", ["%00", "x" * 300, "CONECTA", "cone%0Acta"])
def test_a_product_no_product_can_be_named_is_unknown_and_not_echoed(client: TestClient, product: str) -> None:
    response = client.get(f"/v1/plans/{product}")
    assert_envelope(response, 404, "unknown_product")
    assert response.json()["error"]["message"] == "Nenhum preço cadastrado para esse produto."


def test_a_body_nested_past_the_parsers_limit_is_an_invalid_request(client: TestClient) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    headers = {"Content-Type": "application/json", "Idempotency-Key": "deep-1"}
    assert_envelope(client.post("/v1/change-requests", content=deep, headers=headers), 400, "invalid_request")
    assert_envelope(client.put("/v1/organizations/1", content=deep, headers=headers), 400, "invalid_request")
