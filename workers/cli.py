"""The `renova` command line: one entry point for every process and for operators."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(no_args_is_help=True, help="Renova — subscription billing workers for CONECTA.")


@app.command()
def gateway(
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8700, help="Port to listen on."),
    latency_ms: int = typer.Option(0, help="Added latency for every request, in milliseconds."),
    timeout_rate: float = typer.Option(0.0, help="Share of charges that succeed but answer too late (0–1)."),
    unavailable_rate: float = typer.Option(0.0, help="Share of requests refused with 503, not processed (0–1)."),
    data_dir: Path = typer.Option(Path(".renova/gateway"), help="Folder for the sandbox's SQLite state."),
    webhook_url: str = typer.Option(
        "http://127.0.0.1:8000/v1/webhooks/gateway", help="Where boleto paid/expired webhooks are posted."
    ),
    webhook_secret: str = typer.Option(
        "whsec_sandbox", envvar="GATEWAY_WEBHOOK_SECRET", help="HMAC secret for webhook signatures."
    ),
    api_key: str = typer.Option("sk_sandbox", envvar="GATEWAY_API_KEY", help="API key clients must send."),
) -> None:
    """Run the sandbox payment gateway (development, tests, demo, benchmarks)."""
    from gateways.sandbox import serve

    serve(
        host=host,
        port=port,
        latency_ms=latency_ms,
        timeout_rate=timeout_rate,
        unavailable_rate=unavailable_rate,
        data_dir=data_dir,
        webhook_url=webhook_url,
        webhook_secret=webhook_secret,
        api_key=api_key,
    )


if __name__ == "__main__":
    app()
