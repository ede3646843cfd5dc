"""The sandbox payment gateway: a real HTTP server that behaves like a careful PSP.

Used in development, tests, the demo and benchmarks. State lives in SQLite (WAL) under the data
folder, so a killed and restarted sandbox still knows every charge, replays stored idempotent
responses and resumes pending webhook deliveries.

The HTTP API and its conventions are described in `gateways.sandbox.app`. Modules: `models`
(limits, test cards, configuration, request bodies, errors), `schema` (tables, migration, row
shapes), `store` (SQLite state), `webhooks` (event outbox and delivery), `app` (routes and faults),
`server` (`serve`).
"""

from gateways.sandbox.schema import LEDGER_TABLE, SCHEMA
from gateways.sandbox.server import serve
from gateways.sandbox.store import STATE_FILE

__all__ = ["LEDGER_TABLE", "SCHEMA", "STATE_FILE", "serve"]
