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

import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

from vfs.errors import Conflict, VfsError
from vfs.names import RefSpec, parent_and_name
from vfs.pipeline.combine import Datums, Side, changed_datums, label
from vfs.pipeline.datums import DatumChange, Files, datum_hash, datum_id
from vfs.pipeline.records import (
    DatumRecord,
    JobRecord,
    Processed,
    last_processed,
    load_datum,
    new_job_id,
    processed_of,
    provenance,
)
from vfs.pipeline.registry import PipelineVersion
from vfs.refs import Commit, canonical_json, current_user, now_iso
from vfs.snapshot import Snapshot, iter_file
from vfs.staging import OpenCommit
from vfs.tree import DIR, SYMLINK, Entry, permission_bits

log = logging.getLogger("vfs.pipeline")


def plain_transform_hash(version: PipelineVersion, image_digest: str) -> str:
    """The hash of everything besides the input that decides a datum's output.

    Command, env, runtime, image digest, and the glob (which decides what a datum
    is). Records made under it are shared by every version with the same transform.
    """
    from vfs.blobs import blob_hash

    assert version.spec is not None
    body = {**version.spec.transform(), "image": image_digest, "glob": version.spec.glob}
    return blob_hash(canonical_json(body)).hex()


def transform_hash(version: PipelineVersion, image_digest: str) -> str:
    """The version's transform: the plain one, or for ``--keep-outputs`` one of its own.

    A version that keeps outputs builds on output commits whose datums other
    transforms made; its records are looked up before theirs (``JobPlan.transforms``),
    so they must be its own: were it the plain hash, a spec that comes back (v1, v2,
    then v1's spec with ``--keep-outputs``) would put v1's records in front of v2's,
    which made the outputs (docs/format.md §10a, P3).
    """
    from vfs.blobs import blob_hash

    plain = plain_transform_hash(version, image_digest)
    if not version.keep_outputs:
        return plain
    return blob_hash(canonical_json({"transform": plain,
                                     "kept_by_version": version.version})).hex()


@dataclass
class DatumTask:
    """A datum that has to run (``files``: None until :func:`task_files` reads them).

    ``root`` is the datum's key (:meth:`vfs.pipeline.combine.Datums.key`): its root
    for a single input."""

    root: str
    hash: str
    files: Files | None = None

    @property
    def id(self) -> str:
        return datum_id(self.hash)

    @property
    def label(self) -> str:
        """The datum as users read it: ``/root``, or its parts' paths under /pfs."""
        return label(self.root)


@dataclass
class JobPlan:
    job: JobRecord
    version: PipelineVersion
    heads: dict[str, Commit | None]  # input name -> the commit read (None: it had none)
    changes: list[DatumChange]
    # The transforms whose records hold the result's outputs, newest first; the
    # datums that run or are reused go under the first.
    transforms: tuple[str, ...] = ()
    removed: dict[str, DatumRecord] = field(default_factory=dict)  # root -> old outputs
    reused: dict[str, DatumRecord] = field(default_factory=dict)  # root -> reused outputs
    tasks: list[DatumTask] = field(default_factory=list)
    # The datum hashes of the records in ``removed`` and ``reused`` (root -> hash).
    record_hashes: dict[str, str] = field(default_factory=dict)
    # The output branch's head when the job was planned: its commit goes on exactly
    # that head, or not at all (a job never commits twice).
    output_head: str | None = None
    base: Processed | None = None  # the output commit the result builds on (None: empty)
    store: object = None  # the store the plan reads its inputs from

    @cached_property
    def datums(self) -> Datums:
        """The datums of the plan's inputs."""
        assert self.version.spec is not None
        return Datums(self.version.spec.input)

    @cached_property
    def side(self) -> Side:
        """The job's input commits, read through (kept for the job's life)."""
        assert self.version.spec is not None
        return Side(self.store, self.version.spec.input,
                    [c.tree if c is not None else None for c in self.heads.values()])


