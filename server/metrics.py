"""Den's Prometheus metrics: the metric objects, one small function per event, and the
collector of values read at scrape time.

Each app has its own :class:`Metrics` (its own ``CollectorRegistry``, never the library's
global one), so several apps in one process (tests) do not collide. Instrumentation stays
out of business logic: the workspace service, the reaper, the gateways and the HTTP
middleware each call one function here per event, and values that already exist elsewhere
(workspaces by state, the exec queue, checkpoint disk use, CPU seen by the reaper) are read
when Prometheus scrapes, by :class:`StateCollector`.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from server.db.models import GpuAllocation, Workspace
from server.errors import DenError, Overloaded
from server.runtime.base import Checkpoints, ResourceUsage
from server.runtime.errors import (
    AgentTimeout,
    AgentUnavailable,
    EngineConflict,
    EngineError,
    EngineUnavailable,
    ObjectMissing,
)
from server.workspaces.states import State

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Engine-facing errors, counted by kind (their code slug) wherever an operation fails.
ENGINE_ERRORS = (EngineError, EngineUnavailable, ObjectMissing, EngineConflict,
                 AgentUnavailable, AgentTimeout)
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
OPERATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
EXEC_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 600, 3600)
SESSION_KINDS = ("ssh", "terminal", "exec_stream", "process_logs")


def cause_of(exc: BaseException) -> str:
    """The failure cause label of an exception: a DenError's code slug, else ``internal``."""
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    return exc.code if isinstance(exc, DenError) else "internal"


