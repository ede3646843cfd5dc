"""The ops console over HTTP (a real server; the browser tests are in test_console_browser.py): logging
in, the session cookie, CSRF, roles, and the lookup pages."""

from __future__ import annotations

import os
import re
import time
from datetime import UTC, date, datetime

import dramatiq
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from models.schema import AuditEvent, Refund
from tests.integration.console_fixtures import PASSWORD, Console, add_operator
from tests.integration.factories import CNPJ, make_organization, make_subscription, seed_plans

pytestmark = pytest.mark.usefixtures("console_server")
IN_CI = bool(os.environ.get("CI"))
CNPJ_FORMATTED = f"{CNPJ[:2]}.{CNPJ[2:5]}.{CNPJ[5:8]}/{CNPJ[8:12]}-{CNPJ[12:]}"


def dead_letter(broker: dramatiq.Broker, notification_id: int = 4242) -> dramatiq.Message:
    """A `send_notification` message parked in the dead letters, as the Redis broker stores one."""
    from jobs.notifications import send_notification

    message = send_notification.message(notification_id)
    broker.client.zadd("dramatiq:notifications.XQ", {message.message_id: int(time.time() * 1000)})
    broker.client.hset("dramatiq:notifications.XQ.msgs", message.message_id, message.encode())
    return message


def logged_in(console: Console, email: str, role: str = "operator") -> httpx.Client:
    add_operator(email, role)
    client = httpx.Client(base_url=console.url, timeout=10)
    answer = client.post("/console/login", data={"email": email, "password": PASSWORD, "next": "/console/"})
    assert answer.status_code == 303, answer.text
    return client


