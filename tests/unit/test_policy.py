from __future__ import annotations

import json
from datetime import date, timedelta

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from models.calendar import ANNUAL, MONTHLY
from models.policy import (
    ADMIN,
    BOLETO,
    BOLETO_ALREADY_ISSUED,
    BOLETO_REQUIRES_ANNUAL,
    CARD,
    FORBIDDEN,
    INVALID_DOCUMENT,
    INVALID_REQUEST,
    MEMBER,
    NO_CARD_ON_FILE,
    OUTSTANDING_INVOICE,
    OWNER,
    PAYMENT_DECLINED,
    SAME_CYCLE,
    SAME_PAYMENT_METHOD,
    SUBSCRIPTION_CANCELED,
    UNKNOWN_CYCLE,
    UNKNOWN_PAYMENT_METHOD,
    RuleViolation,
    boleto_issue_date,
    boleto_switch_deadline,
    can_change_billing,
    document_kind,
    effective_payment_method,
    ensure_can_change_billing,
    ensure_cycle_change_allowed,
    ensure_method_allowed,
    ensure_subscription_open,
    format_document,
    invalid_request,
    late_boleto_due_date,
    method_for_cycle_change,
    normalize_document,
    payment_declined,
    plan_payment_method_switch,
)

RENEWAL = date(2026, 3, 15)  # T
NBSP = "\u00a0"


def _violation(callable_, /, **kwargs: object) -> RuleViolation:
    with pytest.raises(RuleViolation) as caught:
        callable_(**kwargs)
    return caught.value


# --- the exception ---------------------------------------------------------------------------------


def test_rule_violation_carries_code_message_and_json_friendly_details() -> None:
    violation = RuleViolation("some_code", "Mensagem.", deadline=date(2026, 3, 7), amount_cents=10, ids=(1, 2))
    assert isinstance(violation, Exception)
    assert violation.code == "some_code"
    assert violation.message == "Mensagem."
    assert violation.details == {"deadline": "2026-03-07", "amount_cents": 10, "ids": [1, 2]}
    data = violation.to_dict()
    assert data == {"code": "some_code", "message": "Mensagem.", "details": violation.details}
    assert json.loads(json.dumps(data)) == data
    assert "some_code" in str(violation)


def test_invalid_request_and_payment_declined_helpers() -> None:
    violation = invalid_request("Campo obrigatório ausente: to_cycle.", field="to_cycle")
    assert (violation.code, violation.details) == (INVALID_REQUEST, {"field": "to_cycle"})
    declined = payment_declined(amount_cents=94744, reason="saldo insuficiente")
    assert declined.code == PAYMENT_DECLINED
    assert f"R${NBSP}947,44" in declined.message
    assert "saldo insuficiente" in declined.message
    assert declined.details["amount_cents"] == 94744


# --- who may change billing -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("role", "financial_responsible", "active", "allowed"),
    [
        (OWNER, False, True, True),
        (ADMIN, False, True, True),
        (MEMBER, False, True, False),
        (OWNER, False, False, False),  # inactive owner
        (ADMIN, True, False, False),  # inactive admin, even holding the function
        (MEMBER, True, True, True),  # member with the financial-responsible function
        (MEMBER, True, False, False),  # inactive financial responsible
        ("guest", False, True, False),  # unknown roles grant nothing
        (None, True, True, False),  # not a member of the organization
        (None, False, True, False),
    ],
)
def test_who_may_change_billing(role: str | None, financial_responsible: bool, active: bool, allowed: bool) -> None:
    kwargs = {"role": role, "financial_responsible": financial_responsible, "active": active}
    assert can_change_billing(**kwargs) is allowed
    if allowed:
        assert ensure_can_change_billing(**kwargs) is None
    else:
        violation = _violation(ensure_can_change_billing, **kwargs)
        assert violation.code == FORBIDDEN
        for term in ("proprietário", "administrador", "responsável financeiro"):
            assert term in violation.message


def test_subscription_open() -> None:
    for status in ("active", "past_due", "suspended"):
        assert ensure_subscription_open(status=status) is None
    assert _violation(ensure_subscription_open, status="canceled").code == SUBSCRIPTION_CANCELED
    with pytest.raises(ValueError):
        ensure_subscription_open(status="paused")


