"""Runs one delivered subtask: claim it, resolve its inputs, run the plugin under a lease, record the end.

The job store, not Celery, decides whether a delivery runs: a duplicate
delivery (visibility timeout, a resent release) finds the subtask owned and is
dropped; a delivery whose owner process died on this box, or whose lease has
expired, takes it over (a lost attempt, counted and bounded).

A Redis blip costs nothing that finished: the lease renewal keeps trying while
the plugin runs, and a finished attempt keeps its result and writes it when Redis
is back; the store refuses it if the attempt no longer owns the subtask. An outage
that outlasts the lease's give-up time (workers/lease_fence.py) stops the plugin
first: the box fences itself off before the store may hand the subtask to another.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from edgefleet.plugin_catalog import PluginCatalog, validate_action_args
from edgefleet.refs import RefError, resolve_refs
from edgefleet.scheduling.dispatch import Dispatcher, Taken
from edgefleet.schemas import ResourceClass, SubtaskEnvelope
from edgefleet.settings import Settings
from edgefleet.store import Completion, JobStore, Usage
from edgefleet.store.attempts import Claim, Claimant, completion_argv
from edgefleet.workers.artifacts import ArtifactFailure, NodeArtifacts
from edgefleet.workers.lease_fence import LeaseFence, LeaseTiming
from edgefleet.workers.metrics import WorkerMetrics, redelivery_reason
from edgefleet.workers.model_calls import ModelCallHandler
from edgefleet.workers.refill import Refiller
from edgefleet.workers.sandbox import LauncherProcess, LaunchSpec, PluginImage, SandboxedRun
from edgefleet.workers.sandbox_executors import Executor, Executors, Slot, link_slot
from edgefleet.workers.sandbox_pool import WarmLaunchers
from edgefleet.workers.store_retry import TRANSIENT, retry_transient

log = logging.getLogger(__name__)


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
class _InExecutor:
    """A subtask in a reusable executor, until its folder has left the executor's view."""

    executors: Executors
    executor: Executor
    slot: Slot
    done: bool = False

    def finish(self, *, reusable: bool) -> None:
        """Recycle the executor after anything but a success (stopped before its folder moves,
        so nothing still writes there), move the folder out, park the executor or stop it."""
        if self.done:
            return
        self.done = True
        if not reusable:
            self.executor.launcher.kill()
        try:
            self.executor.close_slot(self.slot)
        except OSError:
            log.exception("could not move a subtask's folder out of its executor")
            reusable = False
        self.executors.give_back(self.executor, reusable=reusable)


@dataclass
class _Attempt:
    """Shared between the sandbox's reader thread and the lease loop."""

    cancelled: threading.Event = field(default_factory=threading.Event)
    progress: tuple[float, str] | None = None
    progress_sent: tuple[float, str] | None = None
    # A checkpoint Redis could not take (an outage): saved again after the next renewal.
    pending_checkpoint: tuple[Any] | None = None
    # When the last claim or renewal that Redis accepted was sent: the lease runs at least
    # until then + the lease TTL, so no other box may take the subtask over before that.
    leased_at: float = field(default_factory=time.monotonic)


