"""Job planning and output commits, with datums "run" in-process (no containers).

The daemon's part (containers, retries, parallelism) is tested in tests/pipeline;
here the rules: which datums run, which are reused, what the output commit holds.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable

import pytest

import vfs
from vfs.errors import Conflict
from vfs.names import RefSpec
from vfs.pipeline import records, registry
from vfs.pipeline.jobs import collect_outputs, commit_outputs, materialize, plan_job
from vfs.pipeline.records import DatumRecord
from vfs.pipeline.spec import parse_spec
from vfs.snapshot import Snapshot, read_file
from vfs.tree import FILE, Entry, inline_ref

Transform = Callable[[str, dict[str, bytes]], dict[str, bytes]]


def upper(root: str, files: dict[str, bytes]) -> dict[str, bytes]:
    """The test transform: each input file's bytes upper-cased, under the same name."""
    return {path + ".out": data.upper() for path, data in files.items()}


def make(store: vfs.Store, glob: str = "/*", **spec) -> registry.PipelineVersion:
    if "images" not in {r.name for r in store.list_repos()}:
        store.create_repo("images")
    doc = {"pipeline": "edges", "input": {"repo": "images", "glob": glob},
           "transform": {"cmd": ["upper"]}, "runtime": "process", **spec}
    return registry.create(store, parse_spec(doc))


def commit_files(store: vfs.Store, files: dict[str, bytes | None], tmp_path) -> str:
    for path, data in files.items():
        if data is None:
            vfs.remove(store, "images", "main", path, recursive=True)
            continue
        local = tmp_path / "src" / path.replace("/", "_")
        local.parent.mkdir(exist_ok=True)
        local.write_bytes(data)
        vfs.put(store, "images", "main", path, [str(local)])
    return store.commit("images", "main", "input").id


def run_job(store: vfs.Store, tmp_path, transform: Transform = upper, *,
            version: registry.PipelineVersion | None = None, pipeline: str = "edges"):
    """Plan and run one job of ``pipeline`` in-process; return (plan, output commit or
    None)."""
    version = version or registry.get(store.objects, pipeline)
    plan = plan_job(store, version, image_digest="host")
    if plan is None:
        return None, None
    ran = {}
    for task in plan.tasks:
        work = tmp_path / "work" / task.id
        input_dir, out_dir = work / "in", work / "out"
        input_dir.mkdir(parents=True)
        out_dir.mkdir()
        materialize(store, task.files, str(input_dir))
        files = {}
        for directory, _, names in os.walk(input_dir):
            for name in names:
                full = os.path.join(directory, name)
                files[os.path.relpath(full, input_dir)] = open(full, "rb").read()
        for path, data in transform(task.root, files).items():
            target = out_dir / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        record = DatumRecord(task.root, plan.job.id, collect_outputs(store, str(out_dir)))
        records.save_datum(store.objects, pipeline, task.hash, record)
        ran[task.root] = record
        plan.job.datums_processed += 1
    return plan, commit_outputs(store, plan, ran)


def output_files(store: vfs.Store, ref: str = "main") -> dict[str, bytes]:
    commit = store.resolve(RefSpec("edges", ref))
    snap = Snapshot(store.blobs, commit.tree)
    return {path: read_file(store.blobs, e) for path, e in snap.walk() if e.kind == "f"}


def test_first_job_runs_every_datum_then_one_new_file_runs_one(store, tmp_path) -> None:
    make(store)
    commit_files(store, {f"f{i}.txt": f"file {i}".encode() for i in range(20)}, tmp_path)
    plan, out = run_job(store, tmp_path)
    assert len(plan.tasks) == 20 and plan.job.full
    assert output_files(store)["f3.txt.out"] == b"FILE 3"
    head = commit_files(store, {"new.txt": b"new"}, tmp_path)
    plan, out = run_job(store, tmp_path)
    assert [t.root for t in plan.tasks] == ["new.txt"]
    assert not plan.job.full and plan.job.datums_total == 21
    assert plan.job.datums_skipped == 20
    assert out.provenance["inputs"][0]["commit"] == head
    assert len(output_files(store)) == 21
    # Nothing new: no job.
    assert run_job(store, tmp_path) == (None, None)


def test_deleted_input_loses_its_outputs_and_empty_dirs(store, tmp_path) -> None:
    make(store)
    commit_files(store, {"a/x.txt": b"x", "b.txt": b"b"}, tmp_path)
    run_job(store, tmp_path)
    assert set(output_files(store)) == {"a/x.txt.out", "b.txt.out"}
    commit_files(store, {"a": None}, tmp_path)
    plan, _ = run_job(store, tmp_path)
    assert plan.tasks == [] and plan.job.datums_removed == 1
    snap = Snapshot(store.blobs, store.resolve(RefSpec("edges", "main")).tree)
    assert snap.lookup("a") is None
    assert set(output_files(store)) == {"b.txt.out"}


def test_rollback_reuses_recorded_outputs_without_running(store, tmp_path) -> None:
    make(store)
    first = commit_files(store, {"a.txt": b"one", "b.txt": b"two"}, tmp_path)
    run_job(store, tmp_path)
    before = output_files(store)
    commit_files(store, {"a.txt": b"changed", "c.txt": b"three"}, tmp_path)
    run_job(store, tmp_path)
    assert output_files(store)["a.txt.out"] == b"CHANGED"
    store.rollback("images", "main", RefSpec("images", first))
    plan, _ = run_job(store, tmp_path)
    assert plan.tasks == []  # a.txt's old content was seen before
    assert plan.job.datums_reused == 1 and plan.job.datums_removed == 1
    assert plan.job.datums_total == 2 and plan.job.datums_skipped == 2
    assert output_files(store) == before


