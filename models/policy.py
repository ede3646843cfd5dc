"""Who may change billing, which payment methods are allowed, and when a change is refused.

Every refusal is a RuleViolation with a stable `code` for programs and a pt-BR `message` for people,
worded with the help-center article's vocabulary (assinatura, ciclo de cobrança, forma de pagamento,
responsável financeiro, data de renovação). The functions are pure: callers pass in the facts they
read under their row lock and apply what comes back.
"""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any, Final, Literal

from stdnum.br import cnpj, cpf
from stdnum.exceptions import ValidationError as DocumentValidationError

from models.calendar import format_date_br
from models.money import format_brl
from models.states import Cycle, PaymentMethod, Role, SubscriptionStatus

# --- codes -------------------------------------------------------------------------------------

BOLETO_REQUIRES_ANNUAL: Final = "boleto_requires_annual"
NO_CARD_ON_FILE: Final = "no_card_on_file"
BOLETO_ALREADY_ISSUED: Final = "boleto_already_issued"
SAME_PAYMENT_METHOD: Final = "same_payment_method"
SAME_CYCLE: Final = "same_cycle"
OUTSTANDING_INVOICE: Final = "outstanding_invoice"
FORBIDDEN: Final = "forbidden"
SUBSCRIPTION_CANCELED: Final = "subscription_canceled"
PAYMENT_DECLINED: Final = "payment_declined"
UNKNOWN_PAYMENT_METHOD: Final = "unknown_payment_method"
UNKNOWN_CYCLE: Final = "unknown_cycle"
INVALID_DOCUMENT: Final = "invalid_document"
# For requests whose shape is wrong (missing field, wrong type); raised by whoever parses the payload.
INVALID_REQUEST: Final = "invalid_request"
ORGANIZATION_NOT_FOUND: Final = "organization_not_found"
SUBSCRIPTION_NOT_FOUND: Final = "subscription_not_found"
ALREADY_SUBSCRIBED: Final = "already_subscribed"
UNKNOWN_PRODUCT: Final = "unknown_product"
CARD_EXPIRED: Final = "card_expired"
DOCUMENT_REQUIRED: Final = "document_required"
CANCELLATION_ALREADY_SCHEDULED: Final = "cancellation_already_scheduled"
CANCELLATION_NOT_SCHEDULED: Final = "cancellation_not_scheduled"
NO_OPEN_BOLETO: Final = "no_open_boleto"

# --- vocabulary ---------------------------------------------------------------------------------

# The vocabularies are declared once, in models.states; these names stay importable for their callers.
OWNER: Final = Role.OWNER
ADMIN: Final = Role.ADMIN
MEMBER: Final = Role.MEMBER
ROLES: Final = tuple(Role)
CARD: Final = PaymentMethod.CARD
BOLETO: Final = PaymentMethod.BOLETO
PAYMENT_METHODS: Final = tuple(PaymentMethod)
SUBSCRIPTION_STATUSES: Final = tuple(SubscriptionStatus)

BILLING_ROLES: Final = (Role.OWNER, Role.ADMIN)

BOLETO_LEAD_DAYS_DEFAULT: Final = 7
BOLETO_DUE_DAYS_DEFAULT: Final = 3

_METHOD_NAMES: Final = {PaymentMethod.CARD: "cartão de crédito", PaymentMethod.BOLETO: "boleto"}
_CYCLE_NAMES: Final = {Cycle.MONTHLY: "mensal", Cycle.ANNUAL: "anual"}


def payment_method_name(method: str) -> str:
    """pt-BR name of a payment method, as the article writes it."""
    return _METHOD_NAMES.get(method, method)


def cycle_name(cycle: str) -> str:
    """pt-BR name of a billing cycle: mensal or anual."""
    return _CYCLE_NAMES.get(cycle, cycle)


# --- the exception -----------------------------------------------------------------------------


def _json_friendly(value: Any) -> Any:
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(key): _json_friendly(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_json_friendly(item) for item in value]
    return value


class RuleViolation(Exception):
    """A business rule refused a request. Recorded as the request's outcome, never retried."""

    def __init__(self, code: str, message: str, **details: Any) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details: dict[str, Any] = _json_friendly(details)

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "details": dict(self.details)}

    def __repr__(self) -> str:
        return f"RuleViolation(code={self.code!r}, message={self.message!r}, details={self.details!r})"


def invalid_request(message: str, **details: Any) -> RuleViolation:
    """The violation for a malformed request (message in pt-BR, e.g. naming the missing field)."""
    return RuleViolation(INVALID_REQUEST, message, **details)


