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
