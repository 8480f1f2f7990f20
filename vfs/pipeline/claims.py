"""Jobs shared by the nodes of one store: the current job, datum claims and leases.

Many vfsd nodes run the pipelines of one store; the store is the only thing they
share, so everything they agree on is an object written with a conditional put
(docs/format.md §10b is the specification; this module is its only writer):

* ``jobheads/<pipeline>`` = ``{"job": <job id>}``: the pipeline's **current job**,
  moved only by compare-and-swap. A node starts a job by moving it from a finished
  job (or from nothing) to its new one; the loser of that race joins the winner's
  job. So a pipeline has at most one running job in the whole cluster, and one
  job per input head.
* ``claims/<job id>/plan``: what the job does (:func:`vfs.pipeline.jobs.plan_document`),
  written once, before ``jobheads`` names the job: every node runs the same plan.
* ``claims/<job id>/<datum hash>``: a node's **claim** of one datum (a
  :class:`Claim`), created with *create if absent*. A running claim carries a
  **lease** that ends at ``expires`` (store time, :func:`vfs.nodes.store_now`:
  node clocks are never compared); its node renews it every third of its ttl. An
  expired claim may be taken over by any node with a compare-and-swap that raises
  the **token** (the fencing token) and counts a try. Every write of a claim by its
  holder is a compare-and-swap on the tag it last wrote, so a node whose lease was
  taken over learns it at its next write and can neither renew, record nor finish.
* ``claims/<job id>/commit``: the lease of the job's output commit, the same
  mechanics with the key ``commit``.

No function here sleeps or reads a clock: callers pass the store time ``now``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace

from vfs.errors import Corruption, LeaseLost, ObjectNotFound, PreconditionFailed
from vfs.nodes import NodeIdentity
from vfs.objstore.base import ObjectStore
from vfs.refs import canonical_json

log = logging.getLogger("vfs.pipeline")

DEFAULT_LEASE_TTL = 30.0  # seconds a claim stays valid without a renewal (vfsd --lease-ttl)
RUNNING = "running"
DONE = "done"
FAILED = "failed"
COMMIT = "commit"  # the name of the commit lease among a job's claims
PLAN = "plan"


def current_key(pipeline: str) -> str:
    return f"jobheads/{pipeline}"


def claims_prefix(job_id: str) -> str:
    return f"claims/{job_id}/"


def claim_key(job_id: str, name: str) -> str:
    return f"{claims_prefix(job_id)}{name}"


# -- the current job ------------------------------------------------------------------------


@dataclass(frozen=True)
class Current:
    """The pipeline's current job as read: its id (None: no job yet) and the tag."""

    job: str | None
    tag: str | None


def read_current(objects: ObjectStore, pipeline: str) -> Current:
    try:
        data, tag = objects.get_tagged(current_key(pipeline))
    except ObjectNotFound:
        return Current(None, None)
    try:
        return Current(str(json.loads(data)["job"]), tag)
    except (ValueError, KeyError, TypeError) as exc:
        raise Corruption(f"{current_key(pipeline)} is damaged: {exc!r}") from exc


def move_current(objects: ObjectStore, pipeline: str, seen: Current, job_id: str) -> bool:
    """Make ``job_id`` the pipeline's current job if it still is ``seen``.

    Returns False when another node moved it first (its job is the one to join).
    """
    data = canonical_json({"job": job_id})
    try:
        if seen.tag is None:
            objects.put(current_key(pipeline), data, if_absent=True)
        else:
            objects.put(current_key(pipeline), data, if_match=seen.tag)
        return True
    except PreconditionFailed:
        # Behind a retrying store the write may have landed and its answer got lost.
        return read_current(objects, pipeline).job == job_id


def save_plan(objects: ObjectStore, job_id: str, document: dict) -> None:
    objects.put(claim_key(job_id, PLAN), canonical_json(document), if_absent=True)


