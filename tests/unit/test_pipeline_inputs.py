"""Pipelines over several inputs: cross, union, join and group, planned in-process.

Datums "run" here (no containers): every datum writes one output file named after
the files it saw, so an output commit lists exactly the datums it holds. What the
containers see (/pfs/<name>, VFS_INPUT_<NAME>_COMMIT) is tested with real vfsd in
tests/fuse/test_pipelines_several_inputs.py.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_pipeline_jobs import run_job as run_plain_job

import vfs
from vfs.errors import InvalidSpec
from vfs.names import RefSpec
from vfs.pipeline import registry
from vfs.pipeline.combine import label
from vfs.pipeline.inputs import commit_env_var
from vfs.pipeline.spec import parse_spec
from vfs.snapshot import Snapshot, read_file

PIPELINE = "combined"


def make(store: vfs.Store, input_doc: dict) -> registry.PipelineVersion:
    doc = {"pipeline": PIPELINE, "input": input_doc, "transform": {"cmd": ["cat"]},
           "runtime": "process"}
    return registry.create(store, parse_spec(doc))


def commit(store: vfs.Store, repo: str, files: dict[str, bytes | None], tmp_path) -> str:
    if repo not in {r.name for r in store.list_repos()}:
        store.create_repo(repo)
    for path, data in files.items():
        if data is None:
            vfs.remove(store, repo, "main", path, recursive=True)
            continue
        local = tmp_path / "src" / f"{repo}_{path.replace('/', '_')}"
        local.parent.mkdir(exist_ok=True)
        local.write_bytes(data)
        vfs.put(store, repo, "main", path, [str(local)])
    return store.commit(repo, "main", "input").id


def seen_together(root: str, files: dict[str, bytes]) -> dict[str, bytes]:
    """The test transform: one file named after every input file the datum saw
    (``images:a+models:m1``) holding their bytes joined."""
    names = sorted(files)
    return {"+".join(names).replace("/", ":"): b"|".join(files[n] for n in names)}


def run_job(store: vfs.Store, tmp_path):
    """Plan and run one job in-process; return (plan, {output name: bytes})."""
    plan, made = run_plain_job(store, tmp_path, seen_together, pipeline=PIPELINE)
    if plan is None:
        return None, None
    snapshot = Snapshot(store.blobs, made.tree)
    return plan, {path: read_file(store.blobs, entry)
                  for path, entry in snapshot.walk("") if entry.kind != "d"}


def test_cross_runs_the_product_then_only_what_a_commit_changes(store, tmp_path) -> None:
    commit(store, "images", {"a.png": b"A", "b.png": b"B", "c.png": b"C"}, tmp_path)
    commit(store, "models", {"m1": b"1", "m2": b"2"}, tmp_path)
    make(store, {"cross": [{"repo": "images", "glob": "/*"},
                           {"repo": "models", "glob": "/*"}]})
    plan, out = run_job(store, tmp_path)
    assert len(plan.tasks) == 6 and plan.job.datums_total == 6
    assert out["images:a.png+models:m1"] == b"A|1"
    assert len(out) == 6
    # Every datum's files are under its inputs' names (the layout of /pfs).
    assert sorted(p for t in plan.tasks for p, _ in t.files)[:2] == ["images/a.png",
                                                                   "images/a.png"]
    # A third model: one datum per image runs, the six others are skipped.
    commit(store, "models", {"m3": b"3"}, tmp_path)
    plan, out = run_job(store, tmp_path)
    assert len(plan.tasks) == 3 and plan.job.datums_skipped == 6
    assert plan.job.datums_total == 9 and len(out) == 9
    assert sorted(t.label for t in plan.tasks) == [
        "/images/a.png, /models/m3", "/images/b.png, /models/m3", "/images/c.png, /models/m3"]
    # One image changed: one datum per model.
    commit(store, "images", {"b.png": b"b2"}, tmp_path)
    plan, out = run_job(store, tmp_path)
    assert len(plan.tasks) == 3 and plan.job.datums_skipped == 6
    assert out["images:b.png+models:m2"] == b"b2|2"
    assert len(out) == 9
    # Nothing moved: nothing to do.
    assert run_job(store, tmp_path) == (None, None)


def test_deleting_a_file_of_one_input_removes_the_outputs_it_was_part_of(store, tmp_path
                                                                         ) -> None:
    commit(store, "images", {"a.png": b"A", "b.png": b"B", "c.png": b"C"}, tmp_path)
    commit(store, "models", {"m1": b"1", "m2": b"2"}, tmp_path)
    make(store, {"cross": [{"repo": "images"}, {"repo": "models"}]})
    run_job(store, tmp_path)
    commit(store, "models", {"m1": None}, tmp_path)
    plan, out = run_job(store, tmp_path)
    assert plan.tasks == [] and plan.job.datums_removed == 3
    assert sorted(out) == ["images:a.png+models:m2", "images:b.png+models:m2",
                           "images:c.png+models:m2"]
    assert plan.job.datums_total == 3


def test_inner_join_pairs_equal_keys_and_reruns_only_a_changed_key(store, tmp_path) -> None:
    commit(store, "left", {"k1.csv": b"L1", "k2.csv": b"L2", "k3.csv": b"L3"}, tmp_path)
    commit(store, "right", {"k1.json": b"R1", "k2.json": b"R2", "k4.json": b"R4"}, tmp_path)
    make(store, {"join": [{"repo": "left", "glob": "/(*).csv", "join_on": "$1"},
                          {"repo": "right", "glob": "/(*).json", "join_on": "$1"}]})
    plan, out = run_job(store, tmp_path)
    assert out == {"left:k1.csv+right:k1.json": b"L1|R1",
                   "left:k2.csv+right:k2.json": b"L2|R2"}
    commit(store, "left", {"k2.csv": b"L2b"}, tmp_path)
    plan, out = run_job(store, tmp_path)
    assert [t.label for t in plan.tasks] == ["/left/k2.csv, /right/k2.json"]
    assert out["left:k2.csv+right:k2.json"] == b"L2b|R2"
    # k3 finds its match: one new datum; k4 of the right side still matches nothing.
    commit(store, "right", {"k3.json": b"R3"}, tmp_path)
    plan, out = run_job(store, tmp_path)
    assert [t.label for t in plan.tasks] == ["/left/k3.csv, /right/k3.json"]
    assert len(out) == 3


def test_outer_join_keeps_the_unmatched_datums_of_its_side(store, tmp_path) -> None:
    commit(store, "left", {"k1.csv": b"L1", "k3.csv": b"L3"}, tmp_path)
    commit(store, "right", {"k1.json": b"R1", "k4.json": b"R4"}, tmp_path)
    make(store, {"join": [{"repo": "left", "glob": "/(*).csv", "join_on": "$1",
                           "outer": True},
                          {"repo": "right", "glob": "/(*).json", "join_on": "$1"}]})
    plan, out = run_job(store, tmp_path)
    assert out == {"left:k1.csv+right:k1.json": b"L1|R1", "left:k3.csv": b"L3"}
    # k3 gets a match: the left-only datum's output goes, the pair's comes.
    commit(store, "right", {"k3.json": b"R3"}, tmp_path)
    plan, out = run_job(store, tmp_path)
    assert [t.label for t in plan.tasks] == ["/left/k3.csv, /right/k3.json"]
    assert plan.job.datums_removed == 1
    assert out == {"left:k1.csv+right:k1.json": b"L1|R1",
                   "left:k3.csv+right:k3.json": b"L3|R3"}


def test_union_runs_each_inputs_datums_on_their_own(store, tmp_path) -> None:
    commit(store, "a", {"x": b"ax", "y": b"ay"}, tmp_path)
    commit(store, "b", {"x": b"bx"}, tmp_path)
    make(store, {"union": [{"repo": "a"}, {"repo": "b"}]})
    plan, out = run_job(store, tmp_path)
    assert out == {"a:x": b"ax", "a:y": b"ay", "b:x": b"bx"}
    commit(store, "b", {"z": b"bz"}, tmp_path)
    plan, out = run_job(store, tmp_path)
    assert [t.label for t in plan.tasks] == ["/b/z"] and len(out) == 4


def test_group_makes_one_datum_per_key(store, tmp_path) -> None:
    commit(store, "logs", {"web/2026-01/a.log": b"w1", "db/2026-01/b.log": b"d1",
                           "web/2026-02/c.log": b"w2"}, tmp_path)
    make(store, {"group": [{"repo": "logs", "glob": "/*/(*)/*", "group_by": "$1"}]})
    plan, out = run_job(store, tmp_path)
    assert out == {"logs:db:2026-01:b.log+logs:web:2026-01:a.log": b"d1|w1",
                   "logs:web:2026-02:c.log": b"w2"}
    commit(store, "logs", {"db/2026-02/d.log": b"d2"}, tmp_path)
    plan, out = run_job(store, tmp_path)
    # The key's datum is a new one (another set of files): the old one's output goes.
    assert len(plan.tasks) == 1 and plan.job.datums_removed == 1
    assert plan.job.datums_total == 2
    assert out["logs:db:2026-02:d.log+logs:web:2026-02:c.log"] == b"d2|w2"
    assert len(out) == 2


def test_nested_cross_of_a_join_and_a_repository(store, tmp_path) -> None:
    commit(store, "left", {"k1.csv": b"L1", "k2.csv": b"L2"}, tmp_path)
    commit(store, "right", {"k1.json": b"R1", "k2.json": b"R2"}, tmp_path)
    commit(store, "models", {"m1": b"1"}, tmp_path)
    make(store, {"cross": [
        {"join": [{"repo": "left", "glob": "/(*).csv", "join_on": "$1"},
                  {"repo": "right", "glob": "/(*).json", "join_on": "$1"}]},
        {"repo": "models"}]})
    plan, out = run_job(store, tmp_path)
    assert len(out) == 2 and out["left:k1.csv+models:m1+right:k1.json"] == b"L1|1|R1"
    commit(store, "models", {"m2": b"2"}, tmp_path)
    plan, out = run_job(store, tmp_path)
    assert len(plan.tasks) == 2 and len(out) == 4


def test_one_repository_twice_under_two_names(store, tmp_path) -> None:
    commit(store, "images", {"a": b"A", "b": b"B"}, tmp_path)
    make(store, {"cross": [{"repo": "images", "name": "left"},
                           {"repo": "images", "name": "right"}]})
    plan, out = run_job(store, tmp_path)
    assert len(out) == 4 and out["left:a+right:b"] == b"A|B"
    head = store.resolve(RefSpec(PIPELINE, "main"))
    inputs = head.provenance["inputs"]
    assert [(i["name"], i["repo"]) for i in inputs] == [("left", "images"), ("right", "images")]


def test_provenance_and_the_job_name_every_input_commit(store, tmp_path) -> None:
    first = commit(store, "images", {"a": b"A"}, tmp_path)
    model = commit(store, "models", {"m": b"M"}, tmp_path)
    make(store, {"cross": [{"repo": "images"}, {"repo": "models"}]})
    plan, _ = run_job(store, tmp_path)
    assert plan.job.commits() == {"images": first, "models": model}
    second = commit(store, "images", {"b": b"B"}, tmp_path)
    plan, _ = run_job(store, tmp_path)
    head = store.resolve(RefSpec(PIPELINE, "main"))
    assert [(i["name"], i["commit"]) for i in head.provenance["inputs"]] == [
        ("images", second), ("models", model)]
    assert plan.job.commits() == {"images": second, "models": model}


def test_a_single_input_keeps_its_plain_datums(store, tmp_path) -> None:
    """The old form's datums keep their roots and hashes (their records stay valid)."""
    commit(store, "images", {"a": b"A"}, tmp_path)
    make(store, {"repo": "images", "glob": "/*"})
    plan, out = run_job(store, tmp_path)
    assert [t.root for t in plan.tasks] == ["a"] and [t.label for t in plan.tasks] == ["/a"]
    assert [p for p, _ in plan.tasks[0].files] == ["a"]
    assert "name" not in store.resolve(RefSpec(PIPELINE, "main")).provenance["inputs"][0]


