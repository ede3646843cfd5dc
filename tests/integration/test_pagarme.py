"""Pagar.me v5: the adapter on answers shaped as Pagar.me's reference documents them, its webhooks end to
end (the emulator signs, Renova's API authenticates, a worker looks the charge up before acting), and
the production settings that keep the emulator out of production.

The gateway contract itself (charges, declines, idempotency, refunds, boletos, faults) runs against the
emulator in test_gateway.py, parametrized over both adapters.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import date
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import select

from gateways import pagarme_webhooks
from gateways.base import (
    Ambiguous,
    AuthenticationFailed,
    BoletoRequest,
    Declined,
    GatewayRejected,
    IdempotencyConflict,
    Payer,
    Unavailable,
)
from gateways.pagarme import DECLINES, PagarmeGateway, card_reference
from jobs.context import runtime
from jobs.gateway_events import record_gateway_event
from models.boleto import barcode_from_digitable_line, parse_digitable_line
from models.money import format_brl
from models.schema import AuditEvent, Boleto, Charge, GatewayEvent, Invoice, Refund, Subscription
from tests.integration.conftest import serve_api, wait_until
from tests.integration.factories import noon
from tests.integration.gateway_fixtures import SandboxGateway
from tests.integration.test_webhooks import issued_boleto
from workers.settings import Settings, gateway_problems, get_settings

# --- the adapter on Pagar.me's documented answers ----------------------------------------------------------

ORDER_CODE = "charge:77:1"


def order(charge_status: str, transaction: dict[str, Any], *, method: str = "credit_card") -> dict[str, Any]:
    """An order as Pagar.me's reference shows one (fields and types; values of our own)."""
    charge = {
        "id": "ch_K3nR8wPq2vLx9TzA",
        "code": ORDER_CODE,
        "gateway_id": "4412337",
        "amount": 4990,
        "paid_amount": 4990 if charge_status == "paid" else 0,
        "status": charge_status,
        "currency": "BRL",
        "payment_method": method,
        "created_at": "2026-11-30T12:00:01Z",
        "updated_at": "2026-11-30T12:00:02Z",
        "customer": {"id": "cus_Xy7Qm2Lp9Rt4Vw1B", "name": "Padaria Pão Quente", "type": "company"},
        "last_transaction": {"id": "tran_Aa1Bb2Cc3Dd4Ee5F", "gateway_id": "55110", "amount": 4990, **transaction},
    }
    return {
        "id": "or_Pq8Rs7Tu6Vw5Xy4Z",
        "code": ORDER_CODE,
        "amount": 4990,
        "currency": "BRL",
        "closed": True,
        "status": {"paid": "paid", "failed": "failed"}.get(charge_status, "pending"),
        "items": [{"id": "oi_Lm3No4Pq5Rs6Tu7V", "amount": 4990, "description": "CONECTA mensal", "quantity": 1}],
        "customer": charge["customer"],
        "charges": [charge],
        "created_at": "2026-11-30T12:00:01Z",
        "updated_at": "2026-11-30T12:00:02Z",
        "closed_at": "2026-11-30T12:00:01Z",
    }


def declined(return_code: str, message: str) -> dict[str, Any]:
    return order(
        "failed",
        {
            "transaction_type": "credit_card",
            "status": "not_authorized",
            "success": False,
            "acquirer_name": "simulator",
            "acquirer_return_code": return_code,
            "acquirer_message": message,
            "operation_type": "auth_and_capture",
            "gateway_response": {"code": "200", "errors": []},
        },
    )


def adapter(answer: Callable[[httpx.Request], httpx.Response]) -> PagarmeGateway:
    return PagarmeGateway("https://api.pagar.me/core/v5", "sk_test_k", transport=httpx.MockTransport(answer))


