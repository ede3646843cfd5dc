"""Checks that stop a process at start (worker, web, scheduler) before it does any work."""

from __future__ import annotations

from sqlalchemy.orm import Session

from workers.settings import Settings, SettingsError, get_settings


def refuse_test_clock_in_production(session: Session, settings: Settings | None = None) -> None:
    """A test clock set in production is an error: production always uses the real clock, so the
    row would be silently ignored while someone believes time is frozen."""
    from jobs.clock import ClockRefused, ensure_clock_allowed
    from workers.broker import billing_config

    try:
        ensure_clock_allowed(session, billing_config(settings or get_settings()))
    except ClockRefused as exc:
        raise SettingsError(str(exc)) from None