def plan_job(store, version: PipelineVersion, *, image_digest: str, node: str = ""
             ) -> JobPlan | None:
    """What a job for the input branches' current heads has to do; None if nothing.

    Nothing to do: no input branch has a commit, or these heads were already
    processed by this version (with this image). Every new version gets a job, even
    one that changes nothing a datum sees: its output commit then credits it. Each
    input's head is read once, and only those commits are read from: the job's
    record and output commit name exactly what it processed.

    The job builds on the last output commit when the transform is unchanged, or
    when the version keeps outputs and the glob is unchanged; it rebuilds from empty
    with the plain transform otherwise, and when the outputs of a changed datum
    cannot be found exactly (docs/format.md §10a: a job never leaves outputs it
    cannot account for).
    """
    spec = version.spec
    assert spec is not None
    heads = {leaf.name: store.resolve(RefSpec(leaf.repo, leaf.branch)) for leaf in spec.leaves}
    if all(head is None for head in heads.values()):
        return None
    commits = {name: head.id if head is not None else None for name, head in heads.items()}
    transform = transform_hash(version, image_digest)
    output_head = store.head(spec.pipeline, spec.output_branch).commit
    last = last_processed(store, spec.pipeline, spec.output_branch)
    if (last is not None and spec.by_input(last.inputs) == commits
            and last.transform == transform and last.version == version.version):
        return None
    first = spec.leaves[0]
    job = JobRecord(
        id=new_job_id(spec.pipeline), pipeline=spec.pipeline, version=version.version,
        input_repo=first.repo, input_branch=first.branch,
        input_commit=commits[first.name] or "",
        started=now_iso(), keep_outputs=version.keep_outputs,
        transform=transform, image=image_digest, node=node or current_user(),
        inputs=[{"name": leaf.name, "repo": leaf.repo, "branch": leaf.branch,
                 "commit": commits[leaf.name]} for leaf in spec.leaves])
    plan = None
    if last is not None and last.transform == transform:
        plan = _plan_on(store, last, last.transforms, job, version, heads)
    elif last is not None and version.keep_outputs and last.glob == spec.glob:
        plan = _plan_on(store, last, (transform, *last.transforms), job, version, heads)
    if plan is None:
        job.full = True
        plan = JobPlan(job, version, heads, [], (plain_transform_hash(version, image_digest),),
                       store=store)
        plan.changes = changed_datums(plan.datums, None, plan.side)
        for change in plan.changes:
            _add(store, plan, change)
        job.datums_total = len(plan.changes)
    plan.output_head = output_head
    # Skipped: every datum of the head that does not run (unchanged, or output reused).
    job.datums_skipped = job.datums_total - len(plan.tasks)
    job.datums_reused = len(plan.reused)
    return plan


def _plan_on(store, last: Processed, transforms: tuple[str, ...], job: JobRecord,
             version: PipelineVersion, heads: dict[str, Commit | None]) -> JobPlan | None:
    """A job that builds on ``last``; None if a changed datum's outputs are not known."""
    spec = version.spec
    assert spec is not None
    before_commits = spec.by_input(last.inputs)
    if set(before_commits) != set(heads):
        return None  # other inputs than the last job's: every datum is new
    old = Side(store, spec.input, [store.read_commit(before_commits[name]).tree
                                   if before_commits[name] else None for name in heads])
    base = store.read_commit(last.output)
    outputs = Snapshot(store.blobs, base.tree)
    plan = JobPlan(job, version, heads, [], transforms, base=last, store=store)
    plan.changes = changed_datums(plan.datums, old, plan.side)
    pipeline = job.pipeline
    for change in plan.changes:
        if change.old_files:
            found = _recorded(store, pipeline, last.transforms, change.root, change.old_files)
            record = found[1] if found else None
            if record is None or not _holds(outputs, record):
                log.warning("pipeline %s: the outputs of datum %s in %s@%s are not known "
                            "(%s): rebuilding every datum from empty", pipeline,
                            label(change.root), pipeline, last.output[:12],
                            "no record" if record is None else "its record does not match")
                return None
            plan.removed[change.root] = record
            plan.record_hashes[f"-{change.root}"] = found[0]  # type: ignore[index]
        if change.new_files:
            _add(store, plan, change)
    added = sum(1 for c in plan.changes if c.new_files and not c.old_files)
    removed = sum(1 for c in plan.changes if not c.new_files)
    before = base.provenance.get("datums")
    if before is None:  # an output commit without the count: count once
        before = len(plan.datums.all(old))
    job.datums_total = before + added - removed
    job.datums_removed = removed
    return plan


