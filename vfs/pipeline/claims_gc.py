"""Which jobs' claims gc deletes (docs/format.md §10b, "Collecting claims").

A shared job leaves ``claims/<job id>/plan``, one claim per datum and the commit
lease (:mod:`vfs.pipeline.claims`). Once the job is finished nothing needs them but
``vfsctl job inspect``, so gc deletes them when no node can still be acting on the
job: its record says it finished and nothing of it (record, plan, claims) was written
for a **margin** of store time; a running job's claims are never deleted. A prefix
with no record is a plan that never became current (a node lost the race to start a
job, or died before deleting its plan); it goes after the same margin unless
``jobheads`` names it (then a node makes its record from the plan).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from vfs.errors import ObjectNotFound, VfsError
from vfs.objstore.base import ObjectInfo, ObjectStore
from vfs.pipeline import claims, records
from vfs.pipeline.records import JobRecord

# The margin never goes under this (seconds, store time): far beyond the moment a
# node spends between saving a plan and making it current, even through a slow
# store's retries (and twenty default lease ttls).
MIN_AGE = 600.0
# ...nor under this many lease ttls of the job's claims: a holder renews every third
# of its ttl, so a claim untouched for that long has no live holder left.
LEASE_TTLS = 4


@dataclass
class ClaimsCollected:
    """What one pass deleted (or, in a dry run, would delete)."""

    objects: int = 0  # claim objects, plans included
    jobs: int = 0
    notes: list[str] = field(default_factory=list)  # jobs kept because they cannot be read


def collect_claims(objects: ObjectStore, *, now: float, grace: float,
                   dry_run: bool = False) -> ClaimsCollected:
    """Delete the claims of finished jobs and of old plans that never became a job.

    Args:
        now: the store's time (an earlier time only keeps more).
        grace: gc's grace period; the margin is at least this.
        dry_run: count what would go, change nothing.
    """
    out = ClaimsCollected()
    heads: dict[str, str | None] = {}
    for job_id, listed in _jobs_with_claims(objects).items():
        last = max(info.mtime for info in listed)
        if now - last < max(grace, MIN_AGE):
            continue  # cheap test first: most young jobs stop here with no read
        try:
            pipeline = records.pipeline_of_job(job_id)
            # The current job before the record: a job without a record that is not
            # current then is an old plan that never will be (only a fresh plan is
            # made current), whereas one read after could have become current since.
            if pipeline not in heads:
                heads[pipeline] = claims.read_current(objects, pipeline).job
            try:
                last = max(last, objects.stat(records.job_key(job_id)).mtime)
                record = _finished_record(objects, job_id)
                if record is None:
                    continue  # running
            except ObjectNotFound:
                if heads[pipeline] == job_id:
                    continue  # current with no record yet: its record is made from the plan
                record = None
            ttl = max((c.ttl for c in claims.scan(objects, job_id, {}).values()), default=0.0)
        except (VfsError, ValueError, TypeError, KeyError) as exc:
            # Never taken as finished: kept, and said (as gc keeps what it cannot read).
            out.notes.append(f"claims of job {job_id} kept: cannot read them or its "
                             f"record: {exc}")
            continue
        if now - last < max(grace, MIN_AGE, LEASE_TTLS * ttl):
            continue
        out.jobs += 1
        out.objects += len(listed)
        if dry_run:
            continue
        # The record first: a run cut short between the two leaves a record that says
        # "collected" over claims a later run deletes, never missing claims unexplained.
        if record is not None and not record.claims_collected:
            try:
                records.update_job(objects, job_id, _mark_collected)
            except VfsError as exc:
                out.notes.append(f"claims of job {job_id} kept: cannot mark its record: {exc}")
                continue
        claims.delete_claims(objects, job_id)
    return out


def _jobs_with_claims(objects: ObjectStore) -> dict[str, list[ObjectInfo]]:
    """Each job id under ``claims/`` with its listed objects (one listing)."""
    found: dict[str, list[ObjectInfo]] = {}
    for info in objects.list("claims/"):
        job_id, slash, _ = info.key.removeprefix("claims/").partition("/")
        if slash:
            found.setdefault(job_id, []).append(info)
    return found


def _finished_record(objects: ObjectStore, job_id: str) -> JobRecord | None:
    """The job's record if it finished; None while it runs."""
    record = JobRecord.from_dict(json.loads(objects.get(records.job_key(job_id))))
    return record if record.done else None


def _mark_collected(record: JobRecord) -> bool:
    if not record.done or record.claims_collected:
        return False
    record.claims_collected = True
    return True


__all__ = ["ClaimsCollected", "collect_claims"]