def test_a_cycle_through_any_input_is_refused(store, tmp_path) -> None:
    commit(store, "images", {"a": b"A"}, tmp_path)
    commit(store, "models", {"m": b"M"}, tmp_path)
    make(store, {"repo": "images"})  # images -> combined
    doc = {"pipeline": "second", "input": {"cross": [{"repo": "models"},
                                                     {"repo": PIPELINE}]},
           "transform": {"cmd": ["cat"]}, "runtime": "process"}
    registry.create(store, parse_spec(doc))  # combined -> second
    looped = {"pipeline": PIPELINE, "input": {"union": [{"repo": "images"},
                                                         {"repo": "second"}]},
              "transform": {"cmd": ["cat"]}, "runtime": "process"}
    with pytest.raises(InvalidSpec, match="cycle: second -> combined -> second"):
        registry.update(store, parse_spec(looped))
    assert [p.name for p in registry.downstream(store.objects, "models")] == ["second"]


@pytest.mark.parametrize("input_doc, message", [
    ({"crossed": [{"repo": "a"}, {"repo": "b"}]},
     "'input': unknown key 'crossed': an input is a repository"),
    ({"join": [{"repo": "a", "glob": "/(*).csv", "join_on": "$2"},
               {"repo": "b", "glob": "/(*)", "join_on": "$1"}]},
     "'input.join[0].join_on': $2 names capture group 2, but glob '/(*).csv' has 1"),
    ({"join": [{"repo": "a", "glob": "/*.csv", "join_on": "$1"},
               {"repo": "b", "glob": "/(*)", "join_on": "$1"}]},
     "'input.join[0].join_on' needs a capture group in the glob"),
    ({"cross": [{"repo": "a"}, {"repo": "a"}]}, "two inputs are named 'a'"),
    ({"join": [{"repo": "a", "glob": "/(*)"}, {"repo": "b", "glob": "/(*)", "join_on": "$1"}]},
     "'input.join[0].join_on' is required in a join"),
    ({"cross": [{"repo": "a", "glob": "/(*)", "join_on": "$1"}, {"repo": "b"}]},
     "'input.cross[0].join_on' only means something in a join"),
    ({"cross": [{"repo": "a"}]}, "'input.cross' must be a list of at least 2 inputs"),
    ({"join": [{"cross": [{"repo": "a"}, {"repo": "b"}]}, {"repo": "c"}]},
     "a join combines repository inputs"),
    ({"cross": [{"repo": "a", "name": "out"}, {"repo": "b"}]}, "cannot be /pfs/out"),
    ({"cross": [{"repo": "a-b"}, {"repo": "a_b"}]}, "would both set VFS_INPUT_A_B_COMMIT"),
    ({"union": [{"repo": "a", "glob": "/(*"}, {"repo": "b"}]}, "unbalanced '('"),
    ({"group": [{"repo": "a", "glob": "/*", "group_by": "$1"}]}, "needs a capture group"),
])
def test_spec_errors_are_one_clear_line(input_doc, message) -> None:
    doc = {"pipeline": "p", "input": input_doc, "transform": {"cmd": ["cat"]}}
    with pytest.raises(InvalidSpec) as caught:
        parse_spec(doc)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_specs_round_trip_and_the_old_form_is_stored_unchanged() -> None:
    doc = {"pipeline": "p", "transform": {"cmd": ["cat"]},
           "input": {"cross": [{"repo": "images", "branch": "dev", "glob": "/*/*"},
                               {"join": [{"repo": "a", "glob": "/(*).csv", "join_on": "$1",
                                          "outer": True},
                                         {"repo": "b", "name": "bee", "glob": "/(*)",
                                          "join_on": "$1"}]}]}}
    spec = parse_spec(doc)
    assert parse_spec(spec.to_dict()) == spec
    assert [leaf.name for leaf in spec.leaves] == ["images", "a", "bee"]
    plain = parse_spec({"pipeline": "p", "transform": {"cmd": ["cat"]},
                        "input": {"repo": "images"}})
    assert plain.to_dict()["input"] == {"repo": "images", "branch": "main", "glob": "/*"}
    assert plain.plain and not spec.plain and plain.glob == "/*"


