"""Start the embedded test stack (PostgreSQL and Redis under `.renova/test`) once, before `make test`'s
parallel test processes share it: several processes starting it at the same moment would race."""

from __future__ import annotations

import os
from pathlib import Path

from workers.embedded import EmbeddedStack

TEST_DATA_DIR = Path(__file__).resolve().parent.parent / ".renova" / "test"

if __name__ == "__main__":
    stack = EmbeddedStack(TEST_DATA_DIR)
    if not os.environ.get("TEST_DATABASE_URL"):
        stack.postgres_url()
    if not os.environ.get("TEST_REDIS_URL"):
        stack.redis_url()
