"""Pipeline updates: what a new version keeps, what it reruns, and that outputs stay exact.

Jobs are planned and committed by the library, with datums "run" in-process
(test_pipeline_jobs' helpers). After every job the output tree must be what a
fresh run of the current version over the current input makes.
"""

from __future__ import annotations

import pytest
from test_pipeline_jobs import commit_files, output_files, run_job

import vfs
from vfs.errors import JobFailed, ReadOnly, Timeout
from vfs.names import RefSpec
from vfs.pipeline import records, registry
from vfs.pipeline.follow import wait_for
from vfs.pipeline.jobs import plan_job
from vfs.pipeline.records import DatumRecord, datum_key, last_processed
from vfs.pipeline.spec import parse_spec


def tagged(tag: str):
    """A transform whose outputs name the version that made them."""
    return lambda root, files: {f"{path}.{tag}": data.upper() + tag.encode()
                                for path, data in files.items()}


def spec(tag: str, glob: str = "/*", **extra):
    return parse_spec({"pipeline": "edges", "input": {"repo": "images", "glob": glob},
                       "transform": {"cmd": ["upper", tag]}, "runtime": "process", **extra})


def create(store: vfs.Store, tag: str = "v1", glob: str = "/*"):
    store.create_repo("images")
    return registry.create(store, spec(tag, glob))


def update(store: vfs.Store, tag: str, *, glob: str = "/*", keep: bool = False):
    return registry.update(store, spec(tag, glob), keep_outputs=keep)


def expected(inputs: dict[str, bytes], tags: dict[str, str]) -> dict[str, bytes]:
    """The outputs of ``tagged`` for each top-level input file, made by tags[file]."""
    return {f"{path}.{tags[path]}": data.upper() + tags[path].encode()
            for path, data in inputs.items()}


# -- --keep-outputs ---------------------------------------------------------------------------


def test_after_keep_outputs_a_changed_old_datum_replaces_its_output(store, tmp_path) -> None:
    create(store)
    commit_files(store, {"a.txt": b"a", "b.txt": b"b"}, tmp_path)
    run_job(store, tmp_path, tagged("v1"))
    update(store, "v2", keep=True)
    run_job(store, tmp_path, tagged("v2"))  # the new version's job: nothing to run
    commit_files(store, {"a.txt": b"a2"}, tmp_path)
    plan, out = run_job(store, tmp_path, tagged("v2"))
    assert [t.root for t in plan.tasks] == ["a.txt"]
    assert output_files(store) == {"a.txt.v2": b"A2v2", "b.txt.v1": b"Bv1"}


def test_after_keep_outputs_a_deleted_old_datum_loses_its_output(store, tmp_path) -> None:
    create(store)
    commit_files(store, {"a.txt": b"a", "b.txt": b"b"}, tmp_path)
    run_job(store, tmp_path, tagged("v1"))
    update(store, "v2", keep=True)
    run_job(store, tmp_path, tagged("v2"))
    commit_files(store, {"a.txt": None}, tmp_path)
    plan, _ = run_job(store, tmp_path, tagged("v2"))
    assert plan.job.datums_removed == 1 and plan.tasks == []
    assert output_files(store) == {"b.txt.v1": b"Bv1"}


def test_kept_outputs_survive_two_keep_updates_and_a_transform_seen_before(store,
                                                                           tmp_path) -> None:
    # v1 and v3 have the same transform; a.txt's output in v3 is v2's, not v1's record.
    create(store)
    commit_files(store, {"a.txt": b"a", "b.txt": b"b"}, tmp_path)
    run_job(store, tmp_path, tagged("v1"))
    update(store, "v2")  # no keep: everything reruns
    run_job(store, tmp_path, tagged("v2"))
    update(store, "v1", keep=True)  # back to v1's transform, keeping
    run_job(store, tmp_path, tagged("v1"))
    assert output_files(store) == {"a.txt.v2": b"Av2", "b.txt.v2": b"Bv2"}
    commit_files(store, {"a.txt": None, "b.txt": b"b3"}, tmp_path)
    run_job(store, tmp_path, tagged("v1"))
    assert output_files(store) == {"b.txt.v1": b"B3v1"}


@pytest.mark.expect_warnings  # the lost record is reported
def test_a_lost_datum_record_rebuilds_instead_of_leaving_stale_outputs(store,
                                                                      tmp_path) -> None:
    create(store)
    commit_files(store, {"a.txt": b"a", "b.txt": b"b"}, tmp_path)
    plan, _ = run_job(store, tmp_path, tagged("v1"))
    for task in plan.tasks:
        if task.root == "a.txt":
            store.objects.delete(datum_key("edges", task.hash))
    commit_files(store, {"a.txt": b"a2"}, tmp_path)
    plan, _ = run_job(store, tmp_path, tagged("v1"))
    assert plan.job.full
    assert output_files(store) == {"a.txt.v1": b"A2v1", "b.txt.v1": b"Bv1"}


# -- the glob is part of a datum's identity ---------------------------------------------------


@pytest.mark.parametrize("keep", [False, True])
def test_a_glob_change_reprocesses_under_the_new_glob(store, tmp_path, keep: bool) -> None:
    create(store)
    commit_files(store, {"a.txt": b"a", "b.bin": b"b"}, tmp_path)
    run_job(store, tmp_path, tagged("v1"))
    update(store, "v1", glob="/*.txt", keep=keep)  # only the glob changes
    plan, out = run_job(store, tmp_path, tagged("v1"))
    assert plan is not None and plan.job.full
    assert output_files(store) == {"a.txt.v1": b"Av1"}
    assert out.provenance["version"] == 2 and out.provenance["glob"] == "/*.txt"
    commit_files(store, {"c.bin": b"c", "d.txt": b"d"}, tmp_path)
    run_job(store, tmp_path, tagged("v1"))
    assert output_files(store) == {"a.txt.v1": b"Av1", "d.txt.v1": b"Dv1"}


