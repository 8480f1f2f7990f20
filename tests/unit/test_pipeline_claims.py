"""The protocol of jobs shared by nodes (vfs/pipeline/claims.py, docs/format.md §10b).

Two claimants in one process stand for two nodes; times are store times passed in
by hand, so a lease expires when the test says so.
"""

from __future__ import annotations

import pytest

import vfs
from vfs.errors import HeadMoved, JobNotFound, LeaseLost
from vfs.nodes import NodeIdentity
from vfs.objstore.local import LocalStore
from vfs.objstore.memory import MemoryStore
from vfs.pipeline import claims, records
from vfs.pipeline.claims import COMMIT, DONE, FAILED, RUNNING
from vfs.pipeline.jobs import (
    commit_outputs,
    committed_by,
    plan_document,
    plan_from_document,
    plan_job,
    task_files,
)
from vfs.pipeline.records import JobRecord

A = NodeIdentity("a" * 32, "node-a")
B = NodeIdentity("b" * 32, "node-b")
JOB = "edges.20260101T000000000-0001"
TTL = 30.0


@pytest.fixture(params=["local", "memory"])
def objects(request: pytest.FixtureRequest, tmp_path):
    if request.param == "memory":
        return MemoryStore()
    return LocalStore(str(tmp_path / "objects"), create=True)


def test_one_datum_is_claimed_by_one_node(objects) -> None:
    held = claims.claim(objects, JOB, "d1", A, now=100.0, ttl=TTL)
    assert held is not None and (held.token, held.tries, held.state) == (1, 1, RUNNING)
    assert claims.claim(objects, JOB, "d1", B, now=100.0, ttl=TTL) is None
    # While the lease runs nobody takes it over, however often they try.
    seen = claims.read_claim(objects, JOB, "d1")
    assert claims.take_over(objects, seen, B, now=129.0, ttl=TTL, max_tries=3) is None
    assert claims.read_claim(objects, JOB, "d1").node == A.id


def test_an_expired_lease_is_taken_over_once_and_fences_the_old_holder(objects) -> None:
    held = claims.claim(objects, JOB, "d1", A, now=100.0, ttl=TTL)
    seen = claims.read_claim(objects, JOB, "d1")
    taken = claims.take_over(objects, seen, B, now=131.0, ttl=TTL, max_tries=3)
    assert taken is not None and (taken.node, taken.token, taken.tries) == (B.id, 2, 2)
    # A third node with the same stale view loses the race.
    assert claims.take_over(objects, seen, NodeIdentity("c" * 32, "node-c"), now=131.0,
                            ttl=TTL, max_tries=3) is None
    # The old holder can neither renew, nor finish, nor pass the check before recording.
    with pytest.raises(LeaseLost, match="node-b"):
        claims.renew(objects, held, now=132.0)
    with pytest.raises(LeaseLost):
        claims.finish(objects, held)
    with pytest.raises(LeaseLost):
        claims.check(objects, held)
    claims.check(objects, taken)
    renewed = claims.renew(objects, taken, now=140.0)
    assert renewed.expires == 170.0
    done = claims.finish(objects, renewed)
    assert claims.read_claim(objects, JOB, "d1").state == DONE
    # A done claim is never taken over, expired or not.
    assert claims.take_over(objects, claims.read_claim(objects, JOB, "d1"), A, now=1e9,
                            ttl=TTL, max_tries=3) is None
    assert done.final