def payment_declined(*, amount_cents: int, reason: str | None = None, **details: Any) -> RuleViolation:
    """The violation recorded when the immediate card charge of a change is declined; nothing changes."""
    message = f"O pagamento de {format_brl(amount_cents)} no cartão de crédito foi recusado"
    message += f" ({reason})." if reason else "."
    message += " Nenhuma alteração foi feita na assinatura. Verifique o cartão em Formas de pagamento."
    return RuleViolation(PAYMENT_DECLINED, message, amount_cents=amount_cents, reason=reason, **details)


# --- validation of names -----------------------------------------------------------------------


def ensure_known_cycle(cycle: str) -> None:
    if cycle not in tuple(Cycle):
        raise RuleViolation(
            UNKNOWN_CYCLE,
            f"Ciclo de cobrança desconhecido: {cycle!r}. Os ciclos disponíveis são mensal e anual.",
            cycle=cycle,
        )


def ensure_known_payment_method(method: str) -> None:
    if method not in tuple(PaymentMethod):
        raise RuleViolation(
            UNKNOWN_PAYMENT_METHOD,
            f"Forma de pagamento desconhecida: {method!r}. As formas disponíveis são cartão de crédito e boleto.",
            payment_method=method,
        )


# --- who may change billing --------------------------------------------------------------------


def can_change_billing(*, role: str | None, financial_responsible: bool, active: bool) -> bool:
    """Active owners and admins, and active members holding the financial-responsible function.

    `role` None means the person is not a member of the organization, whatever the other flags say.
    """
    return role is not None and active and (role in BILLING_ROLES or financial_responsible)


def ensure_can_change_billing(*, role: str | None, financial_responsible: bool, active: bool) -> None:
    """Raise `forbidden` unless can_change_billing; the worker checks this itself, not only the main app."""
    if not can_change_billing(role=role, financial_responsible=financial_responsible, active=active):
        raise RuleViolation(
            FORBIDDEN,
            "Somente usuários ativos com perfil proprietário ou administrador, ou com a função de "
            "responsável financeiro ativa, podem alterar as assinaturas da organização.",
            role=role,
            financial_responsible=financial_responsible,
            active=active,
        )


def ensure_subscription_open(*, status: str) -> None:
    """A canceled subscription takes no more changes; active, past-due and suspended ones do."""
    if status not in tuple(SubscriptionStatus):
        raise ValueError(f"unknown subscription status {status!r}")
    if status == SubscriptionStatus.CANCELED:
        raise RuleViolation(
            SUBSCRIPTION_CANCELED,
            "Esta assinatura está cancelada e não pode mais ser alterada.",
            status=status,
        )


# --- payment methods ---------------------------------------------------------------------------


def effective_payment_method(payment_method: str, pending_payment_method: str | None) -> str:
    """The method that pays the upcoming renewal: a pending switch wins over the current method."""
    return pending_payment_method or payment_method


def ensure_method_allowed(*, cycle: str, method: str, has_card: bool) -> None:
    """Boleto only for annual subscriptions; card only with a card on file."""
    ensure_known_cycle(cycle)
    ensure_known_payment_method(method)
    if method == PaymentMethod.BOLETO and cycle != Cycle.ANNUAL:
        raise RuleViolation(
            BOLETO_REQUIRES_ANNUAL,
            "A forma de pagamento boleto só está disponível para assinaturas com ciclo de cobrança anual. "
            "No ciclo de cobrança mensal, o pagamento é feito com cartão de crédito.",
            cycle=cycle,
            payment_method=method,
        )
    if method == PaymentMethod.CARD and not has_card:
        raise RuleViolation(
            NO_CARD_ON_FILE,
            "Não há cartão de crédito cadastrado na organização. Cadastre um cartão em Formas de pagamento "
            "e tente novamente.",
            payment_method=method,
        )


def boleto_issue_date(renewal_date: date, lead_days: int = BOLETO_LEAD_DAYS_DEFAULT) -> date:
    """The day the renewal's boleto is issued: T − lead_days."""
    return renewal_date - timedelta(days=lead_days)


def renewal_boleto_due(
    *,
    cycle: str,
    status: str,
    payment_method: str,
    pending_payment_method: str | None,
    cancel_at_period_end: bool,
    renewal_date: date,
    invoiced: bool,
    today: date,
    lead_days: int = BOLETO_LEAD_DAYS_DEFAULT,
) -> bool:
    """Whether the boleto invoice of the renewal on `renewal_date` is due to be created on `today` (T − 7):
    an annual subscription still billed (active or past due) whose effective method is boleto, not
    cancelled at the period's end, whose issue day has come and whose renewal is not invoiced yet.

    jobs.billing_day.scan_boletos_to_issue is this rule as an indexed SQL scan; a handler re-checks it
    here under the row lock."""
    return (
        cycle == Cycle.ANNUAL
        and status in (SubscriptionStatus.ACTIVE, SubscriptionStatus.PAST_DUE)
        and effective_payment_method(payment_method, pending_payment_method) == PaymentMethod.BOLETO
        and not cancel_at_period_end
        and boleto_issue_date(renewal_date, lead_days) <= today
        and not invoiced
    )


