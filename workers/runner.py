"""Runs one delivered subtask: claim it, resolve its inputs, run the plugin under a lease, record the end.

The job store, not Celery, decides whether a delivery runs: a duplicate
delivery (visibility timeout, a resent release) finds the subtask owned and is
dropped; a delivery whose owner process died on this box takes it over.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from edgefleet.dispatch import Dispatcher
from edgefleet.plugin_catalog import PluginCatalog, validate_action_args
from edgefleet.refs import RefError, resolve_refs
from edgefleet.schemas import SubtaskEnvelope
from edgefleet.settings import Settings
from edgefleet.store import JobStore, Usage
from workers.metrics import WorkerMetrics, redelivery_reason
from workers.model_calls import ModelCallHandler
from workers.sandbox import LauncherProcess, LaunchSpec, PluginImage, SandboxedRun
from workers.sandbox_pool import WarmLaunchers

log = logging.getLogger(__name__)

# How often a running subtask renews its lease and looks for a cancel.
MAX_RENEW_INTERVAL = 1.0


def linked_folders(job_dir: Path, exclude: Path) -> list[Path]:
    """Where the job folder's links (workspaces of steps that ran in warm launchers) point."""
    found = []
    for entry in job_dir.iterdir():
        if entry.is_symlink():
            target = entry.resolve()
            if target != exclude and target.is_dir():
                found.append(target)
    return sorted(found)


def process_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@dataclass
class _Attempt:
    """Shared between the sandbox's reader thread and the lease loop."""

    cancelled: threading.Event = field(default_factory=threading.Event)
    progress: tuple[float, str] | None = None
    progress_sent: tuple[float, str] | None = None


