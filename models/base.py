"""Declarative base shared by every mapped table."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, DateTime, MetaData, event, func
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, ORMExecuteState, Session, mapped_column

# Explicit constraint names keep Alembic's autogenerate comparison stable.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {  # noqa: RUF012 - SQLAlchemy reads this class attribute
        int: BigInteger,
        datetime: DateTime(timezone=True),
        dict[str, Any]: JSONB,
        list[Any]: JSONB,
    }


class Timestamped:
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now(), onupdate=func.now())


@event.listens_for(Session, "do_orm_execute")
def _locked_rows_are_read_fresh(state: ORMExecuteState) -> None:
    """A row selected FOR UPDATE is loaded afresh, even when the session already holds its object.

    Sessions here don't expire objects on commit, so an object read earlier (before a gateway call,
    say) keeps its old attributes; without this, the state check made under the lock would read the
    state from before the lock — e.g. a charge another worker recorded meanwhile would look pending
    and be recorded twice. (SQLAlchemy's advice: `populate_existing` with `with_for_update`.)
    """
    statement = state.statement
    if state.is_select and getattr(statement, "_for_update_arg", None) is not None:
        state.update_execution_options(populate_existing=True)