class Metrics:
    """The metric objects of one app, registered in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_seconds = Histogram(
            "den_http_request_duration_seconds",
            "HTTP requests by method, route template and status class (2xx, 4xx, ...).",
            ["method", "route", "status"], buckets=HTTP_BUCKETS, registry=r)
        self.exec_seconds = Histogram(
            "den_exec_duration_seconds",
            "Exec calls, waiting for a slot included, by kind (exec; files: files calls run "
            "through exec) and outcome (ok, timed_out, error, shed).",
            ["kind", "outcome"], buckets=EXEC_BUCKETS, registry=r)
        self.operation_seconds = Histogram(
            "den_operation_duration_seconds",
            "Workspace operations (create, fork, start, stop, pause, resume, restore, "
            "snapshot, delete) by operation and result (ok, failed).",
            ["operation", "result"], buckets=OPERATION_BUCKETS, registry=r)
        self.operation_failures = Counter(
            "den_operation_failures",
            "Failed workspace operations by operation and cause (the error's code slug).",
            ["operation", "cause"], registry=r)
        self.engine_errors = Counter(
            "den_engine_errors",
            "Errors from the engine or a workspace's agent, by kind (their code slug).",
            ["kind"], registry=r)
        self.reaper_actions = Counter(
            "den_reaper_actions",
            "What the idle reaper did: pause or stop (result ok or skipped), and removed "
            "containerd checkpoint copies (sweep).",
            ["action", "result"], registry=r)
        self.open_sessions = Gauge(
            "den_open_sessions",
            "Open interactive sessions: authenticated SSH connections, web terminals, exec "
            "streams and followed process logs.",
            ["kind"], registry=r)
        for kind in SESSION_KINDS:
            self.open_sessions.labels(kind)
        self._usage: dict[str, ResourceUsage] = {}  # workspace -> what the reaper last saw
        self._gpu_percent: dict[str, int] = {}  # GPU UUID -> utilization the reaper last saw

    # --- one function per event ---------------------------------------------------------

    def http_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.http_seconds.labels(method, route, f"{status // 100}xx").observe(seconds)

    def exec_done(self, seconds: float, *, short: bool, timed_out: bool) -> None:
        self.exec_seconds.labels("files" if short else "exec",
                                 "timed_out" if timed_out else "ok").observe(seconds)

    def exec_failed(self, seconds: float, exc: BaseException, *, short: bool) -> None:
        outcome = "shed" if isinstance(exc, Overloaded) else "error"
        self.exec_seconds.labels("files" if short else "exec", outcome).observe(seconds)
        self.engine_error(exc)

    def engine_error(self, exc: BaseException) -> None:
        if isinstance(exc, ENGINE_ERRORS):
            self.engine_errors.labels(exc.code).inc()

    def failed(self, operation: str, exc: BaseException) -> None:
        """Count a failed operation by cause (and an engine error by kind)."""
        self.operation_failures.labels(operation, cause_of(exc)).inc()
        self.engine_error(exc)

    @asynccontextmanager
    async def operation(self, operation: str) -> AsyncIterator[None]:
        """Time a workspace operation; a failure (the exception passes through) is counted
        by cause."""
        started = time.monotonic()
        try:
            yield
        except BaseException as exc:
            self.operation_seconds.labels(operation, "failed").observe(
                time.monotonic() - started)
            self.failed(operation, exc)
            raise
        self.operation_seconds.labels(operation, "ok").observe(time.monotonic() - started)

    def reaper_action(self, action: str, *, result: str, count: int = 1) -> None:
        if count:
            self.reaper_actions.labels(action, result).inc(count)

    def session_opened(self, kind: str) -> None:
        self.open_sessions.labels(kind).inc()

    def session_closed(self, kind: str) -> None:
        self.open_sessions.labels(kind).dec()

    @contextmanager
    def session_open(self, kind: str) -> Iterator[None]:
        """Counts an open session of ``kind`` while the block runs."""
        self.session_opened(kind)
        try:
            yield
        finally:
            self.session_closed(kind)

    def workspace_usage(self, ws_id: str, usage: ResourceUsage) -> None:
        """The CPU time a workspace has used and the memory it holds, as the reaper measured
        them."""
        self._usage[ws_id] = usage

    def gpu_utilization(self, percent_by_uuid: dict[str, int]) -> None:
        """GPU utilization (NVML) as the reaper last measured it."""
        self._gpu_percent.update(percent_by_uuid)

    def gpu_utilization_seen(self) -> dict[str, int]:
        return dict(self._gpu_percent)

    def usage_seen(self) -> dict[str, ResourceUsage]:
        return dict(self._usage)

    def forget_workspace(self, ws_id: str) -> None:
        self._usage.pop(ws_id, None)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def split_listen(listen: str) -> tuple[str, int]:
    """``host:port`` (``[::1]:9464`` for IPv6) as (host, port); ValueError when malformed."""
    host, sep, port = listen.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port, got {listen!r}")
    return host, int(port)


def serve_separately(listen: str, metrics: Metrics) -> Callable[[], None]:
    """Serve the metrics, without a token, on their own ``host:port`` (a thread of
    prometheus_client's own HTTP server); returns what stops it."""
    host, port = split_listen(listen)
    try:
        server, thread = start_http_server(port, addr=host, registry=metrics.registry)
    except OSError as exc:
        raise DenError(f"cannot listen for metrics on {listen}: {exc.strerror or exc}",
                       code="metrics_listen") from exc

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return stop


def checkpoint_usage(runtime: object, data_dir: Path) -> dict[str, int]:
    """Bytes of pause checkpoints (where the backend says it keeps them, when it does) and of
    snapshots' saved memory (under the data dir). Blocking: walks directories."""
    dirs = runtime.checkpoint_dirs() if isinstance(runtime, Checkpoints) else []
    pause = sum(dir_bytes(d) for d in dirs)
    return {"pause": pause, "snapshot": dir_bytes(data_dir / "snapshots")}


def dir_bytes(root: Path) -> int:
    """Bytes of the regular files under ``root`` (0 when it is missing); not following links."""
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            total += st.st_blocks * 512 if st.st_blocks else st.st_size
    return total


def _by_path(name: str, documentation: str, counts: dict[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=["path"])
    for path, n in sorted(counts.items()):
        family.add_metric([path], n)
    return family


class StateCollector(Collector):
    """Values read at scrape time: workspaces by state, the exec queue, checkpoint disk use
    and each running workspace's CPU time."""

    def __init__(self, *, metrics: Metrics, sessions: sessionmaker[Session],
                 gate: Callable[[], tuple[int, int, int]],
                 checkpoint_bytes: Callable[[], dict[str, int]], gpu_total: int = 0,
                 port_connections: Callable[[], dict[str, int]] = dict,
                 file_transfers: Callable[[], dict[str, int]] = dict) -> None:
        self._metrics = metrics
        self._gpu_total = gpu_total
        self._sessions = sessions
        self._gate = gate
        self._checkpoint_bytes = checkpoint_bytes
        self._port_connections = port_connections
        self._file_transfers = file_transfers

    def collect(self) -> Iterable[Metric]:
        with self._sessions() as s:
            rows = s.execute(select(Workspace.state, func.count()).group_by(Workspace.state))
            states = {str(state): int(n) for state, n in rows}
            running = set(s.scalars(select(Workspace.id).where(
                Workspace.state == State.RUNNING.value)))
            gpus_held = s.scalar(select(func.count()).select_from(GpuAllocation)) or 0
        by_state = GaugeMetricFamily("den_workspaces", "Workspaces by state.", labels=["state"])
        for st in State:
            by_state.add_metric([st.value], states.get(st.value, 0))
        yield by_state

        in_flight, waiting, shed = self._gate()
        yield GaugeMetricFamily("den_exec_in_flight", "Exec calls running now.", in_flight)
        yield GaugeMetricFamily("den_exec_queued", "Exec calls waiting for a free slot.",
                                waiting)
        yield CounterMetricFamily("den_exec_shed",
                                  "Exec calls refused with 503 overloaded (queue full).", shed)

        disk = GaugeMetricFamily(
            "den_checkpoint_bytes",
            "Disk used by memory checkpoints: pause checkpoints (pause) and snapshots' saved "
            "memory (snapshot).", labels=["kind"])
        for kind, n in sorted(self._checkpoint_bytes().items()):
            disk.add_metric([kind], n)
        yield disk

        yield _by_path(
            "den_port_connections",
            "Connections into workspaces' ports (previews, ssh -L) by path: direct (to the "
            "agent's listener on the workspace's address) or relay (through the agent's "
            "session, when the direct path cannot be used).", self._port_connections())
        yield _by_path(
            "den_file_transfers",
            "Files API reads and writes by path: host (the workspace's directory on the host, "
            "as its user), agent (through the workspace's agent) or exec (the engine's exec, "
            "for a workspace without a reachable agent).", self._file_transfers())

        cpu = CounterMetricFamily(
            "den_workspace_cpu_seconds",
            "CPU time used by each running workspace, as last measured by the idle reaper "
            "(a workspace appears once the reaper has measured it).", labels=["workspace"])
        memory = GaugeMetricFamily(
            "den_workspace_memory_bytes",
            "Memory held by each running workspace (its processes, page cache and tmpfs "
            "inside the sandbox), as last measured by the idle reaper.", labels=["workspace"])
        for ws_id, usage in sorted(self._metrics.usage_seen().items()):
            if ws_id in running:
                cpu.add_metric([ws_id], usage.cpu_ns / 1e9)
                if usage.memory_bytes is not None:
                    memory.add_metric([ws_id], usage.memory_bytes)
        yield cpu
        yield memory

        gpus = GaugeMetricFamily("den_gpus", "GPUs Den may hand out, by state (held, free).",
                                 labels=["state"])
        gpus.add_metric(["held"], gpus_held)
        gpus.add_metric(["free"], max(0, self._gpu_total - gpus_held))
        yield gpus
        util = GaugeMetricFamily(
            "den_gpu_utilization_percent",
            "Utilization of each held GPU (NVML), as last measured by the idle reaper.",
            labels=["gpu"])
        for uuid, percent in sorted(self._metrics.gpu_utilization_seen().items()):
            util.add_metric([uuid], percent)
        yield util
