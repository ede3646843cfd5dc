"""What a lookup's filters can match. A text holding a NUL, or an id outside PostgreSQL's bigint,
matches no row — and PostgreSQL would refuse the comparison — so a lookup given one answers nothing
instead of failing (the console's search boxes and filters take whatever is typed)."""

from __future__ import annotations

from collections.abc import Iterable

from jobs.contract import MAX_ID


def can_match(*, texts: Iterable[str | None] = (), ids: Iterable[int | None] = ()) -> bool:
    """False when a given text holds a NUL or a given id is not 1 to MAX_ID (None: no filter)."""
    if any(text is not None and "\x00" in text for text in texts):
        return False
    return all(value is None or 0 < value <= MAX_ID for value in ids)