def answering(status: int, body: Any, seen: list[httpx.Request] | None = None) -> PagarmeGateway:
    def answer(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(request)
        return httpx.Response(status, json=body)

    return adapter(answer)


def test_a_charge_is_an_order_with_the_key_as_code_and_idempotency_key() -> None:
    seen: list[httpx.Request] = []
    captured = order("paid", {"transaction_type": "credit_card", "status": "captured", "success": True})
    result = answering(200, captured, seen).charge("cus_Xy7Qm2Lp9Rt4Vw1B/card_Ab12Cd34Ef56Gh78", 4990, ORDER_CODE, "x")
    assert (result.status, result.gateway_id, result.amount_cents) == ("succeeded", "ch_K3nR8wPq2vLx9TzA", 4990)

    [request] = seen
    assert (request.method, request.url.path) == ("POST", "/core/v5/orders")
    assert request.headers["Idempotency-Key"] == ORDER_CODE
    assert request.headers["Authorization"] == "Basic c2tfdGVzdF9rOg=="  # "sk_test_k:", an empty password
    body = json.loads(request.content)
    assert body["code"] == ORDER_CODE and body["customer_id"] == "cus_Xy7Qm2Lp9Rt4Vw1B"
    [payment] = body["payments"]
    assert payment["payment_method"] == "credit_card" and payment["amount"] == 4990
    assert payment["credit_card"]["card_id"] == "card_Ab12Cd34Ef56Gh78"
    assert sum(item["amount"] * item["quantity"] for item in body["items"]) == 4990


@pytest.mark.parametrize(
    ("return_code", "code", "hard"),
    [
        ("51", "insufficient_funds", False),
        ("05", "do_not_honor", False),
        ("1016", "insufficient_funds", False),  # the four-digit codes from before ABECS's
        ("54", "expired_card", True),
        ("43", "stolen_card", True),
        ("1011", "invalid_card", True),
        ("9999", "declined", False),  # unknown: soft, so dunning tries again rather than giving up
    ],
)
def test_a_decline_is_a_200_with_a_failed_charge_classified_by_its_return_code(
    return_code: str, code: str, hard: bool
) -> None:
    with pytest.raises(Declined) as refused:
        answering(200, declined(return_code, "Transação não autorizada")).charge("card_x", 4990, ORDER_CODE, "x")
    assert (refused.value.code, refused.value.hard) == (code, hard)
    assert refused.value.gateway_id == "ch_K3nR8wPq2vLx9TzA"
    assert refused.value.message == f"Transação não autorizada (código {return_code})"


def test_the_decline_table_marks_abecs_irreversible_codes_hard() -> None:
    irreversible = {"12", "13", "14", "19", "41", "43", "46", "54", "56", "57", "63"}
    reversible = {"04", "05", "06", "38", "51", "55", "59", "61", "65", "75", "78"}
    assert {code for code in irreversible if DECLINES[code].hard} == irreversible
    assert not any(DECLINES[code].hard for code in reversible)


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (401, {"message": "Authorization has been denied for this request."}, AuthenticationFailed),
        (403, {"message": "Bloqueio por IP"}, AuthenticationFailed),
        (429, {"message": "Too Many Requests"}, Unavailable),
        (409, {"message": "Idempotency key conflict"}, IdempotencyConflict),
        (422, {"message": "The request is invalid.", "errors": {"order.items": ["required"]}}, GatewayRejected),
        (412, {"message": "Customer not found."}, GatewayRejected),
        (500, {"message": "An error has occurred."}, Ambiguous),
        (502, "<html>bad gateway</html>", Ambiguous),
    ],
)
def test_refusals_are_classified(status: int, body: Any, expected: type[Exception]) -> None:
    with pytest.raises(expected) as refused:
        answering(status, body).charge("card_x", 4990, ORDER_CODE, "x")
    if status == 422:
        assert "order.items: required" in str(refused.value)


def test_a_charge_still_processing_is_ambiguous_and_found_later() -> None:
    processing = order("processing", {"transaction_type": "credit_card", "status": "with_error", "success": False})
    with pytest.raises(Ambiguous):
        answering(200, processing).charge("card_x", 4990, ORDER_CODE, "x")
    with pytest.raises(Unavailable):  # a lookup that cannot tell yet: ask again later
        answering(200, {"data": [processing], "paging": {"total": 1}}).find_charge(ORDER_CODE)