# --- allowed methods -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cycle", "method", "has_card", "code"),
    [
        (ANNUAL, BOLETO, False, None),
        (ANNUAL, BOLETO, True, None),
        (ANNUAL, CARD, True, None),
        (MONTHLY, CARD, True, None),
        (MONTHLY, BOLETO, True, BOLETO_REQUIRES_ANNUAL),
        (MONTHLY, BOLETO, False, BOLETO_REQUIRES_ANNUAL),
        (MONTHLY, CARD, False, NO_CARD_ON_FILE),
        (ANNUAL, CARD, False, NO_CARD_ON_FILE),
        (ANNUAL, "pix", True, UNKNOWN_PAYMENT_METHOD),
        ("weekly", CARD, True, UNKNOWN_CYCLE),
    ],
)
def test_ensure_method_allowed(cycle: str, method: str, has_card: bool, code: str | None) -> None:
    kwargs = {"cycle": cycle, "method": method, "has_card": has_card}
    if code is None:
        assert ensure_method_allowed(**kwargs) is None
    else:
        assert _violation(ensure_method_allowed, **kwargs).code == code


def test_method_messages_use_the_article_vocabulary() -> None:
    boleto = _violation(ensure_method_allowed, cycle=MONTHLY, method=BOLETO, has_card=True)
    assert "forma de pagamento" in boleto.message and "ciclo de cobrança anual" in boleto.message
    no_card = _violation(ensure_method_allowed, cycle=ANNUAL, method=CARD, has_card=False)
    assert "cartão de crédito" in no_card.message and "Formas de pagamento" in no_card.message


def test_effective_payment_method() -> None:
    assert effective_payment_method(CARD, None) == CARD
    assert effective_payment_method(CARD, BOLETO) == BOLETO
    assert effective_payment_method(BOLETO, CARD) == CARD


# --- boleto dates ------------------------------------------------------------------------------------------


def test_boleto_dates() -> None:
    assert boleto_issue_date(RENEWAL) == date(2026, 3, 8)  # T − 7
    assert boleto_switch_deadline(RENEWAL) == date(2026, 3, 7)  # T − 8, the last allowed day
    assert boleto_issue_date(RENEWAL, lead_days=10) == date(2026, 3, 5)
    assert boleto_switch_deadline(RENEWAL, lead_days=10) == date(2026, 3, 4)


@pytest.mark.parametrize(
    ("today", "expected"),
    [
        (date(2026, 3, 8), RENEWAL),  # issued on time (T − 7): due on T
        (date(2026, 3, 12), RENEWAL),  # T − 3 + 3 days = T
        (date(2026, 3, 13), date(2026, 3, 16)),  # T − 2: at least 3 days to pay
        (date(2026, 3, 20), date(2026, 3, 23)),  # after T
    ],
)
def test_late_boleto_due_date(today: date, expected: date) -> None:
    assert late_boleto_due_date(RENEWAL, today) == expected


# --- payment-method switch ---------------------------------------------------------------------------------


def _switch(**overrides: object) -> str | None:
    arguments: dict[str, object] = {
        "cycle": ANNUAL,
        "payment_method": BOLETO,
        "pending_payment_method": None,
        "to_method": CARD,
        "has_card": True,
        "renewal_date": RENEWAL,
        "today": date(2026, 2, 1),
        "boleto_exists_for_renewal": False,
    }
    arguments.update(overrides)
    return plan_payment_method_switch(**arguments)  # type: ignore[arg-type]


def _switch_violation(**overrides: object) -> RuleViolation:
    with pytest.raises(RuleViolation) as caught:
        _switch(**overrides)
    return caught.value


def test_boleto_to_card_allowed_until_t_minus_8() -> None:
    assert _switch(today=date(2026, 3, 7)) == CARD  # T − 8
    assert _switch(today=date(2026, 1, 1)) == CARD


@pytest.mark.parametrize("today", [date(2026, 3, 8), date(2026, 3, 9), RENEWAL, date(2026, 3, 20)])
def test_boleto_to_card_rejected_from_t_minus_7(today: date) -> None:
    violation = _switch_violation(today=today)
    assert violation.code == BOLETO_ALREADY_ISSUED
    assert violation.details["deadline"] == "2026-03-07"
    assert violation.details["renewal_date"] == "2026-03-15"
    assert violation.details["boleto_issued"] is False
    assert "07/03/2026" in violation.message
    assert "15/03/2026" in violation.message
    assert "7 dias antes da data de renovação" in violation.message


