"""Every setting comes from the environment; a bad value stops the process with the setting's name."""

from __future__ import annotations

import ipaddress
import zoneinfo
from datetime import time
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

Environment = Literal["development", "test", "production"]
DEVELOPMENT_CONSOLE_SECRET = "development-only-console-secret"  # refused in production
# The sandbox gateway's publicly documented credentials: refused in production.
SANDBOX_API_KEY = "sk_sandbox"
SANDBOX_WEBHOOK_SECRET = "whsec_sandbox"
# The beneficiary printed on boletos in development and test; production must name the real one.
DEVELOPMENT_BENEFICIARY_CNPJ = "11.222.333/0001-81"


GatewayName = Literal["sandbox", "pagarme"]
PAGARME_JWKS_URL = "https://hubapi.pagar.me/.well-known/jwks.json"


class SettingsError(RuntimeError):
    """Raised at start when the environment holds an invalid setting."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=None, extra="ignore", case_sensitive=False)

    database_url: str | None = Field(None, alias="DATABASE_URL")
    redis_url: str | None = Field(None, alias="REDIS_URL")
    renova_env: Environment = Field("development", alias="RENOVA_ENV")
    data_dir: Path = Field(Path(".renova"), alias="RENOVA_DATA_DIR")

    billing_timezone: str = Field("America/Sao_Paulo", alias="BILLING_TIMEZONE")
    billing_run_at: time = Field(time(6, 0), alias="BILLING_RUN_AT")
    boleto_lead_days: int = Field(7, ge=1, le=60, alias="BOLETO_LEAD_DAYS")
    boleto_due_days: int = Field(3, ge=1, le=30, alias="BOLETO_DUE_DAYS")
    dunning_retry_days: Annotated[tuple[int, ...], NoDecode] = Field((1, 3, 5, 7), alias="DUNNING_RETRY_DAYS")
    boleto_grace_business_days: int = Field(3, ge=0, le=60, alias="BOLETO_GRACE_BUSINESS_DAYS")
    tick_interval_seconds: float = Field(60.0, gt=0, alias="TICK_INTERVAL_SECONDS")

    sentry_dsn: SecretStr | None = Field(None, alias="SENTRY_DSN")
    smtp_url: str | None = Field(None, alias="SMTP_URL")
    mail_from: str = Field("CONECTA Cobrança <cobranca@conecta.example>", alias="MAIL_FROM")
    # Who receives boleto payments, as every boleto's PDF prints it (FEBRABAN's "beneficiário").
    beneficiary_name: str = Field("CONECTA Tecnologia Ltda", min_length=1, max_length=80, alias="BENEFICIARY_NAME")
    beneficiary_cnpj: str = Field(DEVELOPMENT_BENEFICIARY_CNPJ, min_length=14, max_length=18, alias="BENEFICIARY_CNPJ")
    beneficiary_address: str = Field(
        "Av. Paulista, 1000 — São Paulo/SP — 01310-100", max_length=120, alias="BENEFICIARY_ADDRESS"
    )
    beneficiary_agency_code: str = Field("0001 / 1234567-8", max_length=30, alias="BENEFICIARY_AGENCY_CODE")
    beneficiary_wallet: str = Field("109", max_length=10, alias="BENEFICIARY_WALLET")

    # Which PSP Renova talks to: the sandbox (development, tests) or Pagar.me (API v5; GATEWAY_URL is
    # https://api.pagar.me/core/v5 in production, the emulator's /core/v5 in development).
    gateway: GatewayName = Field("sandbox", alias="GATEWAY")
    gateway_url: str = Field("http://127.0.0.1:8700", alias="GATEWAY_URL")
    gateway_api_key: SecretStr = Field(SecretStr(SANDBOX_API_KEY), alias="GATEWAY_API_KEY")
    gateway_webhook_secret: SecretStr = Field(SecretStr(SANDBOX_WEBHOOK_SECRET), alias="GATEWAY_WEBHOOK_SECRET")
    gateway_connect_timeout: float = Field(2.0, gt=0, alias="GATEWAY_CONNECT_TIMEOUT")
    gateway_read_timeout: float = Field(10.0, gt=0, alias="GATEWAY_READ_TIMEOUT")
    # Charges a worker process keeps at the gateway at once (over all its threads): at 200–800 ms per
    # answer, this, not the thread count, is what bounds a process's charging rate.
    gateway_max_in_flight: int = Field(128, ge=1, le=1000, alias="GATEWAY_MAX_IN_FLIGHT")
    # Pagar.me's webhooks: checked against the RS256 signature it sends (`X-Webhook-Asymmetric-Signature`,
    # keys published at this JWKS URL; empty: not checked) and/or the Basic credentials set on the
    # endpoint in Pagar.me's dashboard (empty user name: not checked). At least one must be on.
    pagarme_webhook_jwks_url: str = Field(PAGARME_JWKS_URL, alias="PAGARME_WEBHOOK_JWKS_URL")
    pagarme_webhook_username: str = Field("", alias="PAGARME_WEBHOOK_USERNAME")
    pagarme_webhook_password: SecretStr = Field(SecretStr(""), alias="PAGARME_WEBHOOK_PASSWORD")

    api_keys: Annotated[tuple[SecretStr, ...], NoDecode] = Field((), alias="RENOVA_API_KEYS")
    # Signs the console's session cookies; the default is for development and is refused in production.
    console_secret_key: SecretStr = Field(SecretStr(DEVELOPMENT_CONSOLE_SECRET), alias="CONSOLE_SECRET_KEY")
    web_host: str = Field("127.0.0.1", alias="WEB_HOST")
    web_port: int = Field(8000, ge=1, le=65535, alias="WEB_PORT")
    worker_processes: int = Field(2, ge=1, le=64, alias="WORKER_PROCESSES")
    worker_threads: int = Field(8, ge=1, le=256, alias="WORKER_THREADS")
    # How long an idle worker waits before asking Redis again: the most a message can wait on an idle
    # queue before a worker takes it. Dramatiq's 1 s would be most of a change request's latency; 100 ms
    # costs each idle queue of each process ten cheap Redis calls a second.
    worker_idle_poll_ms: int = Field(100, ge=10, le=60_000, alias="WORKER_IDLE_POLL_MS")
    # A worker process silent this long counts as dead: the messages it held go back to their queue.
    # Dramatiq's 60 s; shorter gets work back sooner after a crash, but a live worker whose every
    # thread is busy that long without touching Redis would have its messages handed out again.
    worker_heartbeat_timeout_ms: int = Field(60_000, ge=1_000, le=3_600_000, alias="WORKER_HEARTBEAT_TIMEOUT_MS")
    # Per million Redis commands of a queue, how many also return dead workers' messages of that queue
    # (Dramatiq's maintenance, which scans Redis's keys): Dramatiq's 1,000.
    # Events to the main application: the first wait before a failed delivery is tried again (then
    # × 4 each time, at most 12 h, for up to 3 days).
    event_retry_first_seconds: float = Field(5.0, ge=0.05, le=3_600, alias="EVENT_RETRY_FIRST_SECONDS")
    redis_maintenance_chance: int = Field(1_000, ge=0, le=1_000_000, alias="REDIS_MAINTENANCE_CHANCE")
    # Bearer token of `GET /metrics`. Unset: served openly in development and test, refused (404) in
    # production, where volumes and failures are not for everyone to read.
    metrics_token: SecretStr | None = Field(None, alias="METRICS_TOKEN")
    # Where each `renova worker` serves Dramatiq's own message metrics; off by default, so that
    # several workers on one host (and the tests) never fight for a port.
    worker_metrics_port: int | None = Field(None, ge=1, le=65535, alias="WORKER_METRICS_PORT")

    @field_validator("billing_timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r}") from exc
        return value

    @field_validator("dunning_retry_days", mode="before")
    @classmethod
    def _retry_days(cls, value: object) -> object:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("dunning_retry_days")
    @classmethod
    def _increasing(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or any(day < 1 for day in value) or list(value) != sorted(set(value)):
            raise ValueError("must be strictly increasing positive day offsets, e.g. 1,3,5,7")
        return value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _keys(cls, value: object) -> object:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("database_url", "redis_url", "smtp_url", "metrics_token", "worker_metrics_port", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @property
    def allows_future_dates(self) -> bool:
        """Running a business date after today is only for development and test."""
        return self.renova_env in ("development", "test")


def production_problems(settings: Settings) -> list[str]:
    """What would make this configuration unsafe in production, one line per setting: development
    defaults anyone can read in the README (the sandbox's key and webhook secret, with which anyone
    could sign a `boleto.paid`), no API key, and the embedded database, Redis or mail sink."""
    problems = gateway_problems(settings)
    if not settings.api_keys:
        problems.append("RENOVA_API_KEYS is empty: the main application could not call the API")
    if settings.console_secret_key.get_secret_value() in ("", DEVELOPMENT_CONSOLE_SECRET):
        problems.append("CONSOLE_SECRET_KEY is unset or the development one (it signs the console's sessions)")
    if settings.database_url is None:
        problems.append("DATABASE_URL is unset: the embedded PostgreSQL is for development and test")
    if settings.redis_url is None:
        problems.append("REDIS_URL is unset: the embedded Redis is for development and test")
    if settings.smtp_url is None:
        problems.append("SMTP_URL is unset: notices would go to the local mail folder")
    if settings.beneficiary_cnpj == DEVELOPMENT_BENEFICIARY_CNPJ:
        problems.append("BENEFICIARY_CNPJ is the development one: boletos would name the wrong beneficiary")
    return problems


def gateway_problems(settings: Settings) -> list[str]:
    """What keeps the gateway settings from taking real money safely (see production_problems)."""
    problems = []
    api_key = settings.gateway_api_key.get_secret_value()
    if settings.gateway == "sandbox":
        if settings.gateway_webhook_secret.get_secret_value() in ("", SANDBOX_WEBHOOK_SECRET):
            problems.append("GATEWAY_WEBHOOK_SECRET is unset or the sandbox's: anyone could sign gateway webhooks")
        if api_key in ("", SANDBOX_API_KEY):
            problems.append("GATEWAY_API_KEY is unset or the sandbox's")
        return problems
    if not api_key.startswith("sk_") or api_key.startswith("sk_test_"):
        problems.append("GATEWAY_API_KEY is not a Pagar.me production secret key (sk_…, not sk_test_…)")
    url = urlsplit(settings.gateway_url)
    if url.scheme != "https" or _is_local(url.hostname or ""):
        problems.append(
            f"GATEWAY_URL {settings.gateway_url!r} is not Pagar.me's (https://api.pagar.me/core/v5): "
            "the emulator takes no money"
        )
    jwks = settings.pagarme_webhook_jwks_url
    if jwks and (urlsplit(jwks).scheme != "https" or _is_local(urlsplit(jwks).hostname or "")):
        problems.append(f"PAGARME_WEBHOOK_JWKS_URL {jwks!r} is not an https address of Pagar.me's")
    if not jwks and not settings.pagarme_webhook_username:
        problems.append(
            "Pagar.me webhooks would be unauthenticated: set PAGARME_WEBHOOK_JWKS_URL or the Basic credentials"
        )
    if settings.pagarme_webhook_username and not settings.pagarme_webhook_password.get_secret_value():
        problems.append("PAGARME_WEBHOOK_PASSWORD is empty")
    return problems


def _is_local(host: str) -> bool:
    if host in ("localhost", "") or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_private or address.is_unspecified


def refuse_unsafe_production(settings: Settings) -> None:
    """In production, SettingsError naming every unsafe setting; elsewhere nothing."""
    if settings.renova_env == "production" and (problems := production_problems(settings)):
        raise SettingsError("refused in production — " + "; ".join(problems))


def load_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = error["loc"][0] if error["loc"] else "?"
            alias = Settings.model_fields[field].alias if field in Settings.model_fields else field
            problems.append(f"{alias}: {error['msg']}")
        raise SettingsError("invalid configuration — " + "; ".join(problems)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()
