"""The people who use the ops console: operators (may act) and viewers (may only look).

Passwords are hashed with Argon2id (pwdlib) and never stored or logged otherwise. Creating,
changing and disabling an operator is audited like every other console or CLI action.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from pwdlib import PasswordHash
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from jobs import audit
from models.schema import Operator

MIN_PASSWORD_LENGTH = 12
_hasher = PasswordHash.recommended()
# Verifying against this keeps an unknown e-mail as slow as a wrong password (no user enumeration).
_DUMMY_HASH = _hasher.hash("renova-operator-dummy-password")


class OperatorRole(StrEnum):
    VIEWER = "viewer"
    OPERATOR = "operator"


class OperatorError(ValueError):
    """Refused: the message says why, in words an operator can act on."""


@dataclass(frozen=True)
class OperatorRow:
    id: int
    email: str
    role: str
    active: bool
    created_at: datetime
    last_login_at: datetime | None


def _normalized_email(email: str) -> str:
    address = email.strip().lower()
    if "@" not in address or any(char.isspace() for char in address) or len(address) > 254:
        raise OperatorError(f"not an e-mail address: {email!r}")
    return address


def _role(role: str) -> OperatorRole:
    try:
        return OperatorRole(role)
    except ValueError:
        raise OperatorError(f"role must be viewer or operator, not {role!r}") from None


def _checked_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise OperatorError(f"the password needs at least {MIN_PASSWORD_LENGTH} characters")
    return password


def add_operator(session: Session, email: str, password: str, role: str, *, actor: str, now: datetime) -> Operator:
    """A new operator, or a new password and role for an existing one (reactivated). Audited."""
    address, chosen = _normalized_email(email), _role(role)
    hashed = _hasher.hash(_checked_password(password))
    operator = session.scalar(select(Operator).where(Operator.email == address).with_for_update())
    created = operator is None
    if operator is None:
        operator = Operator(email=address, password_hash=hashed, role=chosen.value, active=True, created_at=now)
        session.add(operator)
    else:
        operator.password_hash, operator.role, operator.active = hashed, chosen.value, True
    session.flush()
    audit.record(
        session,
        actor=actor,
        action="operator_added" if created else "operator_updated",
        target_type="operator",
        target_id=str(operator.id),
        details={"role": chosen.value},
    )
    return operator


def disable_operator(session: Session, email: str, *, actor: str, reason: str) -> Operator:
    operator = session.scalar(select(Operator).where(Operator.email == _normalized_email(email)).with_for_update())
    if operator is None:
        raise OperatorError(f"no operator {email!r}")
    operator.active = False
    audit.record(
        session,
        actor=actor,
        action="operator_disabled",
        target_type="operator",
        target_id=str(operator.id),
        reason=reason,
    )
    return operator


def list_operators(session: Session) -> list[OperatorRow]:
    rows = session.scalars(select(Operator).order_by(Operator.email))
    return [OperatorRow(row.id, row.email, row.role, row.active, row.created_at, row.last_login_at) for row in rows]


def authenticate(session: Session, email: str, password: str, *, now: datetime) -> Operator | None:
    """The active operator with this e-mail and password, or None (the caller says only "wrong
    e-mail or password"). A hash made with older parameters is upgraded on the way."""
    try:
        address = _normalized_email(email)
    except OperatorError:
        address = ""
    operator = session.scalar(select(Operator).where(func.lower(Operator.email) == address)) if address else None
    if operator is None or not operator.active:
        _hasher.verify(password, _DUMMY_HASH)
        return None
    valid, updated = _hasher.verify_and_update(password, operator.password_hash)
    if not valid:
        return None
    if updated is not None:
        operator.password_hash = updated
    operator.last_login_at = now
    return operator


def active_operator(session: Session, operator_id: int) -> Operator | None:
    operator = session.get(Operator, operator_id)
    return operator if operator is not None and operator.active else None