def load_plan(objects: ObjectStore, job_id: str) -> dict:
    """Raises ObjectNotFound (no such job) or Corruption."""
    data = objects.get(claim_key(job_id, PLAN))
    try:
        return json.loads(data)
    except ValueError as exc:
        raise Corruption(f"{claim_key(job_id, PLAN)} is damaged: {exc}") from exc


# -- claims ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """One claim object as read or last written; ``tag`` is its tag then (not stored)."""

    job: str
    name: str  # the datum hash, or COMMIT
    node: str  # the holder's node id
    node_name: str
    token: int  # +1 at every takeover: whoever holds the highest token holds the datum
    tries: int  # tries started, by every node together
    state: str  # running | done | failed
    expires: float  # store time the lease ends (running only)
    ttl: float
    error: str = ""  # why the last try failed
    tag: str = ""

    def encode(self) -> bytes:
        body = asdict(self)
        del body["tag"], body["job"], body["name"]
        return canonical_json({"v": 1, **body})

    @classmethod
    def decode(cls, job: str, name: str, data: bytes, tag: str) -> Claim:
        try:
            raw = json.loads(data)
            return cls(job, name, str(raw["node"]), str(raw["node_name"]), int(raw["token"]),
                       int(raw["tries"]), str(raw["state"]), float(raw["expires"]),
                       float(raw["ttl"]), str(raw.get("error", "")), tag)
        except (ValueError, KeyError, TypeError) as exc:
            raise Corruption(f"claim {claim_key(job, name)} is damaged: {exc!r}") from exc

    @property
    def final(self) -> bool:
        return self.state in (DONE, FAILED)

    def expired(self, now: float) -> bool:
        return self.state == RUNNING and self.expires <= now

    def held_by(self, node: NodeIdentity) -> bool:
        return self.node == node.id


def read_claim(objects: ObjectStore, job_id: str, name: str) -> Claim | None:
    try:
        data, tag = objects.get_tagged(claim_key(job_id, name))
    except ObjectNotFound:
        return None
    return Claim.decode(job_id, name, data, tag)


def _write(objects: ObjectStore, claim: Claim, *, previous: Claim | None) -> Claim | None:
    """Write ``claim`` over ``previous`` (None: create it); None if that lost a race.

    A conditional put whose answer was lost may fail on its retry although it
    landed: the object then holds exactly what was written, which tells.
    """
    data = claim.encode()
    key = claim_key(claim.job, claim.name)
    try:
        if previous is None:
            tag = objects.put(key, data, if_absent=True)
        else:
            tag = objects.put(key, data, if_match=previous.tag)
        return replace(claim, tag=tag)
    except PreconditionFailed:
        try:
            stored, tag = objects.get_tagged(key)
        except ObjectNotFound:
            return None
        return replace(claim, tag=tag) if stored == data else None


def claim(objects: ObjectStore, job_id: str, name: str, node: NodeIdentity, *, now: float,
          ttl: float) -> Claim | None:
    """Claim an unclaimed datum (or the commit): its first try. None if already claimed."""
    return _write(objects, Claim(job_id, name, node.id, node.name, 1, 1, RUNNING, now + ttl,
                                 ttl), previous=None)


def take_over(objects: ObjectStore, seen: Claim, node: NodeIdentity, *, now: float, ttl: float,
              max_tries: int | None) -> Claim | None:
    """Take over an expired running claim: a new try, a new token.

    ``max_tries`` (None: no limit) counts tries across nodes: a claim that used them
    all becomes *failed* instead (the returned claim then says so). None: another
    node got there first, or the claim is not expired (a holder renewed it).
    """
    if seen.state != RUNNING or (seen.expires > now and not seen.held_by(node)):
        return None
    if max_tries is not None and seen.tries >= max_tries:
        error = seen.error or (f"its node {seen.node_name} stopped answering during try "
                               f"{seen.tries}")
        return _write(objects, replace(seen, state=FAILED, error=error, node=node.id,
                                       node_name=node.name, expires=now), previous=seen)
    return _write(objects, replace(seen, node=node.id, node_name=node.name,
                                   token=seen.token + 1, tries=seen.tries + 1,
                                   expires=now + ttl, ttl=ttl), previous=seen)