def test_find_charge_searches_orders_by_code() -> None:
    seen: list[httpx.Request] = []
    found = answering(200, {"data": [declined("51", "Saldo insuficiente")], "paging": {"total": 1}}, seen)
    result = found.find_charge(ORDER_CODE)
    assert result is not None and (result.status, result.code, result.hard) == ("failed", "insufficient_funds", False)
    assert seen[0].url.params["code"] == ORDER_CODE
    assert answering(200, {"data": [], "paging": {"total": 0}}).find_charge(ORDER_CODE) is None
    with pytest.raises(Unavailable):  # a lookup never guesses "never arrived" from an error
        answering(500, {"message": "error"}).find_charge(ORDER_CODE)


LINE = "99990.00111 23456.700006 00000.000190 2 16560000009900"


def boleto_order(qr_code: str) -> dict[str, Any]:
    return order(
        "pending",
        {
            "transaction_type": "boleto",
            "status": "generated",
            "success": True,
            "line": LINE,
            "barcode": "https://api.pagar.me/core/v5/transactions/tran_Aa1Bb2Cc3Dd4Ee5F/barcode",
            "qr_code": qr_code,
            "pdf": "https://api.pagar.me/core/v5/transactions/tran_Aa1Bb2Cc3Dd4Ee5F/pdf",
            "nosso_numero": "00000000019",
            "type": "DM",
            "due_at": "2026-12-10T23:59:59Z",
        },
        method="boleto",
    )


def test_a_boleto_gets_its_barcode_from_the_line_and_a_pix_code_only_when_one_is_given() -> None:
    seen: list[httpx.Request] = []
    payer = Payer("Padaria Pão Quente Ltda", "12.345.678/0001-95", "financeiro@padaria.example")
    url = "https://api.pagar.me/core/v5/transactions/tran_Aa1Bb2Cc3Dd4Ee5F/qrcode"
    issued = answering(200, boleto_order(url), seen).issue_boleto(
        BoletoRequest(77, 4990, "CONECTA anual"), payer, date(2026, 12, 10), "boleto:77"
    )
    assert issued.barcode == barcode_from_digitable_line(LINE)
    assert parse_digitable_line(LINE, date(2026, 12, 1)).amount_cents == 9900
    assert (issued.digitable_line, issued.due_date, issued.pix_code) == (LINE, date(2026, 12, 10), None)
    body = json.loads(seen[0].content)
    assert body["customer"] == {
        "name": "Padaria Pão Quente Ltda",
        "email": "financeiro@padaria.example",
        "document": "12345678000195",
        "document_type": "CNPJ",
        "type": "company",
    }
    assert body["payments"][0]["boleto"]["due_at"].startswith("2026-12-10")
    assert "Fatura 77" in body["payments"][0]["boleto"]["instructions"]

    emv = "00020101021226830014br.gov.bcb.pix"
    pix = answering(200, boleto_order(emv)).issue_boleto(BoletoRequest(77, 4990, "x"), payer, date(2026, 12, 10), "k")
    assert pix.pix_code == emv


def test_card_references_carry_the_customer() -> None:
    assert card_reference("cus_Xy7Qm2Lp9Rt4Vw1B/card_Ab12Cd34Ef56Gh78") == (
        "cus_Xy7Qm2Lp9Rt4Vw1B",
        "card_Ab12Cd34Ef56Gh78",
    )
    assert card_reference("card_Ab12Cd34Ef56Gh78") == (None, "card_Ab12Cd34Ef56Gh78")


# --- production settings ---------------------------------------------------------------------------------


LIVE = {
    "GATEWAY": "pagarme",
    "GATEWAY_URL": "https://api.pagar.me/core/v5",
    "GATEWAY_API_KEY": "sk_live0123456789abcdef",
}