def test_an_update_that_keeps_the_identity_still_credits_the_new_version(store,
                                                                        tmp_path) -> None:
    create(store)
    head = commit_files(store, {"a.txt": b"a"}, tmp_path)
    run_job(store, tmp_path, tagged("v1"))
    registry.update(store, spec("v1", parallelism=3))
    plan, out = run_job(store, tmp_path, tagged("v1"))
    assert plan.tasks == [] and not plan.job.full
    assert out.provenance["version"] == 2 and out.provenance["inputs"][0]["commit"] == head
    assert output_files(store) == {"a.txt.v1": b"Av1"}


# -- wait follows the current version ---------------------------------------------------------


def test_wait_after_an_update_waits_for_the_new_version(store, tmp_path) -> None:
    create(store)
    head = commit_files(store, {"a.txt": b"a"}, tmp_path)
    run_job(store, tmp_path, tagged("v1"))
    assert wait_for(store, "images", head, timeout=5)[0].output.provenance["version"] == 1
    update(store, "v2")
    with pytest.raises(Timeout):
        wait_for(store, "images", head, timeout=0.3, poll=0.05)
    _, out = run_job(store, tmp_path, tagged("v2"))
    assert wait_for(store, "images", head, timeout=5)[0].output.id == out.id


def test_wait_does_not_fail_on_the_old_version_s_failed_job(store, tmp_path) -> None:
    create(store)
    head = commit_files(store, {"a.txt": b"a"}, tmp_path)
    plan, _ = run_job(store, tmp_path, tagged("v1"))
    from vfs.pipeline.records import JobRecord, new_job_id, save_job

    failed = JobRecord(id=new_job_id("edges"), pipeline="edges", version=1,
                       input_repo="images", input_branch="main", input_commit=head,
                       state="failed", error="boom")
    commit_files(store, {"b.txt": b"b"}, tmp_path)
    newer = store.resolve(RefSpec("images", "main")).id
    failed.input_commit = newer
    save_job(store.objects, failed)
    with pytest.raises(JobFailed):
        wait_for(store, "images", newer, timeout=5)
    update(store, "v2")  # a fix: wait now waits for its job
    with pytest.raises(Timeout):
        wait_for(store, "images", newer, timeout=0.3, poll=0.05)


# -- output branches belong to their pipeline -------------------------------------------------


def test_hand_commits_to_an_output_branch_are_refused(store, tmp_path) -> None:
    create(store)
    first = commit_files(store, {"a.txt": b"a"}, tmp_path)
    run_job(store, tmp_path, tagged("v1"))
    local = tmp_path / "x"
    local.write_bytes(b"mine")
    with pytest.raises(ReadOnly, match=r"edges@main is the output of pipeline edges"):
        vfs.put(store, "edges", "main", "x", [str(local)])
    with pytest.raises(ReadOnly, match=r"output of pipeline edges"):
        vfs.remove(store, "edges", "main", "a.txt.v1")
    made = store.resolve(RefSpec("edges", "main"))
    with pytest.raises(ReadOnly, match=r"output of pipeline edges"):
        store.rollback("edges", "main", RefSpec("edges", made.id))
    with pytest.raises(ReadOnly, match=r"output of pipeline edges"):
        store.commit("edges", "main", "by hand", tree=made.tree, allow_empty=True)
    # The pipeline itself still commits, and other branches of the repository are free.
    commit_files(store, {"b.txt": b"b"}, tmp_path)
    run_job(store, tmp_path, tagged("v1"))
    store.create_branch("edges", "mine", RefSpec("edges", "main"))
    vfs.put(store, "edges", "mine", "x", [str(local)])
    store.commit("edges", "mine", "by hand")
    # A deleted pipeline's output branch is an ordinary branch again.
    registry.delete(store, "edges")
    vfs.put(store, "edges", "main", "x", [str(local)])
    store.commit("edges", "main", "taken over")
    assert first and last_processed(store, "edges", "main") is not None


@pytest.mark.expect_warnings  # the lost record is reported
def test_a_rebuild_cut_short_leaves_no_record_that_hides_kept_outputs(store,
                                                                     tmp_path) -> None:
    create(store)
    first = commit_files(store, {"a.txt": b"a", "c.txt": b"c"}, tmp_path)
    plan, _ = run_job(store, tmp_path, tagged("v1"))
    update(store, "v2", keep=True)
    run_job(store, tmp_path, tagged("v2"))
    lost = next(t.hash for t in plan.tasks if t.root == "a.txt")
    store.objects.delete(datum_key("edges", lost))
    commit_files(store, {"a.txt": b"a2"}, tmp_path)
    # The rebuild this forces records c.txt under v2's transform, then stops (a crash).
    rebuild = plan_job(store, registry.get(store.objects, "edges"), image_digest="host")
    assert rebuild.job.full
    for task in rebuild.tasks:
        if task.root == "c.txt":
            records.save_datum(store.objects, "edges", task.hash, DatumRecord(
                "c.txt", rebuild.job.id, {}))
    # The input goes back: c.txt keeps v1's output, which its deletion must remove.
    store.rollback("images", "main", RefSpec("images", first))
    run_job(store, tmp_path, tagged("v2"))
    commit_files(store, {"c.txt": None}, tmp_path)
    plan, _ = run_job(store, tmp_path, tagged("v2"))
    assert not plan.job.full and plan.job.datums_removed == 1
    assert output_files(store) == {"a.txt.v1": b"Av1"}
