"""Real PostgreSQL and Redis for the suite: embedded by default, or the servers named by
TEST_DATABASE_URL / TEST_REDIS_URL. The broker is built here, before any test imports `jobs`."""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
TEST_DATA_DIR = ROOT / ".renova" / "test"


def _claim_redis_database(stack_url: str) -> int:
    """A Redis database of the embedded server for this test process alone (test runs may overlap)."""
    import redis

    client = redis.Redis.from_url(stack_url)
    for number in range(1, 16):
        if client.set(f"renova-test-db:{number}", os.getpid(), nx=True, ex=3 * 3600):
            return number
        holder = client.get(f"renova-test-db:{number}")
        if holder and not _process_alive(int(holder)):
            client.set(f"renova-test-db:{number}", os.getpid(), ex=3 * 3600)
            return number
    raise RuntimeError("no free Redis database for the test run")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _test_urls() -> tuple[str, str]:
    database_url = os.environ.get("TEST_DATABASE_URL")
    redis_url = os.environ.get("TEST_REDIS_URL")
    if database_url and redis_url:
        return database_url, redis_url
    from workers.embedded import EmbeddedStack

    stack = EmbeddedStack(TEST_DATA_DIR)
    if not database_url:
        # One database per test process, so that overlapping runs never share tables.
        database_url = stack.postgres_url(f"renova_test_{os.getpid()}")
    if not redis_url:
        redis_url = stack.redis_url(db=_claim_redis_database(stack.redis_url(db=0)))
    return database_url, redis_url


_DATABASE_URL, _REDIS_URL = _test_urls()


def _start_mail_sink() -> str:
    """A real SMTP server in this process for the notices the flows send (no detached sink)."""
    import atexit
    import tempfile

    from workers.mail import MailSink

    sink = MailSink(Path(tempfile.mkdtemp(prefix="renova-test-mail-")))
    sink.start()
    atexit.register(sink.stop)
    return sink.url


os.environ.update(
    SMTP_URL=os.environ.get("TEST_SMTP_URL") or _start_mail_sink(),
    DATABASE_URL=_DATABASE_URL,
    REDIS_URL=_REDIS_URL,
    RENOVA_ENV="test",
    RENOVA_DATA_DIR=str(TEST_DATA_DIR),
)
os.environ.pop("SENTRY_DSN", None)

from sqlalchemy import text  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from workers.broker import broker as _broker  # noqa: E402 - must precede any import of actor modules
from workers.db import get_engine, get_session_factory, resolved_urls  # noqa: E402


def _reset_schema() -> None:
    from workers.migrate import upgrade

    with get_engine().begin() as connection:
        connection.execute(text("DROP SCHEMA public CASCADE"))
        connection.execute(text("CREATE SCHEMA public"))
    upgrade(resolved_urls()[0])


@pytest.fixture(scope="session")
def migrated_database() -> Iterator[str]:
    _reset_schema()
    yield resolved_urls()[0]
    if not os.environ.get("TEST_DATABASE_URL"):
        _drop_own_database()


def _drop_own_database() -> None:
    import psycopg

    from workers.db import reset

    url = resolved_urls()[0]
    reset()
    admin = url.replace("postgresql+psycopg://", "postgresql://").replace(f"/renova_test_{os.getpid()}?", "/postgres?")
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "renova_test_{os.getpid()}" WITH (FORCE)')


def _truncate_all() -> None:
    from models.base import Base

    tables = ", ".join(f'"{table.name}"' for table in Base.metadata.sorted_tables)
    with get_engine().begin() as connection:
        connection.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
        # Gateway idempotency keys derive from invoice ids and the sandbox gateway outlives a test:
        # start invoice ids somewhere new, so no test replays another test's stored responses.
        connection.execute(text(f"ALTER SEQUENCE invoices_id_seq RESTART WITH {secrets.randbelow(10**12) + 10**6}"))
        # The same for refunds (key `refund:{id}`).
        connection.execute(text(f"ALTER SEQUENCE refunds_id_seq RESTART WITH {secrets.randbelow(10**12) + 10**6}"))


def _reset_between(session: Session) -> None:
    """Start a scenario again within one test: empty tables, ids from 1."""
    session.rollback()
    session.expunge_all()
    _truncate_all()


