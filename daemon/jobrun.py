"""This node's part in one pipeline job (the watcher decides which job; this runs it).

Every node taking part runs the same plan (``claims/<job id>/plan``) with the same
loop of *rounds* (one at least every ``round_seconds``, and at once when a datum of
this node ends); docs/format.md §10b is the protocol:

1. read the job's claims (one listing, plus a read of each claim not known final),
   its record, and the store's time; a round started by a datum of this node ending
   reuses the last read (with what this node wrote since) while it is younger than a
   round and still shows datums to claim (``_look_due``);
2. the record no longer says running (cancelled, failed, committed): stop, killing
   this node's datums;
3. a datum's claim failed (it used every try, counted across nodes): fail the job;
4. every datum is done: take the commit lease and make the output commit, on the
   exact output head the plan was made on, once;
5. otherwise, while this node has free slots (``parallelism`` container starts of
   up to ``datum_batch`` datums), claim datums nobody holds or whose lease expired,
   starting from this node's own offset in the list, and start them.

Leases are renewed every third of their ttl. A node that finds one taken over
marks it lost, kills its start once every datum of that start is lost, and forgets
its result: a datum's outputs are recorded only after checking that the claim is
still this node's (under the lease's lock, which the renewal takes too), and its
claim is marked done by a compare-and-swap on what this node last wrote.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from daemon.runtimes import ContainerRun, DatumIO
from vfs.errors import Conflict, LeaseLost, VfsError
from vfs.nodes import store_now
from vfs.pipeline import claims, records
from vfs.pipeline.claims import COMMIT, DONE, FAILED, RUNNING, Claim
from vfs.pipeline.combine import label
from vfs.pipeline.datums import datum_id
from vfs.pipeline.jobs import (
    DatumTask,
    JobPlan,
    collect_outputs,
    commit_outputs,
    committed_by,
    materialize,
    task_files,
)
from vfs.pipeline.records import DatumRecord, FailedDatum, JobRecord
from vfs.refs import now_iso

log = logging.getLogger("daemon.watcher")

PROGRESS_SAVE_SECONDS = 2.0
# Free bytes under which the scratch disk counts as full: what a datum printed then
# may be lost (its command writes its log there directly).
_SCRATCH_FULL_BELOW = 1 << 20


class JobFailure(VfsError):
    """What fails the whole job (not only this node's part in it)."""


@dataclass
class _Lease:
    """A claim this node holds. ``lock`` orders the renewal and the last writes."""

    claim: Claim
    lock: threading.Lock = field(default_factory=threading.Lock)
    lost: bool = False
    start: list[str] = field(default_factory=list)  # the claims of its container start
    scope: trio.CancelScope | None = None


class JobRun:
    """One node's part in one job.

    Args:
        store: the store.
        plan: the job's plan (every node's is the same).
        runtime: the runtime of the plan's spec on this node.
        scratch_dir: where datums' files go (``<scratch>/<job id>/...``).
        lease_ttl: how long a claim of this node stays valid without a renewal.
        datum_timeout: the node's default when the spec sets none.
        on_commit: told about the output commit (repo, branch).
    """

    def __init__(self, store, plan: JobPlan, runtime, *, scratch_dir: str, lease_ttl: float,
                 datum_timeout: float | None,
                 on_commit: Callable[[str, str], None]) -> None:
        self.store = store
        self.objects = store.objects
        self.node = store.node
        self.plan = plan
        self.job: JobRecord = plan.job  # as last read
        spec = plan.version.spec
        assert spec is not None
        self.spec = spec
        self.runtime = runtime
        self.scratch_dir = scratch_dir
        self.lease_ttl = lease_ttl
        self.round_seconds = min(1.0, lease_ttl / 3)
        self.datum_timeout = datum_timeout
        self.on_commit = on_commit
        self.tasks = {task.hash: task for task in plan.tasks}
        self.order = sorted(self.tasks)
        self.offset = int(self.node.id[:8], 16) if _is_hex(self.node.id[:8]) else 0
        self.leases: dict[str, _Lease] = {}
        self.interrupted: list[_Lease] = []  # of starts cut short by this node leaving
        self.known: dict[str, Claim] = {}
        self.starts = 0
        self.wake = trio.Event()
        self.logged: set[str] = set()  # datum ids whose log this node stored
        self.logs_lost: dict[str, str] = {}
        self.first_start: str | None = None
        self.saved: tuple[int, int, bool] = (0, 0, False)  # what the record has from us
        self.saved_at = 0.0

    # -- the rounds -----------------------------------------------------------------------

    async def run(self) -> JobRecord:
        """Take part until the job ends; returns its record as last read.

        A job that goes on without this node (it stops, or lost the store) keeps
        its claims in the store: released when it can, else they expire.
        """
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._renew_leases)
                await self._rounds(nursery)
                nursery.cancel_scope.cancel()
        finally:
            held = self.interrupted + list(self.leases.values())
            if held and not self.job.done:
                with trio.CancelScope(shield=True), trio.move_on_after(10):
                    await trio.to_thread.run_sync(self._release_all, held)
        return self.job

    async def _rounds(self, nursery: trio.Nursery) -> None:
        looked: tuple[float, float] | None = None  # (monotonic, store time) of the last look
        while True:
            if looked is None or self._look_due(looked[0]):
                record, view, now = await trio.to_thread.run_sync(self._look)
                self.job, self.known = record, view
                looked = (time.monotonic(), now)
            else:  # a datum of this node ended: what this node knows is enough to go on
                record, view = self.job, self.known
                now = looked[1] + (time.monotonic() - looked[0])
            if record.done:
                return
            failed = [c for name, c in view.items() if name in self.tasks and c.state == FAILED]
            if failed:
                await trio.to_thread.run_sync(self._fail_datums, failed)
                continue
            done = sum(1 for name in self.tasks if view.get(name, _NONE).state == DONE)
            await self._save_progress(done)
            if done == len(self.tasks):
                if await self._commit(view.get(COMMIT), now):
                    continue
            else:
                await self._start_more(nursery, view, now)
            with trio.move_on_after(self.round_seconds):
                await self.wake.wait()
            self.wake = trio.Event()

    def _look_due(self, last: float) -> bool:
        """Whether this round reads the job's claims again. At most once per round
        (``round_seconds``) while this node still has datums to claim in the view it
        has: a datum of its own that ends starts a round at once, and the claims of the
        others need not be read again for it (every claim is a conditional write: one
        another node took meanwhile just fails). A round per ended datum that read
        every claim made a job of N datums cost O(N^2) reads."""
        if time.monotonic() - last >= self.round_seconds:
            return True
        view = self.known
        return not any(name not in self.leases and view.get(name) is None
                       for name in self.order)

    def _look(self) -> tuple[JobRecord, dict[str, Claim], float]:
        record = records.load_job(self.objects, self.job.id)
        view = claims.scan(self.objects, self.job.id, self.known)
        return record, view, store_now(self.objects, self.node.id)

    def _claimable(self, seen: Claim | None, now: float) -> bool:
        if seen is None:
            return True
        # A claim of this node that it does not hold now is its earlier process's.
        return seen.state == RUNNING and (seen.expired(now) or seen.held_by(self.node))

    async def _start_more(self, nursery: trio.Nursery, view: dict[str, Claim], now: float
                          ) -> None:
        while self.starts < self.spec.parallelism:
            candidates = [name for name in claims.spread(self.order, self.offset)
                          if name not in self.leases and self._claimable(view.get(name), now)]
            if not candidates:
                return
            got = await trio.to_thread.run_sync(self._claim_some, candidates, view, now)
            if not got:
                return
            names = [held.name for held in got]
            for held in got:
                self.leases[held.name] = _Lease(held, start=names)
            self.starts += 1
            nursery.start_soon(self._run_start, [self.tasks[name] for name in names])

    def _claim_some(self, candidates: list[str], view: dict[str, Claim], now: float
                    ) -> list[Claim]:
        """Claim up to ``datum_batch`` of ``candidates`` (in order); a datum another node
        got first is skipped."""
        got: list[Claim] = []
        for name in candidates:
            seen = view.get(name)
            if seen is None:
                held = claims.claim(self.objects, self.job.id, name, self.node, now=now,
                                    ttl=self.lease_ttl)
            else:
                held = claims.take_over(self.objects, seen, self.node, now=now,
                                        ttl=self.lease_ttl, max_tries=self.spec.datum_tries)
                if held is not None and held.state == FAILED:
                    self.wake_nowait()  # the next round fails the job
                    held = None
                elif held is not None:
                    log.info("job %s: took over datum %s (%s) from node %s (try %d)",
                             self.job.id, datum_id(name), self.tasks[name].label,
                             seen.node_name, held.tries)
            if held is not None:
                got.append(held)
                if len(got) >= self.spec.datum_batch:
                    break
        return got

    def wake_nowait(self) -> None:
        """Start the next round at once (thread-safe)."""
        try:
            trio.from_thread.run_sync(self.wake.set)
        except RuntimeError:
            self.wake.set()

    # -- leases ---------------------------------------------------------------------------

    async def _renew_leases(self) -> None:
        while True:
            await trio.sleep(self.lease_ttl / 3)
            held = list(self.leases.items())
            if not held:
                continue
            try:
                lost = await trio.to_thread.run_sync(self._renew, held)
            except VfsError as exc:
                log.warning("job %s: cannot renew this node's claims: %s", self.job.id, exc)
                continue
            for name in lost:
                lease = self.leases.get(name)
                if lease is None:
                    continue
                others = [self.leases.get(other) for other in lease.start]
                if lease.scope is not None and all(o is None or o.lost for o in others):
                    lease.scope.cancel()  # nothing of that start counts any more

    def _renew(self, held: list[tuple[str, _Lease]]) -> list[str]:
        now = store_now(self.objects, self.node.id)
        lost = []
        for name, lease in held:
            with lease.lock:
                if lease.lost:
                    continue
                try:
                    lease.claim = claims.renew(self.objects, lease.claim, now=now)
                except LeaseLost as exc:
                    lease.lost = True
                    lost.append(name)
                    log.warning("job %s: %s: this node stops that work and forgets it",
                                self.job.id, exc)
        return lost

    def _release_all(self, held: list[_Lease]) -> None:
        """Give back the claims of a node that leaves a running job: other nodes take
        them at once (the interrupted tries do not count)."""
        for lease in held:
            with lease.lock:
                if lease.lost or lease.claim.state != RUNNING:
                    continue
                try:
                    claims.release(self.objects, lease.claim, count_try=False)
                except VfsError:
                    pass  # it expires instead

    # -- datums ---------------------------------------------------------------------------

    async def _run_start(self, tasks: list[DatumTask]) -> None:
        """One container start for ``tasks`` (claimed); record or release each."""
        scope = trio.CancelScope()
        for task in tasks:
            self.leases[task.hash].scope = scope
        ended = False
        try:
            results = None
            with scope:
                results = await self._start(tasks)
            if results is not None:  # None: every lease of the start was lost
                statuses, errors, ios = results
                for task, io, status in zip(tasks, ios, statuses, strict=True):
                    await trio.to_thread.run_sync(self._finish_datum, task, io, status,
                                                  errors.get(task.root))
                    lease = self.leases.get(task.hash)
                    if lease is not None and not lease.lost:
                        self.known[task.hash] = lease.claim  # as this node wrote it
            ended = True
        finally:
            for task in tasks:
                lease = self.leases.pop(task.hash, None)
                if not ended and lease is not None:
                    self.interrupted.append(lease)  # given back when this node leaves
            self.starts -= 1
            self.wake.set()

    async def _start(self, tasks: list[DatumTask]
                     ) -> tuple[list[int | None], dict[str, str], list[DatumIO]]:
        spec = self.spec
        job = self.job
        base = os.path.join(self.scratch_dir, job.id)
        ios = []
        for task in tasks:
            root = os.path.join(base, task.id)
            # The log is outside the datum's directory: it keeps every try on this node.
            ios.append(DatumIO(task.id, os.path.join(root, "in"), os.path.join(root, "out"),
                               f"{root}.log"))
        names = [leaf.name for leaf in spec.leaves]

        def prepare() -> None:  # file work stays out of the trio thread
            for task, io in zip(tasks, ios, strict=True):
                shutil.rmtree(os.path.dirname(io.input_dir), ignore_errors=True)
                for name in names:  # every input, empty where the datum has none of it
                    os.makedirs(os.path.join(io.input_dir, name))
                os.makedirs(io.out_dir)
                # A single input's files are named as in their repository; those of
                # several inputs under their input's name already (vfs.pipeline.combine).
                materialize(self.store, task_files(self.store, self.plan, task),
                            os.path.join(io.input_dir, names[0]) if spec.plain
                            else io.input_dir)
            os.makedirs(os.path.join(base, f"run-{tasks[0].id}"), exist_ok=True)

        errors: dict[str, str] = {}
        timeout = spec.datum_timeout or self.datum_timeout
        try:
            await trio.to_thread.run_sync(prepare)
            if self.first_start is None:
                self.first_start = now_iso()
            workdir = os.path.join(base, f"run-{tasks[0].id}")
            commits = job.commits()
            statuses: list[int | None] = list(await self.runtime.run(ContainerRun(
                job_id=job.id, inputs=[(name, commits.get(name) or "") for name in names],
                cmd=list(spec.cmd), env=dict(spec.env), image=spec.image, datums=ios,
                workdir=workdir, network=spec.network, memory=spec.memory, cpus=spec.cpu,
                timeout=timeout, user=spec.user, pids=spec.pids, node=self.node.name)))
        except (VfsError, OSError) as exc:
            statuses = [None] * len(tasks)
            errors = {task.root: str(exc) for task in tasks}
        except Exception as exc:  # a bug: these datums fail with it, not the whole vfsd
            log.exception("job %s: unexpected error running datum %s (%s)", job.id,
                          tasks[0].id, tasks[0].label)
            statuses = [None] * len(tasks)
            errors = {task.root: describe(exc) for task in tasks}
        for task, io in zip(tasks, ios, strict=True):
            if io.timed_out:
                assert timeout is not None
                errors[task.root] = f"timed out after {timeout:g} s " + (
                    "(its datum_timeout)" if spec.datum_timeout else
                    "(this node's default datum timeout, vfsd --datum-timeout; set "
                    "datum_timeout in the spec to allow more)")
        return statuses, errors, ios

    def _finish_datum(self, task: DatumTask, io: DatumIO, status: int | None,
                      error: str | None) -> None:
        """Keep a datum's log; record its outputs and mark its claim done (it succeeded
        and the claim is still this node's), or give the claim back for another try."""
        kept, lost = self._keep_log(task, io)
        if kept:
            self.logged.add(task.id)
        if lost:
            log.warning("job %s: the log of datum %s (%s) was lost: %s", self.job.id,
                        task.id, task.label, lost)
            self.logs_lost[task.id] = lost
        lease = self.leases.get(task.hash)
        if lease is None or lease.lost:
            return
        try:
            if status == 0:
                try:
                    self._record(task, io, lease)
                    return
                except (VfsError, OSError) as exc:
                    if isinstance(exc, LeaseLost):
                        raise
                    error = f"cannot store its outputs: {exc}"
            error = error or (f"exit status {status}" if status is not None
                              else "could not start")
            with lease.lock:
                lease.claim = claims.release(self.objects, lease.claim, error=error,
                                             max_tries=self.spec.datum_tries)
            if lease.claim.state == FAILED:
                log.info("job %s: datum %s (%s) failed its last try (%d): %s", self.job.id,
                         task.id, task.label, lease.claim.tries, error)
            else:
                log.info("job %s: datum %s (%s) failed (%s): any node retries it",
                         self.job.id, task.id, task.label, error)
        except LeaseLost as exc:
            lease.lost = True
            log.warning("job %s: %s: its result is dropped", self.job.id, exc)

    def _record(self, task: DatumTask, io: DatumIO, lease: _Lease) -> None:
        # Stored and checked, then recorded, under the node's lock: the datum record
        # is what keeps its outputs alive for gc (docs/format.md §10.4).
        with self.store.lock():
            outputs = collect_outputs(self.store, io.out_dir)
            with lease.lock:
                if lease.lost:
                    raise LeaseLost(f"lost the claim of datum {task.id}")
                claims.check(self.objects, lease.claim)  # fencing: still this node's
                records.save_datum_once(self.objects, self.spec.pipeline, task.hash,
                                        DatumRecord(task.root, self.job.id, outputs))
                lease.claim = claims.finish(self.objects, lease.claim)

    def _keep_log(self, task: DatumTask, io: DatumIO) -> tuple[bool, str]:
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
            records.save_log(self.objects, self.job.id, task.id, io.log_path)
        except (VfsError, OSError) as exc:
            return False, f"it could not be stored: {exc}"
        return True, lost

    # -- the end of the job ---------------------------------------------------------------

    def _fail_datums(self, failed: list[Claim]) -> None:
        """A datum used every try: the job fails (whichever node sees it first)."""
        items = []
        for seen in sorted(failed, key=lambda c: self.tasks[c.name].root):
            task = self.tasks[seen.name]
            items.append(FailedDatum(task.id, task.root, seen.tries, None, seen.error))
        first = items[0]
        self.fail(f"datum {first.id} ({label(first.root)}) failed after {first.tries} "
                  f"tr{'y' if first.tries == 1 else 'ies'}: {first.error}; "
                  f"{self._where_its_log_is(first.id)}", items)

    def fail(self, error: str, failed: list[FailedDatum] | None = None) -> None:
        """Set the job failed unless it finished already (blocking)."""
        made = []

        def change(job: JobRecord) -> bool:
            if job.done:
                return False
            job.state, job.error, job.finished = "failed", error, now_iso()
            job.failed = list(failed or [])
            job.datums_failed = len(job.failed)
            job.logs_lost.update(self.logs_lost)
            made.append(True)
            return True

        self.job = records.update_job(self.objects, self.job.id, change)
        if made and self.job.state == "failed":
            log.error("job %s failed: %s", self.job.id, error)

    def _where_its_log_is(self, datum: str) -> str:
        """Where to read what a datum printed, or why there is nothing to read."""
        if datum in self.logged or self.objects.exists(records.log_key(self.job.id, datum)):
            return f"see 'vfsctl job logs {self.job.id} --datum {datum}'"
        if datum in self.logs_lost or datum in self.job.logs_lost:
            return f"its log was lost: {self.logs_lost.get(datum) or self.job.logs_lost[datum]}"
        return "it printed nothing"

    async def _save_progress(self, done: int) -> None:
        """Raise the record's count of datums processed (and this node's first start and
        lost logs) every few seconds, by compare-and-swap."""
        now = (done, len(self.logs_lost), self.first_start is not None)
        if now == self.saved or time.monotonic() - self.saved_at < PROGRESS_SAVE_SECONDS:
            return
        self.saved_at = time.monotonic()

        def change(job: JobRecord) -> bool:
            if job.done:
                return False
            job.datums_processed = max(job.datums_processed, done)
            if job.first_start is None:
                job.first_start = self.first_start
            job.logs_lost.update(self.logs_lost)
            job.last_seen = now_iso()
            return True

        try:
            self.job = await trio.to_thread.run_sync(records.update_job, self.objects,
                                                     self.job.id, change)
            self.saved = now
        except VfsError as exc:
            log.info("job %s: cannot save progress: %s", self.job.id, exc)

    async def _commit(self, seen: Claim | None, now: float) -> bool:
        """Make the output commit if no other node does; False if one does."""
        if seen is not None and seen.state != RUNNING:
            return False  # made: the record says so at the next look
        if seen is not None and not self._claimable(seen, now):
            return False
        held = await trio.to_thread.run_sync(self._claim_commit, seen, now)
        if held is None:
            return False
        lease = _Lease(held, start=[COMMIT])
        self.leases[COMMIT] = lease
        try:
            made = await trio.to_thread.run_sync(self._commit_outputs, lease)
        except JobFailure as exc:
            await trio.to_thread.run_sync(self.fail, str(exc))
            return True
        finally:
            self.leases.pop(COMMIT, None)
        if made is not None:
            await trio.to_thread.run_sync(self.on_commit, self.spec.pipeline,
                                          self.spec.output_branch)
        return True

    def _claim_commit(self, seen: Claim | None, now: float) -> Claim | None:
        if seen is None:
            return claims.claim(self.objects, self.job.id, COMMIT, self.node, now=now,
                                ttl=self.lease_ttl)
        return claims.take_over(self.objects, seen, self.node, now=now, ttl=self.lease_ttl,
                                max_tries=None)

    def _commit_outputs(self, lease: _Lease):
        """Merge and commit (unless the job's commit is made already), then set the job
        succeeded. None: another node took the commit over."""
        plan = self.plan
        spec = self.spec

        def fence() -> None:  # right before the branch moves
            with lease.lock:
                if lease.lost:
                    raise LeaseLost(f"lost the commit lease of job {self.job.id}")
                claims.check(self.objects, lease.claim)
            if records.load_job(self.objects, self.job.id).done:
                raise LeaseLost(f"job {self.job.id} finished meanwhile")

        made = committed_by(self.store, plan)
        if made is None:
            ran = {}
            for task in plan.tasks:
                record = records.load_datum(self.objects, spec.pipeline, task.hash)
                if record is None:
                    raise JobFailure(f"the record of datum {task.id} ({task.label}) is gone "
                                     "although its claim is done")
                ran[task.root] = record
            plan.job.datums_processed = len(plan.tasks)
            try:
                made = commit_outputs(self.store, plan, ran, fence=fence)
            except LeaseLost as exc:
                log.info("job %s: %s: another node commits", self.job.id, exc)
                return None
            except Conflict as exc:
                made = committed_by(self.store, plan)
                if made is None:
                    raise JobFailure(str(exc)) from None
                log.info("job %s: another node made its output commit %s meanwhile",
                         self.job.id, made.id[:12])
            else:
                log.info("job %s: committed %s@%s", self.job.id, spec.pipeline, made.id[:12])

        def succeed(job: JobRecord) -> bool:
            if job.state == "success":
                return False
            # A cancel that came after the commit landed does not undo it.
            job.state, job.error, job.output_commit = "success", "", made.id
            job.datums_processed = len(plan.tasks)
            job.finished = now_iso()
            job.logs_lost.update(self.logs_lost)
            if job.first_start is None:
                job.first_start = self.first_start
            return True

        self.job = records.update_job(self.objects, self.job.id, succeed)
        with lease.lock:
            try:
                lease.claim = claims.finish(self.objects, lease.claim)
            except LeaseLost:
                pass  # the job is committed and its record says so
        return made


class _NoClaim:
    state = ""


_NONE = _NoClaim()


def _is_hex(text: str) -> bool:
    try:
        int(text, 16)
    except ValueError:
        return False
    return bool(text)


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


__all__ = ["JobFailure", "JobRun", "describe"]
