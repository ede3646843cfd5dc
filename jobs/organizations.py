"""Renova's copy of the main application's organizations and their members.

The main application sends an organization whenever it changes, with all its members: the copy is
created or updated to match, and members absent from it become inactive (they can no longer change
billing nor receive notices). A plain function with a session; the caller commits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from models.policy import INVALID_REQUEST, RuleViolation, normalize_document
from models.schema import Member, Organization

# A member id that belongs to another organization (member ids are unique across organizations).
MEMBER_CONFLICT: Final = "member_conflict"
# The most members one organization may send (the API refuses more with 422).
MAX_MEMBERS: Final = 5_000
# Members per INSERT (PostgreSQL takes at most 65,535 parameters in a statement).
_ROWS_PER_STATEMENT: Final = 1_000
_MEMBER_FIELDS: Final = ("role", "name", "email", "financial_responsible", "active")


@dataclass(frozen=True)
class MemberCopy:
    """A member as the main application sends it; `id` is its id there."""

    id: int
    role: str
    name: str = ""
    email: str | None = None
    financial_responsible: bool = False
    active: bool = True


def upsert_organization(
    session: Session,
    organization_id: int,
    *,
    name: str,
    document: str | None,
    members: Sequence[MemberCopy],
    now: datetime,
) -> Organization:
    """Create or update the organization `organization_id`, its CPF/CNPJ and its members; members
    absent from `members` become inactive. Returns the organization as written. Does not commit.

    Raises RuleViolation, with the input at fault as `details["field"]` where there is one:
    `invalid_request` (an id that is not positive, the same member twice), `invalid_document`, and
    `member_conflict` (a member of another organization). Nothing is written then."""
    if organization_id <= 0:
        raise RuleViolation(INVALID_REQUEST, "deve ser um número positivo", field="organization_id")
    compact = None
    if document is not None and document.strip():
        try:
            compact = normalize_document(document)
        except RuleViolation as violation:
            raise RuleViolation(violation.code, violation.message, field="document") from None
    ids = [member.id for member in members]
    if len(ids) != len(set(ids)):
        raise RuleViolation(INVALID_REQUEST, "há membros repetidos (mesmo id)", field="members")
    foreign = session.scalar(select(Member.id).where(Member.id.in_(ids), Member.organization_id != organization_id))
    if foreign is not None:
        raise RuleViolation(MEMBER_CONFLICT, f"O membro {foreign} pertence a outra organização.", member_id=foreign)

    session.execute(
        insert(Organization)
        .values(id=organization_id, name=name, document=compact)
        .on_conflict_do_update(index_elements=["id"], set_={"name": name, "document": compact, "updated_at": now})
    )
    rows = [{**dataclasses.asdict(member), "organization_id": organization_id} for member in members]
    upsert = insert(Member)
    upsert = upsert.on_conflict_do_update(
        index_elements=["id"],
        set_={**{field: upsert.excluded[field] for field in _MEMBER_FIELDS}, "updated_at": now},
        where=Member.organization_id == organization_id,
    )
    for start in range(0, len(rows), _ROWS_PER_STATEMENT):
        session.execute(upsert.values(rows[start : start + _ROWS_PER_STATEMENT]))
    absent = update(Member).where(Member.organization_id == organization_id)
    if ids:
        absent = absent.where(Member.id.not_in(ids))
    session.execute(absent.values(active=False))
    return session.get_one(Organization, organization_id, populate_existing=True)
