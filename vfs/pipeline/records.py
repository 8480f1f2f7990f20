"""What pipelines leave in the store: job records, datum outputs, logs, provenance.

Store keys (see docs/format.md):

* ``jobs/<pipeline>/<job id>``: JSON job record (state, input commit, counts,
  times, failed datums); rewritten as the job progresses.
* ``datums/<pipeline>/<datum hash>``: JSON ``{"root", "job", "outputs": {path:
  entry row}}``, written once when a datum succeeds. A later job that meets the
  same hash reuses these outputs instead of running the datum (gc keeps the blobs
  they name alive).
* ``joblogs/<pipeline>/<job id>/<datum id>``: the last bytes of a datum's output
  (a first line says how much was cut).
* ``pipelineerrors/<pipeline>``: JSON :class:`PipelineError`, present while the
  pipeline cannot run (its input is gone, its runtime refuses it...).

Output commits carry ``provenance`` ``{"pipeline", "version", "job", "image",
"transform", "transforms", "glob", "keep_outputs", "datums", "inputs": [{"repo",
"branch", "commit"}]}``; ``transforms`` lists, newest first, the transform hashes
whose datum records hold the commit's outputs (docs/format.md §10a).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

from vfs.errors import (
    Conflict,
    Corruption,
    JobNotFound,
    ObjectNotFound,
    PreconditionFailed,
    VfsError,
)
from vfs.names import check_name
from vfs.pipeline.claims import read_current
from vfs.refs import canonical_json, now_iso
from vfs.tree import Entry

log = logging.getLogger("vfs.pipeline")

LOG_LIMIT = 1 << 20  # bytes of a datum's log kept in the store (the end of it)
FINISHED = ("success", "failed", "cancelled", "killed")


@dataclass
class FailedDatum:
    id: str
    root: str
    tries: int
    status: int | None  # exit status of the last try (None: it could not start)
    error: str = ""


@dataclass
class JobRecord:
    """One run of a pipeline over one input commit."""

    id: str
    pipeline: str
    version: int
    input_repo: str
    input_branch: str
    input_commit: str
    state: str = "running"  # running | success | failed | cancelled | killed
    started: str = ""  # when the job was planned (its datums known)
    first_start: str | None = None  # when its first container started
    finished: str | None = None
    datums_total: int = 0
    datums_processed: int = 0
    datums_skipped: int = 0
    datums_failed: int = 0
    datums_removed: int = 0
    datums_reused: int = 0  # of the skipped: changed datums whose output was recorded before
    output_commit: str | None = None
    full: bool = False  # every datum of the input was considered (not only the diff)
    keep_outputs: bool = False
    transform: str = ""
    image: str = ""
    error: str = ""
    node: str = ""
    failed: list[FailedDatum] = field(default_factory=list)
    # When the job was last known to run (every save of a running job): a job killed
    # with its daemon finished then, not when a new daemon found it.
    last_seen: str | None = None
    logs_lost: dict[str, str] = field(default_factory=dict)  # datum id -> what happened
    # Every input's commit as the job read it, in the spec's order: {"name", "repo",
    # "branch", "commit"} (commit None: that branch had none). The input_* fields above
    # are the first input's (the only one of a single-input pipeline).
    inputs: list[dict] = field(default_factory=list)
    # gc deleted the job's claims (docs/format.md §10b): who ran each datum is gone.
    claims_collected: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    def commits(self) -> dict[str, str | None]:
        """Input name -> the commit the job read (a record from before several inputs:
        its one input under the repository's name)."""
        if self.inputs:
            return {item["name"]: item.get("commit") for item in self.inputs}
        return {self.input_repo: self.input_commit}

    def describe_inputs(self) -> str:
        """``images@0123abcd4567, models@89abcdef0123`` (for messages and listings)."""
        if not self.inputs:
            return f"{self.input_repo}@{self.input_commit[:12]}"
        return ", ".join(
            (f"{i['name']}=" if i["name"] != i["repo"] else "") + i["repo"] + "@"
            + (i["commit"][:12] if i.get("commit") else f"{i['branch']} (no commit)")
            for i in self.inputs)

    @classmethod
    def from_dict(cls, raw: dict) -> JobRecord:
        failed = [FailedDatum(**f) for f in raw.pop("failed", [])]
        known = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__}
        return cls(**known, failed=failed)

    @property
    def done(self) -> bool:
        return self.state in FINISHED


