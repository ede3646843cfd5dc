"""The benchmark's own stack: an embedded PostgreSQL, Redis and mail sink under `.renova/bench`, and
real processes started and stopped per scenario: the sandbox gateway (`renova gateway`), the Dramatiq
workers and `renova web`. Logs go to `.renova/bench/logs`."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis

from workers.queues import QUEUES

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = ROOT / ".renova" / "bench"
GATEWAY_API_KEY = "sk_sandbox"
# An idle worker asks Redis again after this long (`WORKER_IDLE_POLL_MS`; the demo uses the same):
# the runs are measured to the last row, so a second of idle polling would be measured too.
IDLE_POLL_MS = 50
# The Procfile's `changes` worker: change requests never wait behind a renewal backlog.
CHANGES_THREADS = 4


class BenchError(RuntimeError):
    """A process did not start or exited early (the message says which log to read)."""


@dataclass
class BenchStack:
    processes: int
    threads: int
    root: Path = DATA_DIR
    env: dict[str, str] = field(default_factory=dict)
    api_key: str = ""
    gateway_url: str = ""
    web_url: str = ""
    _running: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    _gateway_runs: int = 0

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def redis_url(self) -> str:
        return self.env["REDIS_URL"]

    def start(self) -> BenchStack:
        """The embedded servers (reused when already running) and this process's environment: the
        benchmark itself imports the broker and the database code, so it must see the same URLs."""
        from workers.embedded import EmbeddedStack, free_port
        from workers.mail import ensure_mail_sink

        shutil.rmtree(self.logs, ignore_errors=True)
        self.logs.mkdir(parents=True)
        stack = EmbeddedStack(self.root)
        self.api_key = f"bench_{secrets.token_hex(8)}"
        self.gateway_url = f"http://127.0.0.1:{free_port()}"
        web_port = free_port()
        self.web_url = f"http://127.0.0.1:{web_port}"
        self.env = {
            "DATABASE_URL": stack.postgres_url(),
            "REDIS_URL": stack.redis_url(),
            "SMTP_URL": ensure_mail_sink(self.root),
            "RENOVA_ENV": "test",
            "RENOVA_DATA_DIR": str(self.root),
            "RENOVA_API_KEYS": self.api_key,
            "GATEWAY_URL": self.gateway_url,
            "GATEWAY_API_KEY": GATEWAY_API_KEY,
            "WEB_HOST": "127.0.0.1",
            "WEB_PORT": str(web_port),
            "WORKER_PROCESSES": str(self.processes),
            "WORKER_THREADS": str(self.threads),
            "WORKER_IDLE_POLL_MS": str(IDLE_POLL_MS),
            "SENTRY_DSN": "",
        }
        os.environ.update(self.env)
        return self

    def stop(self) -> None:
        from workers.embedded import EmbeddedStack
        from workers.mail import stop_mail_sink

        for name in list(self._running):
            self._stop(name)
        stop_mail_sink(self.root)
        EmbeddedStack(self.root).stop()

    # --- processes ---------------------------------------------------------------------------

    def _spawn(self, name: str, args: list[str], extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        self._stop(name)
        log = (self.logs / f"{name}.log").open("ab")
        # Its own process group, so that stopping it takes a worker's child processes along.
        process = subprocess.Popen(
            [sys.executable, *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env, **(extra_env or {})},
            cwd=ROOT,
            start_new_session=True,
        )
        self._running[name] = process
        return process

    def _stop(self, name: str) -> None:
        process = self._running.pop(name, None)
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def _check_alive(self, name: str) -> None:
        process = self._running[name]
        if process.poll() is not None:
            raise BenchError(f"{name} exited with {process.returncode}; see {self.logs / (name + '.log')}")

    def _wait_http(self, name: str, url: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive(name)
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=1.0).status_code == 200:
                    return
            time.sleep(0.1)
        raise BenchError(f"{name} did not answer {url} within {timeout:.0f} s; see {self.logs / (name + '.log')}")

    def start_gateway(self, latency_ms: int = 0) -> None:
        """A fresh sandbox (empty ledger) on the same port, with `latency_ms` added to every request."""
        self._gateway_runs += 1
        data = self.root / "gateway"
        shutil.rmtree(data, ignore_errors=True)
        port = self.gateway_url.rsplit(":", 1)[1]
        self._spawn(
            "gateway",
            ["-m", "workers.cli", "gateway", "--host", "127.0.0.1", "--port", port, "--latency-ms", str(latency_ms),
             "--data-dir", str(data), "--webhook-url", ""],
        )  # fmt: skip
        self._wait_http("gateway", f"{self.gateway_url}/healthz")

    def start_web(self) -> None:
        self._spawn("web", ["-m", "workers.cli", "web"])
        self._wait_http("web", f"{self.web_url}/healthz")

    def stop_web(self) -> None:
        self._stop("web")

    def start_workers(self) -> None:
        """The Procfile's workers, with `renova worker`'s command (`dramatiq workers.broker`, same idle
        poll): `worker` (every queue but `changes`, `processes` × `threads`, plus bench.actors for the
        floor's no-op actor: one setup for the floor and for the runs) and `changes` (1 × 4). Redis is
        flushed first, so that no message or heartbeat of an earlier scenario is left."""
        self.stop_workers()
        redis.Redis.from_url(self.redis_url).flushdb()
        environment = {"dramatiq_worker_timeout": str(IDLE_POLL_MS)}
        self._spawn(
            "worker",
            ["-m", "dramatiq", "workers.broker", "bench.actors",
             "--processes", str(self.processes), "--threads", str(self.threads),
             "--queues", *(queue for queue in QUEUES if queue != "changes")],
            environment,
        )  # fmt: skip
        self._spawn(
            "changes",
            ["-m", "dramatiq", "workers.broker", "--processes", "1", "--threads", str(CHANGES_THREADS),
             "--queues", "changes"],
            environment,
        )  # fmt: skip
        client = redis.Redis.from_url(self.redis_url)
        deadline = time.monotonic() + 60
        while client.zcard("dramatiq:__heartbeats__") < self.processes + 1:
            self._check_alive("worker")
            self._check_alive("changes")
            if time.monotonic() > deadline:
                raise BenchError(f"the workers did not start; see {self.logs / 'worker.log'}")
            time.sleep(0.1)

    def stop_workers(self) -> None:
        self._stop("worker")
        self._stop("changes")

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time used so far by each part of the stack (a live process's, and its reaped children's):
        where a measured run's CPU went, on machines where every part shares the same cores."""
        used = {name: tree_cpu_seconds(process.pid) for name, process in self._running.items()}
        postmaster = self.root / "postgres" / "postmaster.pid"
        with contextlib.suppress(OSError, ValueError):
            used["postgres"] = tree_cpu_seconds(int(postmaster.read_text().split()[0]))
        sink = self.root / "smtp" / "pid"
        with contextlib.suppress(OSError, ValueError):
            used["mail sink"] = tree_cpu_seconds(int(sink.read_text()))
        used["benchmark"] = _cpu_seconds(os.getpid(), reaped=False)
        return used

    def worker_peak_rss_mb(self) -> list[float]:
        """Peak resident memory (VmHWM) of each worker process: the children of Dramatiq's main processes."""
        peaks = []
        pids = [
            child
            for name in ("worker", "changes")
            if name in self._running
            for child in _descendants(self._running[name].pid)
        ]
        for pid in pids:
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peaks.append(int(line.split()[1]) / 1024)
        return peaks


_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int, *, reaped: bool) -> float:
    """CPU time of a process (user + system), with that of its children it has waited for when `reaped`."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    utime, stime, cutime, cstime = (int(value) for value in fields[11:15])
    return (utime + stime + (cutime + cstime if reaped else 0)) / _TICKS


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of a process and everything under it, ended children included (once reaped)."""
    return _cpu_seconds(pid, reaped=True) + sum(_cpu_seconds(child, reaped=True) for child in _descendants(pid))


def _descendants(pid: int) -> list[int]:
    found: list[int] = []
    pending = [pid]
    while pending:
        parent = pending.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            with contextlib.suppress(OSError):
                children = [int(child) for child in Path(f"/proc/{parent}/task/{task}/children").read_text().split()]
                found.extend(children)
                pending.extend(children)
    return found