@pytest.fixture
def clean_database(migrated_database: str) -> None:
    _truncate_all()


@pytest.fixture
def session(clean_database: None) -> Iterator[Session]:
    with get_session_factory()() as db_session:
        yield db_session


_CALL_REPORT = pytest.StashKey[pytest.TestReport]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[pytest.TestReport]:
    """Keep the call phase's report on the item, so that `ledger_checked` knows whether the test passed."""
    report = yield
    if report.when == "call":
        item.stash[_CALL_REPORT] = report
    return report


@pytest.fixture
def ledger_checked(request: pytest.FixtureRequest, session: Session) -> Iterator[None]:
    """After the test, `renova ledger check` on the committed state (a fresh session): any money kept
    or lost fails the test with the violations. A test that builds an inconsistent ledger on purpose
    opts out with `@pytest.mark.ledger_unchecked("why")`; a test that already failed is not checked
    (its scenario stopped halfway, so its ledger proves nothing)."""
    yield
    marker = request.node.get_closest_marker("ledger_unchecked")
    report = request.node.stash.get(_CALL_REPORT, None)
    if marker is not None or report is None or not report.passed:
        return
    from jobs.ledger_check import check_ledger

    with get_session_factory()() as fresh:
        violations = check_ledger(fresh)
    if violations:
        lines = [
            f"[{v.rule}] subscription {v.subscription_id}, invoice {v.invoice_id}: {v.message}" for v in violations
        ]
        pytest.fail("ledger check: money kept or lost\n" + "\n".join(lines), pytrace=False)


@pytest.fixture
def broker():
    _broker.flush_all()
    _broker.client.flushdb()
    for queue in list(_broker.get_declared_queues()):
        _broker.declare_queue(queue)
    return _broker


@pytest.fixture
def worker(broker, clean_database: None) -> Iterator[object]:
    import dramatiq

    running = dramatiq.Worker(broker, worker_threads=4, worker_timeout=100)
    running.start()
    yield running
    running.stop()
    # A Worker registers a middleware on the broker for its lifetime; drop it with the worker.
    broker.middleware[:] = [m for m in broker.middleware if getattr(m, "worker", None) is not running]


@pytest.fixture
def stack_dir() -> Iterator[Path]:
    """A folder for an embedded stack of the test's own, inside the project's `.renova`: the embedded
    PostgreSQL runs as its own system user when tests run as root, and pytest's `tmp_path` sits under
    a folder only the current user may enter (which any pytest run starting meanwhile resets)."""
    import shutil
    import uuid

    folder = TEST_DATA_DIR.parent / "test-stacks" / uuid.uuid4().hex[:12]
    folder.mkdir(parents=True)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def wait_until(predicate: Callable[[], object], timeout: float = 15.0, interval: float = 0.05) -> object:
    """Poll until `predicate()` is truthy; fail the test with the last value after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s (last value: {value!r})")
        time.sleep(interval)


@pytest.fixture
def billing_gateway(sandbox_gateway):
    """Point the runtime's gateway (what the jobs call) at the sandbox gateway process."""
    from jobs.context import runtime

    gateway = sandbox_gateway.client(connect_timeout=1.0, read_timeout=1.5)
    previous = runtime().gateway_factory
    runtime().gateway_factory = lambda: gateway
    yield gateway
    runtime().gateway_factory = previous
    gateway.close()


API_KEY = "test-api-key"


@pytest.fixture
def api_client(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """The API in process (`TestClient`), answering to `Bearer API_KEY`."""
    from fastapi.testclient import TestClient

    from workers.settings import get_settings

    monkeypatch.setenv("RENOVA_API_KEYS", API_KEY)
    get_settings.cache_clear()
    from workers.api import create_app

    with TestClient(create_app()) as client:
        client.headers["Authorization"] = f"Bearer {API_KEY}"
        yield client
    get_settings.cache_clear()


@contextlib.contextmanager
def serve_api(settings: object) -> Iterator[str]:
    """Renova's API with these settings on uvicorn on a free port (a real socket, for a gateway's
    webhooks); yields its base URL."""
    import threading

    import uvicorn

    from tests.integration.gateway_fixtures import free_port
    from workers.api import create_app
    from workers.settings import get_settings

    app = create_app()
    app.dependency_overrides[get_settings] = lambda: settings
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "API server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