class SubtaskRunner:
    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        catalog: PluginCatalog,
        dispatcher: Dispatcher,
        metrics: WorkerMetrics,
        models: ModelCallHandler | None = None,
    ) -> None:
        self.settings = settings
        self.models = models
        self.store = store
        self.catalog = catalog
        self.dispatcher = dispatcher
        self.metrics = metrics
        self.node = settings.node_name
        self.lease_ttl = settings.effective_lease_ttl
        self.launchers = WarmLaunchers.for_settings(settings)

    def run(self, raw_envelope: dict[str, Any]) -> str:
        env = SubtaskEnvelope.model_validate(raw_envelope)
        self.metrics.received(env)
        pid = os.getpid()
        claim = self.store.claim(env, node=self.node, pid=pid, lease_ttl=self.lease_ttl)
        if claim.verdict == "owned":
            if claim.owner_pid and claim.owner_pid != pid and not process_alive(claim.owner_pid):
                log.warning(
                    "taking over subtask from dead process",
                    extra={"job_id": env.job_id, "subtask": env.subtask_id, "dead_pid": claim.owner_pid},
                )
                claim = self.store.claim(
                    env, node=self.node, pid=pid, lease_ttl=self.lease_ttl, dead_pid=claim.owner_pid
                )
            else:
                return self._dropped(env, f"already running in pid {claim.owner_pid}")
        if claim.verdict != "run":
            return self._dropped(env, claim.reason)
        started = time.monotonic()
        self.metrics.started(env, *self._queued_and_started(env))
        try:
            outcome = self._execute(env, pid, claim.args or {}, claim.needs_outputs or {}, claim.checkpoint)
        finally:
            self.metrics.ended(env)
        self.metrics.observe(env, outcome, time.monotonic() - started)
        return outcome

    def _queued_and_started(self, env: SubtaskEnvelope) -> tuple[float | None, float | None]:
        """The store's queued_at and started_at of this attempt, for the queue-wait metric."""
        try:
            queued, started = self.store.redis.hmget(
                self.store.keys.subtask(env.job_id, env.subtask_id), ["queued_at", "started_at"]
            )
            return (float(queued) if queued else None, float(started) if started else None)
        except Exception:  # noqa: BLE001 - a metric never fails a subtask
            return None, None

    def _dropped(self, env: SubtaskEnvelope, reason: str) -> str:
        log.info(
            "delivery dropped",
            extra={"job_id": env.job_id, "subtask": env.subtask_id, "attempt": env.attempt, "reason": reason},
        )
        self.metrics.redelivered(redelivery_reason(reason))
        return "dropped"

    def _execute(
        self, env: SubtaskEnvelope, pid: int, args: dict[str, Any], outputs: dict[str, Any], checkpoint: Any
    ) -> str:
        plugin = self.catalog.get(env.plugin)
        if plugin is None:
            return self._finish(env, pid, "failed", error=f"plugin {env.plugin!r} is not installed on node {self.node}")
        action = plugin.manifest.actions.get(env.action)
        if action is None:
            return self._finish(env, pid, "failed", error=f"plugin {env.plugin!r} has no action {env.action!r}")
        try:
            resolved = resolve_refs(args, outputs)
        except RefError as exc:
            return self._finish(env, pid, "failed", error=str(exc), retryable=False)
        problems = validate_action_args(action.input_schema, resolved)
        if problems:
            reason = "; ".join(f"{f}: {r}" for f, r in problems)
            return self._finish(env, pid, "failed", error=f"invalid input: {reason}", retryable=False)
        unmet = self.catalog.unmet_dependencies(env.plugin)
        if unmet:
            return self._finish(
                env, pid, "failed", error=f"node {self.node} lacks dependencies: {', '.join(unmet)}"
            )

        image = self.launchers.policy.image_of(plugin) if self.launchers.policy else PluginImage.of(plugin)
        timeout = min(env.timeout, plugin.manifest.limits.timeout)
        workspace, launcher = self._launcher_for(env, image, has_inputs=bool(outputs))
        attempt = _Attempt()
        run = SandboxedRun(
            LaunchSpec(
                image=image,
                action=env.action,
                args=resolved,
                job_id=env.job_id,
                subtask_id=env.subtask_id,
                attempt=env.attempt,
                workspace=workspace,
                job_dir=self._job_dir(env),
                timeout=timeout,
                checkpoint=checkpoint,
            ),
            launcher,
            on_progress=lambda fraction, message: setattr(attempt, "progress", (fraction, message)),
            on_checkpoint=lambda state: self._save_checkpoint(env, pid, attempt, state),
            on_model_call=self._model_call_for(deadline_at := time.monotonic() + timeout),
            kill_grace=self.settings.sandbox_kill_grace,
        )
        run.start()
        # The next subtask of this plugin finds its launcher started while this one runs.
        self.launchers.replenish(image)
        if self._supervise(env, pid, run, attempt, deadline_at) == "lost":
            return "lost"
        result = run.outcome()
        usage = Usage(isolation=result.isolation, cpu_seconds=result.cpu_seconds, max_rss_mb=result.max_rss_mb)
        if result.outcome == "timeout":
            error = result.error or f"timed out after {timeout:g} s"
            return self._finish(env, pid, "failed", error=error, usage=usage)
        if result.outcome == "succeeded":
            return self._finish(env, pid, "succeeded", output=result.output, usage=usage)
        if result.outcome == "cancelled":
            return self._finish(env, pid, "cancelled", error=result.error, usage=usage)
        return self._finish(env, pid, "failed", error=result.error, retryable=result.retryable, usage=usage)

    def _job_dir(self, env: SubtaskEnvelope) -> Path:
        return self.settings.effective_workspace_dir / env.job_id

    def _launcher_for(
        self, env: SubtaskEnvelope, image: PluginImage, *, has_inputs: bool
    ) -> tuple[Path, LauncherProcess]:
        """The attempt's workspace and a launcher for it: a warm one when it may serve, else a new one."""
        job_dir = self._job_dir(env)
        workspace = job_dir / env.subtask_id
        launcher = self.launchers.take(image) if self.launchers.can_serve(image, workspace, has_inputs) else None
        if launcher is not None:
            self.metrics.sandbox_started(env, warm=True)
            if not launcher.confined:
                workspace.mkdir(parents=True, exist_ok=True)
                return workspace, launcher
            job_dir.mkdir(parents=True, exist_ok=True)
            workspace.symlink_to(launcher.home, target_is_directory=True)
            return launcher.home, launcher
        self.metrics.sandbox_started(env, warm=False)
        workspace.mkdir(parents=True, exist_ok=True)
        workspace = workspace.resolve()  # an earlier warm attempt's folder, behind its link
        # Earlier steps that ran warm wrote behind links in the job folder: those folders are readable too.
        readable = [job_dir, *linked_folders(job_dir, exclude=workspace)]
        return workspace, self.launchers.launch(image, home=workspace, readable=readable)

    def _model_call_for(self, deadline: float) -> Callable[[dict[str, Any]], dict[str, Any]] | None:
        models = self.models
        if models is None:
            return None
        return lambda request: models(request, time_left=max(0.1, deadline - time.monotonic()))

    def _save_checkpoint(self, env: SubtaskEnvelope, pid: int, attempt: _Attempt, state: Any) -> None:
        if not self.store.save_checkpoint(env, node=self.node, pid=pid, state=state):
            attempt.cancelled.set()  # this attempt no longer owns the subtask: stop its work

    def _supervise(
        self, env: SubtaskEnvelope, pid: int, run: SandboxedRun, attempt: _Attempt, deadline: float
    ) -> str:
        """Renew the lease while the plugin runs; stop it on cancel, timeout or a lost lease."""
        interval = min(MAX_RENEW_INTERVAL, self.lease_ttl / 3)
        while True:
            if run.wait(min(interval, max(0.0, deadline - time.monotonic()))):
                return "done"
            run.sample()
            if time.monotonic() >= deadline:
                run.stop("timeout")
                return "timeout"
            if attempt.cancelled.is_set():  # a checkpoint was refused: another attempt owns it
                run.stop("lost")
                return "lost"
            progress = attempt.progress if attempt.progress != attempt.progress_sent else None
            renewal = self.store.renew(env, node=self.node, pid=pid, lease_ttl=self.lease_ttl, progress=progress)
            attempt.progress_sent = attempt.progress
            if not renewal.still_owner:
                run.stop("lost")
                log.warning("lease lost; abandoning attempt", extra={"job_id": env.job_id, "subtask": env.subtask_id})
                return "lost"
            if renewal.job_state != "running":
                run.stop("cancelled")
                return "cancelled"

    def _finish(
        self,
        env: SubtaskEnvelope,
        pid: int,
        outcome: str,
        *,
        output: Any = None,
        error: str = "",
        retryable: bool = True,
        usage: Usage | None = None,
    ) -> str:
        completion = self.store.complete(
            env,
            node=self.node,
            pid=pid,
            outcome=outcome,  # type: ignore[arg-type]
            output=output,
            error=error[:4000],
            retryable=retryable,
            usage=usage,
        )
        if not completion.accepted:
            log.warning("result of a stale attempt discarded", extra={"job_id": env.job_id, "subtask": env.subtask_id})
            return "stale"
        self.metrics.finished(env, outcome, error)
        log.info(
            "subtask finished",
            extra={"job_id": env.job_id, "subtask": env.subtask_id, "attempt": env.attempt, "outcome": outcome},
        )
        # Release the dependents now instead of waiting for the router's loop.
        for resource_class in completion.ready_classes:
            try:
                self.dispatcher.release(resource_class)
            except Exception:  # noqa: BLE001 - the router's loop releases them anyway
                log.exception("fast-path release failed")
        return outcome
