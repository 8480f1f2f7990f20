"""Following data through pipelines: ``vfsctl wait`` and ``vfsctl provenance``.

Both read only the store, so they work from any node and need no daemon
connection: waiting polls the output branches of the pipelines downstream of a
commit until each has processed it (or a commit after it), following chains of
pipelines; provenance walks the ``provenance`` of output commits back to the
user commits they came from.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from vfs.errors import JobFailed, NotFound, Timeout
from vfs.names import RefSpec
from vfs.pipeline import registry
from vfs.pipeline.records import covers, last_processed, latest_job, load_pipeline_error
from vfs.refs import Commit

FAILED_STATES = ("failed", "cancelled")


@dataclass(frozen=True)
class WaitResult:
    pipeline: str
    input_repo: str
    input_commit: str
    output: Commit


def wait_for(store, repo: str, commit_id: str, *, timeout: float | None = None,
             poll: float = 0.1) -> list[WaitResult]:
    """Block until every pipeline downstream of ``repo@commit_id`` has processed it.

    A pipeline with several inputs is downstream of every repository it reads: its
    output commit counts once the input reading ``repo`` processed the commit (or a
    later one containing it), whichever other inputs moved meanwhile.

    "Processed" means the pipeline's current version made an output commit from
    this input commit or from a later commit of its input branch that contains it
    (bursts of commits are processed together): right after ``pipeline update`` the
    old version's output does not count. Pipelines whose input branch does not contain the commit
    are not downstream of it. Chains are followed: the output commits are waited
    for in turn.

    Returns:
        One result per pipeline reached, in the order they finished.

    Only the pipelines on the way are looked at: another pipeline's trouble (its
    input gone, its jobs failing) is none of this wait's business.

    Raises:
        JobFailed: a job that had to process the commit failed or was cancelled, or
            a pipeline that has to cannot run (a watcher recorded why, at a head
            that contains the commit); raised once every other pipeline downstream
            has finished, naming every failure.
        Timeout: ``timeout`` seconds passed first.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    results: list[WaitResult] = []
    failures: list[str] = []
    frontier = [(repo, commit_id)]
    while frontier:
        current_repo, current = frontier.pop(0)
        for first in registry.downstream(store.objects, current_repo):
            while True:
                # The current version each time: an update meanwhile is waited for.
                version = registry.current(store.objects, first.name)
                spec = version.spec if version is not None else None
                if spec is None:
                    break  # deleted
                # The inputs reading the commit's repository from a branch holding it.
                names = []
                for leaf in spec.leaves:
                    if leaf.repo != current_repo:
                        continue
                    try:
                        head = store.head(leaf.repo, leaf.branch).commit
                    except NotFound:  # its input branch or repository is gone
                        continue
                    if head is not None and covers(store, head, current):
                        names.append(leaf.name)
                if not names:
                    break  # it reads another repository now, or never sees this commit

                def holds(commits: dict, names=names, current=current) -> bool:
                    return any(commits.get(name) and covers(store, commits[name], current)
                               for name in names)

                done = last_processed(store, spec.pipeline, spec.output_branch)
                if (done is not None and done.version == version.version
                        and holds(spec.by_input(done.inputs))):
                    output = store.read_commit(done.output)
                    results.append(WaitResult(spec.pipeline, current_repo, current, output))
                    frontier.append((spec.pipeline, output.id))
                    break
                job = latest_job(store.objects, spec.pipeline)
                if (job is not None and job.state in FAILED_STATES
                        and job.version == version.version
                        and holds(spec.by_input(job.commits()))):
                    failures.append(
                        f"pipeline {spec.pipeline} did not process {current_repo}@"
                        f"{current[:12]}: job {job.id} {job.state}: {job.error}")
                    break
                trouble = load_pipeline_error(store.objects, spec.pipeline)
                if trouble is not None and holds(
                        trouble.inputs or {spec.leaves[0].name: trouble.input_commit}):
                    failures.append(
                        f"pipeline {spec.pipeline} cannot run (vfsd on {trouble.node}, "
                        f"{trouble.since}): {trouble.error}")
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise Timeout(
                        f"timed out waiting for pipeline {spec.pipeline} to process "
                        f"{current_repo}@{current[:12]} (is vfsd running? see "
                        f"'vfsctl job list {spec.pipeline}')")
                time.sleep(poll)
    if failures:
        raise JobFailed("; ".join(failures))
    return results


@dataclass
class Origin:
    """One commit and the commits it was made from."""

    repo: str
    commit: Commit
    pipeline: str | None = None
    version: int | None = None
    job: str | None = None
    image: str | None = None
    keep_outputs: bool = False
    inputs: list[Origin] = field(default_factory=list)
    input: str | None = None  # the name of the pipeline input it was (None: the top)

    def to_dict(self) -> dict:
        out: dict = {"repo": self.repo, "commit": self.commit.id,
                     "branch": self.commit.branch, "time": self.commit.time}
        if self.pipeline:
            out.update(pipeline=self.pipeline, version=self.version, job=self.job,
                       image=self.image, keep_outputs=self.keep_outputs)
        if self.input is not None:
            out["input"] = self.input
        out["inputs"] = [i.to_dict() for i in self.inputs]
        return out


def provenance_of(store, spec: RefSpec, *, depth: int = 64) -> Origin:
    """The chain of input commits and pipeline versions behind a commit."""
    from vfs.errors import CommitNotFound

    commit = store.resolve(spec)
    if commit is None:
        raise CommitNotFound(f"{spec.repo}@{spec.ref} has no commits")
    return _origin(store, commit, depth)


def _origin(store, commit: Commit, depth: int) -> Origin:
    prov = commit.provenance or {}
    origin = Origin(commit.repo, commit)
    if prov.get("pipeline"):
        origin.pipeline = prov["pipeline"]
        origin.version = prov.get("version")
        origin.job = prov.get("job")
        origin.image = prov.get("image")
        origin.keep_outputs = bool(prov.get("keep_outputs"))
    if depth > 0:
        for item in prov.get("inputs", []):
            if not item.get("commit"):
                continue  # that input's branch had no commit yet
            found = _origin(store, store.read_commit(item["commit"]), depth - 1)
            found.input = item.get("name") or item["repo"]
            origin.inputs.append(found)
    return origin


__all__ = ["Origin", "WaitResult", "provenance_of", "wait_for"]
