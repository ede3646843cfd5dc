"""What leaves the process for Sentry: message arguments (card tokens, e-mails) are scrubbed."""

from __future__ import annotations

from workers.observability import SCRUBBED, scrub_event


def test_message_arguments_are_scrubbed_and_the_rest_kept():
    event = {
        "contexts": {
            "dramatiq": {
                "type": "dramatiq",
                "data": {
                    "actor_name": "submit_change_request",
                    "message_id": "m-1",
                    "args": [{"kind": "card", "token": "tok_secret", "last4": "4242"}],
                    "kwargs": {"email": "dona@acme.example"},
                },
            }
        },
        "message": "boom",
    }
    scrubbed = scrub_event(event, {})
    data = scrubbed["contexts"]["dramatiq"]["data"]
    assert data["args"] == SCRUBBED and data["kwargs"] == SCRUBBED
    assert data["actor_name"] == "submit_change_request" and data["message_id"] == "m-1"
    assert "tok_secret" not in repr(scrubbed)


def test_a_failed_message_is_logged_by_actor_and_id_never_by_its_arguments(broker) -> None:
    import io
    import logging

    import dramatiq

    from tests.integration.conftest import wait_until
    from workers.observability import install_log_filters

    @dramatiq.actor(queue_name="billing", max_retries=0)
    def leaky(payload: dict) -> None:
        raise RuntimeError("boom")

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    install_log_filters()
    worker = dramatiq.Worker(broker, worker_threads=1, worker_timeout=100)
    worker.start()
    try:
        message = leaky.send({"token": "4012888888881881", "email": "dona@acme.example"})
        wait_until(lambda: "Failed to process message" in stream.getvalue())
    finally:
        worker.stop()
        root.removeHandler(handler)
    logged = stream.getvalue()
    assert f"leaky[{message.message_id}]" in logged
    assert "4012888888881881" not in logged and "dona@acme.example" not in logged


def test_sentry_events_carry_no_local_variables() -> None:
    import sentry_sdk
    from pydantic import SecretStr

    from workers.broker import init_sentry
    from workers.settings import load_settings

    settings = load_settings().model_copy(update={"sentry_dsn": SecretStr("https://public@sentry.invalid/1")})
    init_sentry(settings)
    try:
        options = sentry_sdk.get_client().options
        assert options["include_local_variables"] is False
        assert options["send_default_pii"] is False
        assert options["before_send"] is scrub_event
    finally:
        sentry_sdk.init()  # no DSN: reporting off again


def test_a_card_number_in_any_log_line_is_masked() -> None:
    import logging

    from workers.observability import PersonalDataFilter

    record = logging.LogRecord("jobs", logging.WARNING, __file__, 1, "refused %s for %r", ("4012888888881881", 7), None)
    assert PersonalDataFilter().filter(record)
    assert record.getMessage() == "refused [redacted] for 7"


def test_personal_data_in_a_log_line_is_masked_and_the_rest_kept() -> None:
    from workers.observability import mask_personal_data

    line = (
        "recipient ana.maria+cobranca@acme.example refused; CNPJ 11.222.333/0001-81, CPF 52998224725, "
        "card 4012 8888 8888 1881; invoice 12345, charge 98765432101 (not a CPF)"
    )
    assert mask_personal_data(line) == (
        "recipient [e-mail] refused; CNPJ [documento], CPF [documento], "
        "card [redacted]; invoice 12345, charge 98765432101 (not a CPF)"
    )


def test_dead_letter_arguments_hide_tokens_e_mails_documents_and_card_numbers() -> None:
    from workers.dead_letters import _masked

    arguments = [
        {"token": "tok_1", "email": "a@b.example", "brand": "4012888888881881", "note": "pan 4012 8888 8888 1881"}
    ]
    assert _masked(arguments) == [{"token": "***", "email": "***", "brand": "[redacted]", "note": "pan [redacted]"}]
