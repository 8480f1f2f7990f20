"""The pipeline watcher: runs a job whenever a pipeline's input branch advances.

One trio task per daemon. It wakes when a commit is made through this daemon
(:meth:`Watcher.nudge`, at once) and every ``poll_interval`` seconds (heads moved
by other writers, pipelines created elsewhere), waits ``debounce`` seconds so a
burst of commits becomes one job, and starts a job for every pipeline whose
input head is not processed yet, or joins the one another node started.

Jobs are the cluster's, not the node's (docs/format.md §10b): a pipeline has one
current job (``jobheads/<pipeline>``, moved by compare-and-swap) and so at most one
running job among all nodes; commits that land meanwhile are picked up by the next
one, which processes the newest head (the diff covers everything in between). The
node that plans a job first stores its plan and makes it current; every node then
takes part in it (:class:`daemon.jobrun.JobRun`): it claims datums while it has
free slots, records each datum's output as soon as it succeeds, and one node makes
the output commit. A datum that fails every try (counted across nodes) fails the
job; nothing is committed.

Each pipeline's step of a tick is on its own: a pipeline that cannot run (its
input branch or repository is gone, its runtime refuses it) is logged once,
recorded in the store for ``pipeline list``/``inspect`` and ``wait``
(:class:`vfs.pipeline.records.PipelineError`), and holds up no other pipeline.

Restarts: a job that failed or was cancelled is not run again for the same input
head, version and transform, whichever node ran it (its job record says so); a
new head or a pipeline update runs it again. A job that was running when a node
died goes on: the other nodes take over its claims when their leases expire, and
the node itself, restarted, joins it again and takes its own claims back at once.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio

from daemon.jobrun import JobRun, describe
from daemon.runtimes import get_runtime
from daemon.runtimes.runc import DEFAULT_STATE_ROOT, DEFAULT_USERNS_BASE
from vfs.errors import (
    Corruption,
    InvalidSpec,
    JobNotFound,
    LeaseLost,
    ObjectNotFound,
    StoreError,
    VfsError,
)
from vfs.heads import Heads
from vfs.pipeline import claims, records, registry
from vfs.pipeline.claims import DEFAULT_LEASE_TTL
from vfs.pipeline.jobs import JobPlan, plan_document, plan_from_document, plan_job
from vfs.pipeline.records import JobRecord
from vfs.pipeline.registry import PipelineVersion
from vfs.pipeline.spec import DEFAULT_DATUM_TIMEOUT
from vfs.refs import now_iso

__all__ = ["Watcher", "describe"]

log = logging.getLogger("daemon.watcher")

# pipelines/ is listed at least this often; more often when something says it changed
# (see Watcher._look)
PIPELINES_RELIST_SECONDS = 30.0
RERUN_ONLY_ON_CHANGE = ("failed", "cancelled")  # job states not run again for the same head


@dataclass
class _Running:
    job: JobRecord
    scope: trio.CancelScope
    run: JobRun | None = None


@dataclass
class _State:
    """What the watcher knows of one pipeline between ticks."""

    done: tuple[tuple, int] | None = None  # (input heads, version) known to need nothing
    running: _Running | None = None
    last_error: str | None = None  # why it cannot run ("": it can; None: not known yet)
    error_heads: dict | None = None  # the input heads last_error was recorded at
    error_stored: bool = True  # last_error is in the store (False: store it again)
    refused: str | None = None  # the job this node cannot take part in (said once)


class Watcher:
    """Runs the pipelines of one store on this node."""

    def __init__(self, store, scratch_dir: str, *, poll_interval: float = 2.0,
                 debounce: float = 0.2, allow_process_runtime: bool = False,
                 userns_base: int | None = DEFAULT_USERNS_BASE,
                 datum_timeout: float | None = DEFAULT_DATUM_TIMEOUT,
                 lease_ttl: float = DEFAULT_LEASE_TTL,
                 on_commit: Callable[[str, str], None] | None = None) -> None:
        self.store = store
        self.scratch_dir = scratch_dir
        self.poll_interval = poll_interval
        self.debounce = debounce
        self.allow_process_runtime = allow_process_runtime
        self.userns_base = userns_base
        self.datum_timeout = datum_timeout  # when the spec sets none (None: no limit)
        self.lease_ttl = lease_ttl  # of this node's claims (docs/format.md §10b)
        self.on_commit = on_commit or (lambda repo, branch: None)
        self.node = store.node.name
        self._states: dict[str, _State] = {}
        self._runtimes: dict[str, object] = {}  # one per name: they cache image digests
        self._wake = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        # A round's look at the store: one listing of refs/ whatever the number of
        # pipelines (vfs/heads.py), pipelines/ listed again only when needed (_look).
        self.heads = Heads(store)
        self._registry = registry.Pipelines(store.objects)
        self._pipelines: list[PipelineVersion] | None = None
        self._pipelines_listed = 0.0  # monotonic time of the last listing of pipelines/
        self._relist = True  # list pipelines/ at the next round

    # -- entry points ------------------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self._token = trio.lowlevel.current_trio_token()
        os.makedirs(self.scratch_dir, exist_ok=True)
        await trio.to_thread.run_sync(self._recover)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while True:
                with trio.move_on_after(self.poll_interval):
                    await self._wake.wait()
                if self._wake.is_set():
                    self._wake = trio.Event()
                    await trio.sleep(self.debounce)
                    self._wake = trio.Event()  # commits during the debounce: same tick
                try:
                    await self._tick()
                except VfsError as exc:
                    log.error("pipeline watcher: %s", exc)
                except Exception:  # a bug must not take the mount down with it
                    log.exception("pipeline watcher: unexpected error (retrying)")

    def nudge(self) -> None:
        """Something changed (a commit, a pipeline): look now. Thread-safe."""
        self._relist = True
        if self._token is None:
            return
        try:
            trio.from_thread.run_sync(self._wake.set, trio_token=self._token)
        except RuntimeError:  # called from the trio thread itself
            self._wake.set()
        except trio.RunFinishedError:
            pass

    def cancel_job(self, job_id: str) -> bool:
        """Stop this node's part in a job at once (its record says cancelled already:
        the other nodes stop at their next look); False if it takes no part here.

        Thread-safe (the control socket's requests run in worker threads).
        """
        try:
            trio.lowlevel.current_task()
        except RuntimeError:
            return trio.from_thread.run_sync(self._cancel, job_id, trio_token=self._token)
        return self._cancel(job_id)

    def _cancel(self, job_id: str) -> bool:
        for state in self._states.values():
            if state.running is not None and state.running.job.id == job_id:
                state.running.scope.cancel()
                return True
        return False

    def running_jobs(self) -> list[JobRecord]:
        return [s.running.run.job if s.running.run is not None else s.running.job
                for s in self._states.values() if s.running is not None]

    def running_datums(self) -> int:
        """How many datums this node is running now (its heartbeat says so). Any
        thread: the tables are copied first."""
        runs = [s.running.run for s in list(self._states.values())
                if s.running is not None and s.running.run is not None]
        return sum(len(run.leases) for run in runs)

    # -- ticks -------------------------------------------------------------------------------

    def _recover(self) -> None:
        """Clean up after a daemon that died. Jobs it took part in go on (this node
        joins them again, taking its own claims back at once); only a job of a vfs
        before shared jobs (no plan in the store), which nobody else can finish, is
        marked killed (the next job resumes it)."""
        self._sweep_containers()
        shutil.rmtree(self.scratch_dir, ignore_errors=True)
        os.makedirs(self.scratch_dir, exist_ok=True)
        for version in registry.list_pipelines(self.store.objects):
            for job in records.list_jobs(self.store.objects, version.name):
                if (job.state == "running" and job.node == self.node and not
                        self.store.objects.exists(claims.claim_key(job.id, claims.PLAN))):
                    job.state = "killed"
                    # When it was last known to run, not now: the daemon was down between.
                    job.finished = job.last_seen or job.first_start or job.started
                    job.error = ("vfsd stopped during the job; the next job reuses the "
                                 "datums it finished")
                    records.save_job(self.store.objects, job)
                    log.warning("job %s was cut short by a daemon stop: marked killed", job.id)

    def _sweep_containers(self) -> None:
        """Delete runc containers a killed daemon left behind (bundles in our scratch dir)."""
        runc = shutil.which("runc")
        if runc is None or not os.path.isdir(DEFAULT_STATE_ROOT):
            return
        argv = [runc, "--root", DEFAULT_STATE_ROOT]
        try:
            listing = subprocess.run([*argv, "list", "--format", "json"], capture_output=True,
                                     text=True, timeout=60, check=True).stdout
            containers = json.loads(listing or "null") or []
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            log.warning("cannot list runc containers to clean up: %s", exc)
            return
        for container in containers:
            if container.get("bundle", "").startswith(self.scratch_dir + os.sep):
                subprocess.run([*argv, "delete", "--force", container["id"]], check=False,
                               capture_output=True, timeout=60)
                log.warning("deleted container %s left by a daemon that died",
                            container["id"])

    async def _tick(self) -> None:
        pipelines = await trio.to_thread.run_sync(self._look)
        names = {p.name for p in pipelines}
        for name, state in self._states.items():
            if name not in names and state.running is not None:
                log.info("pipeline %s was deleted: cancelling job %s", name,
                         state.running.job.id)
                await trio.to_thread.run_sync(self._cancel_deleted, state.running.job.id)
                state.running.scope.cancel()
        for version in pipelines:
            state = self._states.setdefault(version.name, _State())
            if state.running is not None:
                continue
            # Whatever goes wrong here is this pipeline's: the others still run.
            heads: dict[str, str | None] = {}
            try:
                assert version.spec is not None
                heads = await trio.to_thread.run_sync(self._input_heads, version)
                plan = await self._next_job(version, state, heads)
            except VfsError as exc:
                await self._cannot_run(version, state, str(exc), heads)
                continue
            except Exception as exc:  # a bug: keep it to this pipeline (and say it once)
                if f"{type(exc).__name__}: {exc}" != state.last_error:
                    log.exception("pipeline %s: unexpected error", version.name)
                await self._cannot_run(version, state, f"{type(exc).__name__}: {exc}",
                                       heads)
                continue
            await self._cannot_run(version, state, "", heads)
            if plan is None:
                continue
            assert self._nursery is not None
            scope = trio.CancelScope()
            state.running = _Running(plan.job, scope)
            self._nursery.start_soon(self._job_task, state, plan, scope)

    def _input_heads(self, version: PipelineVersion) -> dict[str, str | None]:
        """Input name -> its branch's head, from this round's listing."""
        assert version.spec is not None
        return {leaf.name: self.heads.head(leaf.repo, leaf.branch).commit
                for leaf in version.spec.leaves}

    def _look(self) -> list[PipelineVersion]:
        """This round's pipelines, after one listing of every branch head.

        ``pipelines/`` is listed again only when this daemon was nudged (a commit or a
        pipeline change made through it), when a branch moved, came or went (creating
        a pipeline makes its output branch), and at least every
        ``PIPELINES_RELIST_SECONDS`` (an update or a delete made through another node).
        """
        moved = self.heads.poll()
        now = time.monotonic()
        if (moved or self._relist or self._pipelines is None
                or now - self._pipelines_listed >= PIPELINES_RELIST_SECONDS):
            self._relist = False  # before the listing: a nudge meanwhile lists again
            try:
                self._pipelines = self._registry.poll()
            except BaseException:
                self._relist = True
                raise
            self._pipelines_listed = now
        return self._pipelines

    async def _next_job(self, version: PipelineVersion, state: _State,
                        heads: dict[str, str | None]) -> JobPlan | None:
        """The job to take part in for ``version`` now, or None.

        The pipeline's current job (``jobheads/<pipeline>``) while it runs, whoever
        started it; else a new job if the input head needs one (none: nothing to do,
        or the current job for this head, version and transform failed or was
        cancelled: not again), started unless another node starts one first (then
        the next tick joins that one).
        """
        key = (tuple(heads.values()), version.version)
        if state.done == key:
            return None
        objects = self.store.objects
        current = await trio.to_thread.run_sync(claims.read_current, objects, version.name)
        job = None
        if current.job is not None:
            job = await trio.to_thread.run_sync(self._current_record, current.job)
            if job is not None and job.state == "running":
                return await self._join(version, state, job)
        plan = await trio.to_thread.run_sync(self._plan, version)
        if plan is None:
            state.done = key
            return None
        if (job is not None and job.state in RERUN_ONLY_ON_CHANGE
                and (job.commits(), job.version, job.transform)
                == (plan.job.commits(), version.version, plan.job.transform)):
            log.info("pipeline %s: job %s %s on %s; not run again until an input "
                     "moves or the pipeline is updated", version.name, job.id, job.state,
                     job.describe_inputs())
            state.done = key
            return None
        if not await trio.to_thread.run_sync(self._start_job, plan, current):
            self._wake.set()  # another node started one: join it
            return None
        return plan

    def _current_record(self, job_id: str) -> JobRecord | None:
        """The record of the current job; made from its plan if its node has not
        stored it yet (or died before it did)."""
        try:
            return records.load_job(self.store.objects, job_id)
        except JobNotFound:
            pass
        try:
            document = claims.load_plan(self.store.objects, job_id)
            records.create_job(self.store.objects, JobRecord.from_dict(dict(document["job"])))
        except ObjectNotFound:
            log.warning("the current job %s has neither a record nor a plan", job_id)
            return None
        except (Corruption, KeyError, TypeError) as exc:
            log.warning("the plan of job %s is damaged: %s", job_id, exc)
            return None
        return records.load_job(self.store.objects, job_id)

    def _start_job(self, plan: JobPlan, current: claims.Current) -> bool:
        """Make ``plan`` the pipeline's current job; False if another node made one."""
        objects = self.store.objects
        job = plan.job
        claims.save_plan(objects, job.id, plan_document(plan))
        if not claims.move_current(objects, job.pipeline, current, job.id):
            claims.delete_claims(objects, job.id)
            return False
        records.create_job(objects, job)
        return True

    async def _join(self, version: PipelineVersion, state: _State, job: JobRecord
                    ) -> JobPlan | None:
        """The plan of a running job another node started (or this one, before a
        restart); None if this node cannot run it (said once)."""
        if version.version != job.version:
            version = await trio.to_thread.run_sync(registry.version, self.store.objects,
                                                    version.name, job.version)
        assert version.spec is not None
        runtime = self.runtime(version.spec.runtime)
        digest = await trio.to_thread.run_sync(runtime.image_digest, version.spec.image)
        if digest != job.image:
            if state.refused != job.id:
                log.warning("job %s: not taking part: the image of pipeline %s is %s on "
                            "this node, %s where the job was planned", job.id, version.name,
                            digest[:16], job.image[:16])
                state.refused = job.id
            return None
        document = await trio.to_thread.run_sync(claims.load_plan, self.store.objects, job.id)
        plan = await trio.to_thread.run_sync(plan_from_document, self.store, version, document)
        plan.job = job
        return plan

    def _cancel_deleted(self, job_id: str) -> None:
        try:
            records.cancel_job(self.store.objects, job_id, "its pipeline was deleted")
        except VfsError:
            pass  # it finished meanwhile

    async def _cannot_run(self, version: PipelineVersion, state: _State, error: str,
                          heads: dict[str, str | None]) -> None:
        """Record why a pipeline cannot run ("": it can), when that changes: logged
        once, stored for ``pipeline list``/``inspect`` and ``wait`` (again when an
        input head moves: ``wait`` must know the new head cannot be processed either)."""
        if error != state.last_error:
            if error:
                log.error("pipeline %s: cannot run: %s", version.name, error)
            elif state.last_error is not None:
                log.info("pipeline %s: runs again", version.name)
        elif state.error_stored and (not error or heads == state.error_heads):
            return
        state.last_error, state.error_heads = error, heads
        try:
            if error:
                await trio.to_thread.run_sync(records.save_pipeline_error, self.store.objects,
                                              records.PipelineError(
                                                  version.name, error, now_iso(), self.node,
                                                  version.version,
                                                  next(iter(heads.values()), None),
                                                  dict(heads)))
            else:
                await trio.to_thread.run_sync(records.clear_pipeline_error,
                                              self.store.objects, version.name)
            state.error_stored = True
        except VfsError as exc:
            if state.error_stored:
                log.warning("pipeline %s: cannot record whether it can run: %s",
                            version.name, exc)
            state.error_stored = False  # again at the next tick

    def runtime(self, name: str):
        if name not in self._runtimes:
            self._runtimes[name] = get_runtime(
                name, cache_dir=os.path.join(self.store.cache_dir, "images"),
                allow_process_as_root=self.allow_process_runtime,
                userns_base=self.userns_base)
        return self._runtimes[name]

    def _plan(self, version: PipelineVersion) -> JobPlan | None:
        assert version.spec is not None
        runtime = self.runtime(version.spec.runtime)
        runtime.check(version.spec.image)
        digest = runtime.image_digest(version.spec.image)
        return plan_job(self.store, version, image_digest=digest, node=self.node)

    async def _job_task(self, state: _State, plan: JobPlan, scope: trio.CancelScope) -> None:
        job = plan.job
        try:
            with scope:
                run = JobRun(self.store, plan, self.runtime(plan.version.spec.runtime),
                             scratch_dir=self.scratch_dir, lease_ttl=self.lease_ttl,
                             datum_timeout=self.datum_timeout, on_commit=self.on_commit)
                if state.running is not None:
                    state.running.run = run
                try:
                    await self._take_part(run)
                except (StoreError, LeaseLost) as exc:
                    # This node's trouble, not the job's: the other nodes go on, and
                    # this one joins again at a later tick.
                    log.error("job %s: this node stops taking part: %s", job.id, exc)
                except Exception as exc:  # a bug: fail the job, not vfsd
                    if not isinstance(exc, VfsError):
                        log.exception("job %s: unexpected error", job.id)
                    with trio.CancelScope(shield=True):
                        try:
                            await trio.to_thread.run_sync(run.fail, describe(exc))
                        except VfsError as again:
                            log.error("job %s: cannot record its failure: %s", job.id, again)
        finally:
            state.running = None
            # A big job leaves many files: never remove them in the trio thread (the
            # mount would stop answering meanwhile).
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(
                    shutil.rmtree, os.path.join(self.scratch_dir, job.id), True)
            self._wake.set()  # the head may have moved while the job ran

    async def _take_part(self, run: JobRun) -> None:
        plan = run.plan
        job = plan.job
        spec = plan.version.spec
        assert spec is not None
        if spec.invalid:
            raise InvalidSpec(
                f"{spec.invalid}: version {plan.version.version} of pipeline {spec.pipeline} "
                "was stored by an older vfs that accepted it; correct the spec and store it "
                "again with 'vfsctl pipeline update -f SPEC'")
        log.info("job %s: %s, %d datums to run, %d reused, %d removed", job.id,
                 job.describe_inputs(), len(plan.tasks), job.datums_reused,
                 job.datums_removed)
        unsupported = run.runtime.unsupported_limits(spec.memory, spec.cpu, spec.pids)
        if unsupported:
            log.warning("pipeline %s: runtime %s cannot enforce %s", spec.pipeline,
                        spec.runtime, ", ".join(unsupported))
        await run.run()
        self._wake.set()  # pipelines downstream of the output