def test_tries_count_across_nodes_until_the_datum_fails(objects) -> None:
    held = claims.claim(objects, JOB, "d1", A, now=0.0, ttl=TTL)
    claims.release(objects, held, error="exit status 3", max_tries=3)
    seen = claims.read_claim(objects, JOB, "d1")
    assert seen.expired(1.0) and seen.error == "exit status 3"  # any node, at once
    second = claims.take_over(objects, seen, B, now=1.0, ttl=TTL, max_tries=3)
    assert second.tries == 2
    # Node b dies during try 2: its lease expires, node a takes try 3...
    third = claims.take_over(objects, claims.read_claim(objects, JOB, "d1"), A, now=40.0,
                             ttl=TTL, max_tries=3)
    assert third.tries == 3
    # ...which fails too: that was the last one.
    last = claims.release(objects, third, error="exit status 4", max_tries=3)
    assert last.state == FAILED and last.error == "exit status 4"
    assert claims.read_claim(objects, JOB, "d1").state == FAILED


def test_a_try_interrupted_by_a_stopping_node_does_not_count(objects) -> None:
    held = claims.claim(objects, JOB, "d1", A, now=0.0, ttl=TTL)
    claims.release(objects, held, count_try=False, max_tries=1)
    seen = claims.read_claim(objects, JOB, "d1")
    again = claims.take_over(objects, seen, B, now=1.0, ttl=TTL, max_tries=1)
    assert again is not None and again.state == RUNNING and again.tries == 1


def test_a_dead_node_whose_last_try_it_was_fails_the_datum(objects) -> None:
    claims.claim(objects, JOB, "d1", A, now=0.0, ttl=TTL)
    seen = claims.read_claim(objects, JOB, "d1")
    failed = claims.take_over(objects, seen, B, now=31.0, ttl=TTL, max_tries=1)
    assert failed.state == FAILED and "node-a stopped answering during try 1" in failed.error


def test_a_restarted_node_takes_back_its_own_claims_at_once(objects) -> None:
    claims.claim(objects, JOB, "d1", A, now=0.0, ttl=TTL)
    seen = claims.read_claim(objects, JOB, "d1")
    assert claims.take_over(objects, seen, B, now=5.0, ttl=TTL, max_tries=3) is None
    # Node a's earlier process died: the claim is its own, lease or not.
    mine = claims.take_over(objects, seen, A, now=5.0, ttl=TTL, max_tries=3)
    assert mine is not None and mine.token == 2


def test_a_lost_answer_to_a_conditional_write_is_recognised(objects) -> None:
    class LostAnswers:
        """Writes land, then the caller sees PreconditionFailed (a retried request)."""

        def __init__(self, inner) -> None:
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def put(self, key, data, **conditions):
            self.inner.put(key, data, **conditions)
            raise vfs.errors.PreconditionFailed("the retry saw its own write")

    lossy = LostAnswers(objects)
    held = claims.claim(lossy, JOB, "d1", A, now=0.0, ttl=TTL)
    assert held is not None and held.tag == objects.get_tagged(claims.claim_key(JOB, "d1"))[1]
    renewed = claims.renew(lossy, held, now=10.0)
    assert renewed.expires == 40.0
    seen = claims.read_current(lossy, "edges")
    assert claims.move_current(lossy, "edges", seen, JOB)


def test_the_current_job_moves_by_compare_and_swap(objects) -> None:
    seen = claims.read_current(objects, "edges")
    assert seen.job is None
    assert claims.move_current(objects, "edges", seen, "edges.1-a")
    assert not claims.move_current(objects, "edges", seen, "edges.1-b")  # lost the race
    now = claims.read_current(objects, "edges")
    assert now.job == "edges.1-a"
    assert claims.move_current(objects, "edges", now, "edges.2-c")
    assert claims.read_current(objects, "edges").job == "edges.2-c"


def test_scan_reads_only_claims_not_known_final(objects) -> None:
    claims.save_plan(objects, JOB, {"v": 1})
    done = claims.finish(objects, claims.claim(objects, JOB, "d1", A, now=0.0, ttl=TTL))
    claims.claim(objects, JOB, "d2", B, now=0.0, ttl=TTL)
    first = claims.scan(objects, JOB, {})
    assert set(first) == {"d1", "d2"} and first["d1"].state == DONE
    objects.delete(claims.claim_key(JOB, "d1"))  # a known final claim is not read again
    again = claims.scan(objects, JOB, first)
    assert "d1" not in again  # it is listed no more
    assert claims.scan(objects, JOB, {"d1": done})["d2"].node == B.id
    assert list(claims.spread(["a", "b", "c"], 4)) == ["b", "c", "a"]


