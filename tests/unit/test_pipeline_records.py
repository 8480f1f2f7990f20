"""What pipelines leave in the store (vfs.pipeline.records) and how ``wait`` reads it."""

from __future__ import annotations

import pytest

import vfs
from vfs.errors import JobFailed, Timeout
from vfs.pipeline import records, registry
from vfs.pipeline.follow import wait_for
from vfs.pipeline.records import LOG_LIMIT, JobRecord, PipelineError
from vfs.pipeline.spec import parse_spec


def _pipeline(store: vfs.Store, name: str = "edges", branch: str = "main"):
    if "images" not in {r.name for r in store.list_repos()}:
        store.create_repo("images")
    doc = {"pipeline": name, "input": {"repo": "images", "branch": branch, "glob": "/*"},
           "transform": {"cmd": ["true"]}, "runtime": "process"}
    return registry.create(store, parse_spec(doc))


def _commit(store: vfs.Store, tmp_path, name: str) -> str:
    local = tmp_path / name
    local.write_text(name)
    vfs.put(store, "images", "main", f"/{name}", [str(local)])
    return store.commit("images", "main", name).id


def test_a_log_cut_to_its_last_mib_says_how_much_was_cut(store, tmp_path) -> None:
    short = tmp_path / "short.log"
    short.write_bytes(b"hello\n")
    records.save_log(store.objects, "edges.1-a", "d1", str(short))
    long = tmp_path / "long.log"
    long.write_bytes(b"a" * 1000 + b"b" * (LOG_LIMIT - 5) + b"THEEND")
    records.save_log(store.objects, "edges.1-a", "d2", str(long))
    logs = records.job_logs(store.objects, "edges.1-a")
    assert logs["d1"] == b"hello\n"
    marker, _, kept = logs["d2"].partition(b"\n")
    assert marker == b"[... 1001 bytes cut: the log keeps the last 1 MiB]"
    assert len(kept) == LOG_LIMIT and kept.endswith(b"THEEND") and b"a" not in kept


def test_job_records_keep_last_seen_and_lost_logs_and_old_ones_still_load() -> None:
    job = JobRecord("edges.1-a", "edges", 1, "images", "main", "c" * 64,
                    last_seen="2026-01-01T00:00:00.000000Z", logs_lost={"d1": "disk full"})
    assert JobRecord.from_dict(job.to_dict()) == job
    old = job.to_dict()
    del old["last_seen"], old["logs_lost"]
    loaded = JobRecord.from_dict(old)
    assert loaded.last_seen is None and loaded.logs_lost == {}


def test_jobs_of_deleted_pipelines_are_still_listed(store) -> None:
    _pipeline(store, "edges")
    _pipeline(store, "faces")
    for name in ("edges", "faces"):
        records.save_job(store.objects, JobRecord(records.new_job_id(name), name, 1,
                                                  "images", "main", "c" * 64))
    registry.delete(store, "edges")
    assert [j.pipeline for j in records.list_all_jobs(store.objects)] == ["edges", "faces"]


def test_a_pipeline_error_is_stored_read_and_cleared(store) -> None:
    error = PipelineError("edges", "branch images@x does not exist", "now", "node1", 2)
    assert records.load_pipeline_error(store.objects, "edges") is None
    records.save_pipeline_error(store.objects, error)
    assert records.load_pipeline_error(store.objects, "edges") == error
    records.clear_pipeline_error(store.objects, "edges")
    records.clear_pipeline_error(store.objects, "edges")  # clearing twice is fine
    assert records.load_pipeline_error(store.objects, "edges") is None


def test_wait_skips_a_pipeline_whose_input_branch_is_gone(store, tmp_path) -> None:
    store.create_repo("images")
    store.create_branch("images", "dev")
    _pipeline(store, "devs", branch="dev")
    store.delete_branch("images", "dev")
    commit = _commit(store, tmp_path, "a.txt")
    assert wait_for(store, "images", commit, timeout=5) == []


def test_wait_reports_why_a_pipeline_on_its_way_cannot_run(store, tmp_path) -> None:
    _pipeline(store)
    old = _commit(store, tmp_path, "a.txt")
    records.save_pipeline_error(store.objects, PipelineError(
        "edges", "runtime process refused", "now", "node1", 1, old))
    with pytest.raises(JobFailed, match="pipeline edges cannot run .*runtime process refused"):
        wait_for(store, "images", old, timeout=5)
    # Recorded at an older head: it says nothing of a newer commit (the watcher has
    # not looked at it yet).
    new = _commit(store, tmp_path, "b.txt")
    with pytest.raises(Timeout):
        wait_for(store, "images", new, timeout=0.3, poll=0.05)
