"""Commit objects, repository records, branch refs and the reflog.

Store keys (see docs/format.md):

* ``repos/<repo>``: JSON ``{"name", "description", "created"}``.
* ``commits/<id>``: canonical JSON commit; ``id`` is the BLAKE3 hash of its bytes.
* ``refs/<repo>/<branch>``: JSON ``{"commit": "<id hex>" | null}``, moved only by
  compare-and-swap.
* ``reflog/<repo>/<seq>``: JSON audit entry of one branch move, ``seq`` a
  16-digit zero-padded counter per repository, created with if-absent.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import socket
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

from vfs.blobs import blob_hash
from vfs.errors import (
    BranchNotFound,
    Corruption,
    ObjectNotFound,
    PreconditionFailed,
)
from vfs.objstore.base import ObjectStore

_COMMIT_ID = re.compile(r"[0-9a-f]{64}")


def canonical_json(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def current_user() -> str:
    """Who is acting, for commits and the reflog (``$VFS_USER`` overrides)."""
    user = os.environ.get("VFS_USER")
    if user:
        return user
    try:
        name = getpass.getuser()
    except (KeyError, OSError):
        name = str(os.getuid())
    return f"{name}@{socket.gethostname()}"


@dataclass(frozen=True)
class Commit:
    """An immutable commit object."""

    repo: str
    branch: str
    parents: tuple[str, ...]
    tree: str
    message: str
    author: str
    time: str
    files: int = 0
    bytes: int = 0
    provenance: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    id: str = ""

    def encode(self) -> bytes:
        body = asdict(self)
        body.pop("id")
        body["parents"] = list(self.parents)
        body["v"] = 1
        return canonical_json(body)

    @classmethod
    def decode(cls, data: bytes, commit_id: str) -> Commit:
        try:
            raw = json.loads(data)
            raw.pop("v", None)
            raw["parents"] = tuple(raw["parents"])
            commit = cls(id=commit_id, **raw)
        except (ValueError, TypeError, KeyError) as exc:
            raise Corruption(f"commit {commit_id} is not a valid commit object: {exc}") from exc
        if blob_hash(data).hex() != commit_id:
            raise Corruption(f"commit {commit_id} does not match its hash: the store is damaged")
        return commit

    def with_id(self) -> Commit:
        data = self.encode()
        return Commit(**{**asdict(self), "parents": self.parents, "id": blob_hash(data).hex()})


def commit_key(commit_id: str) -> str:
    return f"commits/{commit_id}"


def ref_key(repo: str, branch: str) -> str:
    return f"refs/{repo}/{branch}"


@dataclass(frozen=True)
class RefState:
    """A branch head as read from the store, with the tag for a later CAS."""

    repo: str
    branch: str
    commit: str | None
    tag: str


def read_ref(objects: ObjectStore, repo: str, branch: str) -> RefState:
    """Read a branch head.

    Raises:
        BranchNotFound: the branch does not exist.
    """
    try:
        data, tag = objects.get_tagged(ref_key(repo, branch))
    except ObjectNotFound:
        raise BranchNotFound(
            f"branch {repo}@{branch} does not exist (see 'vfsctl branch list {repo}')"
        ) from None
    try:
        commit = json.loads(data)["commit"]
    except (ValueError, KeyError, TypeError) as exc:
        raise Corruption(f"ref of {repo}@{branch} is damaged: {exc}") from exc
    if commit is not None and not (isinstance(commit, str) and _COMMIT_ID.fullmatch(commit)):
        raise Corruption(
            f"ref of {repo}@{branch} is damaged: {commit!r} is not a commit id"
        )
    return RefState(repo, branch, commit, tag)


def create_ref(objects: ObjectStore, repo: str, branch: str, commit: str | None) -> None:
    """Create a branch; raises PreconditionFailed if it exists.

    Behind a retrying store (every S3 store), a create whose first try landed but
    whose answer was lost is retried and then fails with PreconditionFailed,
    although this call made the branch: read the ref to tell the two apart.
    """
    objects.put(ref_key(repo, branch), canonical_json({"commit": commit}), if_absent=True)


def move_ref(objects: ObjectStore, state: RefState, commit: str | None) -> None:
    """Compare-and-swap a branch from ``state.commit`` to ``commit``.

    Raises:
        PreconditionFailed: the branch moved since ``state`` was read, or (behind a
            retrying store, i.e. on S3) the swap landed but its answer was lost and
            the retry saw the new tag. The ref then already names ``commit``; a
            caller that must know re-reads the ref and compares.
    """
    objects.put(ref_key(state.repo, state.branch), canonical_json({"commit": commit}),
                if_match=state.tag)


# -- reflog ------------------------------------------------------------------------


@dataclass(frozen=True)
class ReflogEntry:
    seq: int
    branch: str
    old: str | None
    new: str | None
    who: str
    when: str
    why: str


def reflog_prefix(repo: str) -> str:
    return f"reflog/{repo}/"


def append_reflog(objects: ObjectStore, repo: str, branch: str, old: str | None,
                  new: str | None, why: str, *, start: int | None = None,
                  who: str | None = None) -> ReflogEntry:
    """Append an audit entry for a branch move.

    The sequence number is claimed with if-absent, so concurrent writers never
    share one. Behind a retrying store a claim whose answer was lost is retried,
    fails as taken and the entry is written again under the next number: a
    duplicate entry, never a lost one. ``start`` is a hint (the number after the last one this node
    wrote); without it the reflog is listed to find the end.
    """
    if start is None:
        existing = [info.key for info in objects.list(reflog_prefix(repo))]
        start = int(existing[-1].rsplit("/", 1)[1]) + 1 if existing else 1
    seq = start
    while True:
        entry = ReflogEntry(seq, branch, old, new, who or current_user(), now_iso(), why)
        body = asdict(entry)
        body.pop("seq")
        try:
            objects.put(f"{reflog_prefix(repo)}{seq:016d}", canonical_json(body), if_absent=True)
            return entry
        except PreconditionFailed:
            seq += 1


def read_reflog(objects: ObjectStore, repo: str, branch: str | None = None) -> list[ReflogEntry]:
    """Every audit entry of a repository (optionally one branch), oldest first."""
    out = []
    for info in objects.list(reflog_prefix(repo)):
        seq = int(info.key.rsplit("/", 1)[1])
        try:
            raw = json.loads(objects.get(info.key))
            entry = ReflogEntry(seq=seq, **raw)
        except (ValueError, TypeError, ObjectNotFound) as exc:
            raise Corruption(f"reflog entry {info.key} is damaged: {exc}") from exc
        if branch is None or entry.branch == branch:
            out.append(entry)
    return out


def parse_time(iso: str) -> float:
    """Seconds since the epoch of a time written by :func:`now_iso`."""
    return datetime.strptime(iso, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()
