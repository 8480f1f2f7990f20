"""Planning a job and committing its result (the parts of a job that need no container).

:func:`plan_job` decides what a new input head needs: the datums that changed
since the last processed commit (from the tree diff, so the cost follows the
change), which of them already have a recorded output (reused, not run), and
which outputs disappear. The daemon runs the remaining datums
(:func:`materialize` their input files, run the command, :func:`collect_outputs`,
:func:`vfs.pipeline.records.save_datum`) and then :func:`commit_outputs` merges
every datum's outputs into one output commit with provenance.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

from vfs.errors import Conflict, VfsError
from vfs.names import RefSpec, parent_and_name
from vfs.pipeline.datums import DatumChange, Glob, changed_datums, datum_hash, datum_id
from vfs.pipeline.datums import datum_files as _datum_files
from vfs.pipeline.records import (
    DatumRecord,
    JobRecord,
    Processed,
    last_processed,
    load_datum,
    new_job_id,
    provenance,
)
from vfs.pipeline.registry import PipelineVersion
from vfs.refs import Commit, canonical_json, current_user, now_iso
from vfs.snapshot import Snapshot, iter_file
from vfs.staging import OpenCommit
from vfs.tree import DIR, SYMLINK, Entry, permission_bits


def transform_hash(version: PipelineVersion, image_digest: str) -> str:
    """The hash of everything besides the input that decides a datum's output."""
    from vfs.blobs import blob_hash

    assert version.spec is not None
    body = {**version.spec.transform(), "image": image_digest}
    return blob_hash(canonical_json(body)).hex()


@dataclass
class DatumTask:
    """A datum that has to run."""

    root: str
    hash: str
    files: tuple[tuple[str, Entry], ...]

    @property
    def id(self) -> str:
        return datum_id(self.hash)


@dataclass
class JobPlan:
    job: JobRecord
    version: PipelineVersion
    head: Commit
    base: Processed | None  # the output commit the result builds on (None: from empty)
    changes: list[DatumChange]
    removed: dict[str, DatumRecord] = field(default_factory=dict)  # root -> old outputs
    reused: dict[str, DatumRecord] = field(default_factory=dict)  # root -> reused outputs
    tasks: list[DatumTask] = field(default_factory=list)
    missing_old: list[str] = field(default_factory=list)  # old datums without a record


def plan_job(store, version: PipelineVersion, *, image_digest: str, node: str = ""
             ) -> JobPlan | None:
    """What a job for the input branch's current head has to do; None if nothing.

    Nothing to do: the input branch has no commit, or its head was already
    processed with the current transform.
    """
    spec = version.spec
    assert spec is not None
    head = store.resolve(RefSpec(spec.input_repo, spec.input_branch))
    if head is None:
        return None
    transform = transform_hash(version, image_digest)
    last = last_processed(store, spec.pipeline, spec.output_branch)
    if last is not None and last.input_commit == head.id and last.transform == transform:
        return None
    incremental = last is not None and (last.transform == transform or version.keep_outputs)
    old = None
    if incremental:
        assert last is not None
        old = Snapshot(store.blobs, store.read_commit(last.input_commit).tree)
    new = Snapshot(store.blobs, head.tree)
    glob = Glob(spec.glob)
    changes = changed_datums(glob, old, new, last.transform if incremental and last else None,
                             transform)
    job = JobRecord(
        id=new_job_id(spec.pipeline), pipeline=spec.pipeline, version=version.version,
        input_repo=spec.input_repo, input_branch=spec.input_branch, input_commit=head.id,
        started=now_iso(), full=not incremental, keep_outputs=version.keep_outputs,
        transform=transform, image=image_digest, node=node or current_user())
    plan = JobPlan(job, version, head, last if incremental else None, changes)
    for change in changes:
        if change.old_hash is not None:
            record = load_datum(store.objects, spec.pipeline, change.old_hash)
            if record is None:
                plan.missing_old.append(change.root)
            else:
                plan.removed[change.root] = record
        if change.new_hash is not None:
            record = load_datum(store.objects, spec.pipeline, change.new_hash)
            if record is not None:
                plan.reused[change.root] = record
            else:
                plan.tasks.append(DatumTask(change.root, change.new_hash, change.new_files))
    added = sum(1 for c in changes if c.new_hash is not None and c.old_hash is None)
    removed = sum(1 for c in changes if c.new_hash is None)
    if incremental:
        assert last is not None
        before = store.read_commit(last.output).provenance.get("datums")
        if before is None:  # an output commit without the count: count once
            before = sum(1 for root in glob.datums(old) if _datum_files(old, root))
        job.datums_total = before + added - removed
    else:
        job.datums_total = added
    # Skipped: every datum of the head that does not run (unchanged, or output reused).
    job.datums_skipped = job.datums_total - len(plan.tasks)
    job.datums_reused = len(plan.reused)
    job.datums_removed = removed
    return plan


