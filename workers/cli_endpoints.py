"""`renova endpoints`: where events are pushed to the main application, and what became of each delivery."""

from __future__ import annotations

from datetime import UTC, datetime

import typer
from rich.table import Table

from workers.cli_common import actor_name, console, fail, id_argument, wire
from workers.settings import get_settings

endpoints_app = typer.Typer(
    no_args_is_help=True, help="Webhook endpoints of the main application: signed events, delivery log, redelivery."
)
REASON_HELP = "Why (audit log)."


def _when(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if value else "—"


@endpoints_app.command("add")
def endpoints_add(
    url: str = typer.Argument(..., help="Where to POST the events (https in production)."),
    events: list[str] | None = typer.Option(
        None, "--event", "-e", help="Only this event type (repeatable); all types when none is given."
    ),
    description: str = typer.Option("", "--description", help="What it is, for people."),
    actor: str | None = typer.Option(None, help="Who adds it (audit log; default: your login name)."),
) -> None:
    """Add an endpoint with a new signing secret, printed once: configure it in the receiver."""
    wire()
    from jobs.events import EventError, add_endpoint
    from workers.db import get_session_factory

    with get_session_factory()() as session:
        try:
            endpoint = add_endpoint(
                session,
                url,
                events or (),
                description=description,
                require_https=get_settings().renova_env == "production",
                actor=actor_name(actor),
            )
        except EventError as exc:
            session.rollback()
            fail(exc.message, code=2)
        session.commit()
        console.print(f"endpoint {endpoint.id}: {endpoint.url}")
        console.print(f"events: {', '.join(endpoint.event_types) or 'all'}")
        console.print(f"signing secret (shown once; the receiver verifies with it): {endpoint.secret}", soft_wrap=True)


@endpoints_app.command("list")
def endpoints_list() -> None:
    """Every endpoint, its event types and its deliveries by status."""
    wire()
    from jobs.events import delivery_counts, endpoints
    from workers.db import get_session_factory

    with get_session_factory()() as session:
        rows = endpoints(session)
        counts = delivery_counts(session)
    if not rows:
        console.print("no endpoints yet: add one with `renova endpoints add URL`")
        return
    table = Table()
    for column in ("id", "url", "events", "enabled", "delivered", "pending", "failed", "description"):
        table.add_column(column)
    for row in rows:
        found = counts.get(row.id, {})
        table.add_row(
            str(row.id),
            row.url,
            ", ".join(row.event_types) or "all",
            "yes" if row.enabled else "no",
            str(found.get("delivered", 0)),
            str(found.get("pending", 0)),
            str(found.get("failed", 0)),
            row.description,
        )
    console.print(table)


def _set_enabled(endpoint_id: int, enabled: bool, reason: str, actor: str | None) -> None:
    wire()
    from jobs.events import EventError, set_endpoint_enabled
    from workers.db import get_session_factory

    if not reason.strip():
        fail("--reason must say why", code=2)
    with get_session_factory()() as session:
        try:
            endpoint = set_endpoint_enabled(
                session, endpoint_id, enabled, actor=actor_name(actor), reason=reason.strip()
            )
        except EventError as exc:
            session.rollback()
            fail(exc.message, code=2)
        session.commit()
        console.print(f"endpoint {endpoint.id} {'enabled' if enabled else 'disabled'}")


@endpoints_app.command("disable")
def endpoints_disable(
    endpoint_id: int = id_argument(),
    reason: str = typer.Option(..., "--reason", help=REASON_HELP),
    actor: str | None = typer.Option(None, help="Who (audit log; default: your login name)."),
) -> None:
    """Stop sending to an endpoint; events meanwhile are not queued for it (`GET /v1/events` has them)."""
    _set_enabled(endpoint_id, False, reason, actor)


@endpoints_app.command("enable")
def endpoints_enable(
    endpoint_id: int = id_argument(),
    reason: str = typer.Option(..., "--reason", help=REASON_HELP),
    actor: str | None = typer.Option(None, help="Who (audit log; default: your login name)."),
) -> None:
    """Send to a disabled endpoint again (its pending deliveries go out in order)."""
    _set_enabled(endpoint_id, True, reason, actor)


@endpoints_app.command("deliveries")
def endpoints_deliveries(
    endpoint_id: int = id_argument(),
    status: str | None = typer.Option(None, "--status", help="pending, delivered or failed."),
    limit: int = typer.Option(50, "--limit", min=1, max=1_000),
) -> None:
    """An endpoint's delivery log, newest first: attempts, the last answer, when it goes out again."""
    wire()
    from jobs.event_delivery import delivery_log
    from jobs.events import public_id
    from workers.db import get_session_factory

    if status is not None and status not in ("pending", "delivered", "failed"):
        fail("--status is pending, delivered or failed", code=2)
    with get_session_factory()() as session:
        rows = delivery_log(session, endpoint_id, status=status, limit=limit)
    if not rows:
        console.print(f"no deliveries{f' {status}' if status else ''} for endpoint {endpoint_id}")
        return
    table = Table()
    for column in ("delivery", "event", "type", "status", "attempts", "last answer", "next attempt (UTC)",
                   "delivered (UTC)"):  # fmt: skip
        table.add_column(column)
    for delivery, event in rows:
        answer = (
            f"HTTP {delivery.last_status_code} {delivery.last_response or ''}".strip()
            if delivery.last_status_code is not None
            else delivery.last_error or "—"
        )
        table.add_row(
            str(delivery.id),
            public_id(event.id),
            event.type,
            delivery.status,
            str(delivery.attempts),
            answer[:80],
            _when(delivery.next_attempt_at) if delivery.status == "pending" else "—",
            _when(delivery.delivered_at),
        )
    console.print(table)


@endpoints_app.command("redeliver")
def endpoints_redeliver(
    delivery_ids: list[int] = id_argument("Delivery ids (from `renova endpoints deliveries`)."),
    reason: str = typer.Option(..., "--reason", help=REASON_HELP),
    actor: str | None = typer.Option(None, help="Who (audit log; default: your login name)."),
) -> None:
    """Send deliveries again (failed ones, or delivered ones a receiver lost), in their turn."""
    wire()
    from jobs.clock import wall_clock
    from jobs.event_delivery import redeliver
    from workers.db import get_session_factory

    if not reason.strip():
        fail("--reason must say why", code=2)
    with get_session_factory()() as session:
        missing = [
            delivery_id
            for delivery_id in delivery_ids
            if redeliver(session, delivery_id, actor=actor_name(actor), reason=reason.strip(), now=wall_clock()) is None
        ]
        if missing:
            session.rollback()
            fail(f"no delivery {', '.join(map(str, missing))}; nothing was changed", code=2)
        session.commit()
    console.print(f"{len(delivery_ids)} deliveries will be sent again")
