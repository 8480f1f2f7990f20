"""Pipelines: ``pipeline create|update|list|inspect|delete``, ``job ...``, ``wait``, ``provenance``.

Specs are validated at once (the document here, the runtime and image by the vfsd
that takes the request), so a mistake is reported now rather than by a failed job
later. While a vfsd owns the store, create/update/delete and job cancel go through
it so its watcher reacts at once; without one, the spec is stored and the runtime
is checked by the vfsd that runs it (``pipeline list`` shows why one cannot).
``wait`` and ``provenance`` only read the store.
"""

from __future__ import annotations

import sys

import click

from cli.lineage import pipeline_graph
from cli.options import Options, json_option, pass_options
from cli.output import emit_json, fields, local_time, note, short, table
from vfs.errors import Corruption, JobNotFound, ObjectNotFound, VfsError
from vfs.names import parse_ref
from vfs.pipeline import claims, records, registry
from vfs.pipeline.combine import label
from vfs.pipeline.datums import datum_id
from vfs.pipeline.follow import Origin, provenance_of, wait_for
from vfs.pipeline.inputs import describe
from vfs.pipeline.records import JobRecord
from vfs.pipeline.spec import Spec, load_spec_file, load_spec_text
from vfs.refs import current_user


def _load(path: str) -> Spec:
    if path == "-":
        return load_spec_text(sys.stdin.read(), source="stdin")
    return load_spec_file(path)


def _warn(answer: dict) -> int:
    """Print what the daemon could not enforce; return the version number."""
    for warning in answer.get("warnings", []):
        note(f"vfsctl: warning: {warning}")
    return answer["version"]


def _version_line(version: registry.PipelineVersion, verb: str) -> str:
    spec = version.spec
    assert spec is not None
    return (f"{verb} pipeline {spec.pipeline} (version {version.version}): "
            f"{describe(spec.input)} -> "
            f"{spec.pipeline}@{spec.output_branch}, runtime {spec.runtime}")


@click.group()
def pipeline() -> None:
    """Register commands that run whenever a branch advances."""


@pipeline.command("create")
@click.option("-f", "--file", "path", required=True, metavar="SPEC",
              help="The spec (YAML or JSON); '-' reads stdin.")
@json_option
@pass_options
def pipeline_create(options: Options, path: str, as_json: bool) -> None:
    """Register a pipeline and create its output repository."""
    spec = _load(path)
    daemon = options.daemon()
    if daemon is not None:
        version = registry.version(options.store().objects, spec.pipeline,
                                   _warn(daemon.call("pipeline_create", spec=spec.to_dict(),
                                                     author=current_user())))
    else:
        version = registry.create(options.store(), spec)
    if as_json:
        emit_json(version.to_dict())
    else:
        note(_version_line(version, "created"))


@pipeline.command("update")
@click.option("-f", "--file", "path", required=True, metavar="SPEC",
              help="The new spec (YAML or JSON); '-' reads stdin.")
@click.option("--keep-outputs", is_flag=True,
              help="Keep the outputs of datums that do not change; run only new or changed "
                   "datums with the new transform (default: reprocess everything). A new "
                   "glob reprocesses everything all the same.")
@json_option
@pass_options
def pipeline_update(options: Options, path: str, keep_outputs: bool, as_json: bool) -> None:
    """Store a new version of a pipeline."""
    spec = _load(path)
    daemon = options.daemon()
    if daemon is not None:
        number = _warn(daemon.call("pipeline_update", spec=spec.to_dict(),
                                   keep_outputs=keep_outputs, author=current_user()))
        version = registry.version(options.store().objects, spec.pipeline, number)
    else:
        version = registry.update(options.store(), spec, keep_outputs=keep_outputs)
    if as_json:
        emit_json(version.to_dict())
    else:
        note(_version_line(version, "updated"))