def boleto_switch_deadline(renewal_date: date, lead_days: int = BOLETO_LEAD_DAYS_DEFAULT) -> date:
    """Last day on which boleto → card is still accepted for this renewal (the day before the issue)."""
    return boleto_issue_date(renewal_date, lead_days) - timedelta(days=1)


def late_boleto_due_date(renewal_date: date, today: date, due_days: int = BOLETO_DUE_DAYS_DEFAULT) -> date:
    """Due date of a boleto issued on `today`: the renewal date, but never fewer than `due_days` away."""
    return max(renewal_date, today + timedelta(days=due_days))


def _boleto_already_issued(*, renewal_date: date, deadline: date, lead_days: int, boleto_exists: bool) -> RuleViolation:
    rule = (
        "A forma de pagamento só pode ser alterada de boleto para cartão de crédito até "
        f"{lead_days} dias antes da data de renovação, pois é nessa data que o boleto é gerado."
    )
    if boleto_exists:
        situation = (
            f"O boleto da renovação de {format_date_br(renewal_date)} já foi gerado, por isso ela deverá ser "
            f"paga via boleto."
        )
    else:
        situation = (
            f"Para a renovação de {format_date_br(renewal_date)}, o prazo terminou em "
            f"{format_date_br(deadline)}: será necessário realizar o pagamento via boleto."
        )
    return RuleViolation(
        BOLETO_ALREADY_ISSUED,
        f"{rule} {situation} Último dia para a alteração: {format_date_br(deadline)}.",
        deadline=deadline,
        renewal_date=renewal_date,
        boleto_issued=boleto_exists,
    )


def plan_payment_method_switch(
    *,
    cycle: str,
    payment_method: str,
    pending_payment_method: str | None,
    to_method: str,
    has_card: bool,
    renewal_date: date,
    today: date,
    boleto_exists_for_renewal: bool,
    lead_days: int = BOLETO_LEAD_DAYS_DEFAULT,
) -> str | None:
    """Decide a payment-method switch; returns the new `pending_payment_method` (None = no pending switch).

    The switch takes effect at the next renewal. Outcomes:
    - `to_method` is already the effective method (the current one with nothing pending, or the one
      already scheduled): nothing to do, raises `same_payment_method`.
    - `to_method` is the current method while a different switch is pending: the pending switch is
      cancelled and None is returned.
    - otherwise `to_method` is returned as the new pending method.
    Moving the upcoming renewal off boleto (including cancelling a pending boleto) is only allowed
    while `today < T − lead_days` and no boleto exists for that renewal (`boleto_already_issued`).
    """
    ensure_known_cycle(cycle)
    ensure_known_payment_method(to_method)
    effective = effective_payment_method(payment_method, pending_payment_method)
    if to_method == effective:
        name = payment_method_name(to_method)
        if pending_payment_method not in (None, payment_method):
            message = f"Nada foi alterado: a forma de pagamento {name} já está agendada para a próxima renovação."
        else:
            message = f"Nada foi alterado: a forma de pagamento da assinatura já é {name}."
        raise RuleViolation(
            SAME_PAYMENT_METHOD,
            message,
            payment_method=payment_method,
            pending_payment_method=pending_payment_method,
        )
    ensure_method_allowed(cycle=cycle, method=to_method, has_card=has_card)
    if effective == PaymentMethod.BOLETO:
        deadline = boleto_switch_deadline(renewal_date, lead_days)
        if boleto_exists_for_renewal or today > deadline:
            raise _boleto_already_issued(
                renewal_date=renewal_date,
                deadline=deadline,
                lead_days=lead_days,
                boleto_exists=boleto_exists_for_renewal,
            )
    return None if to_method == payment_method else to_method


# --- cycle change ------------------------------------------------------------------------------


def ensure_cycle_change_allowed(
    *,
    from_cycle: str,
    to_cycle: str,
    has_past_due_invoice: bool,
    past_due_amount_cents: int | None = None,
    past_due_since: date | None = None,
) -> None:
    """Refuse a change to the same cycle, and any change while an invoice is past due.

    The optional amount and due date of the past-due invoice only make the message more helpful.
    """
    ensure_known_cycle(from_cycle)
    ensure_known_cycle(to_cycle)
    if from_cycle == to_cycle:
        raise RuleViolation(
            SAME_CYCLE,
            f"A assinatura já está no ciclo de cobrança {cycle_name(to_cycle)}.",
            cycle=to_cycle,
        )
    if has_past_due_invoice:
        what = "uma cobrança vencida e não paga"
        if past_due_amount_cents is not None:
            what += f" de {format_brl(past_due_amount_cents)}"
        if past_due_since is not None:
            what += f", vencida em {format_date_br(past_due_since)}"
        raise RuleViolation(
            OUTSTANDING_INVOICE,
            f"Não é possível alterar o ciclo de cobrança enquanto houver {what}. "
            "Regularize o pagamento e tente novamente.",
            amount_cents=past_due_amount_cents,
            due_date=past_due_since,
        )


