"""`edgefleet worker`: supervises one Celery worker per resource class and heartbeats the node."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from edgefleet import __version__
from edgefleet.celery_app import worker_hostname
from edgefleet.plugin_catalog import PluginCatalog
from edgefleet.schemas import NodeInfo, ResourceClass
from edgefleet.settings import Settings
from edgefleet.store import JobStore
from edgefleet.workers import probe
from edgefleet.workers.advertise import advertised_metrics_url
from edgefleet.workers.bench import NodeBenchmark, local_models
from edgefleet.workers.process_watch import ProcessWatch
from edgefleet.workers.workspace_gc import start_workspace_gc

if TYPE_CHECKING:
    from edgefleet.workers.metrics import NodeCollector

log = logging.getLogger(__name__)

RESTART_BACKOFF_MAX = 30.0


def pool_for(resource_class: ResourceClass, settings: Settings, gpus: list[str]) -> tuple[str, int]:
    """prefork sized to the cores for cpu, threads for io, one slot per GPU."""
    if resource_class is ResourceClass.cpu:
        return "prefork", settings.cpu_concurrency or probe.cores()
    if resource_class is ResourceClass.io:
        return "threads", settings.io_concurrency
    return "prefork", settings.gpu_concurrency or max(1, len(gpus))


def _models_available(settings: Settings) -> list[str]:
    """Models this box could serve (files present, endpoints configured); nothing is loaded."""
    from edgefleet.models.config import load_models_config
    from edgefleet.models.errors import ModelsConfigError
    from edgefleet.models.runtime import ModelPool

    try:
        config = load_models_config(settings)
    except (ModelsConfigError, OSError) as exc:
        log.error("models config not loaded", extra={"error": str(exc)})
        return []
    return ModelPool(config, settings).available()


def express_workers(classes: list[ResourceClass], settings: Settings) -> list[_ClassWorker]:
    """The express lane: per cpu and io class, `express_slots` slots that take only interactive
    work, so it never waits behind batch work for a slot. None for gpu, whose memory is the limit."""
    if settings.express_slots <= 0:
        return []
    return [
        _ClassWorker(rc, pool_for(rc, settings, [])[0], settings.express_slots, express=True)
        for rc in classes
        if rc is not ResourceClass.gpu
    ]


class _ClassWorker:
    def __init__(self, resource_class: ResourceClass, pool: str, concurrency: int, *, express: bool = False) -> None:
        self.resource_class = resource_class
        self.pool = pool
        self.concurrency = concurrency
        self.express = express
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self.next_start = 0.0
        self.watch = ProcessWatch()


class NodeSupervisor:
    def __init__(self, settings: Settings, classes: list[ResourceClass]) -> None:
        self.settings = settings
        self.classes = classes
        self.gpus = probe.detect_gpus()
        self.store = JobStore.from_url(settings.redis_url, settings.key_prefix)
        self.catalog = PluginCatalog.load(settings.plugin_folders)
        for problem in self.catalog.errors:
            log.warning("plugin not loaded", extra={"problem": str(problem)})
        for name in self.catalog.names():
            unmet = self.catalog.unmet_dependencies(name)
            if unmet:
                log.warning("plugin not advertised: dependencies unmet here", extra={"plugin": name, "unmet": unmet})
        self.started_at = time.time()
        self.models_available = _models_available(settings)
        self._stop = threading.Event()
        self._workers = [_ClassWorker(rc, *pool_for(rc, settings, self.gpus)) for rc in classes]
        self._workers += express_workers(classes, settings)
        self._metrics_dir = Path(tempfile.mkdtemp(prefix="edgefleet-metrics-"))
        self._http: ThreadingHTTPServer | None = None
        self.metrics_port: int | None = None
        self.metrics_url: str | None = None
        self.bench = NodeBenchmark(settings, local_models(settings))
        self._bench_answered = 0  # the last bench request number this node has started a run for
        # Dead processes whose leases could not be released yet (Redis unreachable).
        self._dead_pids: set[int] = set()

    # --- lifecycle ----------------------------------------------------------------------

    def run(self) -> int:
        """Run until SIGTERM/SIGINT, then shut down warm: running subtasks finish first."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self._start_http()
        for worker in self._workers:
            self._spawn(worker)
        self._start_bench()
        heartbeat = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        heartbeat.start()
        start_workspace_gc(self.settings, self.store, self._stop)  # retention of finished jobs' workspaces
        log.info(
            "node started",
            extra={
                "node": self.settings.node_name,
                "classes": [c.value for c in self.classes],
                "metrics_url": self.metrics_url,
            },
        )
        while not self._stop.wait(0.5):
            self._release_dead_leases()
            self._restart_dead()
        self._shutdown()
        return 0

    def _on_signal(self, signum: int, _frame: object) -> None:
        log.info("shutdown requested", extra={"signal": signal.Signals(signum).name})
        self._stop.set()

    def _spawn(self, worker: _ClassWorker) -> None:
        env = dict(os.environ)
        env["PROMETHEUS_MULTIPROC_DIR"] = str(self._metrics_dir)
        env["EDGEFLEET_NODE_NAME"] = self.settings.node_name
        # `edgefleet worker --broker URL` sets only this process's settings: the class workers
        # must use the same broker (through the environment, never their command line).
        env["EDGEFLEET_REDIS_URL"] = self.settings.redis_url
        if self.settings.broker_url:
            env["EDGEFLEET_BROKER_URL"] = self.settings.broker_url
        cmd = [
            sys.executable,
            "-m",
            "edgefleet.workers.class_worker",
            f"--resource-class={worker.resource_class.value}",
            f"--pool={worker.pool}",
            f"--concurrency={worker.concurrency}",
            *(["--express"] if worker.express else []),
        ]
        worker.process = subprocess.Popen(cmd, env=env)
        log.info(
            "class worker started",
            extra={
                "resource_class": worker.resource_class.value,
                "pool": worker.pool,
                "concurrency": worker.concurrency,
                "express": worker.express,
                "pid": worker.process.pid,
            },
        )

    def _release_dead_leases(self) -> None:
        """A class worker or pool child that died: its subtasks are lost now, not when their
        leases run out, so they run again at once on any box (a Celery redelivery of the old
        attempt is then refused by the claim)."""
        for worker in self._workers:
            self._dead_pids.update(worker.watch.dead_since_last_look(worker.process))
        if not self._dead_pids:
            return
        pids = sorted(self._dead_pids)
        try:
            ready = self.store.attempts.lose_processes(self.settings.node_name, pids, self.settings.max_lost_attempts)
        except Exception as exc:
            log.warning("could not release the leases of dead processes", extra={"error": type(exc).__name__})
            return
        self._dead_pids.clear()
        log.warning(
            "worker processes died; their subtasks run again",
            extra={"pids": pids, "requeued_classes": [c.value for c in ready]},
        )

    def _restart_dead(self) -> None:
        now = time.monotonic()
        for worker in self._workers:
            if worker.process is None or worker.process.poll() is None or now < worker.next_start:
                continue
            worker.restarts += 1
            worker.next_start = now + min(RESTART_BACKOFF_MAX, 2.0 ** min(worker.restarts, 5))
            log.error(
                "class worker exited; restarting",
                extra={"resource_class": worker.resource_class.value, "code": worker.process.returncode},
            )
            self._spawn(worker)

    def _shutdown(self) -> None:
        for worker in self._workers:
            if worker.process and worker.process.poll() is None:
                worker.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.max_subtask_timeout
        for worker in self._workers:
            if worker.process:
                try:
                    worker.process.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    worker.process.kill()
                    worker.process.wait()
        try:
            self.store.nodes.remove_node(self.settings.node_name)
        except Exception:
            log.warning("could not remove node record")
        if self._http:
            self._http.shutdown()
        shutil.rmtree(self._metrics_dir, ignore_errors=True)
        log.info("node stopped", extra={"node": self.settings.node_name})

    # --- heartbeat ----------------------------------------------------------------------

    def node_info(self) -> NodeInfo:
        total, available = probe.memory()
        return NodeInfo(
            name=self.settings.node_name,
            classes=self.classes,
            express_slots={w.resource_class.value: w.concurrency for w in self._workers if w.express},
            cores=probe.cores(),
            memory_total=total,
            memory_available=available,
            cpu_percent=psutil.cpu_percent(interval=None),
            # Only what this box can run: a plugin whose dependencies are unmet here is not advertised.
            plugins=self.catalog.runnable_here(),
            gpus=self.gpus,
            gpu_usage=probe.gpu_usage() if self.gpus else [],
            models_available=self.models_available,
            models_loaded=self.store.nodes.warm_models(self.settings.node_name),
            started_at=self.started_at,
            heartbeat_at=time.time(),
            version=__version__,
            metrics_url=self.metrics_url,
            bench=self.bench.last,
            bench_running=self.bench.running,
            slots={w.resource_class.value: w.concurrency for w in self._workers if not w.express},
            busy=self._busy(),
        )

    def _heartbeat_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.store.nodes.heartbeat(self.node_info(), self.settings.heartbeat_ttl)
                self._check_bench_request()
            except Exception as exc:
                log.warning("heartbeat failed", extra={"error": type(exc).__name__})
            self._stop.wait(self.settings.heartbeat_interval)

    # --- the node benchmark (workers/bench.py) ----------------------------------------------

    def _start_bench(self) -> None:
        """Measure once at start, in the background: the node serves before the figures exist.
        With EDGEFLEET_NODE_BENCH=false only requests (`edgefleet workers --bench`) run it."""
        try:
            # Requests made before this node started are answered by this first run.
            self._bench_answered = self.store.nodes.bench_requested()
        except Exception:  # Redis not up yet: the first heartbeat round reads it
            self._bench_answered = 0
        if self.settings.node_bench:
            self.bench.request(self._bench_answered)

    def _check_bench_request(self) -> None:
        """`edgefleet workers --bench` raised the request number: measure again."""
        wanted = self.store.nodes.bench_requested()
        if wanted > self._bench_answered:
            self._bench_answered = wanted
            log.info("benchmark requested", extra={"request": wanted})
            self.bench.request(wanted)

    def _busy(self) -> dict[str, int]:
        """Subtasks running now per class, from the class workers' in-flight gauges."""
        from prometheus_client import CollectorRegistry, multiprocess

        from edgefleet.metric_names import IN_FLIGHT

        busy: dict[str, int] = {}
        try:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=str(self._metrics_dir))
            for family in registry.collect():
                if family.name != IN_FLIGHT:
                    continue
                for sample in family.samples:
                    rc = sample.labels.get("resource_class", "")
                    busy[rc] = busy.get(rc, 0) + max(0, int(sample.value))
        except (OSError, ValueError) as exc:  # a class worker writing its file right now
            log.debug("in-flight gauges not read", extra={"error": str(exc)})
        return busy

    # --- /metrics and /healthz --------------------------------------------------------

    def node_collector(self) -> NodeCollector:
        """The node's own gauges (CPU, memory, load, GPUs, slots, class workers up)."""
        from edgefleet.workers.metrics import NodeCollector

        node = self.settings.node_name
        return NodeCollector(
            node,
            # The slots the target depth is sized for; express slots wait for interactive work.
            slots=lambda: {w.resource_class.value: w.concurrency for w in self._workers if not w.express},
            workers_up=lambda: {
                worker_hostname(w.resource_class.value, node, express=w.express): w.process is not None
                and w.process.poll() is None
                for w in self._workers
            },
            gpu_usage=lambda: probe.gpu_usage() if self.gpus else [],
        )

    def _start_http(self) -> None:
        supervisor = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/healthz":
                    alive = all(w.process is not None and w.process.poll() is None for w in supervisor._workers)
                    body = json.dumps(
                        {"status": "ok" if alive else "degraded", "node": supervisor.settings.node_name}
                    ).encode()
                    self._reply(200 if alive else 503, "application/json", body)
                elif self.path == "/metrics":
                    from prometheus_client import CollectorRegistry, generate_latest, multiprocess
                    from prometheus_client.exposition import CONTENT_TYPE_LATEST

                    registry = CollectorRegistry()
                    multiprocess.MultiProcessCollector(registry, path=str(supervisor._metrics_dir))
                    registry.register(supervisor.node_collector())
                    self._reply(200, CONTENT_TYPE_LATEST, generate_latest(registry))
                else:
                    self._reply(404, "application/json", b'{"error": "not_found"}')

            def _reply(self, code: int, content_type: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: object) -> None:
                pass

        if self.settings.worker_metrics_port < 0:
            return
        self._http = ThreadingHTTPServer(
            (self.settings.worker_metrics_host, self.settings.worker_metrics_port), Handler
        )
        self.metrics_port = self._http.server_address[1]
        self.metrics_url = advertised_metrics_url(
            self.settings.worker_metrics_url,
            self.settings.worker_metrics_host,
            self.settings.worker_advertise_host,
            self.settings.redis_url,
            self.metrics_port,
        )
        threading.Thread(target=self._http.serve_forever, name="metrics-http", daemon=True).start()