def test_commit_variables_and_labels() -> None:
    assert commit_env_var("raw-logs.v2") == "VFS_INPUT_RAW_LOGS_V2_COMMIT"
    assert label('[["images","a.png"],["models","m1"]]') == "/images/a.png, /models/m1"
    assert label("a/b") == "/a/b"


# -- property: incremental jobs make what a full run over the heads would -------------------

LEFT_PATHS = ("a.x", "b.x", "c.x", "a.y")
RIGHT_PATHS = ("a.z", "b.z", "d.z")
EXPRESSIONS = {
    "cross": {"cross": [{"repo": "left"}, {"repo": "right"}]},
    "union": {"union": [{"repo": "left"}, {"repo": "right"}]},
    "join": {"join": [{"repo": "left", "glob": "/(?).*", "join_on": "$1"},
                      {"repo": "right", "glob": "/(?).*", "join_on": "$1"}]},
    "outer": {"join": [{"repo": "left", "glob": "/(?).*", "join_on": "$1", "outer": True},
                       {"repo": "right", "glob": "/(?).*", "join_on": "$1", "outer": True}]},
    # Keys that are the glob's one (*): each partner is looked up, not listed.
    "direct": {"join": [{"repo": "left", "glob": "/(*).x", "join_on": "$1", "outer": True},
                        {"repo": "right", "glob": "/(*).z", "join_on": "$1"}]},
    "group": {"group": [{"repo": "left", "glob": "/(?).*", "group_by": "$1"},
                        {"repo": "right", "glob": "/(?).*", "group_by": "$1"}]},
}