# -- running one datum (host side) ----------------------------------------------------------


def materialize(store, files: tuple[tuple[str, Entry], ...], input_dir: str) -> int:
    """Write a datum's files under ``input_dir`` at their repository paths; return bytes."""
    total = 0
    for path, entry in files:
        target = os.path.join(input_dir, path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if entry.kind == SYMLINK:
            os.symlink(entry.ref, target)
            continue
        with open(target, "wb") as f:
            for data in iter_file(store.blobs, entry):
                f.write(data)
                total += len(data)
        os.chmod(target, permission_bits(entry.mode) | stat.S_IRUSR)
    return total


def collect_outputs(store, out_dir: str) -> dict[str, Entry]:
    """Store every file and symlink under ``out_dir``; return path -> entry.

    Empty directories are not outputs (a datum's output is its files).
    """
    from vfs.ingest import Ingest

    if not any(os.scandir(out_dir)):
        return {}
    empty = OpenCommit(Snapshot(store.blobs, None), {})
    ingest = Ingest(store, empty, files_cache=False, workers=2)
    planned = ingest.plan("", [out_dir], recursive=True)
    with store.blobs.writer() as writer:
        ingest.run(planned, writer)
    return {path: entry for path, entry in ingest.result.changes.items()
            if entry is not None and entry.kind != DIR}


# -- the output commit ----------------------------------------------------------------------


def commit_outputs(store, plan: JobPlan, ran: dict[str, DatumRecord]) -> Commit:
    """Merge the outputs into one commit on the output branch, with provenance.

    Outputs of changed or deleted datums are removed, outputs of new datums (run
    or reused) added. Two datums writing one path is an error naming both.

    Raises:
        Conflict: two datums wrote the same path.
    """
    spec = plan.version.spec
    assert spec is not None
    base_tree = store.read_commit(plan.base.output).tree if plan.base else None
    view = OpenCommit(Snapshot(store.blobs, base_tree), {})
    for record in plan.removed.values():
        for path in sorted(record.outputs):
            if view.lookup(path) is not None:
                view.apply({path: None})
                _prune(view, path)
    owners: dict[str, str] = {}
    additions = {**plan.reused, **ran}
    for root in sorted(additions):
        for path, entry in sorted(additions[root].outputs.items()):
            if path in owners:
                raise Conflict(
                    f"pipeline {spec.pipeline}: datums /{owners[path]} and /{root} both "
                    f"wrote /{path}: outputs of different datums must not overlap")
            if view.lookup(path) is not None:
                other = _owner(store, plan, path) or "an earlier datum"
                raise Conflict(
                    f"pipeline {spec.pipeline}: datum /{root} wrote /{path}, which "
                    f"{'datum /' + other if other != 'an earlier datum' else other} "
                    "also wrote: outputs of different datums must not overlap")
            owners[path] = root
            try:
                view.apply(view.plan_set(path, entry.renamed(parent_and_name(path)[1])))
            except VfsError as exc:
                raise Conflict(f"pipeline {spec.pipeline}: datum /{root}: {exc}") from None
    job = plan.job
    message = (f"{spec.pipeline} job {job.id}: {job.datums_processed} processed, "
               f"{job.datums_skipped} skipped, {job.datums_removed} removed "
               f"({spec.input_repo}@{plan.head.id[:12]})")
    # From the check of the trees' packs (the writer's flush) to the ref's move, under
    # the node's lock: gc's condemnations are not acknowledged in between (§10.4).
    with store.lock():
        with store.blobs.writer() as writer:
            tree = view.seal(writer)
        return store.commit(spec.pipeline, spec.output_branch, message, tree=tree,
                            provenance=provenance(spec.pipeline, plan.version.version, job),
                            author=f"pipeline:{spec.pipeline}", why=f"pipeline job {job.id}",
                            allow_empty=True)


def _prune(view: OpenCommit, path: str) -> None:
    """Remove directories left empty by removing ``path``."""
    parent = parent_and_name(path)[0]
    while parent:
        entry = view.lookup(parent)
        if entry is None or entry.kind != DIR or view.listdir(parent):
            return
        view.apply({parent: None})
        parent = parent_and_name(parent)[0]


def _owner(store, plan: JobPlan, path: str) -> str | None:
    """Which unchanged datum's recorded output holds ``path`` (a scan: error path only)."""
    spec = plan.version.spec
    assert spec is not None
    new = Snapshot(store.blobs, plan.head.tree)
    for root in Glob(spec.glob).datums(new):
        files = _datum_files(new, root)
        if not files:
            continue
        record = load_datum(store.objects, spec.pipeline,
                            datum_hash(plan.job.transform, root, files))
        if record is not None and path in record.outputs:
            return root
    return None


__all__ = ["DatumTask", "JobPlan", "collect_outputs", "commit_outputs", "materialize",
           "plan_job", "transform_hash"]
