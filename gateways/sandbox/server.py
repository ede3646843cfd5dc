"""Running the sandbox: `serve` (what `renova gateway` calls) on uvicorn."""

from __future__ import annotations

import threading
from pathlib import Path
from types import FrameType

import uvicorn

from gateways.sandbox.app import create_app
from gateways.sandbox.models import (
    DEFAULT_STALL_MS,
    DEFAULT_WEBHOOK_MAX_ATTEMPTS,
    FLAVORS,
    Flavor,
    SandboxConfig,
)


def serve(
    *,
    host: str = "127.0.0.1",
    port: int = 8700,
    latency_ms: int = 0,
    timeout_rate: float = 0.0,
    unavailable_rate: float = 0.0,
    data_dir: Path | str = Path(".renova/gateway"),
    webhook_url: str = "",
    webhook_secret: str = "whsec_sandbox",
    api_key: str = "sk_sandbox",
    stall_ms: int = DEFAULT_STALL_MS,
    webhook_max_attempts: int = DEFAULT_WEBHOOK_MAX_ATTEMPTS,
    webhook_retry_base_s: float = 1.0,
    flavor: Flavor = "sandbox",
    webhook_username: str = "",
    webhook_password: str = "",
) -> None:
    """Run the sandbox until SIGINT/SIGTERM (uvicorn stops gracefully on both)."""
    if latency_ms < 0 or stall_ms < 0:
        raise ValueError("latency_ms and stall_ms must not be negative")
    if not (0 <= timeout_rate <= 1 and 0 <= unavailable_rate <= 1):
        raise ValueError("timeout_rate and unavailable_rate must be between 0 and 1")
    if not api_key or not webhook_secret:
        raise ValueError("api_key and webhook_secret must not be empty")
    if flavor not in FLAVORS:
        raise ValueError(f"flavor must be one of {', '.join(FLAVORS)}")
    config = SandboxConfig(
        api_key=api_key,
        webhook_secret=webhook_secret,
        webhook_url=webhook_url,
        latency_ms=latency_ms,
        timeout_rate=timeout_rate,
        unavailable_rate=unavailable_rate,
        stall_ms=stall_ms,
        webhook_max_attempts=webhook_max_attempts,
        webhook_retry_base_s=webhook_retry_base_s,
        flavor=flavor,
        webhook_username=webhook_username,
        webhook_password=webhook_password,
    )
    stopping = threading.Event()
    app = create_app(config, Path(data_dir), stopping)
    server = _Server(
        stopping,
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="warning",
            # Longer than clients keep idle connections, so the server never closes one under them.
            timeout_keep_alive=30,
            timeout_graceful_shutdown=5,
        ),
    )
    server.run()


class _Server(uvicorn.Server):
    """uvicorn's server, telling the app when a shutdown signal arrives (uvicorn only tells it after
    every in-flight request has finished, which a stalled response would delay)."""

    def __init__(self, stopping: threading.Event, config: uvicorn.Config) -> None:
        super().__init__(config)
        self._stopping = stopping

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._stopping.set()
        super().handle_exit(sig, frame)
