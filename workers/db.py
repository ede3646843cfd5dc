"""Engine and sessions: one engine per process, built from the resolved database URL."""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache

from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from workers.settings import Settings, get_settings


def sqlalchemy_url(url: str) -> str:
    """Accept `postgresql://` and `postgres://` URLs, and drive them with psycopg 3."""
    parsed = make_url(url.replace("postgres://", "postgresql://", 1) if url.startswith("postgres://") else url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


@lru_cache(maxsize=1)
def resolved_urls() -> tuple[str, str]:
    """(database URL, Redis URL): from the settings, or from the embedded stack when unset."""
    settings = get_settings()
    if settings.database_url and settings.redis_url:
        return sqlalchemy_url(settings.database_url), settings.redis_url
    from workers.embedded import resolve_urls

    database, redis_url = resolve_urls(settings.database_url, settings.redis_url, settings.data_dir)
    return sqlalchemy_url(database), redis_url


def build_engine(url: str, settings: Settings | None = None) -> Engine:
    settings = settings or get_settings()
    return create_engine(
        url,
        pool_size=max(5, settings.worker_threads + 2),
        max_overflow=10,
        pool_pre_ping=True,
        connect_args={"application_name": "renova"},
    )


@lru_cache(maxsize=1)
def get_engine() -> Engine:
    return build_engine(resolved_urls()[0])


@lru_cache(maxsize=1)
def get_session_factory() -> sessionmaker[Session]:
    return sessionmaker(get_engine(), expire_on_commit=False)


def get_session() -> Iterator[Session]:
    """One session per HTTP request (a FastAPI dependency of the API and the console)."""
    with get_session_factory()() as session:
        yield session


def reset() -> None:
    """Forget cached engine and URLs (tests and the CLI after changing the environment)."""
    if get_engine.cache_info().currsize:
        get_engine().dispose()
    get_engine.cache_clear()
    get_session_factory.cache_clear()
    resolved_urls.cache_clear()
