"""The demo's processes: PostgreSQL, Redis and the mail sink under `<data dir>/demo`, the sandbox
gateway, `renova web`, `renova worker` and `renova scheduler`, each a real process with its log in
`<data dir>/demo/logs`. Started fresh, stopped together (or left running with `--keep` and stopped by
`renova demo --stop`)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis

from gateways.sandbox import clients
from workers.embedded import EmbeddedStack, free_port
from workers.mail import ensure_mail_sink, mail_dir, stop_mail_sink
from workers.queues import NAMESPACE
from workers.settings import get_settings

PROCESSES_FILE = "processes.json"
READ_TIMEOUT_SECONDS = 1.5
TICK_INTERVAL_SECONDS = 0.25
# Each step of the demo waits for the workers: an idle queue is polled every 50 ms, not every second.
IDLE_POLL_MS = 50


class DemoError(RuntimeError):
    """A process did not start, or a step did not finish in time (the message says where to look)."""


def demo_dir(data_dir: Path) -> Path:
    return Path(data_dir).resolve() / "demo"


@dataclass
class DemoStack:
    root: Path
    env: dict[str, str] = field(default_factory=dict)
    web_url: str = ""
    gateway_url: str = ""
    api_key: str = ""
    gateway_api_key: str = ""
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    # Settings added to (or overriding) the demo's own, for every process.
    extra_env: dict[str, str] = field(default_factory=dict)
    commands: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def mail(self) -> Path:
        return mail_dir(self.root)

    def start(self, say: Callable[[str], object] = print) -> DemoStack:
        """A fresh stack: whatever an earlier demo left in `root` is stopped and removed first."""
        stop_leftovers(self.root)
        shutil.rmtree(self.root, ignore_errors=True)
        self.logs.mkdir(parents=True)
        say("starting the embedded PostgreSQL, Redis and mail sink")
        stack = EmbeddedStack(self.root)
        database_url, redis_url = stack.postgres_url(), stack.redis_url()
        smtp_url = ensure_mail_sink(self.root)
        web_port, gateway_port = free_port(), free_port()
        self.web_url = f"http://127.0.0.1:{web_port}"
        self.gateway_url = f"http://127.0.0.1:{gateway_port}"
        self.api_key = f"demo_{secrets.token_hex(8)}"
        self.gateway_api_key = f"sk_demo_{secrets.token_hex(8)}"
        webhook_secret = f"whsec_demo_{secrets.token_hex(8)}"
        # GATEWAY (the caller's) picks the sandbox's flavor: its own API or Pagar.me's.
        flavor = self.extra_env.get("GATEWAY") or get_settings().gateway
        self.env = {
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "SMTP_URL": smtp_url,
            "RENOVA_ENV": "development",
            "RENOVA_DATA_DIR": str(self.root),
            "RENOVA_API_KEYS": self.api_key,
            "GATEWAY": flavor,
            "GATEWAY_URL": clients.api_url(flavor, self.gateway_url),
            "GATEWAY_API_KEY": self.gateway_api_key,
            "GATEWAY_WEBHOOK_SECRET": webhook_secret,
            "PAGARME_WEBHOOK_JWKS_URL": clients.jwks_url(self.gateway_url),
            "PAGARME_WEBHOOK_USERNAME": f"pagarme_{secrets.token_hex(4)}",
            "PAGARME_WEBHOOK_PASSWORD": secrets.token_hex(16),
            "GATEWAY_READ_TIMEOUT": str(READ_TIMEOUT_SECONDS),
            "WEB_HOST": "127.0.0.1",
            "WEB_PORT": str(web_port),
            "TICK_INTERVAL_SECONDS": str(TICK_INTERVAL_SECONDS),
            "WORKER_PROCESSES": "1",
            "WORKER_THREADS": "8",
            "WORKER_IDLE_POLL_MS": str(IDLE_POLL_MS),
            "SENTRY_DSN": "",
            **self.extra_env,
        }
        from workers.migrate import upgrade

        upgrade(database_url)
        say("starting the sandbox gateway, renova web and renova worker")
        self._spawn(
            "gateway",
            "gateway", "--host", "127.0.0.1", "--port", str(gateway_port),
            "--data-dir", str(self.root / "gateway"), "--flavor", flavor,
            "--webhook-url", f"{self.web_url}{clients.webhook_path(flavor)}",
        )  # fmt: skip
        self._spawn("web", "web")
        self._spawn("worker", "worker")
        self._wait_http("gateway", f"{self.gateway_url}/healthz")
        self._wait_http("web", f"{self.web_url}/healthz")
        self._wait_worker(redis_url)
        return self

    def start_scheduler(self) -> None:
        self._spawn("scheduler", "scheduler")

    def kill(self, name: str) -> None:
        """SIGKILL `name` and every process of its group (a worker's children too), as a crash would."""
        process = self.processes.pop(name)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        self._record()

    def respawn(self, name: str) -> None:
        """Start `name` again with its command, as a process supervisor does after it died."""
        self._spawn(name, *self.commands[name])

    def _spawn(self, name: str, *args: str) -> None:
        self.commands[name] = args
        log = (self.logs / f"{name}.log").open("ab")
        # Its own process group, so stopping takes the worker's child processes along.
        self.processes[name] = subprocess.Popen(
            [sys.executable, "-m", "workers.cli", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
            start_new_session=True,
        )
        self._record()

    def _record(self) -> None:
        pids = {name: process.pid for name, process in self.processes.items()}
        (self.root / PROCESSES_FILE).write_text(json.dumps(pids))

    def check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise DemoError(f"{name} exited with {process.returncode}; see {self.logs / (name + '.log')}")

    def _wait_http(self, name: str, url: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=1.0).status_code == 200:
                    return
            time.sleep(0.1)
        raise DemoError(f"{name} did not answer {url} within {timeout:.0f} s; see {self.logs / (name + '.log')}")

    def _wait_worker(self, redis_url: str, timeout: float = 60.0) -> None:
        client = redis.Redis.from_url(redis_url)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            if client.zcard(f"{NAMESPACE}:__heartbeats__"):
                return
            time.sleep(0.1)
        raise DemoError(f"no worker registered within {timeout:.0f} s; see {self.logs / 'worker.log'}")

    def stop(self) -> None:
        for process in self.processes.values():
            _terminate_group(process.pid)
        for process in self.processes.values():
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.processes.clear()
        (self.root / PROCESSES_FILE).unlink(missing_ok=True)
        stop_mail_sink(self.root)
        EmbeddedStack(self.root).stop()


def _terminate_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)


def stop_leftovers(root: Path) -> bool:
    """Stop what a demo started with `--keep` left running in `root`; False when nothing was."""
    pids_file = root / PROCESSES_FILE
    stopped = False
    if pids_file.exists():
        with contextlib.suppress(ValueError):
            for pid in json.loads(pids_file.read_text()).values():
                _terminate_group(int(pid))
                stopped = True
        deadline = time.monotonic() + 15
        for pid in json.loads(pids_file.read_text() or "{}").values():
            while time.monotonic() < deadline and _alive(int(pid)):
                time.sleep(0.1)
            if _alive(int(pid)):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(int(pid), signal.SIGKILL)
        pids_file.unlink(missing_ok=True)
    if root.exists():
        stopped = stop_mail_sink(root) or stopped
        stack = EmbeddedStack(root)
        stopped = stack.stop_redis() or stopped
        stopped = stack.stop_postgres() or stopped
    return stopped


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone.
    with contextlib.suppress(ChildProcessError):
        finished, _ = os.waitpid(pid, os.WNOHANG)
        if finished == pid:
            return False
    return True