def _add(store, plan: JobPlan, change: DatumChange) -> None:
    """A datum of the head that needs outputs: reuse a record of this transform, or run."""
    digest = datum_hash(plan.transforms[0], change.root, change.new_files)
    record = load_datum(store.objects, plan.job.pipeline, digest)
    if record is not None:
        plan.reused[change.root] = record
        plan.record_hashes[f"+{change.root}"] = digest
    else:
        plan.tasks.append(DatumTask(change.root, digest, change.new_files))


def recorded_outputs(store, pipeline: str, transforms: tuple[str, ...], root: str,
                     files: Files) -> DatumRecord | None:
    """The record of a datum's outputs in an output commit with these ``transforms``.

    The newest transform with a record for the datum made its outputs: a datum keeps
    outputs of an older transform only while it is unchanged, and while it is, no
    newer version runs it (docs/format.md §10a).
    """
    found = _recorded(store, pipeline, transforms, root, files)
    return found[1] if found else None


def _recorded(store, pipeline: str, transforms: tuple[str, ...], root: str,
              files: Files) -> tuple[str, DatumRecord] | None:
    for transform in transforms:
        digest = datum_hash(transform, root, files)
        record = load_datum(store.objects, pipeline, digest)
        if record is not None:
            return digest, record
    return None


# -- the plan every node of a job runs ------------------------------------------------------


def plan_document(plan: JobPlan) -> dict:
    """The plan as stored for the other nodes (``claims/<job id>/plan``, §10b).

    Datum files are not stored: every node reads them from the input commit.
    """
    first = next(iter(plan.heads.values()))
    return {"v": 1, "job": plan.job.to_dict(), "version": plan.version.version,
            "head": first.id if first is not None else None,
            "inputs": {name: c.id if c is not None else None for name, c in plan.heads.items()},
            "base": plan.base.output if plan.base else None,
            "output_head": plan.output_head, "transforms": list(plan.transforms),
            "tasks": [[task.root, task.hash] for task in plan.tasks],
            "records": plan.record_hashes}


def plan_from_document(store, version: PipelineVersion, document: dict) -> JobPlan:
    """The :class:`JobPlan` another node stored (its version must be ``version``).

    Raises:
        Corruption: the document or a datum record it names is damaged or missing.
    """
    from vfs.errors import Corruption

    try:
        job = JobRecord.from_dict(dict(document["job"]))
        spec = version.spec
        assert spec is not None
        commits = document.get("inputs") or {spec.leaves[0].name: document["head"]}
        heads = {leaf.name: store.read_commit(commits[leaf.name]) if commits[leaf.name]
                 else None for leaf in spec.leaves}
        base = None
        if document["base"]:
            base = processed_of(store.read_commit(document["base"]))
        plan = JobPlan(job, version, heads, [], tuple(document["transforms"]),
                       tasks=[DatumTask(root, digest) for root, digest in document["tasks"]],
                       record_hashes=dict(document["records"]),
                       output_head=document["output_head"], base=base, store=store)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise Corruption(f"the plan of job {document.get('job', {}).get('id')} is damaged: "
                         f"{exc!r}") from exc
    for key, digest in plan.record_hashes.items():
        record = load_datum(store.objects, job.pipeline, digest)
        if record is None:
            raise Corruption(f"job {job.id}: the datum record {digest[:16]} of /{key[1:]} "
                             "its plan names is gone")
        (plan.removed if key.startswith("-") else plan.reused)[key[1:]] = record
    return plan