def method_for_cycle_change(*, to_cycle: str, requested_method: str | None, current_method: str, has_card: bool) -> str:
    """The payment method of the subscription after a cycle change.

    To monthly: always card (a boleto subscription switches to card; requesting boleto is refused).
    To annual: the requested method, card or boleto; with no request the current method is kept.
    """
    ensure_known_cycle(to_cycle)
    ensure_known_payment_method(current_method)
    if requested_method is not None:
        ensure_known_payment_method(requested_method)
    # Monthly is card-only, so with no explicit request a boleto subscription moves to card.
    default_method = PaymentMethod.CARD if to_cycle == Cycle.MONTHLY else current_method
    method = requested_method or default_method
    ensure_method_allowed(cycle=to_cycle, method=method, has_card=has_card)
    return method


# --- documents ---------------------------------------------------------------------------------

DocumentKind = Literal["cpf", "cnpj"]


def document_kind(document: str) -> DocumentKind:
    """cpf or cnpj after validation (see normalize_document)."""
    return "cpf" if len(normalize_document(document)) == 11 else "cnpj"


def normalize_document(document: str | None) -> str:
    """A valid CPF (11 digits) or CNPJ (14 characters, alphanumeric from July 2026), without punctuation.

    Letters are uppercased. Numbers made of one repeated digit pass the check-digit test but are never
    issued, so they are refused too.
    """
    raw = (document or "").strip()
    compact = raw.translate(str.maketrans("", "", " .-/")).upper()
    kind: DocumentKind | None = {11: "cpf", 14: "cnpj"}.get(len(compact))  # type: ignore[assignment]
    valid = False
    if kind is not None and len(set(compact)) > 1:
        validator = cpf if kind == "cpf" else cnpj
        try:
            validator.validate(compact)
            valid = True
        except DocumentValidationError:
            valid = False
    if not valid:
        raise RuleViolation(
            INVALID_DOCUMENT,
            "CPF/CNPJ inválido. Informe um CPF com 11 dígitos ou um CNPJ com 14 caracteres, "
            "com os dígitos verificadores corretos.",
            document=raw,
        )
    return compact


def format_document(document: str) -> str:
    """000.000.000-00 for a CPF, 00.000.000/0000-00 for a CNPJ."""
    compact = normalize_document(document)
    return cpf.format(compact) if len(compact) == 11 else cnpj.format(compact)


# Every code a request can be rejected with, for the README and the API's documentation.
ERROR_CODES: Final[dict[str, str]] = {
    INVALID_REQUEST: "the message's shape is wrong (missing field, wrong type, unknown kind)",
    ORGANIZATION_NOT_FOUND: "Renova has no copy of the organization (PUT /v1/organizations/{id} first)",
    FORBIDDEN: "the requester is not an active owner, admin or financial responsible of the organization",
    SUBSCRIPTION_NOT_FOUND: "no such subscription in this organization",
    SUBSCRIPTION_CANCELED: "the subscription is canceled (or its period ended with a scheduled cancellation)",
    UNKNOWN_PRODUCT: "no plan for this product and cycle",
    ALREADY_SUBSCRIBED: "the organization already has a live subscription of this product",
    SAME_CYCLE: "the subscription is already in that billing cycle",
    OUTSTANDING_INVOICE: "a cycle change while an invoice is past due",
    BOLETO_REQUIRES_ANNUAL: "boleto asked for a monthly subscription",
    NO_CARD_ON_FILE: "card asked but the organization has no card",
    BOLETO_ALREADY_ISSUED: "boleto → card after the deadline (T − 7 days) or once the renewal's boleto exists",
    SAME_PAYMENT_METHOD: "the payment method asked is already the one in effect",
    DOCUMENT_REQUIRED: "boleto asked but the organization has no CPF/CNPJ",
    CARD_EXPIRED: "the new card's expiry is in the past",
    PAYMENT_DECLINED: "the immediate card charge was declined; nothing changed",
    CANCELLATION_ALREADY_SCHEDULED: "cancel asked twice",
    CANCELLATION_NOT_SCHEDULED: "resume asked with no cancellation scheduled",
    NO_OPEN_BOLETO: "segunda via asked but the subscription has no open invoice payable by boleto",
}