def test_live_pagarme_settings_have_no_gateway_problem() -> None:
    assert gateway_problems(Settings(**LIVE)) == []


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"GATEWAY_URL": "http://127.0.0.1:8700/core/v5"}, "GATEWAY_URL"),
        ({"GATEWAY_URL": "https://localhost:8700/core/v5"}, "GATEWAY_URL"),
        ({"GATEWAY_URL": "http://api.pagar.me/core/v5"}, "GATEWAY_URL"),
        ({"GATEWAY_API_KEY": "sk_test_0123456789"}, "GATEWAY_API_KEY"),
        ({"GATEWAY_API_KEY": "pk_0123456789"}, "GATEWAY_API_KEY"),
        ({"PAGARME_WEBHOOK_JWKS_URL": "http://10.0.0.5/jwks.json"}, "PAGARME_WEBHOOK_JWKS_URL"),
        ({"PAGARME_WEBHOOK_JWKS_URL": ""}, "unauthenticated"),
        ({"PAGARME_WEBHOOK_USERNAME": "renova"}, "PAGARME_WEBHOOK_PASSWORD"),
    ],
)
def test_production_refuses_the_emulator_and_test_keys(change: dict[str, str], named: str) -> None:
    problems = gateway_problems(Settings(**{**LIVE, **change}))
    assert any(named in problem for problem in problems), problems


# --- webhooks end to end -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxGateway]:
    sandbox = SandboxGateway(tmp_path_factory.mktemp("pagarme-emulator"), flavor="pagarme")
    try:
        sandbox.start()
        yield sandbox
    finally:
        sandbox.close()


@pytest.fixture(scope="module")
def pagarme_settings(emulator: SandboxGateway) -> Settings:
    return get_settings().model_copy(
        update={
            "gateway": "pagarme",
            "pagarme_webhook_jwks_url": emulator.jwks_url,
            "pagarme_webhook_username": emulator.webhook_username,
            "pagarme_webhook_password": SecretStr(emulator.webhook_password),
        }
    )


@pytest.fixture(scope="module")
def api_url(pagarme_settings: Settings) -> Iterator[str]:
    with serve_api(pagarme_settings) as url:
        yield url


@pytest.fixture
def pagarme(emulator: SandboxGateway) -> Iterator[PagarmeGateway]:
    """The runtime's gateway (what the jobs call) is the adapter to the emulator."""
    gateway = emulator.client(connect_timeout=1.0, read_timeout=5.0)
    assert isinstance(gateway, PagarmeGateway)
    previous = runtime().gateway_factory
    runtime().gateway_factory = lambda: gateway
    yield gateway
    runtime().gateway_factory = previous
    gateway.close()


def test_a_paid_boleto_webhook_is_verified_then_checked_with_the_api(
    session: Any, worker: object, pagarme: PagarmeGateway, emulator: SandboxGateway, api_url: str
) -> None:
    _subscription, boleto = issued_boleto(session, pagarme)
    assert boleto.gateway_id.startswith("ch_")
    with emulator.configured(webhook_url=f"{api_url}/v1/webhooks/pagarme"):
        paid = emulator.pay_boleto(boleto.gateway_id, paid_on=date(2028, 3, 9))
        wait_until(lambda: session.scalar(select(Invoice.status).where(Invoice.id == boleto.invoice_id)) == "paid")
        session.expire_all()
        recorded = session.get_one(Boleto, boleto.id)
        assert (recorded.status, recorded.paid_on, recorded.paid_amount_cents) == (
            "paid",
            date(2028, 3, 9),
            boleto.amount_cents,
        )
        event = session.scalars(select(GatewayEvent).where(GatewayEvent.event_id == paid["event_id"])).one()
        assert event.type == "pagarme:charge.paid" and event.processed_at is not None

        # Pagar.me delivering it again (the same hook id) changes nothing.
        resent = redeliver(api_url, emulator, paid["event_id"])
        assert resent.status_code == 200 and resent.json()["status"] == "duplicate"


def redeliver(api_url: str, emulator: SandboxGateway, event_id: str) -> httpx.Response:
    """Pagar.me delivering a webhook it already delivered: the same body, signed again."""
    [delivery] = [d for d in emulator.webhooks() if d["event_id"] == event_id]
    body = json.dumps(delivery["event"]).encode()
    signature = pagarme_webhooks.sign(emulator_signing_key(emulator), "renova-emulator-1", body)
    return post(api_url, delivery["event"], emulator, **{pagarme_webhooks.SIGNATURE_HEADER: signature})


def emulator_signing_key(emulator: SandboxGateway) -> Any:
    from gateways.sandbox.pagarme import signing_key

    return signing_key(emulator.data_dir)


def error_code(response: httpx.Response) -> str:
    return response.json()["error"]["code"]


