"""Pipeline specs in the store: every version kept, created and updated atomically.

Store keys (see docs/format.md):

* ``pipelines/<name>/<version>``: one version of a pipeline, ``version`` a
  10-digit zero-padded counter, created with if-absent (two updates racing:
  one wins, the other retries on the next number). JSON ``{"version", "spec",
  "created", "author", "keep_outputs", "deleted"}``. A delete is a version with
  ``"deleted": true``; the history stays.

The output repository is named after the pipeline and created with it; deleting
a pipeline keeps its output repository (data is never dropped as a side effect).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from vfs.errors import (
    AlreadyExists,
    BranchNotFound,
    InvalidSpec,
    ObjectNotFound,
    PipelineNotFound,
    PreconditionFailed,
    ReadOnly,
    RepoNotFound,
)
from vfs.names import check_name
from vfs.pipeline.spec import Spec, spec_from_stored
from vfs.refs import canonical_json, current_user, now_iso

_ATTEMPTS = 20


@dataclass(frozen=True)
class PipelineVersion:
    """One stored version of a pipeline."""

    name: str
    version: int
    spec: Spec | None  # None for a deletion
    created: str
    author: str
    keep_outputs: bool = False
    deleted: bool = False

    def to_dict(self) -> dict:
        return {"pipeline": self.name, "version": self.version, "created": self.created,
                "author": self.author, "keep_outputs": self.keep_outputs,
                "deleted": self.deleted,
                "spec": self.spec.to_dict() if self.spec else None}


def version_key(name: str, version: int) -> str:
    return f"pipelines/{name}/{version:010d}"


def versions(objects, name: str) -> list[PipelineVersion]:
    """Every version of pipeline ``name``, oldest first (empty if it never existed)."""
    check_name(name, "pipeline")
    out = []
    for info in objects.list(f"pipelines/{name}/"):
        tail = info.key.rsplit("/", 1)[1]
        if tail.isdigit():
            out.append(_decode(name, objects.get(info.key)))
    return out


def _decode(name: str, data: bytes) -> PipelineVersion:
    raw = json.loads(data)
    return PipelineVersion(
        name=name,
        version=raw["version"],
        spec=None if raw.get("deleted") else spec_from_stored(raw["spec"]),
        created=raw["created"],
        author=raw.get("author", ""),
        keep_outputs=bool(raw.get("keep_outputs")),
        deleted=bool(raw.get("deleted")),
    )


def current(objects, name: str) -> PipelineVersion | None:
    """The latest version of a pipeline, or None if it does not exist (or was deleted).

    One listing and one read, however long the history: ``wait`` polls it and every
    commit asks it (:func:`refuse_hand_commits`).
    """
    check_name(name, "pipeline")
    last = None
    for info in objects.list(f"pipelines/{name}/"):
        if info.key.rsplit("/", 1)[1].isdigit():
            last = info.key
    if last is None:
        return None
    found = _decode(name, objects.get(last))
    return None if found.deleted else found


def refuse_hand_commits(objects, repo: str, branch: str) -> None:
    """Refuse a change made by hand to the output branch of an existing pipeline.

    The output branch is the pipeline's: each job builds on its last output commit
    and writes what its datums made, so a commit made by hand would be undone
    silently by the next job. A deleted pipeline's branch is an ordinary one again.

    Raises:
        ReadOnly: ``repo@branch`` is the output branch of pipeline ``repo``.
    """
    owner = current(objects, repo)
    if owner is not None and owner.spec is not None and owner.spec.output_branch == branch:
        raise ReadOnly(
            f"{repo}@{branch} is the output of pipeline {repo}: only its jobs commit there "
            "(its next job would undo a change made by hand). Change its input or the "
            f"pipeline ('vfsctl pipeline update'), write to another branch, or delete the "
            f"pipeline to take the branch over ('vfsctl pipeline delete {repo}')")


def get(objects, name: str) -> PipelineVersion:
    """The latest version of an existing pipeline.

    Raises:
        PipelineNotFound: no such pipeline.
    """
    found = current(objects, name)
    if found is None:
        raise PipelineNotFound(f"pipeline {name} does not exist "
                               "(see 'vfsctl pipeline list')")
    return found


def list_pipelines(objects) -> list[PipelineVersion]:
    """The current version of every existing pipeline, by name."""
    names = sorted({info.key.split("/")[1] for info in objects.list("pipelines/")})
    return [v for v in (current(objects, name) for name in names) if v is not None]


class Pipelines:
    """The current version of every pipeline, kept with one listing of ``pipelines/``.

    Versions are immutable once stored (created with if-absent), so :meth:`poll` reads
    only the versions it has not read before: an unchanged registry costs one
    request. One caller at a time.
    """

    def __init__(self, objects) -> None:
        self.objects = objects
        self._read: dict[str, PipelineVersion] = {}  # version key -> that version

    def poll(self) -> list[PipelineVersion]:
        """As :func:`list_pipelines`, reading only versions new since the last poll."""
        newest: dict[str, str] = {}  # name -> key of its newest version
        for info in self.objects.list("pipelines/"):
            name, _, tail = info.key[len("pipelines/"):].partition("/")
            if tail.isdigit():
                newest[name] = info.key  # listings are in key order: the last is the newest
        read = {}
        for name, key in newest.items():
            found = self._read.get(key)
            read[key] = found if found is not None else _decode(name, self.objects.get(key))
        self._read = read
        return sorted((v for v in read.values() if not v.deleted), key=lambda v: v.name)


def downstream(objects, repo: str, pipelines: list[PipelineVersion] | None = None
               ) -> list[PipelineVersion]:
    """The pipelines that read ``repo`` (through any of their inputs)."""
    pipelines = list_pipelines(objects) if pipelines is None else pipelines
    return [p for p in pipelines
            if p.spec and any(leaf.repo == repo for leaf in p.spec.leaves)]


def _check_cycle(objects, spec: Spec) -> None:
    """Refuse a spec whose output would flow back into any of its inputs."""
    readers: dict[str, list[str]] = {}  # repo -> the pipelines reading it
    for p in list_pipelines(objects):
        if p.name != spec.pipeline and p.spec:
            for repo in dict.fromkeys(leaf.repo for leaf in p.spec.leaves):
                readers.setdefault(repo, []).append(p.name)
    inputs = {leaf.repo for leaf in spec.leaves}
    stack = [[spec.pipeline]]
    while stack:
        path = stack.pop()
        if path[-1] in inputs:
            raise InvalidSpec(f"pipeline {spec.pipeline} would make a cycle: "
                              f"{' -> '.join([path[-1], *path])}")
        for name in readers.get(path[-1], []):
            if name not in path:
                stack.append([*path, name])


def _check_inputs(store, spec: Spec) -> None:
    for leaf in spec.leaves:
        try:
            store.head(leaf.repo, leaf.branch)
        except RepoNotFound:
            raise InvalidSpec(f"pipeline {spec.pipeline}: input repository {leaf.repo} does "
                              f"not exist (create it with 'vfsctl repo create "
                              f"{leaf.repo}')") from None
        except BranchNotFound:
            raise InvalidSpec(f"pipeline {spec.pipeline}: input branch "
                              f"{leaf.repo}@{leaf.branch} does not exist") from None
    _check_cycle(store.objects, spec)


def _store_version(objects, name: str, body: dict) -> PipelineVersion:
    for _ in range(_ATTEMPTS):
        existing = versions(objects, name)
        number = existing[-1].version + 1 if existing else 1
        body = {**body, "version": number}
        try:
            objects.put(version_key(name, number), canonical_json(body), if_absent=True)
        except PreconditionFailed:
            continue  # another writer took this number: try the next one
        return _decode(name, canonical_json(body))
    raise AlreadyExists(f"pipeline {name} is being changed by someone else: try again")


def _ensure_output(store, spec: Spec, *, existed_before: bool) -> None:
    try:
        store.repo(spec.pipeline)
    except RepoNotFound:
        store.create_repo(spec.pipeline, f"output of pipeline {spec.pipeline}")
    else:
        if not existed_before:
            raise InvalidSpec(
                f"a repository named {spec.pipeline} already exists; a pipeline writes to a "
                "repository named after it: choose another pipeline name")
    branches = {b.name for b in store.list_branches(spec.pipeline)}
    if spec.output_branch not in branches:
        store.create_branch(spec.pipeline, spec.output_branch)


def create(store, spec: Spec, *, author: str | None = None) -> PipelineVersion:
    """Register a new pipeline and create its output repository.

    Raises:
        AlreadyExists: the pipeline exists (use update).
        InvalidSpec: missing input, a cycle, or a repository already using the name.
    """
    history = versions(store.objects, spec.pipeline)
    if history and not history[-1].deleted:
        raise AlreadyExists(f"pipeline {spec.pipeline} already exists: change it with "
                            "'vfsctl pipeline update -f SPEC'")
    _check_inputs(store, spec)
    _ensure_output(store, spec, existed_before=bool(history))
    return _store_version(store.objects, spec.pipeline, {
        "spec": spec.to_dict(), "created": now_iso(), "author": author or current_user(),
        "keep_outputs": False, "deleted": False})


def update(store, spec: Spec, *, keep_outputs: bool = False,
           author: str | None = None) -> PipelineVersion:
    """Store a new version of an existing pipeline.

    A changed transform reprocesses every datum on the next job unless
    ``keep_outputs`` is set (then only new or changed datums run with it).

    Raises:
        PipelineNotFound: no such pipeline (use create).
    """
    get(store.objects, spec.pipeline)
    _check_inputs(store, spec)
    _ensure_output(store, spec, existed_before=True)
    return _store_version(store.objects, spec.pipeline, {
        "spec": spec.to_dict(), "created": now_iso(), "author": author or current_user(),
        "keep_outputs": keep_outputs, "deleted": False})


def delete(store, name: str, *, author: str | None = None) -> PipelineVersion:
    """Stop a pipeline (a deletion version); its history and output repository stay."""
    get(store.objects, name)
    dependants = [p.name for p in downstream(store.objects, name)]
    if dependants:
        raise InvalidSpec(f"pipeline {name} feeds {', '.join(dependants)}: delete "
                          f"{'them' if len(dependants) > 1 else 'it'} first")
    return _store_version(store.objects, name, {
        "spec": None, "created": now_iso(), "author": author or current_user(),
        "keep_outputs": False, "deleted": True})


def version(objects, name: str, number: int) -> PipelineVersion:
    try:
        return _decode(name, objects.get(version_key(name, number)))
    except ObjectNotFound:
        raise PipelineNotFound(f"pipeline {name} has no version {number}") from None


__all__ = ["PipelineVersion", "Pipelines", "create", "current", "delete", "downstream", "get",
           "list_pipelines", "refuse_hand_commits", "update", "version", "versions"]