def test_boleto_to_card_rejected_earlier_when_the_boleto_exists() -> None:
    violation = _switch_violation(today=date(2026, 2, 1), boleto_exists_for_renewal=True)
    assert violation.code == BOLETO_ALREADY_ISSUED
    assert violation.details["deadline"] == "2026-03-07"
    assert violation.details["boleto_issued"] is True
    assert "já foi gerado" in violation.message
    assert "07/03/2026" in violation.message


def test_custom_lead_days_move_the_deadline() -> None:
    assert _switch(today=date(2026, 3, 4), lead_days=10) == CARD
    violation = _switch_violation(today=date(2026, 3, 5), lead_days=10)
    assert violation.details["deadline"] == "2026-03-04"


@pytest.mark.parametrize("today", [date(2026, 1, 1), date(2026, 3, 10), RENEWAL])
def test_card_to_boleto_always_allowed_for_annual(today: date) -> None:
    assert _switch(payment_method=CARD, to_method=BOLETO, today=today, has_card=False) == BOLETO
    assert _switch(payment_method=CARD, to_method=BOLETO, today=today, boleto_exists_for_renewal=True) == BOLETO


def test_monthly_to_boleto_rejected() -> None:
    violation = _switch_violation(cycle=MONTHLY, payment_method=CARD, to_method=BOLETO)
    assert violation.code == BOLETO_REQUIRES_ANNUAL


def test_to_card_without_card_rejected() -> None:
    assert _switch_violation(has_card=False).code == NO_CARD_ON_FILE


def test_same_payment_method_is_a_rejected_no_op() -> None:
    violation = _switch_violation(payment_method=CARD, to_method=CARD)
    assert violation.code == SAME_PAYMENT_METHOD
    assert "já é cartão de crédito" in violation.message
    scheduled = _switch_violation(payment_method=CARD, pending_payment_method=BOLETO, to_method=BOLETO)
    assert scheduled.code == SAME_PAYMENT_METHOD
    assert "agendada" in scheduled.message
    assert _switch_violation(payment_method=BOLETO, to_method=BOLETO).code == SAME_PAYMENT_METHOD


def test_asking_for_the_current_method_cancels_a_pending_switch() -> None:
    # Boleto with a pending switch to card, back to boleto: the renewal stays on boleto, any day.
    assert _switch(payment_method=BOLETO, pending_payment_method=CARD, to_method=BOLETO) is None
    assert (
        _switch(
            payment_method=BOLETO,
            pending_payment_method=CARD,
            to_method=BOLETO,
            today=date(2026, 3, 14),
            has_card=False,
        )
        is None
    )
    # Card with a pending boleto, back to card: the renewal leaves boleto, so the deadline applies.
    assert _switch(payment_method=CARD, pending_payment_method=BOLETO, to_method=CARD) is None
    late = _switch_violation(payment_method=CARD, pending_payment_method=BOLETO, to_method=CARD, today=date(2026, 3, 8))
    assert late.code == BOLETO_ALREADY_ISSUED
    issued = _switch_violation(
        payment_method=CARD, pending_payment_method=BOLETO, to_method=CARD, boleto_exists_for_renewal=True
    )
    assert issued.code == BOLETO_ALREADY_ISSUED


def test_switch_rejects_unknown_names() -> None:
    assert _switch_violation(to_method="pix").code == UNKNOWN_PAYMENT_METHOD
    assert _switch_violation(cycle="weekly").code == UNKNOWN_CYCLE


@settings(max_examples=300, deadline=None)
@given(
    payment_method=st.sampled_from([CARD, BOLETO]),
    pending=st.sampled_from([None, CARD, BOLETO]),
    to_method=st.sampled_from([CARD, BOLETO]),
    has_card=st.booleans(),
    days_before_renewal=st.integers(min_value=-5, max_value=40),
    boleto_exists=st.booleans(),
)
def test_switch_outcome_is_consistent(
    payment_method: str,
    pending: str | None,
    to_method: str,
    has_card: bool,
    days_before_renewal: int,
    boleto_exists: bool,
) -> None:
    today = RENEWAL - timedelta(days=days_before_renewal)
    arguments = {
        "payment_method": payment_method,
        "pending_payment_method": pending,
        "to_method": to_method,
        "has_card": has_card,
        "today": today,
        "boleto_exists_for_renewal": boleto_exists,
    }
    effective_before = effective_payment_method(payment_method, pending)
    try:
        new_pending = _switch(**arguments)
    except RuleViolation as violation:
        if to_method == effective_before:
            assert violation.code == SAME_PAYMENT_METHOD
        elif to_method == CARD and not has_card:
            assert violation.code == NO_CARD_ON_FILE
        else:
            assert violation.code == BOLETO_ALREADY_ISSUED
            assert effective_before == BOLETO
            assert boleto_exists or today >= RENEWAL - timedelta(days=7)
        return
    # Accepted: the requested method pays the next renewal, and a pending switch never repeats the current one.
    assert effective_payment_method(payment_method, new_pending) == to_method
    assert new_pending != payment_method
    if effective_before == BOLETO:
        assert not boleto_exists and today < RENEWAL - timedelta(days=7)


