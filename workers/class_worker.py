"""One Celery worker process serving one resource class of this node (spawned by `edgefleet worker`)."""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import sys
import threading
from typing import Any

from celery import Celery

from edgefleet.celery_app import EXPRESS_SUFFIX, PROBE, RUN_SUBTASK, create_celery, worker_hostname
from edgefleet.hardening import make_undumpable
from edgefleet.logs import setup_logging
from edgefleet.models.factory import build_model_router
from edgefleet.plugin_catalog import PluginCatalog
from edgefleet.scheduling.affinity import build_affinity
from edgefleet.scheduling.dispatch import Dispatcher
from edgefleet.scheduling.state import SchedulerState
from edgefleet.schemas import ResourceClass
from edgefleet.settings import Settings
from edgefleet.store import JobStore
from edgefleet.workers.chaining import SlotChain
from edgefleet.workers.metrics import WorkerMetrics
from edgefleet.workers.model_calls import ModelCallHandler
from edgefleet.workers.runner import SubtaskRunner
from edgefleet.workers.store_retry import worker_client

PR_SET_PDEATHSIG = 1
# A warm model is advertised this long after its last use in some worker process.
WARM_TTL_SECONDS = 600


class RuntimePerProcess:
    """Builds the runner lazily in each pool process: Redis connections must not cross a fork."""

    def __init__(self, settings: Settings, app: Celery) -> None:
        self.settings = settings
        self.app = app
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._runner: SubtaskRunner | None = None

    def get(self) -> SubtaskRunner:
        with self._lock:
            if self._runner is None or self._pid != os.getpid():
                store = JobStore(worker_client(self.settings.redis_url), self.settings.key_prefix)
                catalog = PluginCatalog.load(self.settings.plugin_folders)
                settings = self.settings
                models = ModelCallHandler(
                    lambda: build_model_router(settings),
                    lambda warm: store.nodes.mark_warm(settings.node_name, warm, ttl=WARM_TTL_SECONDS),
                )
                self._runner = SubtaskRunner(
                    settings,
                    store,
                    catalog,
                    Dispatcher(SchedulerState.of(store), self.app, settings, build_affinity(store, catalog, settings)),
                    WorkerMetrics(),
                    models,
                )
                self._pid = os.getpid()
            return self._runner


def build_app(settings: Settings, resource_class: ResourceClass, *, express: bool = False) -> Celery:
    """`express`: the app of a node's express slots, which do not chain (see `workers.chaining`);
    nor does any slot while Celery task events are on."""
    app = create_celery(settings, main=f"edgefleet-{resource_class.value}")
    # Tasks an operator or a benchmark adds (loadtests/bench_tasks.py), imported at worker start.
    app.conf.imports = tuple(settings.worker_task_modules)
    runtime = RuntimePerProcess(settings, app)
    # With task events on (for Flower) every subtask stays a Celery task, so that Flower lists it:
    # a chained one has no message and no events.
    chain_max = 0 if express or settings.task_events else settings.chain_max

    @app.task(name=RUN_SUBTASK)
    def run_subtask(envelope: dict[str, Any]) -> str:
        runner = runtime.get()
        if chain_max == 0:
            return runner.run(envelope)
        return SlotChain(runner, max_subtasks=chain_max, seconds=settings.chain_seconds).run(envelope)

    @app.task(name=PROBE)
    def probe(counter_key: str) -> None:
        """Counts one delivery: a liveness probe for operators and the raw-Celery baseline of loadtests."""
        runtime.get().store.count_probe(counter_key)

    return app


def _die_with_parent() -> None:
    """A class worker outlives no supervisor: it gets SIGTERM (a warm shutdown) when the node dies."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        except OSError:
            pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--resource-class", required=True, choices=[rc.value for rc in ResourceClass])
    parser.add_argument("--pool", required=True, choices=["prefork", "threads", "solo"])
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--express", action="store_true", help="serve only the class's express (interactive) queues")
    args = parser.parse_args(argv)
    _die_with_parent()
    make_undumpable()
    settings = Settings()
    setup_logging(f"worker-{args.resource_class}", settings.log_level, settings.log_json)
    resource_class = ResourceClass(args.resource_class)
    app = build_app(settings, resource_class, express=args.express)
    node = settings.node_name
    rc = resource_class.value
    express = [f"{rc}{EXPRESS_SUFFIX}", f"node.{node}.{rc}{EXPRESS_SUFFIX}"]
    queues = express if args.express else [rc, f"node.{node}.{rc}", *express]
    worker_args = [
        "worker",
        f"--queues={','.join(queues)}",
        f"--pool={args.pool}",
        f"--concurrency={args.concurrency}",
        f"--hostname={worker_hostname(rc, node, express=args.express)}",
        f"--loglevel={settings.log_level}",
        "--without-gossip",
        "--without-mingle",
    ]
    if settings.task_events:
        worker_args.append("--task-events")
    app.worker_main(worker_args)


if __name__ == "__main__":
    main()