def test_update_reprocesses_everything_unless_keep_outputs(store, tmp_path) -> None:
    make(store)
    commit_files(store, {"a.txt": b"a", "b.txt": b"b"}, tmp_path)
    run_job(store, tmp_path)
    doc = {"pipeline": "edges", "input": {"repo": "images"},
           "transform": {"cmd": ["upper", "v2"]}, "runtime": "process"}
    registry.update(store, parse_spec(doc))
    plan, out = run_job(store, tmp_path, lambda root, files: {
        p + ".v2": d for p, d in files.items()})
    assert len(plan.tasks) == 2 and plan.job.full
    assert set(output_files(store)) == {"a.txt.v2", "b.txt.v2"}
    doc["transform"]["cmd"] = ["upper", "v3"]
    registry.update(store, parse_spec(doc), keep_outputs=True)
    commit_files(store, {"c.txt": b"c"}, tmp_path)
    plan, out = run_job(store, tmp_path, lambda root, files: {
        p + ".v3": d for p, d in files.items()})
    assert [t.root for t in plan.tasks] == ["c.txt"]
    assert out.provenance["keep_outputs"] is True and out.provenance["version"] == 3
    assert set(output_files(store)) == {"a.txt.v2", "b.txt.v2", "c.txt.v3"}


def test_two_datums_writing_one_path_is_an_error_naming_both(store, tmp_path) -> None:
    make(store)
    commit_files(store, {"a.txt": b"a", "b.txt": b"b"}, tmp_path)
    with pytest.raises(Conflict, match=r"datums /a.txt and /b.txt both wrote /same"):
        run_job(store, tmp_path, lambda root, files: {"same": b"x"})
    assert store.resolve(RefSpec("edges", "main")) is None  # nothing committed


def test_a_new_datum_colliding_with_an_unchanged_one_names_it(store, tmp_path) -> None:
    make(store)
    commit_files(store, {"a.txt": b"a"}, tmp_path)
    run_job(store, tmp_path, lambda root, files: {"same": b"x"})
    commit_files(store, {"b.txt": b"b"}, tmp_path)
    with pytest.raises(Conflict, match=r"datum /b.txt wrote /same, which datum /a.txt"):
        run_job(store, tmp_path, lambda root, files: {"same": b"y"})


def test_an_input_commit_that_changes_nothing_still_gets_an_output_commit(store,
                                                                          tmp_path) -> None:
    make(store, glob="/*.txt")
    commit_files(store, {"a.txt": b"a"}, tmp_path)
    _, first = run_job(store, tmp_path)
    head = commit_files(store, {"ignored.bin": b"not matched"}, tmp_path)
    plan, second = run_job(store, tmp_path)
    assert plan.tasks == [] and second.tree == first.tree
    assert second.provenance["inputs"][0]["commit"] == head


def test_directory_datums_and_the_whole_repo_glob(store, tmp_path) -> None:
    make(store, glob="/")
    commit_files(store, {"a/x": b"x", "b/y": b"y"}, tmp_path)
    seen = []
    run_job(store, tmp_path, lambda root, files: seen.append((root, sorted(files))) or {})
    assert seen == [("", ["a/x", "b/y"])]


def test_gc_keeps_the_blobs_of_datum_records_no_commit_names(store, tmp_path) -> None:
    from vfs.gc import collect

    make(store)
    commit_files(store, {"a.txt": b"x" * 5000}, tmp_path)  # not inlined: a real blob
    version = registry.get(store.objects, "edges")
    plan = plan_job(store, version, image_digest="host")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "result").write_bytes(b"y" * 5000)
    record = DatumRecord("a.txt", plan.job.id, collect_outputs(store, str(out_dir)))
    records.save_datum(store.objects, "edges", plan.tasks[0].hash, record)
    # The job "failed" after this datum: no output commit names the blob.
    collect(store, grace=0)
    plan = plan_job(store, version, image_digest="host")
    assert plan.tasks == [] and list(plan.reused) == ["a.txt"]
    commit_outputs(store, plan, {})
    assert output_files(store) == {"result": b"y" * 5000}


# -- modes: only the permission bits go in or out ---------------------------------------------


def test_collect_outputs_drops_setuid_setgid_and_sticky_bits(store, tmp_path) -> None:
    # A datum must not plant a setuid program that `vfsctl get` as root writes out.
    out_dir = tmp_path / "out"
    (out_dir / "bin").mkdir(parents=True)
    (out_dir / "bin" / "id").write_bytes(b"\x7fELF not really")
    os.chmod(out_dir / "bin" / "id", 0o4755)
    os.chmod(out_dir / "bin", 0o3775)
    outputs = collect_outputs(store, str(out_dir))
    assert {path: oct(entry.mode) for path, entry in outputs.items()} \
        == {"bin/id": oct(0o755)}


def test_materialize_drops_setuid_bits_an_older_version_stored(store, tmp_path) -> None:
    data = b"#!/bin/sh\nid\n"
    entry = Entry("id", FILE, 0o6755, len(data), 1, inline_ref(data))
    assert materialize(store, (("bin/id", entry),), str(tmp_path / "in")) == len(data)
    assert (tmp_path / "in" / "bin" / "id").read_bytes() == data
    assert oct(stat.S_IMODE(os.stat(tmp_path / "in" / "bin" / "id").st_mode)) == oct(0o755)