# --- cycle change ---------------------------------------------------------------------------------------------


def test_cycle_change_allowed() -> None:
    assert ensure_cycle_change_allowed(from_cycle=MONTHLY, to_cycle=ANNUAL, has_past_due_invoice=False) is None
    assert ensure_cycle_change_allowed(from_cycle=ANNUAL, to_cycle=MONTHLY, has_past_due_invoice=False) is None


@pytest.mark.parametrize("cycle", [MONTHLY, ANNUAL])
def test_same_cycle_rejected(cycle: str) -> None:
    violation = _violation(ensure_cycle_change_allowed, from_cycle=cycle, to_cycle=cycle, has_past_due_invoice=True)
    assert violation.code == SAME_CYCLE
    assert "ciclo de cobrança" in violation.message
    assert ("mensal" if cycle == MONTHLY else "anual") in violation.message


def test_outstanding_invoice_rejected() -> None:
    violation = _violation(
        ensure_cycle_change_allowed,
        from_cycle=MONTHLY,
        to_cycle=ANNUAL,
        has_past_due_invoice=True,
        past_due_amount_cents=9990,
        past_due_since=date(2026, 3, 10),
    )
    assert violation.code == OUTSTANDING_INVOICE
    assert f"R${NBSP}99,90" in violation.message
    assert "10/03/2026" in violation.message
    assert violation.details == {"amount_cents": 9990, "due_date": "2026-03-10"}
    plain = _violation(ensure_cycle_change_allowed, from_cycle=ANNUAL, to_cycle=MONTHLY, has_past_due_invoice=True)
    assert plain.code == OUTSTANDING_INVOICE


def test_cycle_change_unknown_cycle() -> None:
    violation = _violation(
        ensure_cycle_change_allowed, from_cycle=MONTHLY, to_cycle="weekly", has_past_due_invoice=False
    )
    assert violation.code == UNKNOWN_CYCLE


@pytest.mark.parametrize(
    ("to_cycle", "requested", "current", "has_card", "expected"),
    [
        # Annual → monthly: card only; a boleto subscription moves to card.
        (MONTHLY, None, BOLETO, True, CARD),
        (MONTHLY, CARD, BOLETO, True, CARD),
        (MONTHLY, None, CARD, True, CARD),
        (MONTHLY, None, BOLETO, False, NO_CARD_ON_FILE),
        (MONTHLY, CARD, CARD, False, NO_CARD_ON_FILE),
        (MONTHLY, BOLETO, BOLETO, True, BOLETO_REQUIRES_ANNUAL),
        # Monthly → annual: card or boleto, the customer's choice.
        (ANNUAL, BOLETO, CARD, True, BOLETO),
        (ANNUAL, BOLETO, CARD, False, BOLETO),
        (ANNUAL, CARD, CARD, True, CARD),
        (ANNUAL, None, CARD, True, CARD),
        (ANNUAL, CARD, CARD, False, NO_CARD_ON_FILE),
        (ANNUAL, "pix", CARD, True, UNKNOWN_PAYMENT_METHOD),
        ("weekly", CARD, CARD, True, UNKNOWN_CYCLE),
    ],
)
def test_method_for_cycle_change(
    to_cycle: str, requested: str | None, current: str, has_card: bool, expected: str
) -> None:
    kwargs = {"to_cycle": to_cycle, "requested_method": requested, "current_method": current, "has_card": has_card}
    if expected in (CARD, BOLETO):
        assert method_for_cycle_change(**kwargs) == expected
    else:
        assert _violation(method_for_cycle_change, **kwargs).code == expected