def task_files(store, plan: JobPlan, task: DatumTask) -> Files:
    """A task's input files, read from the input commit (once).

    Raises:
        Corruption: they do not hash to the datum the plan names.
    """
    from vfs.errors import Corruption

    if task.files is None:
        datums = plan.datums
        try:
            files = datums.files(plan.side, datums.parts(task.root))
        except ValueError as exc:
            raise Corruption(f"job {plan.job.id}: the plan names a datum its inputs cannot "
                             f"have: {exc}") from None
        if datum_hash(plan.transforms[0], task.root, list(files)) != task.hash:
            raise Corruption(f"job {plan.job.id}: the files of datum {task.label} in "
                             f"{plan.job.describe_inputs()} do not match its plan")
        task.files = files
    return task.files


def _holds(outputs: Snapshot, record: DatumRecord) -> bool:
    """Whether the output tree holds every output of ``record`` as recorded."""
    for path, entry in record.outputs.items():
        found = outputs.lookup(path)
        if found is None or (found.kind, found.ref) != (entry.kind, entry.ref):
            return False
    return True


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


def commit_outputs(store, plan: JobPlan, ran: dict[str, DatumRecord], *,
                   fence: Callable[[], None] | None = None) -> Commit:
    """Merge the outputs into one commit on the output branch, with provenance.

    Outputs of changed or deleted datums are removed, outputs of new datums (run
    or reused) added. Two datums writing one path is an error naming both. The
    commit goes on the head the job was planned on (``plan.output_head``) or not
    at all; ``fence`` is called right before the branch moves (it raises when this
    node may no longer commit the job).

    Raises:
        Conflict: two datums wrote the same path.
        HeadMoved: the output branch is no longer at ``plan.output_head``.
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
                    f"pipeline {spec.pipeline}: datums {label(owners[path])} and "
                    f"{label(root)} both wrote /{path}: outputs of different datums must "
                    "not overlap")
            if view.lookup(path) is not None:
                other = _owner(store, plan, path)
                raise Conflict(
                    f"pipeline {spec.pipeline}: datum {label(root)} wrote /{path}, which "
                    f"{'datum ' + label(other) if other else 'an earlier datum'} "
                    "also wrote: outputs of different datums must not overlap")
            owners[path] = root
            try:
                view.apply(view.plan_set(path, entry.renamed(parent_and_name(path)[1])))
            except VfsError as exc:
                raise Conflict(f"pipeline {spec.pipeline}: datum {label(root)}: {exc}"
                               ) from None
    job = plan.job
    message = (f"{spec.pipeline} job {job.id}: {job.datums_processed} processed, "
               f"{job.datums_skipped} skipped, {job.datums_removed} removed "
               f"({job.describe_inputs()})")
    # From the check of the trees' packs (the writer's flush) to the ref's move, under
    # the node's lock: gc's condemnations are not acknowledged in between (§10.4).
    with store.lock():
        with store.blobs.writer() as writer:
            tree = view.seal(writer)
        return store.commit(spec.pipeline, spec.output_branch, message, tree=tree,
                            provenance=provenance(spec.pipeline, plan.version.version, job,
                                                  glob=spec.glob,
                                                  transforms=plan.transforms),
                            author=f"pipeline:{spec.pipeline}", why=f"pipeline job {job.id}",
                            allow_empty=True, expect_head=plan.output_head, fence=fence)


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
    datums = plan.datums
    for parts in datums.all(plan.side):
        files = datums.files(plan.side, parts)
        key = datums.key(parts)
        record = recorded_outputs(store, spec.pipeline, plan.transforms, key, files)
        if record is not None and path in record.outputs:
            return key
    return None


def committed_by(store, plan: JobPlan, *, limit: int = 20) -> Commit | None:
    """The output commit this job made, if it made one: the output branch's head or
    one of its recent first-parent ancestors whose provenance names the job."""
    spec = plan.version.spec
    assert spec is not None
    for commit in store.log(RefSpec(spec.pipeline, spec.output_branch), limit=limit):
        if (commit.provenance or {}).get("job") == plan.job.id:
            return commit
        if commit.id == plan.output_head:
            return None  # older than the job
    return None


__all__ = ["DatumTask", "JobPlan", "collect_outputs", "commit_outputs", "committed_by",
           "materialize", "plain_transform_hash", "plan_document", "plan_from_document",
           "plan_job", "recorded_outputs", "task_files", "transform_hash"]
