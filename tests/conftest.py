"""Shared by both suites: `unit/` needs no server; `integration/` starts (or uses) real PostgreSQL,
Redis and an SMTP sink in its own conftest. The sandbox gateway's and the console's fixtures are declared here because
pytest takes plugins only from the root conftest; they start nothing until a test asks for them."""

pytest_plugins = ["tests.integration.gateway_fixtures", "tests.integration.console_fixtures"]