def new_job_id(pipeline: str) -> str:
    """``<pipeline>.<UTC time>-<random>``: sortable by start time within a pipeline."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")[:-3]
    return f"{pipeline}.{stamp}-{secrets.token_hex(2)}"


def pipeline_of_job(job_id: str) -> str:
    name, dot, tail = job_id.rpartition(".")
    if not dot or not tail:
        raise JobNotFound(f"{job_id!r} is not a job id (see 'vfsctl job list')")
    check_name(name, "pipeline")
    return name


def job_key(job_id: str) -> str:
    return f"jobs/{pipeline_of_job(job_id)}/{job_id}"


def save_job(objects, job: JobRecord) -> None:
    """Write a job record unconditionally (one writer only: tests, old stores).

    Nodes sharing a job use :func:`create_job` and :func:`update_job`."""
    objects.put(job_key(job.id), canonical_json(job.to_dict()))


def create_job(objects, job: JobRecord) -> bool:
    """Store a new job record unless one exists; True if this call created it."""
    data = canonical_json(job.to_dict())
    try:
        objects.put(job_key(job.id), data, if_absent=True)
        return True
    except PreconditionFailed:
        return False


def update_job(objects, job_id: str, change: Callable[[JobRecord], bool], *,
               attempts: int = 50) -> JobRecord:
    """Change a job record by compare-and-swap, as many nodes may at once.

    ``change`` edits the record it is given and returns whether to write it; it
    is called again on the newer record when another node wrote in between (so it
    must decide from the record, e.g. "only while running").

    Returns:
        The record as stored after the call.

    Raises:
        JobNotFound: there is no such job record.
        Conflict: the record kept changing (``attempts`` swaps lost).
    """
    key = job_key(job_id)
    for _ in range(attempts):
        try:
            data, tag = objects.get_tagged(key)
        except ObjectNotFound:
            raise JobNotFound(f"no job {job_id} (see 'vfsctl job list')") from None
        job = JobRecord.from_dict(json.loads(data))
        if not change(job):
            return job
        try:
            objects.put(key, canonical_json(job.to_dict()), if_match=tag)
            return job
        except PreconditionFailed:
            continue  # another node wrote it meanwhile (or our write landed): again
    raise Conflict(f"the record of job {job_id} keeps changing: gave up")


def cancel_job(objects, job_id: str, why: str = "cancelled by the user") -> JobRecord:
    """Set a running job cancelled, whichever node runs it (they stop its datums when
    they next look at the record). Returns the record as stored.

    Raises:
        JobNotFound: no such job.
        VfsError: it finished already.
    """
    def cancel(job: JobRecord) -> bool:
        if job.done:
            return False
        job.state, job.error, job.finished = "cancelled", why, now_iso()
        return True

    job = update_job(objects, job_id, cancel)
    if job.state != "cancelled" or job.error != why:
        raise VfsError(f"job {job_id} already finished ({job.state})")
    return job


def load_job(objects, job_id: str) -> JobRecord:
    try:
        return JobRecord.from_dict(json.loads(objects.get(job_key(job_id))))
    except ObjectNotFound:
        raise JobNotFound(f"no job {job_id} (see 'vfsctl job list')") from None


def list_jobs(objects, pipeline: str) -> list[JobRecord]:
    """Every job of a pipeline, oldest first."""
    check_name(pipeline, "pipeline")
    return [JobRecord.from_dict(json.loads(objects.get(info.key)))
            for info in objects.list(f"jobs/{pipeline}/")]


def latest_job(objects, pipeline: str) -> JobRecord | None:
    """The pipeline's current job (the latest started), or None.

    Nodes name it in ``jobheads/<pipeline>`` (vfs.pipeline.claims); stores written
    before that have only the listing, whose last job id is the latest.
    """
    try:
        current = read_current(objects, pipeline).job
        if current is not None:
            return load_job(objects, current)
    except (JobNotFound, Corruption):
        pass  # not stored yet (its node is creating it), or damaged: the listing
    last = None
    for info in objects.list(f"jobs/{pipeline}/"):
        last = info.key
    return JobRecord.from_dict(json.loads(objects.get(last))) if last else None


def list_all_jobs(objects) -> list[JobRecord]:
    """Every job of every pipeline, deleted pipelines' included: by pipeline, oldest
    first within one."""
    return [JobRecord.from_dict(json.loads(objects.get(info.key)))
            for info in objects.list("jobs/")]


def find_job(objects, prefix: str) -> JobRecord:
    """A job by id (the pipeline part is needed; the tail may be a unique prefix)."""
    try:
        return load_job(objects, prefix)
    except JobNotFound:
        pass
    pipeline = pipeline_of_job(prefix) if "." in prefix else None
    if pipeline is None:
        raise JobNotFound(f"no job {prefix} (see 'vfsctl job list')")
    matches = [info.key for info in objects.list(f"jobs/{pipeline}/{prefix}")]
    if len(matches) != 1:
        raise JobNotFound(f"no job {prefix}" if not matches
                          else f"{prefix} names {len(matches)} jobs: give more of the id")
    return JobRecord.from_dict(json.loads(objects.get(matches[0])))


# -- datum outputs ----------------------------------------------------------------------


@dataclass(frozen=True)
class DatumRecord:
    root: str
    job: str
    outputs: dict[str, Entry]


def datum_key(pipeline: str, digest: str) -> str:
    return f"datums/{pipeline}/{digest}"


def save_datum(objects, pipeline: str, digest: str, record: DatumRecord) -> None:
    body = {"root": record.root, "job": record.job,
            "outputs": {path: entry.encode() for path, entry in sorted(record.outputs.items())}}
    # Not fsync'd: the blobs it names are durable already (the writer synced them),
    # and a record lost to a power cut only means the datum runs again.
    objects.put_deferred(datum_key(pipeline, digest), canonical_json(body))


def save_datum_once(objects, pipeline: str, digest: str, record: DatumRecord) -> bool:
    """Record a datum's outputs unless a record exists: the first result stays.

    Two nodes may both finish a datum (one of them after its lease expired); either
    result is the datum's, but a record never changes once written (a job may have
    committed what it names). Returns False if a record was there already.
    """
    body = {"root": record.root, "job": record.job,
            "outputs": {path: entry.encode() for path, entry in sorted(record.outputs.items())}}
    try:
        objects.put(datum_key(pipeline, digest), canonical_json(body), if_absent=True)
        return True
    except PreconditionFailed:
        return False


def load_datum(objects, pipeline: str, digest: str) -> DatumRecord | None:
    try:
        raw = json.loads(objects.get(datum_key(pipeline, digest)))
        return DatumRecord(raw["root"], raw.get("job", ""),
                           {path: Entry.decode(row) for path, row in raw["outputs"].items()})
    except ObjectNotFound:
        return None
    except (ValueError, KeyError, TypeError, AttributeError, VfsError) as exc:
        # Damaged (e.g. cut short by a power loss): the datum simply runs again.
        log.warning("ignoring the damaged datum record %s: %s",
                    datum_key(pipeline, digest), exc)
        return None


def all_datum_entries(objects):
    """Yield every entry named by any datum record (for gc's reachability)."""
    for info in objects.list("datums/"):
        raw = json.loads(objects.get(info.key))
        for path, row in raw.get("outputs", {}).items():
            yield path, Entry.decode(row), info.key


# -- logs -----------------------------------------------------------------------------------


def log_key(job_id: str, datum: str) -> str:
    return f"joblogs/{pipeline_of_job(job_id)}/{job_id}/{datum}"


def save_log(objects, job_id: str, datum: str, path: str) -> None:
    """Store the end of a datum's log file: its last LOG_LIMIT bytes, after a line
    that says how many bytes before them were cut, if any were."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            marker = b""
            if size > LOG_LIMIT:
                f.seek(size - LOG_LIMIT)
                marker = (f"[... {size - LOG_LIMIT} bytes cut: the log keeps the last "
                          f"{LOG_LIMIT >> 20} MiB]\n").encode()
            data = marker + f.read()
    except FileNotFoundError:
        data = b""
    objects.put_deferred(log_key(job_id, datum), data)


def job_logs(objects, job_id: str) -> dict[str, bytes]:
    """Datum id -> stored log of a job."""
    prefix = f"joblogs/{pipeline_of_job(job_id)}/{job_id}/"
    return {info.key[len(prefix):]: objects.get(info.key) for info in objects.list(prefix)}


# -- pipelines that cannot run -----------------------------------------------------------


@dataclass(frozen=True)
class PipelineError:
    """Why a pipeline cannot run, as the watcher of ``node`` last saw it."""

    pipeline: str
    error: str
    since: str
    node: str
    version: int
    input_commit: str | None = None  # the (first) input head it was seen at, if there is one
    inputs: dict[str, str | None] = field(default_factory=dict)  # every input's head then

    def to_dict(self) -> dict:
        return asdict(self)


def pipeline_error_key(pipeline: str) -> str:
    return f"pipelineerrors/{pipeline}"


def save_pipeline_error(objects, error: PipelineError) -> None:
    objects.put(pipeline_error_key(error.pipeline), canonical_json(error.to_dict()))


def clear_pipeline_error(objects, pipeline: str) -> None:
    objects.delete(pipeline_error_key(pipeline))


def load_pipeline_error(objects, pipeline: str) -> PipelineError | None:
    """Why ``pipeline`` cannot run, or None if nothing keeps it from running."""
    try:
        raw = json.loads(objects.get(pipeline_error_key(pipeline)))
        return PipelineError(**{k: v for k, v in raw.items()
                                if k in PipelineError.__dataclass_fields__})
    except ObjectNotFound:
        return None
    except (ValueError, TypeError) as exc:
        log.warning("ignoring the damaged record %s: %s", pipeline_error_key(pipeline), exc)
        return None


# -- provenance -------------------------------------------------------------------------------


def provenance(pipeline: str, version: int, job: JobRecord, *, glob: str,
               transforms: tuple[str, ...]) -> dict:
    """An output commit's provenance. ``inputs`` has one item per input (its ``name``
    only where several inputs or a named one make it differ from the repository)."""
    inputs = [{"repo": job.input_repo, "branch": job.input_branch,
               "commit": job.input_commit}]
    if job.inputs and (len(job.inputs) > 1 or job.inputs[0]["name"] != job.input_repo):
        inputs = [{"name": i["name"], "repo": i["repo"], "branch": i["branch"],
                   "commit": i.get("commit")} for i in job.inputs]
    return {"pipeline": pipeline, "version": version, "job": job.id, "image": job.image,
            "transform": job.transform, "transforms": list(transforms), "glob": glob,
            "keep_outputs": job.keep_outputs, "datums": job.datums_total,
            "inputs": inputs}


@dataclass(frozen=True)
class Processed:
    """The last input commit a pipeline turned into an output commit."""

    output: str  # output commit id
    input_commit: str
    transform: str
    version: int
    glob: str | None = None  # None: a commit made before the glob was recorded
    # The transforms whose datum records hold the outputs, newest first (docs/format.md).
    transforms: tuple[str, ...] = ()
    # Input name -> the commit processed (one input: under its repository's name).
    inputs: dict[str, str | None] = field(default_factory=dict)


def processed_of(commit) -> Processed | None:
    """What an output commit says it processed (None: not a pipeline's commit)."""
    prov = commit.provenance or {}
    if not (prov.get("pipeline") and prov.get("inputs")):
        return None
    transform = prov.get("transform", "")
    inputs = {item.get("name") or item["repo"]: item.get("commit") for item in prov["inputs"]}
    return Processed(commit.id, prov["inputs"][0].get("commit"), transform,
                     int(prov.get("version", 0)), prov.get("glob"),
                     tuple(prov.get("transforms") or [transform]), inputs)


def last_processed(store, pipeline: str, branch: str, *, limit: int = 10_000
                   ) -> Processed | None:
    """The newest commit on the output branch that the pipeline made, if any."""
    from vfs.errors import NotFound
    from vfs.names import RefSpec

    try:
        for commit in store.log(RefSpec(pipeline, branch), limit=limit):
            if (commit.provenance or {}).get("pipeline") == pipeline:
                found = processed_of(commit)
                if found is not None:
                    return found
    except NotFound:  # no output repository or branch yet: nothing processed
        return None
    return None


def covers(store, newer: str, older: str, *, limit: int = 100_000) -> bool:
    """True if ``older`` is ``newer`` or one of its ancestors."""
    seen = 0
    stack = [newer]
    visited = set()
    while stack and seen < limit:
        current = stack.pop()
        if current == older:
            return True
        if current in visited:
            continue
        visited.add(current)
        seen += 1
        stack.extend(store.read_commit(current).parents)
    return False


def now() -> float:
    return time.time()


__all__ = ["DatumRecord", "FailedDatum", "JobRecord", "PipelineError", "Processed",
           "cancel_job", "clear_pipeline_error", "covers", "create_job", "find_job",
           "job_logs", "last_processed",
           "list_all_jobs", "list_jobs", "load_datum", "load_job", "load_pipeline_error",
           "new_job_id", "processed_of", "provenance", "save_datum", "save_datum_once", "save_job",
           "save_log", "save_pipeline_error", "update_job"]