def expected_outputs(kind: str, left: dict, right: dict) -> dict[str, bytes]:
    """What a datum per combination makes, from the files alone (the model)."""
    def datum(*parts: tuple[str, str]) -> tuple[str, bytes]:
        items = sorted((f"{repo}/{path}", (left if repo == "left" else right)[path])
                       for repo, path in parts)
        return ("+".join(name for name, _ in items).replace("/", ":"),
                b"|".join(data for _, data in items))

    lefts = [("left", p) for p in sorted(left) if kind != "direct" or p.endswith(".x")]
    rights = [("right", p) for p in sorted(right)]
    out: list[tuple[str, bytes]] = []
    if kind == "cross":
        out = [datum(a, b) for a in lefts for b in rights]
    elif kind == "union":
        out = [datum(part) for part in lefts + rights]
    else:
        keys = sorted({p[1][0] for p in lefts + rights})
        for key in keys:
            ls = [p for p in lefts if p[1][0] == key]
            rs = [p for p in rights if p[1][0] == key]
            if kind == "group":
                out.append(datum(*ls, *rs))
            elif ls and rs:
                out += [datum(a, b) for a in ls for b in rs]
            elif kind == "outer":
                out += [datum(part) for part in ls + rs]
            elif kind == "direct":
                out += [datum(part) for part in ls]
    return dict(out)


