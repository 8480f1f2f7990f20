"""Pipeline updates and output branches, through a real vfsd and the real vfsctl.

An update with ``--keep-outputs`` keeps outputs exactly (a changed or deleted old
datum loses its old outputs), a glob change reprocesses, ``wait`` after an update
waits for the new version, and the output branch refuses changes made by hand.
"""

from __future__ import annotations

import errno
import json
import shutil
from typing import TYPE_CHECKING

import pytest
from conftest import _require_fuse, check_after, mounted
from test_pipelines import images, job_json, put_files, read_output  # noqa: F401 - fixture

if TYPE_CHECKING:
    from collections.abc import Iterator

    from conftest import Mount


def versioned(tag: str) -> str:
    """A script writing each input file upper-cased as ``<name>.<tag>``."""
    return ('for f in /pfs/images/*; do n=$(basename "$f"); '
            f'tr a-z A-Z < "$f" > "/pfs/out/$n.{tag}"; done')


def write_spec(tmp_path, tag: str, glob: str = "/*", runtime: str = "bwrap") -> str:
    script = versioned(tag)
    if runtime == "process":
        script = script.replace("/pfs/", '"$VFS_PFS"/')
    doc = {"pipeline": "upper", "input": {"repo": "images", "glob": glob},
           "transform": {"cmd": ["sh", "-c", script]}, "runtime": runtime}
    path = tmp_path / f"upper-{tag}-{len(glob)}.json"
    path.write_text(json.dumps(doc))
    return str(path)


def wait_version(mount: Mount, commit: str) -> int:
    """``vfsctl wait`` on an input commit; the pipeline version its output names."""
    out = mount.vfsctl("wait", f"images@{commit}", "--timeout", "60").stdout.split()
    assert len(out) == 1 and out[0].startswith("upper@")
    prov = json.loads(mount.vfsctl("provenance", out[0], "--json").stdout)
    assert prov["inputs"][0]["commit"] == commit
    return prov["version"]


def test_keep_outputs_and_glob_changes_keep_the_outputs_exact(mount: Mount, tmp_path) -> None:
    if shutil.which("bwrap") is None:
        pytest.skip("bwrap is not installed (scripts/setup.sh installs it)")
    mount.vfsctl("repo", "create", "images")
    mount.vfsctl("pipeline", "create", "-f", write_spec(tmp_path, "v1"))
    first = put_files(mount, {"a.txt": "a", "b.txt": "b", "c.bin": "c"})
    assert wait_version(mount, first) == 1
    assert read_output(mount) == {"a.txt.v1": "A", "b.txt.v1": "B", "c.bin.v1": "C"}

    # A new transform keeping the outputs: wait waits for the new version's commit.
    mount.vfsctl("pipeline", "update", "--keep-outputs", "-f", write_spec(tmp_path, "v2"))
    assert wait_version(mount, first) == 2
    assert read_output(mount) == {"a.txt.v1": "A", "b.txt.v1": "B", "c.bin.v1": "C"}

    # An old datum changed and another deleted: their v1 outputs go.
    (mount.path / "images@main" / "b.txt").unlink()
    second = put_files(mount, {"a.txt": "a2"})
    assert wait_version(mount, second) == 2
    assert read_output(mount) == {"a.txt.v2": "A2", "c.bin.v1": "C"}
    job = job_json(mount, "upper")[-1]
    assert job["state"] == "success"
    assert (job["datums_processed"], job["datums_reused"], job["datums_removed"]) == (1, 0, 1)
    assert "1 datums to run, 0 reused, 1 removed" in mount.log.read_text()

    # A glob change (with --keep-outputs all the same) reprocesses under the new glob.
    mount.vfsctl("pipeline", "update", "--keep-outputs", "-f",
                 write_spec(tmp_path, "v2", glob="/*.txt"))
    assert wait_version(mount, second) == 3
    assert read_output(mount) == {"a.txt.v2": "A2"}
    job = job_json(mount, "upper")[-1]
    assert job["full"] and job["version"] == 3
    prov = json.loads(mount.vfsctl("provenance", "upper@main", "--json").stdout)
    assert prov["version"] == 3


@pytest.fixture
def process_mount(request: pytest.FixtureRequest, tmp_path) -> Iterator[Mount]:
    _require_fuse()
    with mounted(tmp_path, "--allow-process-runtime") as m:
        yield m
    check_after(m, log=not request.node.get_closest_marker("expect_warnings"))


def test_the_output_branch_refuses_changes_made_by_hand(process_mount: Mount,
                                                       tmp_path) -> None:
    mount = process_mount
    mount.vfsctl("repo", "create", "images")
    mount.vfsctl("pipeline", "create", "-f", write_spec(tmp_path, "v1", runtime="process"))
    first = put_files(mount, {"a.txt": "a"})
    assert wait_version(mount, first) == 1
    output = mount.path / "upper@main"
    for change in (lambda: (output / "mine.txt").write_text("mine"),
                   lambda: (output / "a.txt.v1").write_text("changed"),
                   lambda: (output / "a.txt.v1").unlink(),
                   lambda: (output / "dir").mkdir()):
        with pytest.raises(OSError) as caught:
            change()
        assert caught.value.errno == errno.EROFS
    assert read_output(mount) == {"a.txt.v1": "A"}
    local = tmp_path / "mine.txt"
    local.write_text("mine")
    head = json.loads(mount.vfsctl("log", "upper@main", "--json").stdout)[0]["id"]
    for args in (("put", "upper@main:/mine.txt", str(local)),
                 ("rm", "upper@main:/a.txt.v1"),
                 ("commit", "upper@main", "-m", "by hand"),
                 ("rollback", "upper@main", "--to", head)):
        done = mount.vfsctl(*args, check=False)
        assert done.returncode == 1, args
        assert "upper@main is the output of pipeline upper" in done.stderr, args
    # The pipeline's own commits go on, and other branches are free.
    second = put_files(mount, {"b.txt": "b"})
    assert wait_version(mount, second) == 1
    assert read_output(mount) == {"a.txt.v1": "A", "b.txt.v1": "B"}
    mount.vfsctl("branch", "create", "upper@mine", "--from", "upper@main")
    (mount.path / "upper@mine" / "mine.txt").write_text("mine")
    mount.commit("upper@mine")