def csrf_of(client: httpx.Client, path: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', client.get(path).text)
    assert found is not None
    return found.group(1)


def test_pages_need_a_login_and_come_back_after_it(console_server: Console):
    add_operator("ops@renova.example", "operator")
    with httpx.Client(base_url=console_server.url) as client:
        first = client.get("/console/subscriptions?q=acme")
        assert first.status_code == 303
        assert first.headers["location"] == "/console/login?next=%2Fconsole%2Fsubscriptions%3Fq%3Dacme"

        wrong = client.post("/console/login", data={"email": "ops@renova.example", "password": "nope-nope-nope"})
        assert wrong.status_code == 401 and "E-mail ou senha incorretos" in wrong.text
        unknown = client.post("/console/login", data={"email": "ninguem@renova.example", "password": PASSWORD})
        assert unknown.status_code == 401 and "E-mail ou senha incorretos" in unknown.text

        answer = client.post(
            "/console/login",
            data={"email": " OPS@renova.example ", "password": PASSWORD, "next": "/console/subscriptions?q=acme"},
        )
        assert answer.status_code == 303 and answer.headers["location"] == "/console/subscriptions?q=acme"
        cookie = answer.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=lax" in cookie and "path=/console" in cookie
        assert "secure" not in cookie  # development and test serve plain HTTP
        assert client.get("/console/subscriptions?q=acme").status_code == 200


def test_login_never_redirects_outside_the_console(console_server: Console):
    add_operator("ops@renova.example", "operator")
    with httpx.Client(base_url=console_server.url) as client:
        for target in ("https://evil.example/", "//evil.example/x", "/v1/plans"):
            answer = client.post(
                "/console/login", data={"email": "ops@renova.example", "password": PASSWORD, "next": target}
            )
            assert answer.headers["location"] == "/console/"


def test_a_forged_or_stale_cookie_is_a_new_login(console_server: Console):
    with httpx.Client(base_url=console_server.url, cookies={"renova_console": "forged.value.here"}) as client:
        assert client.get("/console/").status_code == 303


def test_a_disabled_operator_is_logged_out(console_server: Console, session):
    from jobs.operators import disable_operator

    client = logged_in(console_server, "ops@renova.example")
    assert client.get("/console/").status_code == 200
    disable_operator(session, "ops@renova.example", actor="test", reason="left the company")
    session.commit()
    assert client.get("/console/").status_code == 303


def test_actions_need_the_forms_csrf_token_and_the_operator_role(console_server: Console, broker, session):
    message = dead_letter(broker)
    operator = logged_in(console_server, "ops@renova.example")
    viewer = logged_in(console_server, "leitura@renova.example", "viewer")
    body = {"message_id": message.message_id, "queue": "notifications", "reason": "SMTP de volta"}

    forged = operator.post("/console/dead-letters/requeue", data=body)
    assert forged.status_code == 403 and "token CSRF" in forged.text
    refused = viewer.post(
        "/console/dead-letters/requeue", data={**body, "csrf_token": csrf_of(viewer, "/console/dead-letters")}
    )
    assert refused.status_code == 403 and "leitura" in refused.text
    assert broker.client.zcard("dramatiq:notifications.XQ") == 1

    no_reason = operator.post(
        "/console/dead-letters/requeue",
        data={**body, "reason": "  ", "csrf_token": csrf_of(operator, "/console/dead-letters")},
    )
    assert no_reason.status_code == 303 and "erro=" in no_reason.headers["location"]
    assert broker.client.zcard("dramatiq:notifications.XQ") == 1

    done = operator.post(
        "/console/dead-letters/requeue", data={**body, "csrf_token": csrf_of(operator, "/console/dead-letters")}
    )
    assert done.status_code == 303
    assert "reenfileirada" in operator.get(done.headers["location"]).text
    assert broker.client.zcard("dramatiq:notifications.XQ") == 0
    assert broker.client.llen("dramatiq:notifications") == 1
    event = session.scalars(select(AuditEvent).where(AuditEvent.action == "dead_letter.requeue")).one()
    assert (event.actor, event.reason, event.target_id) == ("ops@renova.example", "SMTP de volta", message.message_id)


def test_subscriptions_are_found_by_name_document_and_ids(console_server: Console, session):
    seed_plans(session)
    organization = make_organization(session, 7, name="Acme Soluções")
    subscription = make_subscription(session, organization, anchor=date(2027, 1, 10), cycle="monthly", method="card")
    session.commit()
    client = logged_in(console_server, "ops@renova.example", "viewer")

    for term in ("acme", CNPJ_FORMATTED, "7", f"#{subscription.id}"):
        found = client.get("/console/subscriptions", params={"q": term})
        assert f'href="/console/subscriptions/{subscription.id}"' in found.text, term
        # Shown without its CNPJ (only the check digits), unless the operator typed it into the search box.
        shown = found.text.replace(f'value="{term}"', "")
        assert CNPJ not in shown and CNPJ_FORMATTED not in shown
        assert f"**.***.***/****-{CNPJ[-2:]}" in shown
    assert "Nada encontrado" in client.get("/console/subscriptions", params={"q": "zzz_%"}).text

    detail = client.get(f"/console/subscriptions/{subscription.id}")
    assert detail.status_code == 200
    assert "Acme Soluções" in detail.text and "mensal" in detail.text
    assert CNPJ not in detail.text and f"**.***.***/****-{CNPJ[-2:]}" in detail.text
    assert client.get("/console/subscriptions/999999").status_code == 404


def test_a_change_request_shows_its_parameters_with_the_card_token_masked(console_server: Console, session):
    from jobs.changes import record_change_request

    seed_plans(session)
    make_organization(session, 7, name="Acme")
    session.commit()
    body = {
        "organization_id": 7,
        "requested_by": 70,
        "idempotency_key": "k-1",
        "kind": "card",
        "token": "tok_visa_4242_secret",
        "brand": "visa",
        "last4": "4242",
        "exp_month": 12,
        "exp_year": 2030,
    }
    request = record_change_request(session, body, source="api", now=datetime.now(UTC)).request
    session.commit()
    client = logged_in(console_server, "ops@renova.example", "viewer")

    listed = client.get("/console/change-requests", params={"organization": "7", "kind": "card"})
    assert f'href="/console/change-requests/{request.id}"' in listed.text
    assert (
        f'href="/console/change-requests/{request.id}"'
        not in client.get("/console/change-requests", params={"organization": "8"}).text
    )
    detail = client.get(f"/console/change-requests/{request.id}")
    assert "tok_visa_4242_secret" not in detail.text and "…cret" in detail.text


def pending_payout(session) -> Refund:
    """A payout of R$ 12,34 waiting for on-call, of organization 7's subscription."""
    seed_plans(session)
    organization = make_organization(session, 7, name="Acme")
    subscription = make_subscription(session, organization, anchor=date(2027, 1, 10), cycle="monthly", method="card")
    refund = Refund(subscription_id=subscription.id, organization_id=7, method="payout", amount_cents=1234)
    session.add(refund)
    session.commit()
    return refund


def test_on_call_closes_a_payout_with_its_reference(console_server: Console, session):
    refund = pending_payout(session)
    client = logged_in(console_server, "ops@renova.example")
    listed = client.get("/console/refunds")
    assert "R$\xa012,34" in listed.text or "R$ 12,34" in listed.text

    token = csrf_of(client, "/console/refunds")
    missing = client.post(f"/console/refunds/{refund.id}/paid", data={"csrf_token": token, "reason": "pago"})
    assert "erro=" in missing.headers["location"]
    done = client.post(
        f"/console/refunds/{refund.id}/paid",
        data={"csrf_token": token, "reference": "TED 123", "reason": "transferido"},
    )
    assert "marcado+como+pago" in done.headers["location"]
    session.expire_all()
    assert (session.get(Refund, refund.id).status, session.get(Refund, refund.id).reference) == ("paid", "TED 123")
    again = client.post(
        f"/console/refunds/{refund.id}/paid",
        data={"csrf_token": token, "reference": "TED 123", "reason": "transferido"},
    )
    assert "erro=" in again.headers["location"]  # already paid: refused, nothing changed


def test_parked_work_is_listed_and_retried_by_an_operator(console_server: Console, session, broker):
    from models.schema import ChangeRequest

    make_organization(session, 7, name="Acme")
    parked = ChangeRequest(
        organization_id=7,
        idempotency_key="k-parked",
        kind="cancel",
        payload={},
        payload_hash="h",
        attempts=5,
        last_error="RuntimeError: boom",
        needs_attention_at=datetime.now(UTC),
    )
    session.add(parked)
    session.commit()
    client = logged_in(console_server, "ops@renova.example")
    assert "RuntimeError: boom" in client.get("/console/attention").text

    token = csrf_of(client, "/console/attention")
    done = client.post(
        f"/console/attention/change_request/{parked.id}/retry", data={"csrf_token": token, "reason": "bug corrigido"}
    )
    assert "volta+a+ser+tentado" in done.headers["location"]
    session.expire_all()
    assert session.get(ChangeRequest, parked.id).needs_attention_at is None
    assert broker.client.llen("dramatiq:changes") == 1
    event = session.scalars(select(AuditEvent).where(AuditEvent.action == "attention.retry")).one()
    assert (event.actor, event.reason) == ("ops@renova.example", "bug corrigido")
    unknown = client.post("/console/attention/nonsense/1/retry", data={"csrf_token": token, "reason": "x"})
    assert "erro=" in unknown.headers["location"]


def test_a_refused_charge_action_says_why_and_changes_nothing(console_server: Console, session, billing_gateway):
    from tests.integration.test_charge_review import declined_renewal

    _, declined = declined_renewal(session, billing_gateway, token="tok_expired")  # a hard decline
    client = logged_in(console_server, "ops@renova.example")
    listed = client.get("/console/charges", params={"status": "failed", "code": "expired_card"})
    assert f'href="/console/charges/{declined.id}"' in listed.text

    token = csrf_of(client, f"/console/charges/{declined.id}")
    refused = client.post(f"/console/charges/{declined.id}/retry", data={"csrf_token": token, "reason": "tentar"})
    shown = client.get(refused.headers["location"]).text
    assert "flash error" in shown
    no_reason = client.post(f"/console/charges/{declined.id}/reconcile", data={"csrf_token": token, "reason": ""})
    assert "erro=" in no_reason.headers["location"]
    assert session.scalars(select(AuditEvent).where(AuditEvent.action.startswith("charge."))).all() == []
    assert "charge" not in client.get("/console/audit", params={"action": "charge"}).text.split("<table>")[1]


def test_an_operator_deletes_a_whole_queue_of_dead_letters(console_server: Console, broker, session):
    dead_letter(broker, 1)
    dead_letter(broker, 2)
    client = logged_in(console_server, "ops@renova.example")
    token = csrf_of(client, "/console/dead-letters")

    done = client.post(
        "/console/dead-letters/delete", data={"csrf_token": token, "queue": "notifications", "reason": "obsoletas"}
    )
    assert "2+mensagem%28ns%29+apagada%28s%29" in done.headers["location"]
    assert broker.client.zcard("dramatiq:notifications.XQ") == 0
    assert broker.client.llen("dramatiq:notifications") == 0  # deleted, not requeued
    events = session.scalars(select(AuditEvent).where(AuditEvent.action == "dead_letter.delete")).all()
    assert sorted(event.reason for event in events) == ["obsoletas", "obsoletas"]


def test_the_event_deliveries_are_watched_and_resent_from_the_console(console_server: Console, session):
    from jobs.events import add_endpoint
    from models.schema import EventDelivery

    seed_plans(session)
    endpoint = add_endpoint(session, "http://127.0.0.1:9/app/events", ["subscription.created"], require_https=False)
    make_subscription(session, make_organization(session, 7), anchor=date(2027, 1, 10), cycle="monthly", method="card")
    session.commit()
    delivery = session.scalars(select(EventDelivery)).one()
    delivery.status, delivery.attempts, delivery.last_status_code = "failed", 12, 503
    session.commit()
    viewer = logged_in(console_server, "leitura@renova.example", "viewer")
    operator = logged_in(console_server, "ops@renova.example")

    shown = viewer.get("/console/endpoints")
    assert shown.status_code == 200
    assert endpoint.url in shown.text and "subscription.created" in shown.text and "HTTP 503" in shown.text
    assert "Reenviar" not in shown.text  # a viewer looks
    assert endpoint.secret not in shown.text

    path = f"/console/endpoints/deliveries/{delivery.id}/redeliver"
    no_reason = operator.post(path, data={"reason": " ", "csrf_token": csrf_of(operator, "/console/endpoints")})
    assert no_reason.status_code == 303 and "erro=" in no_reason.headers["location"]
    done = operator.post(path, data={"reason": "app de volta", "csrf_token": csrf_of(operator, "/console/endpoints")})
    assert done.status_code == 303
    assert "será reenviada" in operator.get(done.headers["location"]).text
    session.refresh(delivery)
    assert delivery.status == "pending"
    event = session.scalars(select(AuditEvent).where(AuditEvent.action == "event_delivery.redeliver")).one()
    assert (event.actor, event.reason) == ("ops@renova.example", "app de volta")


@pytest.mark.parametrize(
    ("path", "params", "status"),
    [
        ("/console/subscriptions", {"q": "#99999999999999999999"}, 200),
        ("/console/subscriptions", {"q": "99999999999999999999"}, 200),
        ("/console/subscriptions", {"q": "acme\x00"}, 200),
        ("/console/subscriptions", {"q": "x" * 5000}, 200),
        ("/console/change-requests", {"organization": "99999999999999999999"}, 200),
        ("/console/change-requests", {"kind": "ca\x00ncel", "status": "pend\x00ing"}, 200),
        ("/console/change-requests", {"since": "2027-02-30", "until": "\x00"}, 200),
        ("/console/subscriptions/99999999999999999999", {}, 404),
        ("/console/charges/99999999999999999999", {}, 404),
        ("/console/change-requests/0", {}, 404),
        ("/console/runs/2027-02-30", {}, 404),
    ],
)
def test_odd_lookups_find_nothing_and_never_fail(console_server: Console, path: str, params: dict, status: int) -> None:
    client = logged_in(console_server, "ops@renova.example", "viewer")
    answer = client.get(path, params=params)
    assert answer.status_code == status, answer.text[:300]
    if status == 404:
        assert "Não encontrado" in answer.text


def test_a_filter_no_row_can_match_finds_nothing_instead_of_everything(console_server: Console, session) -> None:
    from jobs.changes.recording import record_change_request
    from tests.integration.test_changes import payload, setup_organization

    setup_organization(session)
    session.commit()
    recorded = record_change_request(session, payload("cancel", 1), source="api", now=datetime.now(UTC))
    session.commit()
    client = logged_in(console_server, "ops@renova.example", "viewer")
    link = "/console/change-requests/"
    assert link in client.get("/console/change-requests").text, recorded
    for params in ({"organization": "99999999999999999999"}, {"kind": "can\x00cel"}, {"status": "pend\x00ing"}):
        assert link not in client.get("/console/change-requests", params=params).text, params


def test_a_form_with_a_nul_is_refused_and_changes_nothing(console_server: Console, session):
    refund = pending_payout(session)
    client = logged_in(console_server, "ops@renova.example")
    token = csrf_of(client, "/console/refunds")
    for data in ({"reference": "TED\x00 123", "reason": "transferido"}, {"reference": "TED 123", "reason": "pa\x00go"}):
        refused = client.post(f"/console/refunds/{refund.id}/paid", data={"csrf_token": token, **data})
        assert refused.status_code == 400 and "Texto inválido" in refused.text, refused.text[:300]
    session.expire_all()
    assert session.get(Refund, refund.id).status == "pending"
    assert session.scalars(select(AuditEvent.action).where(AuditEvent.target_type == "refund")).all() == []


ODD_TEXT = st.one_of(
    st.text(max_size=40),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.sampled_from(["\x00", "9" * 30, "2027-02-30", "31/02/2027", "%", "_", "'", "#" + "9" * 25, " "]),
)
LOOKUPS = {
    "/console/subscriptions": ("q",),
    "/console/change-requests": ("organization", "status", "kind", "since", "until"),
    "/console/dead-letters": ("queue",),
    "/console/charges": ("status", "since", "until", "code", "organization"),
    "/console/audit": ("actor", "action", "target"),
    "/console/refunds": ("status",),
    "/console/attention": ("kind",),
    "/console/endpoints": ("endpoint", "status"),
}


@pytest.mark.parametrize("path", list(LOOKUPS))
def test_lookup_pages_answer_any_filter_without_a_server_error(console_server: Console, path: str) -> None:
    client = logged_in(console_server, "ops@renova.example", "viewer")

    @given(values=st.fixed_dictionaries({name: ODD_TEXT for name in LOOKUPS[path]}))
    @settings(max_examples=30, deadline=None, derandomize=IN_CI, database=None, suppress_health_check=list(HealthCheck))
    def answers(values: dict[str, str]) -> None:
        answer = client.get(path, params=values)
        assert answer.status_code in (200, 404), (values, answer.status_code, answer.text[:200])

    answers()