_steps = st.lists(st.one_of(
    st.tuples(st.just("left"), st.sampled_from(LEFT_PATHS),
              st.sampled_from((b"1", b"22", None))),
    st.tuples(st.just("right"), st.sampled_from(RIGHT_PATHS),
              st.sampled_from((b"3", b"44", None))),
), min_size=1, max_size=10)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(sorted(EXPRESSIONS)), steps=_steps, together=st.booleans())
def test_incremental_jobs_over_two_inputs_match_a_fresh_run(
        tmp_path_factory: pytest.TempPathFactory, kind, steps, together) -> None:
    """Random commits to two inputs (one job per commit, or one for both inputs' commits
    at once): every output commit holds what the model makes from the heads."""
    root = tmp_path_factory.mktemp("inputs")
    store = vfs.open_store(str(root / "store"), cache_dir=str(root / "cache"), create=True,
                           durable_index=False)
    try:
        files = {"left": {"a.x": b"1"}, "right": {"a.z": b"3"}}
        for repo in files:
            commit(store, repo, files[repo], root)
        make(store, EXPRESSIONS[kind])
        run_job(store, root)
        pending = False
        for repo, path, data in steps:
            if files[repo].get(path) == data:
                continue
            if data is None:
                files[repo].pop(path)
            else:
                files[repo][path] = data
            commit(store, repo, {path: data}, root)
            pending = True
            if together and repo == "left":
                continue  # the next right commit lands before the job
            run_job(store, root)
            pending = False
            head = store.resolve(RefSpec(PIPELINE, "main"))
            got = {p: read_file(store.blobs, e)
                   for p, e in Snapshot(store.blobs, head.tree).walk("") if e.kind == "f"}
            assert got == expected_outputs(kind, files["left"], files["right"])
        if pending:
            run_job(store, root)
        head = store.resolve(RefSpec(PIPELINE, "main"))
        got = {p: read_file(store.blobs, e)
               for p, e in Snapshot(store.blobs, head.tree).walk("") if e.kind == "f"}
        assert got == expected_outputs(kind, files["left"], files["right"])
    finally:
        store.close()


@pytest.mark.parametrize("pattern, groups, root", [
    ("/(*).csv", ("k7",), "k7.csv"),
    ("/data/(*)/(*).json", ("a", "b"), "data/a/b.json"),
    ("/*/(*)", ("x",), None),  # a wildcard outside the group: only a listing can say
    ("/(a*)", ("ab",), None),  # a group that is not a whole (*)
    ("/(*)", ("a/b",), None),  # no single name
    ("/(*)/**", ("a",), None),
])
def test_a_glob_names_the_root_of_given_capture_groups(pattern, groups, root) -> None:
    from vfs.pipeline.datums import Glob

    assert Glob(pattern).root_of(groups) == root
