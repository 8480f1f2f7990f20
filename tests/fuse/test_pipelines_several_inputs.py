"""Pipelines over several inputs, run by a real vfsd in real bwrap sandboxes.

The planning rules (which datums a cross, union, join or group makes, and which a
commit touches) are tested in-process in tests/unit/test_pipeline_inputs.py; here
what a user sees: the datums' /pfs directories and commit variables inside the
sandbox, jobs and provenance naming every input, wait on any input, and README's
join example run as written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import Mount

ROOT = Path(__file__).resolve().parents[2]

# Each datum writes one file named after what it sees, holding the files' bytes and
# the commit variables of its inputs.
SHOW = r'''set -e
name=""
for d in /pfs/*/; do
  input=$(basename "$d"); [ "$input" = out ] && continue
  for f in $(cd "$d" && find . -type f | sort); do name="$name+$input:${f#./}"; done
done
name=$(echo "${name#+}" | tr / _)
{ for d in /pfs/*/; do [ "$(basename "$d")" = out ] && continue
    find "$d" -type f | sort | xargs -r cat; done
  env | grep '^VFS_INPUT' | sort; } > "/pfs/out/$name"
touch /pfs/images/x 2>/dev/null && echo "inputs are writable" >&2 && exit 9
exit 0
'''


def _need_bwrap() -> None:
    if shutil.which("bwrap") is None:
        pytest.skip("bwrap is not installed (scripts/setup.sh installs it)")


def create(mount: Mount, tmp_path: Path, name: str, input_doc: dict,
           script: str = SHOW, image: str | None = None) -> None:
    doc = {"pipeline": name, "input": input_doc, "runtime": "runc" if image else "bwrap",
           "transform": {"cmd": ["sh", "-c", script], **({"image": image} if image else {})},
           "parallelism": 2}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(doc))
    mount.vfsctl("pipeline", "create", "-f", str(path))


def put(mount: Mount, repo: str, files: dict[str, str | None]) -> str:
    branch = mount.path / f"{repo}@main"
    for name, text in files.items():
        target = branch / name
        if text is None:
            target.unlink()
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    return mount.commit(f"{repo}@main")


def wait(mount: Mount, ref: str) -> list[str]:
    return mount.vfsctl("wait", ref, "--timeout", "90").stdout.split()


def output(mount: Mount, repo: str) -> dict[str, str]:
    root = mount.path / f"{repo}@main"
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*"))
            if p.is_file()}


def last_job(mount: Mount, pipeline: str) -> dict:
    return json.loads(mount.vfsctl("job", "list", pipeline, "--json").stdout)[-1]


def test_cross_runs_the_product_then_only_the_datums_a_commit_touches(mount, tmp_path
                                                                      ) -> None:
    _need_bwrap()
    for repo in ("images", "models"):
        mount.vfsctl("repo", "create", repo)
    images = put(mount, "images", {"a.png": "A", "b.png": "B", "c.png": "C"})
    models = put(mount, "models", {"m1": "1", "m2": "2"})
    create(mount, tmp_path, "scored", {"cross": [{"repo": "images", "glob": "/*"},
                                                 {"repo": "models", "glob": "/*"}]})
    wait(mount, f"models@{models}")
    job = last_job(mount, "scored")
    assert (job["state"], job["datums_processed"], job["datums_skipped"]) == ("success", 6, 0)
    out = output(mount, "scored")
    assert len(out) == 6
    # Each sandbox saw only its datum's files of each input, read-only, and the commits.
    assert out["images:a.png+models:m2"] == (
        f"A2VFS_INPUT_IMAGES_COMMIT={images}\nVFS_INPUT_MODELS_COMMIT={models}\n")
    assert [(i["name"], i["commit"]) for i in job["inputs"]] == [("images", images),
                                                               ("models", models)]
    # A third model: 3 datums run, 6 skipped.
    models = put(mount, "models", {"m3": "3"})
    wait(mount, f"models@{models}")
    job = last_job(mount, "scored")
    assert (job["datums_processed"], job["datums_skipped"]) == (3, 6)
    assert len(output(mount, "scored")) == 9
    # One image changed: one datum per model.
    images = put(mount, "images", {"b.png": "b2"})
    wait(mount, f"images@{images}")
    job = last_job(mount, "scored")
    assert (job["datums_processed"], job["datums_skipped"]) == (3, 6)
    out = output(mount, "scored")
    assert out["images:b.png+models:m3"].startswith(
        f"b23VFS_INPUT_IMAGES_COMMIT={images}\nVFS_INPUT_MODELS_COMMIT={models}\n")
    # Deleting a model removes the outputs of the datums it was part of.
    models = put(mount, "models", {"m1": None})
    wait(mount, f"models@{models}")
    job = last_job(mount, "scored")
    assert (job["datums_processed"], job["datums_removed"]) == (0, 3)
    assert sorted(output(mount, "scored")) == sorted(
        f"images:{i}+models:{m}" for i in ("a.png", "b.png", "c.png") for m in ("m2", "m3"))
    # Provenance names both input commits; the graph shows both edges.
    prov = json.loads(mount.vfsctl("provenance", "scored@main", "--json").stdout)
    assert sorted((i["input"], i["commit"]) for i in prov["inputs"]) == [
        ("images", images), ("models", models)]
    graph = json.loads(mount.vfsctl("pipeline", "graph", "--format", "json").stdout)
    assert sorted((e["source"], e["combinator"]) for e in graph["edges"]
                  if e["kind"] == "input") == [("images", "cross"), ("models", "cross")]
    assert "models" in mount.vfsctl("pipeline", "graph", "--format", "dot").stdout


def test_runc_shows_every_input_of_a_datum(mount, tmp_path, busybox_rootfs: Path) -> None:
    if shutil.which("runc") is None:
        pytest.skip("runc is not installed (scripts/setup.sh installs it)")
    for repo in ("images", "models"):
        mount.vfsctl("repo", "create", repo)
    images = put(mount, "images", {"a.png": "A", "b.png": "B"})
    models = put(mount, "models", {"m1": "1"})
    create(mount, tmp_path, "scored", {"cross": [{"repo": "images"}, {"repo": "models"}]},
           image=str(busybox_rootfs))
    wait(mount, f"models@{models}")
    assert output(mount, "scored") == {
        f"images:{i}+models:m1": f"{i[0].upper()}1VFS_INPUT_IMAGES_COMMIT={images}\n"
                                 f"VFS_INPUT_MODELS_COMMIT={models}\n"
        for i in ("a.png", "b.png")}
    models = put(mount, "models", {"m2": "2"})
    wait(mount, f"models@{models}")
    job = last_job(mount, "scored")
    assert (job["datums_processed"], job["datums_skipped"]) == (2, 2)


def test_union_and_group(mount, tmp_path) -> None:
    _need_bwrap()
    for repo in ("web", "db"):
        mount.vfsctl("repo", "create", repo)
    put(mount, "web", {"2026-01/a.log": "w1", "2026-02/b.log": "w2"})
    db = put(mount, "db", {"2026-01/c.log": "d1"})
    create(mount, tmp_path, "both", {"union": [{"repo": "web", "glob": "/*/*"},
                                               {"repo": "db", "glob": "/*/*"}]})
    create(mount, tmp_path, "monthly", {"group": [
        {"repo": "web", "glob": "/(*)/*", "group_by": "$1"},
        {"repo": "db", "glob": "/(*)/*", "group_by": "$1"}]})
    wait(mount, f"db@{db}")
    union = output(mount, "both")
    assert sorted(union) == ["db:2026-01_c.log", "web:2026-01_a.log", "web:2026-02_b.log"]
    assert union["db:2026-01_c.log"].startswith("d1VFS_INPUT_DB_COMMIT=")
    group = output(mount, "monthly")
    assert sorted(group) == ["db:2026-01_c.log+web:2026-01_a.log", "web:2026-02_b.log"]
    assert group["db:2026-01_c.log+web:2026-01_a.log"].startswith("d1w1")
    db = put(mount, "db", {"2026-02/d.log": "d2"})
    wait(mount, f"db@{db}")
    assert last_job(mount, "both")["datums_processed"] == 1
    job = last_job(mount, "monthly")
    assert (job["datums_processed"], job["datums_removed"]) == (1, 1)
    assert sorted(output(mount, "monthly")) == ["db:2026-01_c.log+web:2026-01_a.log",
                                                "db:2026-02_d.log+web:2026-02_b.log"]


def test_a_job_reads_one_consistent_set_of_heads_while_both_inputs_move(mount, tmp_path
                                                                        ) -> None:
    """Commits land on both inputs while jobs run: every output commit holds exactly
    the files of the input commits its provenance names."""
    _need_bwrap()
    for repo in ("left", "right"):
        mount.vfsctl("repo", "create", repo)
    put(mount, "left", {"v": "0"})
    put(mount, "right", {"v": "0"})
    script = ('cat /pfs/left/v /pfs/right/v > /pfs/out/seen; '
              'echo "$VFS_INPUT_LEFT_COMMIT $VFS_INPUT_RIGHT_COMMIT" > /pfs/out/commits')
    create(mount, tmp_path, "pair", {"cross": [{"repo": "left", "glob": "/"},
                                               {"repo": "right", "glob": "/"}]}, script)
    errors = []

    def writer(repo: str) -> None:
        try:
            for n in range(1, 8):
                put(mount, repo, {"v": f"{repo}{n}"})
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(r,)) for r in ("left", "right")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    last = put(mount, "left", {"v": "final"})
    wait(mount, f"left@{last}")
    commits = json.loads(mount.vfsctl("log", "pair@main", "--json").stdout)
    checked = 0
    for commit in commits:
        inputs = {i["name"]: i["commit"] for i in commit.get("provenance", {}).get("inputs", [])}
        if not inputs:
            continue
        seen = mount.vfsctl("cat", f"pair@{commit['id']}:/seen").stdout
        wrote = mount.vfsctl("cat", f"pair@{commit['id']}:/commits").stdout.split()
        assert wrote == [inputs["left"], inputs["right"]]
        left = mount.vfsctl("cat", f"left@{inputs['left']}:/v").stdout
        right = mount.vfsctl("cat", f"right@{inputs['right']}:/v").stdout
        assert seen == left + right
        checked += 1
    assert checked >= 2
    assert mount.vfsctl("cat", "pair@main:/seen").stdout.startswith("final")


def test_spec_errors_reach_the_user_in_one_line(mount, tmp_path) -> None:
    mount.vfsctl("repo", "create", "left")
    doc = {"pipeline": "bad", "input": {"join": [
        {"repo": "left", "glob": "/(*).csv", "join_on": "$2"},
        {"repo": "left", "name": "again", "glob": "/(*)", "join_on": "$1"}]},
        "transform": {"cmd": ["true"]}, "runtime": "bwrap"}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    done = mount.vfsctl("pipeline", "create", "-f", str(path), check=False)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "'input.join[0].join_on': $2 names capture group 2" in lines[0]


def _readme_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Several inputs"):]
    return re.search(r"```sh\n(.*?)```", section, re.DOTALL).group(1)


def test_readme_join_example_runs_as_written(mount, tmp_path) -> None:
    _need_bwrap()
    example = (ROOT / "examples/join/customer_orders.yaml").read_text()
    assert example.strip() in (ROOT / "README.md").read_text()
    work = tmp_path / "work"
    (work / "examples/join").mkdir(parents=True)
    shutil.copy(ROOT / "examples/join/customer_orders.yaml", work / "examples/join")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    wrapper = bindir / "vfsctl"
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} -m cli.main \"$@\"\n")
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    script = _readme_block().replace("/pfs/", f"{mount.path}/")
    env = {**mount.env, "PATH": f"{bindir}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=work, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    # (text mode reads the csv module's \r\n line ends as \n)
    assert "customer,name,order,amount\n7,Ada,1001,25\n7,Ada,1002,12\n" in done.stdout
    out = output(mount, "customer_orders")
    assert out["9.csv"] == "customer,name,order,amount\n9,Bob,2001,40\n"
    job = last_job(mount, "customer_orders")
    assert (job["datums_processed"], job["datums_skipped"]) == (1, 1)
    assert "\n  orders@" in done.stdout and "\n  customers@" in done.stdout  # provenance