@dataclass
class NextTake:
    """A chain's request for its slot's next subtask, taken by the store call that records the
    current one's end (workers/chaining.py): `wanted` says whether the chain still has room then."""

    resource_class: ResourceClass
    wanted: Callable[[], bool]
    deadline: float = 0.0  # (monotonic) the chain takes no subtask after this
    attempted: bool = False  # the completion took (or found nothing to take)
    taken: Taken | None = None
    sent_at: float = 0.0  # when that call was sent (monotonic): the taken subtask's lease runs from then
    lingering: bool = False  # it found nothing, with time left: the slot now lingers (take_core.lua)

    def takes_for(self) -> float:
        """How long the slot still takes its next subtask itself: what its claims tell the store
        (`Claimant.takes_for`), so that the release keeps no message queued for it."""
        return max(0.0, self.deadline - time.monotonic()) if self.wanted() else 0.0

    def pop(self) -> tuple[bool, Taken | None, float, bool]:
        """(attempted, taken, sent_at, lingering), and ready for the next completion."""
        answer = (self.attempted, self.taken, self.sent_at, self.lingering)
        self.attempted, self.taken, self.lingering = False, None, False
        return answer


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
        self.lease_timing = LeaseTiming.of(self.lease_ttl)
        self.max_lost = settings.max_lost_attempts
        self.patience = settings.store_outage_patience
        self.launchers = WarmLaunchers.for_settings(settings)
        # Computed once: a settings property builds a new Path on every read, several times per subtask.
        self.workspace_root = settings.effective_workspace_dir
        self.executors = Executors(settings, self.launchers.policy, self.workspace_root)
        self.artifacts = NodeArtifacts(settings, store)
        self.refill = Refiller(dispatcher, self.node)
        # Set by a chain around the subtasks it runs (one at a time in this process).
        self.next_take: NextTake | None = None

    def run(self, raw_envelope: dict[str, Any]) -> str:
        """A delivered subtask (the Celery message's envelope)."""
        return self.run_envelope(SubtaskEnvelope.model_validate(raw_envelope))

    def run_envelope(self, env: SubtaskEnvelope) -> str:
        self.metrics.received(env)
        pid = os.getpid()
        # One token per delivery: a claim retried after a lost reply is known as the same claim.
        token = uuid.uuid4().hex
        attempt = _Attempt()

        def claim_once(dead_pid: int | None = None) -> Any:
            attempt.leased_at = time.monotonic()
            return self.store.attempts.claim(
                env,
                node=self.node,
                pid=pid,
                lease_ttl=self.lease_ttl,
                dead_pid=dead_pid,
                max_lost=self.max_lost,
                token=token,
                takes_for=self._takes_for(),
            )

        claim, _ = retry_transient(claim_once, patience=self.lease_ttl, what="claim")
        if claim.verdict == "owned":
            if claim.owner_pid and claim.owner_pid != pid and not process_alive(claim.owner_pid):
                log.warning(
                    "taking over subtask from dead process",
                    extra={"job_id": env.job_id, "subtask": env.subtask_id, "dead_pid": claim.owner_pid},
                )
                dead = claim.owner_pid
                claim, _ = retry_transient(lambda: claim_once(dead), patience=self.lease_ttl, what="claim")
            else:
                return self._dropped(env, f"already running in pid {claim.owner_pid}")
        if claim.verdict != "run":
            return self._dropped(env, claim.reason)
        return self._run_claimed(env, pid, attempt, claim)

    def run_claimed(self, env: SubtaskEnvelope, claim: Claim, claimed_at: float) -> str:
        """A subtask this process took and claimed itself (`Dispatcher.take`), the claim sent at
        `claimed_at` (monotonic): from then on its lease runs, as for a delivery's claim."""
        self.metrics.received(env)
        if claim.verdict != "run":
            return self._dropped(env, claim.reason)
        return self._run_claimed(env, os.getpid(), _Attempt(leased_at=claimed_at), claim)

    def claimant(self) -> Claimant:
        """This process as the store knows a claimant; a new claim token each time."""
        return Claimant(self.node, os.getpid(), self.lease_ttl, self.max_lost, uuid.uuid4().hex, self._takes_for())

    def _takes_for(self) -> float:
        return self.next_take.takes_for() if self.next_take is not None else 0.0

    def _run_claimed(self, env: SubtaskEnvelope, pid: int, attempt: _Attempt, claim: Claim) -> str:
        started = time.monotonic()
        self.metrics.started(env, claim.queued_at, claim.started_at)
        try:
            outcome = self._execute(
                env, pid, attempt, claim.args or {}, claim.needs_outputs or {}, claim.checkpoint, claim.tenant
            )
        finally:
            self.metrics.ended(env)
        self.metrics.observe(env, outcome, time.monotonic() - started)
        return outcome

    def _dropped(self, env: SubtaskEnvelope, reason: str) -> str:
        log.info(
            "delivery dropped",
            extra={"job_id": env.job_id, "subtask": env.subtask_id, "attempt": env.attempt, "reason": reason},
        )
        self.metrics.redelivered(redelivery_reason(reason))
        return "dropped"

    def _execute(
        self,
        env: SubtaskEnvelope,
        pid: int,
        attempt: _Attempt,
        args: dict[str, Any],
        outputs: dict[str, Any],
        checkpoint: Any,
        tenant: str = "",
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
        try:
            # Files of other boxes (earlier steps' artifacts, `$artifact`s) as local copies first.
            resolved, has_copies = self.artifacts.localise(
                env, resolved, list(outputs), self._job_dir(env), self._keep_alive(env, pid, attempt)
            )
        except ArtifactFailure as exc:
            return self._finish(env, pid, "failed", error=str(exc), retryable=exc.retryable)
        problems = validate_action_args(action.input_schema, resolved)
        if problems:
            reason = "; ".join(f"{f}: {r}" for f, r in problems)
            return self._finish(env, pid, "failed", error=f"invalid input: {reason}", retryable=False)
        unmet = self.catalog.unmet_dependencies(env.plugin)
        if unmet:
            return self._finish(env, pid, "failed", error=f"node {self.node} lacks dependencies: {', '.join(unmet)}")

        image = self.launchers.policy.image_of(plugin) if self.launchers.policy else PluginImage.of(plugin)
        timeout = min(env.timeout, plugin.manifest.limits.timeout)
        has_inputs = bool(outputs) or has_copies
        use: _InExecutor | None = None
        job_dir = self._job_dir(env)
        job_link = job_dir / env.subtask_id
        # One lstat: a first attempt (the usual case) finds nothing there and needs no recovery.
        earlier = os.path.lexists(job_link)
        if earlier:
            self.executors.recover(job_link)
        if self.executors.serves(plugin.manifest.isolation, image, job_link, has_inputs, fresh=not earlier):
            link = link_slot(self.executors.workspace_root, job_dir, env.subtask_id)
            # What a one-shot launcher would bind read-only, shown through the executor's mirror.
            inputs = [job_dir, *linked_folders(job_dir, exclude=job_dir)] if has_inputs else []
            try:
                executor, reused = self.executors.take(image, tenant)
            except OSError:
                link.unlink()
                raise
            self.metrics.sandbox_started(env, warm=reused)
            try:
                slot = executor.open_slot(link, inputs)
            except OSError:
                self.executors.give_back(executor, reusable=False)
                link.unlink()
                raise
            use = _InExecutor(self.executors, executor, slot)
            workspace, launcher = slot.workspace, executor.launcher
        else:
            workspace, launcher = self._launcher_for(env, image, has_inputs=has_inputs)
        try:
            return self._run_in(env, pid, attempt, image, resolved, checkpoint, timeout, workspace, launcher, use)
        finally:
            if use is not None:
                use.finish(reusable=False)  # an end that did not get as far as its outcome

    def _run_in(
        self,
        env: SubtaskEnvelope,
        pid: int,
        attempt: _Attempt,
        image: PluginImage,
        resolved: dict[str, Any],
        checkpoint: Any,
        timeout: float,
        workspace: Path,
        launcher: LauncherProcess,
        use: _InExecutor | None,
    ) -> str:
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
                folder=use.slot.folder if use is not None else None,
            ),
            launcher,
            on_progress=lambda fraction, message: setattr(attempt, "progress", (fraction, message)),
            on_checkpoint=lambda state: self._save_checkpoint(env, pid, attempt, state),
            on_model_call=self._model_call_for(deadline_at := time.monotonic() + timeout),
            kill_grace=self.settings.sandbox_kill_grace,
        )
        run.start()
        if use is None:
            # The next subtask of this plugin finds its launcher started while this one runs.
            self.launchers.replenish(image)
        if self._supervise(env, pid, run, attempt, deadline_at) == "lost":
            return "lost"
        result = run.outcome()
        if use is not None:
            # Its folder leaves the executor's view before the outputs are collected from it.
            use.finish(reusable=result.outcome == "succeeded")
        usage = Usage(isolation=result.isolation, cpu_seconds=result.cpu_seconds, max_rss_mb=result.max_rss_mb)
        if result.outcome == "lost":
            # Killed by something outside it (the OOM killer): not the plugin's failure.
            return self._lost(env, pid, result.error or "the plugin process was killed")
        if result.outcome == "timeout":
            error = result.error or f"timed out after {timeout:g} s"
            return self._finish(env, pid, "failed", error=error, usage=usage)
        if result.outcome == "succeeded":
            try:
                # Stored before the success is: a box that dies next loses none of its files.
                self.artifacts.collect(env, pid, workspace, result.output, self._keep_alive(env, pid, attempt))
            except ArtifactFailure as exc:
                return self._finish(env, pid, "failed", error=str(exc), retryable=exc.retryable, usage=usage)
            except TRANSIENT:
                raise  # the store is away: handled like every other store call of this attempt
            except Exception as exc:
                # A fault of ours, not the plugin's: the attempt fails once with the reason instead
                # of taking the worker process down, which would lose it to lease expiry again and again.
                log.exception("storing the outputs of %s/%s failed", env.job_id, env.subtask_id)
                error = f"storing the step's output files failed: {type(exc).__name__}: {exc}"
                return self._finish(env, pid, "failed", error=error, retryable=False, usage=usage)
            return self._finish(env, pid, "succeeded", output=result.output, usage=usage)
        if result.outcome == "cancelled":
            return self._finish(env, pid, "cancelled", error=result.error, usage=usage)
        return self._finish(env, pid, "failed", error=result.error, retryable=result.retryable, usage=usage)

    def _keep_alive(self, env: SubtaskEnvelope, pid: int, attempt: _Attempt) -> Callable[[], bool]:
        """Renew the lease during a long artifact transfer; False once another attempt owns it."""

        def renew() -> bool:
            sent = time.monotonic()
            try:
                owner = self.store.attempts.renew(env, node=self.node, pid=pid, lease_ttl=self.lease_ttl).still_owner
            except TRANSIENT:
                return True  # an outage: the transfer goes on, the completion decides (as for a plugin)
            if owner:
                attempt.leased_at = sent  # the plugin's lease fence times its give-up from here
            return owner

        return renew

    def _job_dir(self, env: SubtaskEnvelope) -> Path:
        return self.workspace_root / env.job_id

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
        """On the sandbox's reader thread: it must not raise, nor wait out an outage."""
        try:
            saved = self.store.attempts.save_checkpoint(env, node=self.node, pid=pid, state=state)
        except TRANSIENT:
            attempt.pending_checkpoint = (state,)  # the lease loop saves it once Redis is back
            return
        attempt.pending_checkpoint = None
        if not saved:
            attempt.cancelled.set()  # this attempt no longer owns the subtask: stop its work

    def _supervise(self, env: SubtaskEnvelope, pid: int, run: SandboxedRun, attempt: _Attempt, deadline: float) -> str:
        """Renew the lease while the plugin runs; stop it on cancel, timeout or a lost lease.

        While Redis is unreachable the plugin keeps running and renewal is tried again each
        round, until the lease fence (its own thread) kills the plugin at the give-up time,
        strictly before the store may give the subtask to another box; the attempt then ends
        as lost, recording nothing (the reaper requeues it)."""
        fence = LeaseFence(self.lease_timing, attempt.leased_at, run.kill, armed=False)
        try:
            return self._renew_while_running(env, pid, run, attempt, deadline, fence)
        finally:
            fence.close()

    def _renew_while_running(
        self, env: SubtaskEnvelope, pid: int, run: SandboxedRun, attempt: _Attempt, deadline: float, fence: LeaseFence
    ) -> str:
        interval = self.lease_timing.renew_interval
        unreachable_since: float | None = None
        while True:
            if fence.fired:
                log.error(
                    "lease not renewed in time; the plugin was stopped before the subtask can be given to another box",
                    extra={
                        "job_id": env.job_id,
                        "subtask": env.subtask_id,
                        "since_renewal_s": round((fence.fired_at or 0.0) - attempt.leased_at, 2),
                        "lease_ttl": self.lease_ttl,
                    },
                )
                return "lost"
            if run.wait(min(interval, max(0.0, deadline - time.monotonic()))) and not fence.fired:
                return "done"
            fence.arm()  # after one wait of at most R, before a renewal can block (see LeaseFence)
            run.sample()
            if time.monotonic() >= deadline:
                run.stop("timeout")
                return "timeout"
            if attempt.cancelled.is_set():  # a checkpoint was refused: another attempt owns it
                run.stop("lost")
                return "lost"
            progress = attempt.progress if attempt.progress != attempt.progress_sent else None
            sent = time.monotonic()
            try:
                renewal = self.store.attempts.renew(
                    env, node=self.node, pid=pid, lease_ttl=self.lease_ttl, progress=progress
                )
            except TRANSIENT as exc:
                if unreachable_since is None:
                    unreachable_since = sent
                    log.warning(
                        "job store unreachable; the plugin keeps running",
                        extra={"job_id": env.job_id, "subtask": env.subtask_id, "error": type(exc).__name__},
                    )
                continue
            attempt.leased_at = sent
            fence.renewed(sent)
            if unreachable_since is not None:
                log.info(
                    "job store reachable again; lease renewed",
                    extra={
                        "job_id": env.job_id,
                        "subtask": env.subtask_id,
                        "outage_s": round(time.monotonic() - unreachable_since, 1),
                    },
                )
                unreachable_since = None
            attempt.progress_sent = attempt.progress
            if renewal.still_owner and attempt.pending_checkpoint is not None:
                self._save_checkpoint(env, pid, attempt, attempt.pending_checkpoint[0])
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
        request = self.next_take

        def write() -> Completion:
            argv = completion_argv(
                env,
                node=self.node,
                pid=pid,
                outcome=outcome,  # type: ignore[arg-type]
                output=output,
                error=error[:4000],
                retryable=retryable,
                usage=usage,
            )
            if request is None or request.attempted or not request.wanted():
                return self.store.attempts.complete_argv(argv)
            # A retry after a lost reply takes nothing: the completion is refused as stale then.
            request.sent_at = time.monotonic()
            claimant = self.claimant()
            done, request.taken = self.dispatcher.complete_and_take(argv, request.resource_class, claimant)
            request.attempted = True
            request.lingering = done.accepted and request.taken is None and claimant.takes_for > 0
            return done

        # The result is kept while Redis is away, and written when it is back.
        try:
            completion, failures = retry_transient(write, patience=self.patience, what="result write")
        except TRANSIENT:
            log.error(
                "result not written: job store unreachable", extra={"job_id": env.job_id, "subtask": env.subtask_id}
            )
            return "abandoned"
        if not completion.accepted:
            if failures and completion.job_state == outcome:
                # A try whose reply was lost had written it already.
                log.info(
                    "result was written before the connection broke",
                    extra={"job_id": env.job_id, "subtask": env.subtask_id},
                )
                return outcome
            log.warning("result of a stale attempt discarded", extra={"job_id": env.job_id, "subtask": env.subtask_id})
            return "stale"
        self.metrics.finished(env, outcome, error)
        log.info(
            "subtask finished",
            extra={"job_id": env.job_id, "subtask": env.subtask_id, "attempt": env.attempt, "outcome": outcome},
        )
        self._release(completion.ready_classes)
        return outcome

    def _release(self, ready_classes: list[ResourceClass]) -> None:
        """Release what became ready now instead of waiting for the router's loop (on the
        refill thread: the slot's next claim does not wait for it)."""
        self.refill.request(ready_classes)

    def _lost(self, env: SubtaskEnvelope, pid: int, why: str) -> str:
        """A lost attempt: a new one resumes from the checkpoint, whatever `retries` says,
        until the subtask has been lost `max_lost_attempts` times."""
        try:
            lost, _ = retry_transient(
                lambda: self.store.attempts.lost(env, node=self.node, pid=pid, max_lost=self.max_lost, why=why),
                patience=self.patience,
                what="lost attempt",
            )
        except TRANSIENT:
            return "abandoned"  # the lease expires and the reaper counts the loss instead
        log.warning(
            "plugin process lost",
            extra={
                "job_id": env.job_id,
                "subtask": env.subtask_id,
                "attempt": env.attempt,
                "verdict": lost.verdict,
                "why": why,
            },
        )
        if lost.verdict == "failed":
            self.metrics.finished(env, "failed", why)
        self._release(lost.ready_classes)
        return "lost"
