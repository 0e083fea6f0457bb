"""Sends a subtask that needs a model to the box best placed to run it.

A plugin action declares the model task it uses (`model_task` in its manifest);
the models config routes that task to a primary model; nodes advertise the
models warm in their worker processes and the speed their benchmark measured
for each local model (workers/bench.py). Order: a box with the model warm (a
load costs more than a short wait, so warm beats cold even when busy), one
with a free slot first, the fastest first; else the fastest box with a free
slot that has the model benchmarked; else the class queue. The reason is
recorded with the subtask (`placement` in its status).

"Free slot" is the node's last heartbeat (`slots` - `busy`) less what this
router sent it since it last read the nodes: approximate, never a reservation.

Locality, for steps that need no model: a step whose inputs are artifacts (files of the
steps it needs, `$artifact`s) goes to the live box with a free slot that holds the most of
those bytes (it produced them, or has them cached), like Ray's locality-aware scheduling;
when none has room, to the class queue, and the box that takes it fetches them.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from edgefleet.celery_app import node_queue
from edgefleet.models.config import ModelsConfig
from edgefleet.plugin_catalog import PluginCatalog
from edgefleet.schemas import NodeInfo, SubtaskEnvelope
from edgefleet.settings import Settings
from edgefleet.store import JobStore
from edgefleet.store.artifacts import ArtifactStore
from edgefleet.store.nodes import NodeStore

log = logging.getLogger(__name__)

NODES_REFRESH_SECONDS = 1.0


@dataclass(frozen=True)
class Placement:
    queue: str | None  # a node's direct queue; None: the class queue
    reason: str


class ModelAffinity:
    def __init__(
        self, nodes: NodeStore, catalog: PluginCatalog, config: ModelsConfig, artifacts: ArtifactStore | None = None
    ) -> None:
        self.nodes = nodes
        self.artifacts = artifacts
        self.catalog = catalog
        self.config = config
        self._lock = threading.Lock()
        self._placed: list[str] | None = None
        self._nodes: list[NodeInfo] = []
        self._fetched = 0.0
        self._turn = 0
        self._sent: dict[str, int] = {}  # node -> subtasks sent to it since the nodes were read

    def placed_plugins(self) -> list[str]:
        """Plugins with an action that wants a model: where their subtasks run is chosen here
        (`place`), so a slot that takes its own next subtask must not claim one of them blindly."""
        if self._placed is None:
            self._placed = [
                name
                for name in self.catalog.names()
                if (plugin := self.catalog.get(name)) is not None
                and any(action.model_task for action in plugin.manifest.actions.values())
            ]
        return self._placed

    def wanted_model(self, env: SubtaskEnvelope) -> str | None:
        plugin = self.catalog.get(env.plugin)
        action = plugin.manifest.actions.get(env.action) if plugin else None
        if action is None or not action.model_task:
            return None
        route = self.config.route(action.model_task)
        return route.primary if route else None

    def _live_nodes(self) -> list[NodeInfo]:
        with self._lock:
            if time.monotonic() - self._fetched > NODES_REFRESH_SECONDS:
                self._nodes = self.nodes.live_nodes()
                self._fetched = time.monotonic()
                self._sent.clear()
            return self._nodes

    def queue_for(self, env: SubtaskEnvelope) -> str | None:
        """The direct queue `place` chose, or None for the class queue."""
        placement = self.place(env)
        return placement.queue if placement else None

    def inputs_held(self, envs: list[SubtaskEnvelope], has_inputs: list[bool] | None = None) -> list[dict[str, int]]:
        """For each subtask, bytes of its input artifacts per node (one store call for the batch;
        none for the subtasks `has_inputs` says read no artifacts)."""
        wanted = [i for i in range(len(envs)) if has_inputs is None or has_inputs[i]]
        held: list[dict[str, int]] = [{} for _ in envs]
        if self.artifacts is None or not wanted:
            return held
        found = self.artifacts.input_bytes_by_node([(envs[i].job_id, envs[i].subtask_id) for i in wanted])
        for i, bytes_by_node in zip(wanted, found, strict=True):
            held[i] = bytes_by_node
        return held

    def place(
        self, env: SubtaskEnvelope, held: dict[str, int] | None = None, freed_on: str | None = None
    ) -> Placement | None:
        """Where a step goes and why: a model step by its model, another by where its inputs are
        (`held`: bytes of them per node, from `inputs_held`); None for the class queue, no reason."""
        model = self.wanted_model(env)
        if model is None:
            return self._by_locality(env, held or {}, freed_on)
        rc = env.resource_class.value
        able = [n for n in self._live_nodes() if env.resource_class in n.classes and env.plugin in n.plugins]
        warm = [n for n in able if model in n.models_loaded]
        measured = [n for n in able if model not in n.models_loaded and _speed(n, model) > 0]
        with self._lock:
            if warm:
                node = self._pick(warm, model, rc)
                why = f"warm: {model} loaded on {node.name}"
            else:
                roomy = [n for n in measured if self._room(n, rc) > 0]
                if not roomy:
                    return Placement(None, f"class queue: {model} warm nowhere, no benchmarked box with a free slot")
                node = self._pick(roomy, model, rc)
                why = f"fastest for {model} (none warm)"
            free = max(0, self._room(node, rc))
            self._sent[node.name] = self._sent.get(node.name, 0) + 1
        others = sorted((n for n in (warm or measured) if n.name != node.name), key=lambda n: -_speed(n, model))
        compared = "".join(f"; {n.name} {_speed(n, model):g} tok/s" for n in others[:3])
        return Placement(
            f"{node_queue(node.name)}.{rc}",
            f"{why}; {node.name} {_speed(node, model):g} tok/s, {free} free slot(s){compared}",
        )

    def _by_locality(self, env: SubtaskEnvelope, held: dict[str, int], freed_on: str | None) -> Placement | None:
        if not held:
            return None
        rc = env.resource_class.value
        capable = [n for n in self._live_nodes() if env.resource_class in n.classes and env.plugin in n.plugins]
        if len(capable) < 2:
            return None  # one box could run it: there is no choice to make
        able = [n for n in capable if held.get(n.name)]
        total = max(held.values())
        with self._lock:
            # The node whose subtask just ended has a slot its last heartbeat still shows busy.
            def room(n: NodeInfo) -> int:
                return self._room(n, rc) + (1 if n.name == freed_on else 0)

            roomy = [n for n in able if room(n) > 0]
            if not roomy:
                holders = ", ".join(sorted(held)[:3])
                return Placement(None, f"class queue: the boxes holding its inputs ({holders}) are busy or gone")
            node = max(roomy, key=lambda n: (held[n.name], room(n), n.name))
            free = room(node)
            self._sent[node.name] = self._sent.get(node.name, 0) + 1
        return Placement(
            f"{node_queue(node.name)}.{rc}",
            f"locality: {node.name} holds {_mib(held[node.name])} of its inputs ({_mib(total)} at most on one box), "
            f"{free} free slot(s)",
        )

    def _room(self, node: NodeInfo, rc: str) -> int:
        """Free slots of the class as last seen, less what was sent since; unknown (an older node): 1."""
        if rc not in node.slots:
            return 1 - self._sent.get(node.name, 0)
        return node.slots[rc] - node.busy.get(rc, 0) - self._sent.get(node.name, 0)

    def _pick(self, nodes: list[NodeInfo], model: str, rc: str) -> NodeInfo:
        """A free slot first, then the fastest; equals take turns (as warm boxes always did)."""

        def key(n: NodeInfo) -> tuple[bool, float]:
            return (self._room(n, rc) > 0, _speed(n, model))

        best = max(key(n) for n in nodes)
        tied = sorted((n for n in nodes if key(n) == best), key=lambda n: n.name)
        self._turn += 1
        return tied[self._turn % len(tied)]


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size} B"


def _speed(node: NodeInfo, model: str) -> float:
    """The node's benchmarked tokens/s for the model; 0 when not measured."""
    return node.bench.tokens_per_s.get(model, 0.0) if node.bench else 0.0


def build_affinity(store: JobStore, catalog: PluginCatalog, settings: Settings) -> ModelAffinity | None:
    """Affinity from the models config; a broken config is logged and routes by class only."""
    from edgefleet.models.config import load_models_config
    from edgefleet.models.errors import ModelsConfigError

    try:
        config = load_models_config(settings)
    except (ModelsConfigError, OSError) as exc:
        log.error("models config not loaded; no model affinity", extra={"error": str(exc)})
        config = ModelsConfig()
    # Always built: without model routes it still places steps by where their inputs are.
    return ModelAffinity(store.nodes, catalog, config, store.artifacts)
