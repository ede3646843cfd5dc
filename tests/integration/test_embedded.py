"""The embedded stack: real servers, reused while running, stopped cleanly."""

from __future__ import annotations

import psycopg
import redis

from workers.embedded import EmbeddedStack


def test_start_reuse_and_stop(stack_dir):
    stack = EmbeddedStack(stack_dir / "data")
    try:
        database_url = stack.postgres_url("app")
        redis_url = stack.redis_url()
        assert stack.postgres_url("app") == database_url
        assert stack.redis_url() == redis_url

        client = redis.Redis.from_url(redis_url)
        client.set("k", "v")
        assert client.get("k") == b"v"
        plain = database_url.replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(plain) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == ("app",)
    finally:
        stack.stop()
    assert stack._running_redis_port() is None
    assert not (stack.postgres_dir / "postmaster.pid").exists()
