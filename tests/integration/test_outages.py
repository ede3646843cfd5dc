"""Renova's processes outlive PostgreSQL and Redis: the API answers 503 with the error envelope while
the database is out of reach, and `/healthz` says what is down (the scheduler: tests/integration/test_cli.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from tests.integration.gateway_fixtures import free_port
from workers.db import get_session
from workers.settings import get_settings

API_KEY = "outage-key"


@pytest.fixture
def client_without_database(monkeypatch: pytest.MonkeyPatch, migrated_database: str) -> Iterator[TestClient]:
    monkeypatch.setenv("RENOVA_API_KEYS", API_KEY)
    get_settings.cache_clear()
    from workers.api import create_app

    app = create_app()
    nowhere = create_engine(
        f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/renova", connect_args={"connect_timeout": 2}
    )

    def unreachable_session() -> Iterator[Session]:
        with Session(nowhere) as session:
            yield session

    app.dependency_overrides[get_session] = unreachable_session
    try:
        with TestClient(app, raise_server_exceptions=False) as test_client:
            test_client.headers["Authorization"] = f"Bearer {API_KEY}"
            yield test_client
    finally:
        nowhere.dispose()
        get_settings.cache_clear()


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/v1/subscriptions/1", None),
        ("GET", "/v1/change-requests/1", None),
        ("PUT", "/v1/organizations/1", {"name": "Padaria", "members": []}),
    ],
)
def test_the_api_answers_503_while_the_database_is_down(client_without_database, method, path, body) -> None:
    response = client_without_database.request(method, path, json=body)
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "unavailable"
    assert response.headers["Retry-After"] == "5"


def test_healthz_says_what_is_down(client_without_database) -> None:
    response = client_without_database.get("/healthz")
    assert response.status_code == 200  # the process is alive: restarting it would not help
    answer = response.json()
    assert (answer["status"], answer["database"], answer["redis"]) == ("degraded", "down", "up")


def test_healthz_says_all_is_up(migrated_database) -> None:
    get_settings.cache_clear()
    from workers.api import create_app

    with TestClient(create_app()) as client:
        answer = client.get("/healthz").json()
    assert (answer["status"], answer["database"], answer["redis"]) == ("ok", "up", "up")


def test_the_console_shows_a_page_while_the_database_is_down(client_without_database) -> None:
    client_without_database.headers.pop("Authorization")
    response = client_without_database.post(
        "/console/login", data={"email": "ops@renova.example", "password": "qualquer-senha"}, follow_redirects=False
    )
    assert response.status_code == 503
    assert response.headers["content-type"].startswith("text/html")
    assert response.headers["Retry-After"] == "5"
    assert "Serviço temporariamente indisponível" in response.text
    assert "Nada foi alterado" in response.text