# --- documents -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("document", "normalized", "kind", "formatted"),
    [
        ("529.982.247-25", "52998224725", "cpf", "529.982.247-25"),
        ("52998224725", "52998224725", "cpf", "529.982.247-25"),
        ("11.222.333/0001-81", "11222333000181", "cnpj", "11.222.333/0001-81"),
        # Alphanumeric CNPJ (Receita Federal's example, issued from July 2026).
        ("12.ABC.345/01DE-35", "12ABC34501DE35", "cnpj", "12.ABC.345/01DE-35"),
        (" 12.abc.345/01de-35 ", "12ABC34501DE35", "cnpj", "12.ABC.345/01DE-35"),
    ],
)
def test_valid_documents(document: str, normalized: str, kind: str, formatted: str) -> None:
    assert normalize_document(document) == normalized
    assert document_kind(document) == kind
    assert format_document(document) == formatted


@pytest.mark.parametrize(
    "document",
    [
        "529.982.247-24",  # wrong CPF check digit
        "111.111.111-11",  # repeated digits pass the arithmetic but are never issued
        "000.000.000-00",
        "11.222.333/0001-82",  # wrong CNPJ check digit
        "00.000.000/0000-00",
        "12.ABC.345/01DE-34",  # wrong alphanumeric CNPJ check digit
        "12.ABC.345/01DE-3A",  # check digits are always numeric
        "5299822472",  # 10 digits
        "529982247251",  # 12 digits
        "",
        None,
        "529.982.247-2X",
    ],
)
def test_invalid_documents(document: str | None) -> None:
    violation = _violation(normalize_document, document=document)
    assert violation.code == INVALID_DOCUMENT
    assert "CPF/CNPJ inválido" in violation.message


def _cnpj_check_digits(base: str) -> str:
    """Receita Federal's rule, written independently: value = ord(char) − 48, mod 11 with weights 2..9."""
    digits = ""
    for weights in ([5, 4, 3, 2, 9, 8, 7, 6, 5, 4, 3, 2], [6, 5, 4, 3, 2, 9, 8, 7, 6, 5, 4, 3, 2]):
        total = sum((ord(char) - 48) * weight for char, weight in zip(base + digits, weights, strict=True))
        remainder = total % 11
        digits += "0" if remainder < 2 else str(11 - remainder)
    return digits


def test_alphanumeric_cnpj_check_digits_by_hand() -> None:
    # 12ABC34501DE: values 1,2,17,18,19,3,4,5,0,1,20,21 × 5,4,3,2,9,8,7,6,5,4,3,2 = 459; 459 % 11 = 8 → 3.
    # With the 3 appended, × 6,5,4,3,2,9,8,7,6,5,4,3,2 = 424; 424 % 11 = 6 → 5.
    assert _cnpj_check_digits("12ABC34501DE") == "35"


@settings(max_examples=200, deadline=None)
@given(base=st.text(alphabet="0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=12, max_size=12))
def test_alphanumeric_cnpj_property(base: str) -> None:
    assume(base != "0" * 12)  # the all-zero root is never issued
    check = _cnpj_check_digits(base)
    document = base + check
    assert normalize_document(document.lower()) == document
    assert document_kind(document) == "cnpj"
    wrong = base + check[0] + str((int(check[1]) + 1) % 10)
    assert _violation(normalize_document, document=wrong).code == INVALID_DOCUMENT


def test_vocabulary_matches_the_stored_enumerations() -> None:
    # The rules take plain strings; the schema stores StrEnum values. Both must name the same things.
    from models.calendar import CYCLES
    from models.policy import PAYMENT_METHODS, ROLES, SUBSCRIPTION_STATUSES
    from models.states import Cycle, PaymentMethod, Role, SubscriptionStatus

    assert set(CYCLES) == {member.value for member in Cycle}
    assert set(PAYMENT_METHODS) == {member.value for member in PaymentMethod}
    assert set(ROLES) == {member.value for member in Role}
    assert set(SUBSCRIPTION_STATUSES) == {member.value for member in SubscriptionStatus}
    # Enum members work wherever a string is expected.
    assert can_change_billing(role=Role.OWNER, financial_responsible=False, active=True)
    assert (
        method_for_cycle_change(
            to_cycle=Cycle.MONTHLY, requested_method=None, current_method=PaymentMethod.BOLETO, has_card=True
        )
        == CARD
    )
