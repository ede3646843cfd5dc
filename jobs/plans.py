"""Plan prices: set a product's monthly and annual prices from a date on, and list them.

The `plans` table is a price history: the price in force on a date is the row with the latest
`effective_from` on or before it (`jobs.invoicing.plan_price`). A renewal is invoiced at the price
in force on its renewal date, so a change applies from each subscription's next renewal. A price is
never changed retroactively: `effective_from` is today or later.

Plain functions with a session and explicit dates; the caller commits (the CLI and the HTTP API).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import Any, Final

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from jobs import audit
from models.boleto import MAX_AMOUNT_CENTS
from models.calendar import ANNUAL, CYCLES, MONTHLY
from models.money import CURRENCY, format_brl
from models.schema import Plan

PRODUCT_PATTERN: Final = re.compile(r"^[a-z0-9_\-]{1,64}$")  # as the change-request contract (jobs.contract)
MAX_PRICE_CENTS: Final = MAX_AMOUNT_CENTS  # a price must fit a boleto's 10-digit amount
MAX_REASON_LENGTH: Final = 500
AUDIT_ACTION: Final = "plans.set"

# Reais as an operator types them: digits, then at most one decimal separator (`.` or `,`) and at
# most two decimals. No thousands separators: `1.234` would be ambiguous, so it is refused.
_REAIS: Final = re.compile(r"^([0-9]{1,15})(?:[.,]([0-9]{1,2}))?$")
_ISO_DATE: Final = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")

# Error codes (the HTTP API's `error.code`).
INVALID_PRODUCT: Final = "invalid_product"
INVALID_PRICE: Final = "invalid_price"
PRICE_REQUIRED: Final = "price_required"
RETROACTIVE_PRICE: Final = "retroactive_price"
INVALID_DATE: Final = "invalid_date"
INVALID_REASON: Final = "invalid_reason"
UNKNOWN_PRODUCT: Final = "unknown_product"


class PlanError(ValueError):
    """Invalid plan input: nothing was written. `fields` names the inputs at fault (function
    arguments: `product`, `monthly_cents`, `annual_cents`, `effective_from`, `reason`)."""

    def __init__(self, code: str, message: str, *, fields: tuple[str, ...] = (), **details: Any) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.fields = fields
        self.details: dict[str, Any] = {
            key: value.isoformat() if isinstance(value, date) else value for key, value in details.items()
        }


@dataclass(frozen=True)
class ScheduledPrice:
    effective_from: date
    price_cents: int


@dataclass(frozen=True)
class PriceRow:
    """One product and cycle: the price in force on the date asked (None when only future prices
    exist) and the prices scheduled after it, soonest first."""

    product: str
    cycle: str
    currency: str
    price_cents: int | None
    effective_from: date | None
    scheduled: list[ScheduledPrice] = field(default_factory=list)


# --- validation ----------------------------------------------------------------------------------


def validate_product(product: str) -> str:
    if not isinstance(product, str) or not PRODUCT_PATTERN.match(product):
        raise PlanError(
            INVALID_PRODUCT,
            "Produto inválido: use de 1 a 64 letras minúsculas, dígitos, _ ou -.",
            fields=("product",),
        )
    return product


def validate_price(cents: int, name: str) -> int:
    if isinstance(cents, bool) or not isinstance(cents, int):
        raise PlanError(INVALID_PRICE, "O preço deve ser um número inteiro de centavos.", fields=(name,))
    if cents < 0:
        raise PlanError(INVALID_PRICE, "O preço não pode ser negativo.", fields=(name,))
    if cents > MAX_PRICE_CENTS:
        raise PlanError(
            INVALID_PRICE,
            f"O preço não pode passar de {format_brl(MAX_PRICE_CENTS)} (o valor máximo de um boleto).",
            fields=(name,),
        )
    return cents


def parse_reais(text: str, name: str = "price") -> int:
    """`49.90`, `49,90`, `49,9` or `49` reais → integer cents, exactly (Decimal, never float).

    Refused: signs, thousands separators (`1.234,56`), more than two decimals, currency symbols,
    spaces inside, anything that is not plain digits with one optional decimal separator."""
    candidate = text.strip()
    match = _REAIS.match(candidate)
    if match is None:
        if candidate.startswith("-"):
            raise PlanError(INVALID_PRICE, f"O preço não pode ser negativo: {text!r}.", fields=(name,))
        raise PlanError(
            INVALID_PRICE,
            f"Valor inválido {text!r}: use reais com no máximo 2 casas decimais e um único separador "
            "decimal, sem separador de milhar (ex.: 49.90, 49,90 ou 1234,56).",
            fields=(name,),
        )
    whole, decimals = match.group(1), match.group(2) or "0"
    return validate_price(int(Decimal(f"{whole}.{decimals}").scaleb(2)), name)


def parse_iso_date(text: str) -> date:
    """Exactly `YYYY-MM-DD` (Python 3.11's `date.fromisoformat` also takes `20270101` or `2027-W01-1`)."""
    if not _ISO_DATE.match(text.strip()):
        raise ValueError(f"expected a date YYYY-MM-DD, got {text!r}")
    return date.fromisoformat(text.strip())


# --- reading -------------------------------------------------------------------------------------


def price_list(session: Session, product: str | None = None, *, on: date) -> list[PriceRow]:
    """Per product and cycle, the price in force on `on` and the prices scheduled after `on`.

    Empty when the product (or, with no product, any plan) has no price at all."""
    query = select(Plan.product, Plan.cycle, Plan.currency, Plan.effective_from, Plan.price_cents).order_by(
        Plan.product, Plan.cycle, Plan.effective_from
    )
    if product is not None:
        query = query.where(Plan.product == product)
    history: dict[tuple[str, str], list[Any]] = {}
    for row in session.execute(query):
        history.setdefault((row.product, row.cycle), []).append(row)

    rows: list[PriceRow] = []
    cycle_order = {cycle: index for index, cycle in enumerate(CYCLES)}
    for (name, cycle), entries in sorted(history.items(), key=lambda item: (item[0][0], cycle_order[item[0][1]])):
        in_force = [entry for entry in entries if entry.effective_from <= on]
        current = in_force[-1] if in_force else None
        rows.append(
            PriceRow(
                product=name,
                cycle=cycle,
                currency=current.currency if current else entries[0].currency,
                price_cents=current.price_cents if current else None,
                effective_from=current.effective_from if current else None,
                scheduled=[
                    ScheduledPrice(entry.effective_from, entry.price_cents)
                    for entry in entries
                    if entry.effective_from > on
                ],
            )
        )
    return rows


# --- writing -------------------------------------------------------------------------------------


def set_prices(
    session: Session,
    product: str,
    *,
    monthly_cents: int | None,
    annual_cents: int | None,
    effective_from: date,
    today: date,
    actor: str,
    reason: str = "",
) -> list[Plan]:
    """Set the product's prices from `effective_from` on (today or later; a price is never changed
    retroactively) and record who did it and why in `audit_events`.

    Either price may be None to leave that cycle alone, but not both. Setting a price again for the
    same date replaces it. Does not commit. Raises PlanError, having written nothing."""
    validate_product(product)
    prices = {MONTHLY: monthly_cents, ANNUAL: annual_cents}
    if all(cents is None for cents in prices.values()):
        raise PlanError(
            PRICE_REQUIRED,
            "Informe o preço mensal, o anual ou ambos.",
            fields=("monthly_cents", "annual_cents"),
        )
    for cycle, cents in prices.items():
        if cents is not None:
            validate_price(cents, f"{cycle}_cents")
    if isinstance(effective_from, datetime) or not isinstance(effective_from, date):
        raise PlanError(INVALID_DATE, "A vigência deve ser uma data (AAAA-MM-DD).", fields=("effective_from",))
    if effective_from < today:
        raise PlanError(
            RETROACTIVE_PRICE,
            f"Um preço não pode ser alterado retroativamente: a vigência ({effective_from.isoformat()}) "
            f"deve ser hoje ({today.isoformat()}) ou uma data futura.",
            fields=("effective_from",),
            effective_from=effective_from,
            today=today,
        )
    if not isinstance(reason, str) or len(reason) > MAX_REASON_LENGTH:
        raise PlanError(
            INVALID_REASON, f"O motivo deve ser um texto de até {MAX_REASON_LENGTH} caracteres.", fields=("reason",)
        )

    changed = {cycle: cents for cycle, cents in prices.items() if cents is not None}
    before = {cycle: _price_on(session, product, cycle, effective_from) for cycle in changed}
    statement = insert(Plan).values(
        [
            {
                "product": product,
                "cycle": cycle,
                "price_cents": cents,
                "currency": CURRENCY,
                "effective_from": effective_from,
            }
            for cycle, cents in changed.items()
        ]
    )
    statement = statement.on_conflict_do_update(
        index_elements=[Plan.product, Plan.cycle, Plan.effective_from],
        set_={"price_cents": statement.excluded.price_cents, "currency": statement.excluded.currency},
    ).returning(Plan)
    plans = list(session.scalars(statement, execution_options={"populate_existing": True}))
    # `plan_price` keeps the session's price list for the unit of work: it is stale now.
    session.info.pop("plan_prices", None)
    audit.record(
        session,
        actor=actor,
        action=AUDIT_ACTION,
        target_type="plan",
        target_id=product,
        reason=reason,
        details={
            "product": product,
            "effective_from": effective_from.isoformat(),
            "currency": CURRENCY,
            **{f"{cycle}_cents": cents for cycle, cents in changed.items()},
            "previous": {f"{cycle}_cents": cents for cycle, cents in before.items()},
        },
    )
    session.flush()
    return sorted(plans, key=lambda plan: CYCLES.index(plan.cycle))


def _price_on(session: Session, product: str, cycle: str, on: date) -> int | None:
    """What the price was on `on` before this change (for the audit trail)."""
    return session.scalar(
        select(Plan.price_cents)
        .where(Plan.product == product, Plan.cycle == cycle, Plan.effective_from <= on)
        .order_by(Plan.effective_from.desc())
        .limit(1)
    )