@pipeline.command("list")
@json_option
@pass_options
def pipeline_list(options: Options, as_json: bool) -> None:
    """The pipelines, with their last job."""
    objects = options.store().objects
    rows = []
    documents = []
    for version in registry.list_pipelines(objects):
        spec = version.spec
        assert spec is not None
        job = records.latest_job(objects, spec.pipeline)
        trouble = records.load_pipeline_error(objects, spec.pipeline)
        documents.append({**version.to_dict(), "last_job": job.to_dict() if job else None,
                          "error": trouble.error if trouble else None})
        last = f"{job.state} {job.id}" if job else "no jobs yet"
        if trouble:
            last += f"; cannot run: {trouble.error}"
        if spec.plain:
            shown = (f"{spec.input_repo}@{spec.input_branch}", spec.glob)
        else:  # several inputs: each with its glob
            shown = (describe(spec.input), "(per input)")
        rows.append((spec.pipeline, version.version, *shown, spec.runtime, last))
    if as_json:
        emit_json(documents)
        return
    if not rows:
        note("no pipelines (create one with 'vfsctl pipeline create -f SPEC')")
        return
    table(rows, ("PIPELINE", "VERSION", "INPUT", "GLOB", "RUNTIME", "LAST JOB"))


@pipeline.command("inspect")
@click.argument("name")
@click.option("--history", is_flag=True, help="Show every version, oldest first.")
@json_option
@pass_options
def pipeline_inspect(options: Options, name: str, history: bool, as_json: bool) -> None:
    """A pipeline's spec, version and last job."""
    objects = options.store().objects
    versions = registry.versions(objects, name)
    if history:
        if not versions:
            registry.get(objects, name)  # raises PipelineNotFound
        if as_json:
            emit_json([v.to_dict() for v in versions])
            return
        table([(v.version, local_time(v.created), v.author,
                "deleted" if v.deleted else ("update --keep-outputs" if v.keep_outputs
                                             else "spec"))
               for v in versions], ("VERSION", "CREATED", "AUTHOR", "CHANGE"))
        return
    version = registry.get(objects, name)
    job = records.latest_job(objects, name)
    trouble = records.load_pipeline_error(objects, name)
    if as_json:
        emit_json({**version.to_dict(), "last_job": job.to_dict() if job else None,
                   "error": trouble.to_dict() if trouble else None})
        return
    spec = version.spec
    assert spec is not None
    fields([
        ("pipeline", spec.pipeline),
        ("version", f"{version.version} ({local_time(version.created)}, {version.author})"),
        ("description", spec.description or "-"),
        ("input", f"{spec.input_repo}@{spec.input_branch} glob {spec.glob}" if spec.plain
         else describe(spec.input)),
        ("output", f"{spec.pipeline}@{spec.output_branch}"),
        ("runtime", spec.runtime + (f" image {spec.image}" if spec.image else "")),
        ("cmd", " ".join(spec.cmd)),
        ("env", " ".join(f"{k}={v}" for k, v in sorted(spec.env.items())) or "-"),
        ("parallelism", spec.parallelism),
        ("datum_tries", spec.datum_tries),
        ("datum_batch", spec.datum_batch),
        ("datum_timeout", f"{spec.datum_timeout:g} s" if spec.datum_timeout
         else "the node's default (vfsd --datum-timeout)"),
        ("resources", f"memory {spec.memory or '-'} cpu {spec.cpu or '-'}"),
        ("network", "yes" if spec.network else "no"),
        *([("cannot run", spec.invalid)] if spec.invalid else []),
        ("last job", f"{job.id} {job.state}" if job else "none"),
        *([("error", f"cannot run: {trouble.error} (vfsd on {trouble.node}, since "
                     f"{local_time(trouble.since)})")] if trouble else []),
    ])


pipeline.add_command(pipeline_graph)


@pipeline.command("delete")
@click.argument("name")
@pass_options
def pipeline_delete(options: Options, name: str) -> None:
    """Stop a pipeline. Its history and its output repository are kept."""
    daemon = options.daemon()
    if daemon is not None:
        daemon.call("pipeline_delete", name=name, author=current_user())
    else:
        registry.delete(options.store(), name)
    note(f"deleted pipeline {name} (its output repository {name} is kept)")


# -- jobs ------------------------------------------------------------------------------------


def _duration(job: JobRecord) -> str:
    from vfs.refs import parse_time

    if not job.started or not job.finished:
        return "-"
    return f"{parse_time(job.finished) - parse_time(job.started):.1f}s"


def _job_json(job: JobRecord, deleted: bool = False) -> dict:
    return {**job.to_dict(), "pipeline_deleted": deleted}


@click.group()
def job() -> None:
    """The runs of pipelines."""


