"""Dramatiq's own message metrics (`dramatiq.middleware.prometheus`: messages processed, errors, retries,
dead-lettered, in progress, durations per queue and actor), served by each `renova worker` on
WORKER_METRICS_PORT (README "Metrics and alerts").

How Dramatiq does it: every worker process writes its counters to files in a shared folder
(prometheus_client's multiprocess mode), and a process forked by Dramatiq's main process serves them
over HTTP. That server process never imports `workers.broker`, and Dramatiq's module reads the port and
the folder from the environment when it is imported: so both sides derive them here, from
WORKER_METRICS_PORT and the main process's pid, before importing it.

Nothing here may import `prometheus_client`: a worker process must import it only after Dramatiq's
`after_process_boot` has switched it to multiprocess mode, or its counters stay in memory, unseen.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from dramatiq import Broker, Message, Middleware, Worker

from workers.settings import load_settings

ENV_PORT = "dramatiq_prom_port"
ENV_FOLDER = "dramatiq_prom_db"
FOLDERS = Path(tempfile.gettempdir()) / "renova-worker-metrics"


def run_folder(port: int) -> Path:
    """One folder per `renova worker` run: its processes share it (their parent is Dramatiq's main
    process), and a restart starts from zero instead of summing a dead run's files forever."""
    return FOLDERS / f"{port}-{os.getppid()}"


def configure_environment(port: int) -> None:
    """What Dramatiq's module reads at import; `dramatiq_prom_host` (default 0.0.0.0) is the operator's.
    The folder is always recomputed, never taken from an inherited environment (it would name another run)."""
    os.environ[ENV_PORT] = str(port)
    os.environ[ENV_FOLDER] = str(run_folder(port))


def _import_prometheus(port: int) -> Any:
    configure_environment(port)
    from dramatiq.middleware import prometheus

    if port != prometheus.HTTP_PORT or os.environ[ENV_FOLDER] != prometheus.DB_PATH:
        raise RuntimeError("dramatiq.middleware.prometheus was imported before WORKER_METRICS_PORT was applied")
    return prometheus


class WorkerMetrics(Middleware):
    """Dramatiq's Prometheus middleware, created at `after_process_boot`: only a Dramatiq worker process
    boots, so the web, the scheduler, the CLI and an in-process `dramatiq.Worker` (which also build
    the broker, and enqueue) neither touch the environment nor create a folder, and skip every hook."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.prometheus: Any = None

    @property
    def forks(self) -> list[Any]:
        return [serve]

    def after_process_boot(self, broker: Broker) -> None:
        self.prometheus = _import_prometheus(self.port).Prometheus()
        self.prometheus.after_process_boot(broker)

    def after_worker_shutdown(self, broker: Broker, worker: Worker) -> None:
        if self.prometheus is not None:
            self.prometheus.after_worker_shutdown(broker, worker)

    def after_nack(self, broker: Broker, message: Message[Any]) -> None:
        if self.prometheus is not None:
            self.prometheus.after_nack(broker, message)

    def after_enqueue(self, broker: Broker, message: Message[Any], delay: int | None) -> None:
        if self.prometheus is not None:
            self.prometheus.after_enqueue(broker, message, delay)

    def before_delay_message(self, broker: Broker, message: Message[Any]) -> None:
        if self.prometheus is not None:
            self.prometheus.before_delay_message(broker, message)

    def before_process_message(self, broker: Broker, message: Message[Any]) -> None:
        if self.prometheus is not None:
            self.prometheus.before_process_message(broker, message)

    def after_process_message(
        self, broker: Broker, message: Message[Any], *, result: Any = None, exception: BaseException | None = None
    ) -> None:
        if self.prometheus is not None:
            self.prometheus.after_process_message(broker, message, result=result, exception=exception)

    def after_skip_message(self, broker: Broker, message: Message[Any]) -> None:
        if self.prometheus is not None:
            self.prometheus.after_skip_message(broker, message)


def _forget_finished_runs(port: int) -> None:
    """Folders of earlier runs on this port whose main process is gone."""
    if not FOLDERS.is_dir():
        return
    current = run_folder(port)
    for folder in FOLDERS.glob(f"{port}-*"):
        pid = folder.name.rpartition("-")[2]
        if folder != current and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def serve() -> int:
    """The HTTP server Dramatiq's main process forks once its workers are up (named by `forks`)."""
    port = load_settings().worker_metrics_port
    if port is None:  # the environment changed under us; nothing to serve
        return 0
    _forget_finished_runs(port)
    prometheus = _import_prometheus(port)
    return int(prometheus._run_exposition_server() or 0)