def _holder_write(objects: ObjectStore, lease: Claim, new: Claim) -> Claim:
    written = _write(objects, new, previous=lease)
    if written is None:
        current = read_claim(objects, lease.job, lease.name)
        who = (f"node {current.node_name} holds it now (token {current.token})"
               if current is not None else "it is gone")
        raise LeaseLost(f"lost the claim of {lease.name[:16]} in job {lease.job}: {who}")
    return written


def renew(objects: ObjectStore, lease: Claim, *, now: float) -> Claim:
    """Extend a held lease by its ttl from ``now``.

    Raises:
        LeaseLost: another node took it over (or it is no longer running): stop the
            datum and forget its result.
    """
    return _holder_write(objects, lease, replace(lease, expires=now + lease.ttl))


def check(objects: ObjectStore, lease: Claim) -> None:
    """Raise LeaseLost unless ``lease`` is still exactly the stored claim."""
    current = read_claim(objects, lease.job, lease.name)
    if current is None or current.tag != lease.tag or current.token != lease.token:
        who = f"node {current.node_name}" if current is not None else "nobody"
        raise LeaseLost(f"lost the claim of {lease.name[:16]} in job {lease.job} "
                        f"(held by {who} now)")


def finish(objects: ObjectStore, lease: Claim) -> Claim:
    """Mark a held claim done. Raises LeaseLost."""
    return _holder_write(objects, lease, replace(lease, state=DONE, error=""))


def release(objects: ObjectStore, lease: Claim, *, error: str = "",
            max_tries: int | None = None, count_try: bool = True) -> Claim:
    """Give a held claim back so that any node may take it over at once (its lease
    ends at time 0: expired for every clock).

    ``error`` says why the try failed; a try that was only interrupted (this node
    is stopping) does not count (``count_try=False``). When the failed try was the
    last one (``max_tries``), the claim becomes failed instead. Raises LeaseLost.
    """
    tries = lease.tries if count_try else lease.tries - 1
    if max_tries is not None and count_try and tries >= max_tries:
        return _holder_write(objects, lease, replace(lease, state=FAILED, error=error,
                                                     expires=0.0))
    return _holder_write(objects, lease, replace(lease, tries=tries, expires=0.0,
                                                 error=error or lease.error))


def scan(objects: ObjectStore, job_id: str, known: dict[str, Claim]) -> dict[str, Claim]:
    """Every claim of a job (the plan excluded): one listing, and a read of each claim
    not known final in ``known`` (done and failed claims never change again)."""
    out: dict[str, Claim] = {}
    prefix = claims_prefix(job_id)
    for info in objects.list(prefix):
        name = info.key[len(prefix):]
        if name == PLAN:
            continue
        seen = known.get(name)
        if seen is not None and seen.final:
            out[name] = seen
            continue
        current = read_claim(objects, job_id, name)
        if current is not None:
            out[name] = current
    return out


def spread(names: list[str], start: int) -> Iterator[str]:
    """``names`` from position ``start`` on, wrapping around: nodes that start at
    different offsets try different datums first instead of racing for the same."""
    if not names:
        return
    start %= len(names)
    yield from names[start:]
    yield from names[:start]


def delete_claims(objects: ObjectStore, job_id: str) -> None:
    """Remove every object of a job under ``claims/``: a job that never became current,
    or one gc found finished long ago (:mod:`vfs.pipeline.claims_gc`)."""
    for info in list(objects.list(claims_prefix(job_id))):
        objects.delete(info.key)


__all__ = ["COMMIT", "DEFAULT_LEASE_TTL", "DONE", "FAILED", "RUNNING", "Claim", "Current",
           "check", "claim", "delete_claims", "finish", "load_plan", "move_current", "read_claim",
           "read_current", "release", "renew", "save_plan", "scan", "spread", "take_over"]