@job.command("list")
@click.argument("pipeline_name", metavar="[PIPELINE]", required=False)
@json_option
@pass_options
def job_list(options: Options, pipeline_name: str | None, as_json: bool) -> None:
    """Jobs, oldest first (of one pipeline, or of all, deleted pipelines' included)."""
    objects = options.store().objects
    if pipeline_name:
        if not registry.versions(objects, pipeline_name):
            registry.get(objects, pipeline_name)
        jobs = records.list_jobs(objects, pipeline_name)
    else:
        jobs = records.list_all_jobs(objects)
    existing = {v.name for v in registry.list_pipelines(objects)}
    if as_json:
        emit_json([_job_json(j, j.pipeline not in existing) for j in jobs])
        return
    if not jobs:
        note("no jobs yet")
        return
    table([(j.id, j.state + ("" if j.pipeline in existing else " (pipeline deleted)"),
            j.describe_inputs(), j.datums_processed,
            j.datums_skipped, j.datums_failed, local_time(j.started), _duration(j),
            short(j.output_commit) if j.output_commit else "-") for j in jobs],
          ("JOB", "STATE", "INPUT", "RUN", "SKIPPED", "FAILED", "STARTED", "TOOK", "OUTPUT"))


@job.command("inspect")
@click.argument("job_id", metavar="JOB")
@json_option
@pass_options
def job_inspect(options: Options, job_id: str, as_json: bool) -> None:
    """One job: state, datums processed / skipped / failed, times, output commit, and
    which node ran each datum, in how many tries."""
    objects = options.store().objects
    found = records.find_job(objects, job_id)
    deleted = registry.current(objects, found.pipeline) is None
    datums = _datum_claims(objects, found.id)
    if as_json:
        emit_json({**_job_json(found, deleted), "datums": datums})
        return
    pairs: list[tuple[str, object]] = [
        ("job", found.id), ("state", found.state),
        ("pipeline", f"{found.pipeline} version {found.version}"
                     + (" (pipeline deleted)" if deleted else "")),
        *_job_inputs(found),
        ("datums", f"{found.datums_processed} processed, {found.datums_skipped} skipped, "
                   f"{found.datums_failed} failed, {found.datums_removed} removed "
                   f"(of {found.datums_total}{', full run' if found.full else ''})"),
        ("started", local_time(found.started)),
        ("finished", (local_time(found.finished) if found.finished else "-")
                     + (" (last seen running; vfsd stopped)" if found.state == "killed"
                        else "")),
        ("output", found.output_commit or "-"),
    ]
    if found.error:
        pairs.append(("error", found.error))
    pairs += [(f"log of {datum}", f"lost: {why}") for datum, why in found.logs_lost.items()]
    if found.claims_collected and not datums:
        pairs.append(("per datum", "claims collected by gc: which node ran each datum, in "
                                   "how many tries, is no longer known"))
    fields(pairs)
    if datums:
        click.echo()
        table([(d["id"], label(d["root"]) if d["root"] is not None else "?", d["state"],
                d["node"], d["tries"], d["error"] or "-") for d in datums],
              ("DATUM", "ROOT", "STATE", "NODE", "TRIES", "LAST ERROR"))


def _job_inputs(job: JobRecord) -> list[tuple[str, str]]:
    """The ``input`` line of a single-input job; an ``input NAME`` line per input."""
    if not job.inputs or len(job.inputs) == 1 and job.inputs[0]["name"] == job.input_repo:
        return [("input", f"{job.input_repo}@{job.input_branch} {job.input_commit}")]
    return [(f"input {i['name']}", f"{i['repo']}@{i['branch']} {i.get('commit') or '(none)'}")
            for i in job.inputs]


def _datum_claims(objects, job_id: str) -> list[dict]:
    """The datums the job ran, from their claims (docs/format.md §10b): which node
    holds or held each, in how many tries, and how it ended."""
    try:
        plan = claims.load_plan(objects, job_id)
        roots = {digest: root for root, digest in plan.get("tasks", [])}
    except (ObjectNotFound, Corruption):
        roots = {}  # a job of a vfs before shared jobs, or its plan is damaged
    out = []
    for name, claim in sorted(claims.scan(objects, job_id, {}).items(),
                              key=lambda item: roots.get(item[0], item[0])):
        if name == claims.COMMIT:
            continue
        out.append({"id": datum_id(name), "hash": name, "root": roots.get(name),
                    "node": claim.node_name, "node_id": claim.node, "tries": claim.tries,
                    "state": claim.state, "error": claim.error})
    return out