def post(api_url: str, event: dict[str, Any], emulator: SandboxGateway, **headers: str) -> httpx.Response:
    """POST a webhook with the emulator's Basic credentials and no signature unless given."""
    return httpx.post(
        f"{api_url}/v1/webhooks/pagarme",
        content=json.dumps(event).encode(),  # the bytes signed, when a signature is given
        auth=(emulator.webhook_username, emulator.webhook_password),
        headers={"Content-Type": "application/json", **headers},
        timeout=10,
    )


def test_unsigned_forged_or_wrongly_credentialed_webhooks_are_refused(
    session: Any, emulator: SandboxGateway, api_url: str
) -> None:
    forged = {"id": "hook_forged0000001", "type": "charge.paid", "data": {"id": "ch_whatever"}}
    unsigned = post(api_url, forged, emulator)
    assert unsigned.status_code == 401 and error_code(unsigned) == "invalid_signature"

    # A signature by a key that is not Pagar.me's (same kid), and a valid one over another body.
    impostor = pagarme_webhooks.new_signing_key()
    body = json.dumps(forged).encode()
    header = pagarme_webhooks.sign(impostor, "renova-emulator-1", body)
    assert post(api_url, forged, emulator, **{pagarme_webhooks.SIGNATURE_HEADER: header}).status_code == 401

    wrong_password = httpx.post(
        f"{api_url}/v1/webhooks/pagarme", content=body, auth=(emulator.webhook_username, "guess"), timeout=10
    )
    assert wrong_password.status_code == 401
    assert error_code(wrong_password) == "invalid_credentials"
    assert session.scalar(select(GatewayEvent.id).where(GatewayEvent.event_id == "hook_forged0000001")) is None


def test_the_body_is_never_trusted_the_charge_is_looked_up(
    session: Any, pagarme: PagarmeGateway, emulator: SandboxGateway
) -> None:
    _subscription, boleto = issued_boleto(session, pagarme)
    # An event claiming payment of a boleto Pagar.me still holds as pending: nothing is paid.
    lie = {
        "id": "hook_liar000000001",
        "type": "charge.paid",
        "data": {"id": boleto.gateway_id, "status": "paid", "paid_amount": 999_999_99},
    }
    session.add(GatewayEvent(event_id=lie["id"], type="pagarme:charge.paid", payload=lie))
    session.commit()
    now = noon(date(2028, 3, 5))
    assert record_gateway_event(session, lie["id"], now=now, config=runtime().config, gateway=pagarme) == "pending"
    session.commit()
    assert session.get_one(Boleto, boleto.id).status == "issued"

    # Paid for real, the API's amount counts, whatever the event claimed.
    emulator.pay_boleto(boleto.gateway_id, paid_on=date(2028, 3, 6))
    understated = {"id": "hook_liar000000002", "type": "charge.payment_failed", "data": {"id": boleto.gateway_id}}
    session.add(GatewayEvent(event_id=understated["id"], type="pagarme:charge.payment_failed", payload=understated))
    session.commit()
    outcome = record_gateway_event(session, understated["id"], now=now, config=runtime().config, gateway=pagarme)
    session.commit()
    assert outcome == "paid"
    recorded = session.get_one(Boleto, boleto.id)
    assert (recorded.status, recorded.paid_amount_cents, recorded.paid_on) == (
        "paid",
        boleto.amount_cents,
        date(2028, 3, 6),
    )

    # A card charge's event (not a boleto of ours) is stored and ignored without a lookup.
    card = {"id": "hook_card000000001", "type": "charge.paid", "data": {"id": "ch_notaboleto00001"}}
    session.add(GatewayEvent(event_id=card["id"], type="pagarme:charge.paid", payload=card))
    session.commit()
    assert record_gateway_event(session, card["id"], now=now, config=runtime().config, gateway=pagarme) == "ignored"


def test_an_expired_boleto_is_replaced(
    session: Any, worker: object, pagarme: PagarmeGateway, emulator: SandboxGateway, api_url: str
) -> None:
    _subscription, boleto = issued_boleto(session, pagarme)
    with emulator.configured(webhook_url=f"{api_url}/v1/webhooks/pagarme"):
        emulator.expire_boleto(boleto.gateway_id)
        wait_until(lambda: session.scalar(select(Boleto.status).where(Boleto.id == boleto.id)) == "expired")
    session.expire_all()
    # The segunda via was issued at the emulator, through the adapter.
    wait_until(lambda: session.scalar(select(Boleto.id).where(Boleto.status == "issued")) is not None)