def test_job_records_change_by_compare_and_swap(objects) -> None:
    job = JobRecord(JOB, "edges", 1, "images", "main", "0" * 64)
    assert records.create_job(objects, job)
    assert not records.create_job(objects, job)  # the other node's create loses

    def cancel(record: JobRecord) -> bool:
        if record.state != "running":
            return False
        record.state = "cancelled"
        return True

    def succeed(record: JobRecord) -> bool:
        if record.state != "running":
            return False
        record.state = "success"
        return True

    assert records.update_job(objects, JOB, cancel).state == "cancelled"
    # A node that finishes later does not overwrite the cancel.
    assert records.update_job(objects, JOB, succeed).state == "cancelled"
    with pytest.raises(JobNotFound):
        records.update_job(objects, "edges.nope", succeed)


# -- a job's plan and its one output commit --------------------------------------------------


def _pipeline(store: vfs.Store, tmp_path):
    from vfs.pipeline import registry
    from vfs.pipeline.spec import parse_spec

    store.create_repo("images")
    for i in range(3):
        (tmp_path / f"f{i}").write_bytes(f"file {i}".encode())
        vfs.put(store, "images", "main", f"f{i}.txt", [str(tmp_path / f"f{i}")])
    store.commit("images", "main", "input")
    doc = {"pipeline": "edges", "input": {"repo": "images", "glob": "/*"},
           "transform": {"cmd": ["upper"]}, "runtime": "process"}
    return registry.create(store, parse_spec(doc))


def test_another_node_runs_the_same_plan_and_only_one_commit_lands(store, tmp_path) -> None:
    version = _pipeline(store, tmp_path)
    plan = plan_job(store, version, image_digest="host")
    assert plan is not None and len(plan.tasks) == 3
    document = plan_document(plan)
    other = plan_from_document(store, version, document)
    assert [(t.root, t.hash) for t in other.tasks] == [(t.root, t.hash) for t in plan.tasks]
    assert [task_files(store, other, t) for t in other.tasks] == [t.files for t in plan.tasks]
    ran = {}
    for task in plan.tasks:
        record = records.DatumRecord(task.root, plan.job.id, {})
        assert records.save_datum_once(store.objects, "edges", task.hash, record)
        assert not records.save_datum_once(store.objects, "edges", task.hash, record)
        ran[task.root] = record
    fenced = []
    made = commit_outputs(store, plan, ran, fence=lambda: fenced.append(True))
    assert fenced == [True]
    assert committed_by(store, other).id == made.id
    # The other node's commit of the same job, planned on the same head, cannot land.
    with pytest.raises(HeadMoved):
        commit_outputs(store, other, ran)
    # Nor can a node that lost its commit lease commit anything.
    store.objects.delete("refs/edges/main")
    store.create_branch("edges", "main")
    with pytest.raises(LeaseLost):
        commit_outputs(store, other, ran, fence=_lost)
    assert store.head("edges", "main").commit is None


def _lost() -> None:
    raise LeaseLost("gone")


def test_commit_lease_uses_the_same_mechanics(objects) -> None:
    held = claims.claim(objects, JOB, COMMIT, A, now=0.0, ttl=3.0)
    assert claims.claim(objects, JOB, COMMIT, B, now=1.0, ttl=3.0) is None
    seen = claims.read_claim(objects, JOB, COMMIT)
    taken = claims.take_over(objects, seen, B, now=3.5, ttl=3.0, max_tries=None)
    assert taken is not None and taken.tries == 2
    with pytest.raises(LeaseLost):
        claims.check(objects, held)
