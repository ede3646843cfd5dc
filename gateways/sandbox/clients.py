"""Talking to a running sandbox in either flavor: where its PSP API lives, the adapter that speaks it,
and where its webhooks go and are verified — one place, for the demo, `renova simulate` and the tests."""

from __future__ import annotations

from typing import Any

from gateways.http import HttpGateway
from gateways.sandbox.models import Flavor
from gateways.sandbox.pagarme import PREFIX as PAGARME_PREFIX


def api_url(flavor: Flavor, base_url: str) -> str:
    """The adapter's base URL (GATEWAY_URL) for a sandbox serving at `base_url`."""
    return base_url.rstrip("/") + (PAGARME_PREFIX if flavor == "pagarme" else "")


def webhook_path(flavor: Flavor) -> str:
    """Renova's route for this flavor's webhooks."""
    return "/v1/webhooks/pagarme" if flavor == "pagarme" else "/v1/webhooks/gateway"


def jwks_url(base_url: str) -> str:
    """Where the pagarme flavor publishes its webhooks' signing key (PAGARME_WEBHOOK_JWKS_URL)."""
    return base_url.rstrip("/") + "/.well-known/jwks.json"


def connect(flavor: Flavor, base_url: str, api_key: str, **options: Any) -> HttpGateway:
    """The adapter for a sandbox of this flavor: `HttpGateway` or `PagarmeGateway` (same options)."""
    if flavor == "pagarme":
        from gateways.pagarme import PagarmeGateway

        return PagarmeGateway(api_url(flavor, base_url), api_key, **options)
    return HttpGateway(base_url, api_key, **options)
