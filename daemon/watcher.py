"""The pipeline watcher: runs a job whenever a pipeline's input branch advances.

One trio task per daemon. It wakes when a commit is made through this daemon
(:meth:`Watcher.nudge`, at once) and every ``poll_interval`` seconds (heads moved
by other writers, pipelines created elsewhere), waits ``debounce`` seconds so a
burst of commits becomes one job, and starts a job for every pipeline whose
input head is not processed yet. A pipeline runs at most one job at a time;
commits that land meanwhile are picked up by the next one, which processes the
newest head (the diff covers everything in between).

A job (:meth:`Watcher._run_job`): plan (:func:`vfs.pipeline.jobs.plan_job`), run the
datums that have no recorded output (``parallelism`` container starts at once,
``datum_batch`` datums per start, ``datum_tries`` tries each), record each
datum's output as soon as it succeeds (so a job cut short by a crash resumes
where it was: the next job reuses them), then commit the merged outputs. A datum
that fails every try fails the job; nothing is committed.

Each pipeline's step of a tick is on its own: a pipeline that cannot run (its
input branch or repository is gone, its runtime refuses it) is logged once,
recorded in the store for ``pipeline list``/``inspect`` and ``wait``
(:class:`vfs.pipeline.records.PipelineError`), and holds up no other pipeline.

Restarts: a job that failed or was cancelled is not run again for the same input
head, version and transform, whether this daemon ran it or an earlier one (its job
record says so); a new head or a pipeline update runs it again. A job that was
running when its daemon died is marked killed, finished when it was last seen
(``last_seen``, saved at least every ``JOB_HEARTBEAT_SECONDS``), and the next
job resumes it: the datums it finished are reused.
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

from daemon.runtimes import ContainerRun, DatumIO, get_runtime
from daemon.runtimes.runc import DEFAULT_STATE_ROOT, DEFAULT_USERNS_BASE
from vfs.errors import InvalidSpec, VfsError
from vfs.heads import Heads
from vfs.pipeline import records, registry
from vfs.pipeline.jobs import (
    DatumTask,
    JobPlan,
    collect_outputs,
    commit_outputs,
    materialize,
    plan_job,
)
from vfs.pipeline.records import DatumRecord, FailedDatum, JobRecord
from vfs.pipeline.registry import PipelineVersion
from vfs.pipeline.spec import DEFAULT_DATUM_TIMEOUT
from vfs.refs import current_user, now_iso

log = logging.getLogger("daemon.watcher")

PROGRESS_SAVE_SECONDS = 2.0
JOB_HEARTBEAT_SECONDS = 30.0  # a running job's record is saved at least this often
# pipelines/ is listed at least this often; more often when something says it changed
# (see Watcher._look)
PIPELINES_RELIST_SECONDS = 30.0
RERUN_ONLY_ON_CHANGE = ("failed", "cancelled")  # job states not run again for the same head
# Free bytes under which the scratch disk counts as full: what a datum printed then
# may be lost (its command writes its log there directly).
_SCRATCH_FULL_BELOW = 1 << 20


class DatumFailed(Exception):
    def __init__(self, failure: FailedDatum) -> None:
        super().__init__(failure.error)
        self.failure = failure


@dataclass
class _Running:
    job: JobRecord
    scope: trio.CancelScope
    cancelled_by_user: bool = False


@dataclass
class _State:
    """What the watcher knows of one pipeline between ticks."""

    done: tuple[str, int] | None = None  # (input head, version) known to need nothing
    running: _Running | None = None
    last_error: str | None = None  # why it cannot run ("": it can; None: not known yet)
    error_head: str | None = None  # the input head last_error was recorded at
    error_stored: bool = True  # last_error is in the store (False: store it again)
    looked: bool = False  # its job records were read since this daemon started


class Watcher:
    """Runs the pipelines of one store on this node."""

    def __init__(self, store, scratch_dir: str, *, poll_interval: float = 2.0,
                 debounce: float = 0.2, allow_process_runtime: bool = False,
                 userns_base: int | None = DEFAULT_USERNS_BASE,
                 datum_timeout: float | None = DEFAULT_DATUM_TIMEOUT,
                 on_commit: Callable[[str, str], None] | None = None) -> None:
        self.store = store
        self.scratch_dir = scratch_dir
        self.poll_interval = poll_interval
        self.debounce = debounce
        self.allow_process_runtime = allow_process_runtime
        self.userns_base = userns_base
        self.datum_timeout = datum_timeout  # when the spec sets none (None: no limit)
        self.on_commit = on_commit or (lambda repo, branch: None)
        self.node = current_user()
        self._states: dict[str, _State] = {}
        self._runtimes: dict[str, object] = {}  # one per name: they cache image digests
        self._wake = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._saving: dict[str, trio.Lock] = {}  # job id -> its saves, one at a time
        self._saved_at: dict[str, float] = {}  # job id -> monotonic time of its last save
        self._logged: dict[str, set[str]] = {}  # job id -> datums whose log is stored
        # A round's look at the store: one listing of refs/ whatever the number of
        # pipelines (vfs/heads.py), pipelines/ listed again only when needed (_look).
        self.heads = Heads(store)
        self._registry = registry.Pipelines(store.objects)
        self._pipelines: list[PipelineVersion] | None = None
        self._pipelines_listed = 0.0  # monotonic time of the last listing of pipelines/
        self._relist = True  # list pipelines/ at the next round
        self._datums_running = 0  # datums being prepared or run now

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
                    await self._heartbeat()
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
        """Cancel a running job of this daemon; False if it is not running here.

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
                state.running.cancelled_by_user = True
                state.running.scope.cancel()
                return True
        return False

    def running_jobs(self) -> list[JobRecord]:
        return [s.running.job for s in self._states.values() if s.running is not None]

    def running_datums(self) -> int:
        """How many datums this node is running now (its heartbeat says so).
        Thread-safe."""
        return self._datums_running

    # -- ticks -------------------------------------------------------------------------------

    def _recover(self) -> None:
        """Jobs this node was running when it died: mark them killed (the next job resumes)."""
        self._sweep_containers()
        shutil.rmtree(self.scratch_dir, ignore_errors=True)
        os.makedirs(self.scratch_dir, exist_ok=True)
        for version in registry.list_pipelines(self.store.objects):
            for job in records.list_jobs(self.store.objects, version.name):
                if job.state == "running" and job.node == self.node:
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
                state.running.scope.cancel()
        for version in pipelines:
            state = self._states.setdefault(version.name, _State())
            if state.running is not None:
                continue
            # Whatever goes wrong here is this pipeline's: the others still run.
            head: str | None = None
            try:
                assert version.spec is not None
                head = (await trio.to_thread.run_sync(
                    self.heads.head, version.spec.input_repo, version.spec.input_branch)
                        ).commit
                plan = await self._next_job(version, state, head or "")
            except VfsError as exc:
                await self._cannot_run(version, state, str(exc), head)
                continue
            except Exception as exc:  # a bug: keep it to this pipeline (and say it once)
                if f"{type(exc).__name__}: {exc}" != state.last_error:
                    log.exception("pipeline %s: unexpected error", version.name)
                await self._cannot_run(version, state, f"{type(exc).__name__}: {exc}", head)
                continue
            await self._cannot_run(version, state, "", head)
            if plan is None:
                continue
            assert self._nursery is not None
            scope = trio.CancelScope()
            state.running = _Running(plan.job, scope)
            self._nursery.start_soon(self._job_task, state, plan, scope)

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

    async def _next_job(self, version: PipelineVersion, state: _State, head: str
                        ) -> JobPlan | None:
        """The job to run for ``version`` now, or None (nothing to do, or a job for this
        head, version and transform failed or was cancelled: not again)."""
        key = (head, version.version)
        if state.done == key:
            return None
        plan = await trio.to_thread.run_sync(self._plan, version)
        if plan is None:
            state.done = key
            return None
        if not state.looked:
            # What this daemon did not see itself (a job before a restart) is in the
            # store: the latest job tells whether this head already failed.
            last = await trio.to_thread.run_sync(records.latest_job, self.store.objects,
                                                 version.name)
            state.looked = True
            if (last is not None and last.state in RERUN_ONLY_ON_CHANGE
                    and (last.input_commit, last.version, last.transform)
                    == (plan.job.input_commit, version.version, plan.job.transform)):
                log.info("pipeline %s: job %s %s on %s@%s; not run again until the input "
                         "moves or the pipeline is updated", version.name, last.id,
                         last.state, last.input_repo, last.input_commit[:12])
                state.done = (plan.job.input_commit, version.version)
                return None
        return plan

    async def _cannot_run(self, version: PipelineVersion, state: _State, error: str,
                          head: str | None) -> None:
        """Record why a pipeline cannot run ("": it can), when that changes: logged
        once, stored for ``pipeline list``/``inspect`` and ``wait`` (again when the
        input head moves: ``wait`` must know the new head cannot be processed either)."""
        if error != state.last_error:
            if error:
                log.error("pipeline %s: cannot run: %s", version.name, error)
            elif state.last_error is not None:
                log.info("pipeline %s: runs again", version.name)
        elif state.error_stored and (not error or head == state.error_head):
            return
        state.last_error, state.error_head = error, head
        try:
            if error:
                await trio.to_thread.run_sync(records.save_pipeline_error, self.store.objects,
                                              records.PipelineError(
                                                  version.name, error, now_iso(), self.node,
                                                  version.version, head))
            else:
                await trio.to_thread.run_sync(records.clear_pipeline_error,
                                              self.store.objects, version.name)
            state.error_stored = True
        except VfsError as exc:
            if state.error_stored:
                log.warning("pipeline %s: cannot record whether it can run: %s",
                            version.name, exc)
            state.error_stored = False  # again at the next tick

    async def _heartbeat(self) -> None:
        """Save the record of every job that has not been saved for a while, so that
        ``last_seen`` says when a job cut short by a daemon's death last ran."""
        for state in list(self._states.values()):
            running = state.running
            if running is not None and not running.job.done and time.monotonic() - \
                    self._saved_at.get(running.job.id, 0.0) > JOB_HEARTBEAT_SECONDS:
                await self._save(running.job)

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
        try:
            with scope:
                try:
                    await self._run_job(plan)
                except Exception as exc:  # a bug or a store failure: fail the job, not vfsd
                    if not isinstance(exc, VfsError):
                        log.exception("job %s: unexpected error", plan.job.id)
                    plan.job.state = "failed"
                    plan.job.error = describe(exc)
                    plan.job.finished = now_iso()
                    with trio.CancelScope(shield=True):
                        await self._save(plan.job)
        finally:
            running = state.running
            state.running = None
            job = plan.job
            if job.state in ("failed", "cancelled") or (running and running.cancelled_by_user):
                # Not again for this head and version: the next commit or update retries.
                state.done = (job.input_commit, plan.version.version)
            if not job.done:  # cancelled (by a user, a pipeline delete, or a shutdown)
                job.state = "cancelled" if running and running.cancelled_by_user else "killed"
                job.finished = now_iso()
                job.error = job.error or ("cancelled by the user"
                                          if job.state == "cancelled"
                                          else "stopped before it finished")
                with trio.CancelScope(shield=True):
                    await self._save(job)
            for table in (self._saving, self._saved_at, self._logged):
                table.pop(job.id, None)
            # A big job leaves many files: never remove them in the trio thread (the
            # mount would stop answering meanwhile).
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(
                    shutil.rmtree, os.path.join(self.scratch_dir, job.id), True)
            self._wake.set()  # the head may have moved while the job ran

    # -- one job -----------------------------------------------------------------------------

    async def _save(self, job: JobRecord) -> None:
        """Store the job record; a failure is logged (the job's own outcome stands).

        One save of a job at a time: saves that overlapped could land out of order,
        and an older state overwrite a newer one.
        """
        async with self._saving.setdefault(job.id, trio.Lock()):
            if not job.done:
                job.last_seen = now_iso()
            self._saved_at[job.id] = time.monotonic()
            try:
                await trio.to_thread.run_sync(records.save_job, self.store.objects, job)
            except (VfsError, OSError) as exc:
                log.error("cannot save the record of job %s: %s", job.id, exc)

    async def _run_job(self, plan: JobPlan) -> None:
        job = plan.job
        spec = plan.version.spec
        assert spec is not None
        if spec.invalid:
            raise InvalidSpec(
                f"{spec.invalid}: version {plan.version.version} of pipeline {spec.pipeline} "
                "was stored by an older vfs that accepted it; correct the spec and store it "
                "again with 'vfsctl pipeline update -f SPEC'")
        await self._save(job)
        log.info("job %s: %s@%s, %d datums to run, %d reused, %d removed", job.id,
                 spec.input_repo, job.input_commit[:12], len(plan.tasks), job.datums_reused,
                 job.datums_removed)
        runtime = self.runtime(spec.runtime)
        unsupported = runtime.unsupported_limits(spec.memory, spec.cpu, spec.pids)
        if unsupported:
            log.warning("pipeline %s: runtime %s cannot enforce %s", spec.pipeline,
                        spec.runtime, ", ".join(unsupported))
        ran: dict[str, DatumRecord] = {}
        limiter = trio.CapacityLimiter(spec.parallelism)
        batches = [plan.tasks[i:i + spec.datum_batch]
                   for i in range(0, len(plan.tasks), spec.datum_batch)]
        failure: FailedDatum | None = None
        self._saved = time.monotonic()
        try:
            async with trio.open_nursery() as nursery:
                for batch in batches:
                    nursery.start_soon(self._run_batch, plan, runtime, batch, limiter, ran)
        except* DatumFailed as group:
            job.failed = [e.failure for e in _leaves(group)]
            failure = job.failed[0]
        if failure is not None:
            job.state = "failed"
            job.datums_failed = len(job.failed)
            job.error = (f"datum {failure.id} (/{failure.root}) failed after {failure.tries} "
                         f"tr{'y' if failure.tries == 1 else 'ies'}: {failure.error}; "
                         f"{self._where_its_log_is(job, failure.id)}")
            job.finished = now_iso()
            await self._save(job)
            log.error("job %s failed: %s", job.id, job.error)
            return
        try:
            commit = await trio.to_thread.run_sync(commit_outputs, self.store, plan, ran)
        except VfsError as exc:
            job.state = "failed"
            job.error = str(exc)
            job.finished = now_iso()
            await self._save(job)
            log.error("job %s failed: %s", job.id, exc)
            return
        job.output_commit = commit.id
        job.state = "success"
        job.finished = now_iso()
        await self._save(job)
        log.info("job %s: committed %s@%s", job.id, spec.pipeline, commit.id[:12])
        await trio.to_thread.run_sync(self.on_commit, spec.pipeline, spec.output_branch)
        self._wake.set()  # pipelines downstream of the output

    def _where_its_log_is(self, job: JobRecord, datum: str) -> str:
        """Where to read what a datum printed, or why there is nothing to read."""
        if datum in self._logged.get(job.id, ()):
            return f"see 'vfsctl job logs {job.id} --datum {datum}'"
        if datum in job.logs_lost:
            return f"its log was lost: {job.logs_lost[datum]}"
        return "it printed nothing"

    async def _run_batch(self, plan: JobPlan, runtime, batch: list[DatumTask],
                         limiter: trio.CapacityLimiter, ran: dict[str, DatumRecord]) -> None:
        """Run datums in one container start; retry the failed ones (together)."""
        spec = plan.version.spec
        assert spec is not None
        job = plan.job
        tries = dict.fromkeys((task.root for task in batch), 0)
        todo = list(batch)
        while todo:
            async with limiter:
                statuses, errors, results = await self._start(plan, runtime, todo)
            retry = []
            for task, status in zip(todo, statuses, strict=True):
                tries[task.root] += 1
                if status == 0:
                    ran[task.root] = results[task.root]
                    job.datums_processed += 1
                elif tries[task.root] < spec.datum_tries:
                    log.info("job %s: datum %s (/%s) failed (%s): retrying", job.id, task.id,
                             task.root, errors.get(task.root) or f"exit status {status}")
                    retry.append(task)
                else:
                    error = errors.get(task.root) or (
                        f"exit status {status}" if status is not None else "could not start")
                    raise DatumFailed(FailedDatum(task.id, task.root, tries[task.root],
                                                  status, error))
            todo = retry
        if time.monotonic() - self._saved > PROGRESS_SAVE_SECONDS:
            self._saved = time.monotonic()
            await self._save(job)

    def _keep_log(self, job_id: str, task: DatumTask, io: DatumIO) -> tuple[bool, str]:
        """Store a datum's log. Returns whether one was stored, and what was lost of
        it ("" if nothing): a log that cannot be kept must not pass for an empty one."""
        lost = ""
        try:
            free = os.statvfs(self.scratch_dir)
            full = free.f_bavail * free.f_frsize < _SCRATCH_FULL_BELOW
        except OSError:
            full = False
        if full:
            # The command writes its log here itself: its writes failed unseen.
            lost = (f"the disk of vfsd's scratch directory {self.scratch_dir} was full "
                    f"when the datum ended: what it printed may be missing")
        if not (os.path.exists(io.log_path) and os.path.getsize(io.log_path)):
            return False, lost
        try:
            records.save_log(self.store.objects, job_id, task.id, io.log_path)
        except (VfsError, OSError) as exc:
            return False, f"it could not be stored: {exc}"
        return True, lost

    def _finish_datum(self, pipeline: str, job_id: str, task: DatumTask, io: DatumIO,
                      succeeded: bool) -> tuple[DatumRecord | None, str, bool, str]:
        """Keep a datum's log, then store its outputs and record them (if it succeeded).

        Returns:
            The datum's record (None: it failed, or its outputs could not be stored),
            why its outputs could not be stored (or ""), and :meth:`_keep_log`'s answer.
        """
        kept, lost = self._keep_log(job_id, task, io)
        if lost:
            log.warning("job %s: the log of datum %s (/%s) was lost: %s", job_id, task.id,
                        task.root, lost)
        if not succeeded:
            return None, "", kept, lost
        try:
            # Stored and checked, then recorded, under the node's lock: the datum record
            # is what keeps its outputs alive for gc (docs/format.md §10.4).
            with self.store.lock():
                record = DatumRecord(task.root, job_id,
                                     collect_outputs(self.store, io.out_dir))
                records.save_datum(self.store.objects, pipeline, task.hash, record)
        except (VfsError, OSError) as exc:
            return None, f"cannot store its outputs: {exc}", kept, lost
        return record, "", kept, lost

    async def _start(self, plan: JobPlan, runtime, tasks: list[DatumTask]
                     ) -> tuple[list[int | None], dict[str, str], dict[str, DatumRecord]]:
        """One container start for ``tasks``; store the outputs of those that succeed."""
        spec = plan.version.spec
        assert spec is not None
        job = plan.job
        base = os.path.join(self.scratch_dir, job.id)
        ios = []
        for task in tasks:
            root = os.path.join(base, task.id)
            # The log is outside the datum's directory: it keeps every try.
            ios.append(DatumIO(task.id, os.path.join(root, "in"), os.path.join(root, "out"),
                               f"{root}.log"))

        def prepare() -> None:  # file work stays out of the trio thread
            for task, io in zip(tasks, ios, strict=True):
                shutil.rmtree(os.path.dirname(io.input_dir), ignore_errors=True)
                os.makedirs(io.input_dir)
                os.makedirs(io.out_dir)
                materialize(self.store, task.files, io.input_dir)
            os.makedirs(os.path.join(base, f"run-{tasks[0].id}"), exist_ok=True)

        errors: dict[str, str] = {}
        results: dict[str, DatumRecord] = {}
        timeout = spec.datum_timeout or self.datum_timeout
        self._datums_running += len(tasks)
        try:
            await trio.to_thread.run_sync(prepare)
            if job.first_start is None:
                job.first_start = now_iso()
            workdir = os.path.join(base, f"run-{tasks[0].id}")
            statuses: list[int | None] = list(await runtime.run(ContainerRun(
                job_id=job.id, input_repo=spec.input_repo, input_commit=job.input_commit,
                cmd=list(spec.cmd), env=dict(spec.env), image=spec.image, datums=ios,
                workdir=workdir, network=spec.network, memory=spec.memory, cpus=spec.cpu,
                timeout=timeout, user=spec.user, pids=spec.pids)))
        except (VfsError, OSError) as exc:
            statuses = [None] * len(tasks)
            errors = {task.root: str(exc) for task in tasks}
        except Exception as exc:  # a bug: these datums fail with it, not the whole vfsd
            log.exception("job %s: unexpected error running datum %s (/%s)", job.id,
                          tasks[0].id, tasks[0].root)
            statuses = [None] * len(tasks)
            errors = {task.root: describe(exc) for task in tasks}
        finally:
            self._datums_running -= len(tasks)
        for task, io in zip(tasks, ios, strict=True):
            if io.timed_out:
                assert timeout is not None
                errors[task.root] = f"timed out after {timeout:g} s " + (
                    "(its datum_timeout)" if spec.datum_timeout else
                    "(this node's default datum timeout, vfsd --datum-timeout; set "
                    "datum_timeout in the spec to allow more)")
        for index, (task, io, status) in enumerate(zip(tasks, ios, statuses, strict=True)):
            record, error, kept, lost = await trio.to_thread.run_sync(
                self._finish_datum, spec.pipeline, job.id, task, io, status == 0)
            if kept:
                self._logged.setdefault(job.id, set()).add(task.id)
            if lost:  # the log holds every try: what one try lost stays lost
                job.logs_lost[task.id] = lost
            if error:
                statuses[index] = None
                errors[task.root] = error
            elif record is not None:
                results[task.root] = record
        return statuses, errors, results


def describe(exc: BaseException) -> str:
    """What went wrong, in one line: a VfsError's message, else the exception's type and
    message; an exception group (from a trio nursery) is described by what it holds."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(dict.fromkeys(describe(leaf) for leaf in _leaves(exc)))
    if isinstance(exc, VfsError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _leaves(group: BaseExceptionGroup):
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc
