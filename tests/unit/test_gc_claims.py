"""gc deletes the claims and plans of finished jobs (docs/format.md §10b, "Collecting
claims"), and nothing a node may still act on.

Jobs are made with the claims and records API on a real local store; their age is
set by moving the objects' modification times back (ages are store times).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

import vfs
from vfs.gc import collect
from vfs.nodes import NodeIdentity
from vfs.pipeline import claims, records
from vfs.pipeline.claims import COMMIT
from vfs.pipeline.records import JobRecord

NODE = NodeIdentity("a" * 32, "node-a")
PIPELINE = "edges"
HOUR = 3600.0


def make_job(store: vfs.Store, job_id: str, *, state: str | None, datums: int = 2,
             current: bool = False, ttl: float = 30.0) -> None:
    """A job as nodes leave it: its plan, a claim per datum, the commit lease (all
    done when ``state`` is finished), and its record (``state`` None: no record)."""
    objects = store.objects
    record = JobRecord(job_id, PIPELINE, 1, "in", "main", "0" * 64, state=state or "running")
    tasks = [[f"d{i}", f"{i:064x}"] for i in range(datums)]
    claims.save_plan(objects, job_id, {"v": 1, "job": record.to_dict(), "tasks": tasks})
    if current:
        seen = claims.read_current(objects, PIPELINE)
        assert claims.move_current(objects, PIPELINE, seen, job_id)
    finished = state is not None and state != "running"
    for name in [digest for _, digest in tasks] + ([COMMIT] if finished else []):
        held = claims.claim(objects, job_id, name, NODE, now=time.time(), ttl=ttl)
        assert held is not None
        if finished:
            claims.finish(objects, held)
    if state is not None:
        assert records.create_job(objects, record)


def age(tmp_path: Path, job_id: str, seconds: float) -> None:
    """Make every object of the job (claims, plan, record) ``seconds`` old."""
    past = time.time() - seconds
    paths = list((tmp_path / "store" / "claims" / job_id).iterdir())
    record = tmp_path / "store" / "jobs" / PIPELINE / job_id
    for path in paths + ([record] if record.exists() else []):
        os.utime(path, (past, past))


def claim_keys(store: vfs.Store, job_id: str) -> list[str]:
    return [info.key for info in store.objects.list(claims.claims_prefix(job_id))]


def job(n: int) -> str:
    return f"{PIPELINE}.20260101T00000{n}000-000{n}"


@pytest.mark.parametrize("state", ["success", "failed", "cancelled", "killed"])
def test_the_claims_of_a_job_finished_long_ago_are_deleted(store, tmp_path, state) -> None:
    make_job(store, job(1), state=state, datums=3)
    make_job(store, job(2), state="running", current=True)
    age(tmp_path, job(1), 2 * HOUR)
    report = collect(store, grace=HOUR)
    assert claim_keys(store, job(1)) == []
    assert (report.claims_deleted, report.claim_jobs) == (5, 1)  # plan, 3 datums, commit
    # Its record stays, and says where the claims went.
    kept = records.load_job(store.objects, job(1))
    assert kept.state == state and kept.claims_collected


def test_the_running_current_job_keeps_its_claims_however_old(store, tmp_path) -> None:
    make_job(store, job(1), state="running", current=True)
    age(tmp_path, job(1), 10 * HOUR)
    report = collect(store, grace=0)
    assert len(claim_keys(store, job(1))) == 3
    assert report.claims_deleted == 0
    assert not records.load_job(store.objects, job(1)).claims_collected


def test_a_finished_job_is_collected_only_long_after_its_last_write(store, tmp_path) -> None:
    make_job(store, job(1), state="success")
    make_job(store, job(2), state="failed")
    age(tmp_path, job(2), 2 * HOUR)
    # Just finished: a node may still be acting on it, even with no grace at all.
    assert collect(store, grace=0).claims_deleted == 4
    assert claim_keys(store, job(2)) == []
    assert len(claim_keys(store, job(1))) == 4
    # Older than the margin's floor but within the grace: kept too.
    age(tmp_path, job(1), 20 * 60)
    assert collect(store, grace=HOUR).claims_deleted == 0
    assert len(claim_keys(store, job(1))) == 4
    # A record written late (a slow node's last save) counts as the job's last write.
    age(tmp_path, job(1), 2 * HOUR)
    os.utime(tmp_path / "store" / "jobs" / PIPELINE / job(1))
    assert collect(store, grace=HOUR).claims_deleted == 0
    age(tmp_path, job(1), 2 * HOUR)
    assert collect(store, grace=HOUR).claims_deleted == 4


def test_a_long_lease_ttl_lengthens_the_margin(store, tmp_path) -> None:
    make_job(store, job(1), state="success", ttl=HOUR)
    age(tmp_path, job(1), 2 * HOUR)  # past the grace, within four lease ttls
    assert collect(store, grace=HOUR).claims_deleted == 0
    age(tmp_path, job(1), 5 * HOUR)
    assert collect(store, grace=HOUR).claims_deleted == 4


def test_a_finished_current_job_is_collected_and_the_pipeline_still_knows_it(
        store, tmp_path) -> None:
    make_job(store, job(1), state="success", current=True)
    age(tmp_path, job(1), 2 * HOUR)
    assert collect(store, grace=HOUR).claims_deleted == 4
    assert claims.read_current(store.objects, PIPELINE).job == job(1)
    assert records.latest_job(store.objects, PIPELINE).state == "success"


def test_a_plan_with_no_record_is_collected_only_when_old_and_not_current(
        store, tmp_path) -> None:
    # A node that lost the race to start a job and died before deleting its plan.
    make_job(store, job(1), state=None, datums=0)
    # A node that moved the current job and died before creating the record: the
    # next node makes the record from the plan.
    make_job(store, job(2), state=None, datums=0, current=True)
    # A node between saving its plan and moving the current job.
    make_job(store, job(3), state=None, datums=0)
    age(tmp_path, job(1), 2 * HOUR)
    age(tmp_path, job(2), 2 * HOUR)
    report = collect(store, grace=0)
    assert (report.claims_deleted, report.claim_jobs) == (1, 1)
    assert claim_keys(store, job(1)) == []
    assert claim_keys(store, job(2)) == [claims.claim_key(job(2), "plan")]
    assert claim_keys(store, job(3)) == [claims.claim_key(job(3), "plan")]


def test_a_dry_run_counts_and_deletes_nothing(store, tmp_path) -> None:
    make_job(store, job(1), state="success")
    age(tmp_path, job(1), 2 * HOUR)
    report = collect(store, grace=HOUR, dry_run=True)
    assert (report.claims_deleted, report.claim_jobs, report.dry_run) == (4, 1, True)
    assert len(claim_keys(store, job(1))) == 4
    assert not records.load_job(store.objects, job(1)).claims_collected


def test_a_damaged_record_keeps_its_job_claims(store, tmp_path) -> None:
    make_job(store, job(1), state="success")
    (tmp_path / "store" / "jobs" / PIPELINE / job(1)).write_bytes(b"{not json")
    age(tmp_path, job(1), 2 * HOUR)
    report = collect(store, grace=HOUR)
    assert report.claims_deleted == 0 and len(claim_keys(store, job(1))) == 4
    assert any(job(1) in line for line in report.notes)