def test_a_card_update_takes_a_pagarme_customer_and_card() -> None:
    from pydantic import ValidationError

    from jobs.contract import CardUpdate

    card = {"kind": "card", "organization_id": 1, "requested_by": 1, "brand": "visa", "last4": "4242"}
    card |= {"exp_month": 12, "exp_year": 2031}
    assert CardUpdate(**card, token="cus_Xy7Qm2Lp9Rt4Vw1B/card_Ab12Cd34Ef56Gh78").token.startswith("cus_")
    with pytest.raises(ValidationError):
        CardUpdate(**card, token="cus_Xy7Qm2Lp9Rt4Vw1B card_Ab12Cd34Ef56Gh78")


# --- card payments taken back at Pagar.me: chargebacks, refunds made outside Renova ---------------------------


@pytest.mark.parametrize(
    ("status", "canceled_amount", "expected", "reversed_cents"),
    [
        ("paid", 0, "paid", 0),
        ("paid", 1000, "refunded", 1000),  # a partial refund leaves the charge `paid`
        ("canceled", 4990, "refunded", 4990),
        ("chargedback", 0, "chargedback", 4990),
        ("failed", 0, "other", 0),
    ],
)
def test_a_card_charge_is_read_as_refunded_or_charged_back(
    status: str, canceled_amount: int, expected: str, reversed_cents: int
) -> None:
    charge = order(status, {"transaction_type": "credit_card", "status": "captured"})["charges"][0]
    charge["canceled_amount"] = canceled_amount
    seen: list[httpx.Request] = []
    state = answering(200, charge, seen).card_charge_state("ch_K3nR8wPq2vLx9TzA")
    assert (state.status, state.reversed_cents, state.amount_cents) == (expected, reversed_cents, 4990)
    assert [(request.method, request.url.path) for request in seen] == [("GET", "/core/v5/charges/ch_K3nR8wPq2vLx9TzA")]


def test_a_boleto_or_an_unreadable_answer_is_not_a_card_charge_state() -> None:
    boleto = order("paid", {"transaction_type": "boleto"}, method="boleto")["charges"][0]
    with pytest.raises(Unavailable):  # a lookup: nothing was done, the event is retried
        answering(200, boleto).card_charge_state("ch_K3nR8wPq2vLx9TzA")
    with pytest.raises(Unavailable):
        answering(503, {"message": "down"}).card_charge_state("ch_K3nR8wPq2vLx9TzA")


def paid_card_charge(session: Any, gateway: PagarmeGateway) -> Charge:
    from tests.integration.test_changes import payload, setup_organization, submit

    setup_organization(session)
    session.commit()
    request = submit(session, gateway, payload("subscribe", product="conecta", cycle="monthly",
                                                payment_method="card"), date(2027, 3, 10))  # fmt: skip
    assert request.status == "applied", request.error_message
    charge = session.scalars(select(Charge)).one()
    assert charge.status == "succeeded" and charge.gateway_id.startswith("ch_")
    return charge


def reported(session: Any) -> list[AuditEvent]:
    from jobs.reversals import ACTION

    session.expire_all()
    return list(session.scalars(select(AuditEvent).where(AuditEvent.action == ACTION).order_by(AuditEvent.id)))