@job.command("logs")
@click.argument("job_id", metavar="JOB")
@click.option("--datum", "datum", metavar="ID", help="Only this datum's log.")
@pass_options
def job_logs(options: Options, job_id: str, datum: str | None) -> None:
    """The output (stdout and stderr) of a job's datums."""
    objects = options.store().objects
    found = records.find_job(objects, job_id)
    logs = records.job_logs(objects, found.id)
    lost = dict(found.logs_lost)
    if datum:
        logs = {d: data for d, data in logs.items() if d.startswith(datum)}
        lost = {d: why for d, why in lost.items() if d.startswith(datum)}
        if not logs and not lost:
            raise JobNotFound(f"job {found.id} has no log for datum {datum} (it printed "
                              f"nothing, or did not run in this job)")
    out = click.get_binary_stream("stdout")
    for name in sorted(logs.keys() | lost.keys()):
        if len(logs) + len(lost) > 1 or not datum:
            click.echo(f"==> datum {name} <==")
        if name in lost:  # said first: what follows is incomplete, or nothing
            click.echo(f"[vfs: the log of datum {name} was lost: {lost[name]}]")
        data = logs.get(name, b"")
        out.write(data)
        if data and not data.endswith(b"\n"):
            out.write(b"\n")
        out.flush()
    if not logs and not lost:
        if found.datums_processed + found.datums_failed == 0:
            note(f"job {found.id} has no logs (no datum ran in it)")
        else:
            note(f"job {found.id} has no logs (its datums printed nothing)")


@job.command("cancel")
@click.argument("job_id", metavar="JOB")
@pass_options
def job_cancel(options: Options, job_id: str) -> None:
    """Stop a running job and its containers on every node; nothing is committed."""
    found = records.find_job(options.store().objects, job_id)
    if found.done:
        raise VfsError(f"job {found.id} already finished ({found.state})")
    daemon = options.daemon()
    if daemon is not None:  # its node stops its part at once
        daemon.call("job_cancel", job=found.id)
    else:  # the nodes running it stop when they next look at its record
        records.cancel_job(options.store().objects, found.id)
    note(f"cancelled job {found.id}")


# -- wait, provenance ------------------------------------------------------------------------


@click.command()
@click.argument("ref", metavar="REPO@REF")
@click.option("--timeout", type=float, default=None, metavar="S",
              help="Give up after S seconds (exit status 1).")
@json_option
@pass_options
def wait(options: Options, ref: str, timeout: float | None, as_json: bool) -> None:
    """Block until every pipeline downstream of a commit has processed it.

    Processed by the pipeline's current version: right after 'pipeline update' this
    waits for the new version's job. Prints the output commits, following chains of
    pipelines.
    """
    store = options.store()
    spec = parse_ref(ref, allow_path=False)
    commit = store.resolve(spec)
    if commit is None:
        raise VfsError(f"{ref} has no commits")
    if registry.downstream(store.objects, spec.repo) and options.daemon() is None:
        note("vfsctl: note: no vfsd runs on this node; waiting for one to process the commit")
    results = wait_for(store, spec.repo, commit.id, timeout=timeout)
    if as_json:
        emit_json([{"pipeline": r.pipeline, "input": f"{r.input_repo}@{r.input_commit}",
                    "output": f"{r.output.repo}@{r.output.id}",
                    "job": (r.output.provenance or {}).get("job")} for r in results])
        return
    for r in results:
        click.echo(f"{r.output.repo}@{r.output.id}")
    if not results:
        note(f"no pipeline reads {spec.repo}@{commit.id[:12]}")


@click.command()
@click.argument("ref", metavar="REPO@REF")
@json_option
@pass_options
def provenance(options: Options, ref: str, as_json: bool) -> None:
    """The input commits and pipeline versions behind a commit, recursively."""
    origin = provenance_of(options.store(), parse_ref(ref, allow_path=False))
    if as_json:
        emit_json(origin.to_dict())
        return
    _print_origin(origin, 0)


def _print_origin(origin: Origin, level: int) -> None:
    indent = "  " * level
    named = f" (input {origin.input})" if origin.input and origin.input != origin.repo else ""
    line = f"{indent}{origin.repo}@{origin.commit.id}{named}"
    if origin.pipeline:
        line += (f"  <- pipeline {origin.pipeline} v{origin.version} job {origin.job}"
                 + (" (kept outputs)" if origin.keep_outputs else ""))
    else:
        line += f"  ({origin.commit.author}, {local_time(origin.commit.time)})"
    click.echo(line)
    for item in origin.inputs:
        _print_origin(item, level + 1)


__all__ = ["job", "pipeline", "provenance", "wait"]
