from __future__ import annotations

from datetime import time

import pytest

from workers.settings import SettingsError, load_settings


@pytest.fixture
def env(monkeypatch):
    for name in (
        "DUNNING_RETRY_DAYS",
        "BILLING_RUN_AT",
        "BILLING_TIMEZONE",
        "BOLETO_LEAD_DAYS",
        "RENOVA_ENV",
        "GATEWAY_MAX_IN_FLIGHT",
    ):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_defaults(env):
    settings = load_settings()
    assert settings.dunning_retry_days == (1, 3, 5, 7)
    assert settings.billing_run_at == time(6, 0)
    assert settings.billing_timezone == "America/Sao_Paulo"
    assert settings.boleto_lead_days == 7
    assert settings.boleto_grace_business_days == 3
    assert settings.gateway_max_in_flight == 128
    assert settings.worker_idle_poll_ms == 100


def test_values_from_the_environment(env):
    env.setenv("DUNNING_RETRY_DAYS", "2, 4")
    env.setenv("BILLING_RUN_AT", "07:30")
    env.setenv("RENOVA_API_KEYS", "k1,k2")
    env.setenv("GATEWAY_MAX_IN_FLIGHT", "200")
    settings = load_settings()
    assert settings.gateway_max_in_flight == 200
    assert settings.dunning_retry_days == (2, 4)
    assert settings.billing_run_at == time(7, 30)
    assert [key.get_secret_value() for key in settings.api_keys] == ["k1", "k2"]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("BILLING_TIMEZONE", "Mars/Olympus"),
        ("BILLING_RUN_AT", "25:99"),
        ("DUNNING_RETRY_DAYS", "3,1"),
        ("DUNNING_RETRY_DAYS", "one"),
        ("BOLETO_LEAD_DAYS", "-1"),
        ("RENOVA_ENV", "staging"),
        ("GATEWAY_MAX_IN_FLIGHT", "0"),
        ("GATEWAY_MAX_IN_FLIGHT", "1001"),
    ],
)
def test_a_bad_value_names_the_setting(env, name, value):
    env.setenv(name, value)
    with pytest.raises(SettingsError) as error:
        load_settings()
    assert name in str(error.value)