def test_a_chargeback_is_put_in_front_of_on_call_once(
    session: Any, worker: object, pagarme: PagarmeGateway, emulator: SandboxGateway, api_url: str
) -> None:
    from jobs.reversals import count_reported

    charge = paid_card_charge(session, pagarme)
    with emulator.configured(webhook_url=f"{api_url}/v1/webhooks/pagarme"):
        charged_back = emulator.chargeback(charge.gateway_id)
        assert charged_back["charge"]["status"] == "chargedback"
        wait_until(lambda: len(reported(session)) == 1)
        [event] = reported(session)
        assert (event.actor, event.target_type, event.target_id) == ("gateway", "charge", str(charge.id))
        assert event.reason == f"chargeback de {format_brl(charge.amount_cents)} na cobrança {charge.gateway_id}"
        assert event.details["kind"] == "chargeback" and event.details["reversed_cents"] == charge.amount_cents
        assert event.details["refunded_by_renova_cents"] == 0 and event.details["invoice_id"] == charge.invoice_id
        stored = session.scalars(select(GatewayEvent).where(GatewayEvent.event_id == charged_back["event_id"])).one()
        assert stored.type == "pagarme:charge.chargedback" and stored.processed_at is not None

        # Pagar.me sending it again, or another event about the same charge: reported once.
        resent = redeliver(api_url, emulator, charged_back["event_id"])
        assert resent.status_code == 200 and resent.json()["status"] == "duplicate"
    other = {"id": "hook_cbupdate00001", "type": "charge.updated", "data": {"id": charge.gateway_id}}
    session.add(GatewayEvent(event_id=other["id"], type="pagarme:charge.updated", payload=other))
    session.commit()
    now = noon(date(2027, 4, 2))
    outcome = record_gateway_event(session, other["id"], now=now, config=runtime().config, gateway=pagarme)
    session.commit()
    assert outcome == "already_reported" and len(reported(session)) == 1
    assert count_reported(session) == {"chargeback": 1, "refund": 0}

    # On-call sees it in the subscription's timeline (`renova charges show`).
    from jobs.charge_review import timeline

    invoice = session.get_one(Invoice, charge.invoice_id)
    seen = [entry for entry in timeline(session, invoice.subscription_id) if entry.kind == event.action]
    assert [(entry.actor, entry.reason) for entry in seen] == [("gateway", event.reason)]

    # Nothing else changes by itself: whether to contest, write off or end is on-call's decision.
    assert invoice.status == "paid"
    assert session.get_one(Subscription, invoice.subscription_id).status == "active"


def stored_event(session: Any, hook_id: str, charge: Charge) -> str:
    event = {"id": hook_id, "type": "charge.partial_canceled", "data": {"id": charge.gateway_id}}
    session.add(GatewayEvent(event_id=hook_id, type="pagarme:charge.partial_canceled", payload=event))
    session.commit()
    return hook_id


def test_renovas_own_refunds_are_not_reported_a_refund_made_elsewhere_is(
    session: Any, pagarme: PagarmeGateway, emulator: SandboxGateway
) -> None:
    from jobs.refunds import execute_refund

    charge = paid_card_charge(session, pagarme)
    invoice = session.get_one(Invoice, charge.invoice_id)
    now = noon(date(2027, 3, 20))

    def record(hook_id: str) -> str:
        outcome = record_gateway_event(
            session, stored_event(session, hook_id, charge), now=now, config=runtime().config, gateway=pagarme
        )
        session.commit()
        return outcome

    # Renova refunds R$ 10,00 itself: in flight (pending), then done; neither is a reversal.
    subscription = session.get_one(Subscription, invoice.subscription_id)
    own = Refund(subscription_id=subscription.id, organization_id=subscription.organization_id,
                 charge_id=charge.id, method="card", amount_cents=1000, reason="teste")  # fmt: skip
    session.add(own)
    session.commit()
    pagarme.refund(charge.gateway_id, 1000, f"refund:{own.id}")  # at Pagar.me, answer not recorded yet
    assert record("hook_ownrefund0001") == "unchanged"
    assert execute_refund(session, pagarme, own.id, now=now) == "succeeded"
    assert record("hook_ownrefund0002") == "unchanged"

    # Someone refunds R$ 5,00 more in Pagar.me's dashboard.
    pagarme.refund(charge.gateway_id, 500, "dashboard-refund-1")
    assert record("hook_dashboard0001") == "reversed_refund"
    assert record("hook_dashboard0002") == "already_reported"
    [event] = reported(session)
    assert event.reason == f"estorno de {format_brl(500)} feito fora do Renova na cobrança {charge.gateway_id}"
    assert (event.details["reversed_cents"], event.details["refunded_by_renova_cents"]) == (1500, 1000)

    # And the rest later: a new state, reported again.
    pagarme.refund(charge.gateway_id, charge.amount_cents - 1500, "dashboard-refund-2")
    assert record("hook_dashboard0003") == "reversed_refund"
    assert [e.details["reversed_cents"] for e in reported(session)] == [1500, charge.amount_cents]
    assert session.get_one(Invoice, charge.invoice_id).status == "paid"


def test_a_declined_charges_event_is_ignored(session: Any, pagarme: PagarmeGateway) -> None:
    charge = paid_card_charge(session, pagarme)
    charge.status = "failed"  # as if this attempt had been declined
    session.commit()
    hook = stored_event(session, "hook_declined00001", charge)
    now = noon(date(2027, 3, 20))
    assert record_gateway_event(session, hook, now=now, config=runtime().config, gateway=pagarme) == "ignored"


ODD_BODIES = {
    "NaN": b'{"id": "hook_odd000000001", "type": "charge.paid", "data": {"id": "ch_1", "amount": NaN}}',
    "Infinity": b'{"id": "hook_odd000000002", "type": "charge.paid", "data": {"id": "ch_1", "amount": -Infinity}}',
    "deep": b'{"id": "hook_odd000000003", "type": "charge.paid", "data": {"id": "ch_1", "x": '
    + b"[" * 100_000
    + b"]" * 100_000
    + b"}}",
    "id a number": b'{"id": 12, "type": "charge.paid", "data": {"id": "ch_1"}}',
    "id true": b'{"id": true, "type": "charge.paid", "data": {"id": "ch_1"}}',
    "type an object": b'{"id": "hook_odd000000004", "type": {"a": 1}, "data": {"id": "ch_1"}}',
    "data.id an object": b'{"id": "hook_odd000000005", "type": "charge.paid", "data": {"id": {"a": "ch_1"}}}',
    "data.id empty": b'{"id": "hook_odd000000006", "type": "charge.paid", "data": {"id": ""}}',
    "data.id too long": b'{"id": "hook_odd000000007", "type": "charge.paid", "data": {"id": "' + b"c" * 200 + b'"}}',
    "NUL in a key": b'{"id": "hook_odd000000008", "type": "charge.paid", "data": {"id": "ch_1", "\\u0000": 1}}',
    "not UTF-8": b'{"id": "hook_odd000000009", "type": "charge.paid", "data": {"id": "\xff"}}',
    "a list": b'[{"id": "hook_odd000000010"}]',
    "empty": b"",
}


@pytest.mark.parametrize("name", list(ODD_BODIES))
def test_odd_signed_bodies_are_refused_with_a_400_and_nothing_is_stored(
    name: str, session: Any, emulator: SandboxGateway, api_url: str
) -> None:
    body = ODD_BODIES[name]
    signature = pagarme_webhooks.sign(emulator_signing_key(emulator), "renova-emulator-1", body)
    answer = httpx.post(
        f"{api_url}/v1/webhooks/pagarme",
        content=body,
        auth=(emulator.webhook_username, emulator.webhook_password),
        headers={"Content-Type": "application/json", pagarme_webhooks.SIGNATURE_HEADER: signature},
        timeout=30,
    )
    assert answer.status_code == 400, answer.text
    assert error_code(answer) == "invalid_event"
    assert session.scalar(select(GatewayEvent.id)) is None


def test_the_emulator_charges_back_a_paid_card_charge_once(
    session: Any, pagarme: PagarmeGateway, emulator: SandboxGateway
) -> None:
    charge = paid_card_charge(session, pagarme)
    emulator.chargeback(charge.gateway_id)
    assert pagarme.card_charge_state(charge.gateway_id).status == "chargedback"
    for charge_id, status in ((charge.gateway_id, 409), ("ch_doesnotexist0001", 404)):
        with pytest.raises(httpx.HTTPStatusError) as refused:
            emulator.chargeback(charge_id)
        assert refused.value.response.status_code == status
    # Pagar.me shows the order of a charged-back charge as paid: it was paid, then disputed.
    [found] = httpx.get(
        f"{emulator.url}/core/v5/orders",
        params={"code": charge.idempotency_key},
        auth=(emulator.api_key, ""),
        timeout=10,
    ).json()["data"]
    assert found["status"] == "paid" and found["charges"][0]["status"] == "chargedback"
