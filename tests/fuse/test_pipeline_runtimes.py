"""Pipelines end to end in real sandboxes: bwrap (host programs) and runc (busybox image).

The command sees the datum at ``/pfs/images/...`` read-only and writes ``/pfs/out``;
the output commit, its provenance and the incremental rerun are checked through
the real vfsctl against a real vfsd.
"""

from __future__ import annotations

import json
import shutil
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from pathlib import Path

    from conftest import Mount

# Upper-case every file of the datum; record whether the input was writable.
SCRIPT = ('for f in /pfs/images/*; do n=$(basename "$f"); '
          'tr a-z A-Z < "$f" > "/pfs/out/$n.up"; '
          'if touch "$f" 2>/dev/null; then echo writable > "/pfs/out/$n.rw"; fi; '
          'echo "$VFS_DATUM_ID $VFS_INPUT_COMMIT $VFS_INPUT_IMAGES_COMMIT" > "/pfs/out/$n.env"; '
          'done')


def _need(program: str) -> None:
    if shutil.which(program) is None:
        pytest.skip(f"{program} is not installed (scripts/setup.sh installs it)")


def _run_pipeline(mount: Mount, tmp_path, runtime: str, image: str | None,
                  batch: int = 1) -> None:
    mount.vfsctl("repo", "create", "images")
    doc = {"pipeline": "upper", "input": {"repo": "images", "glob": "/*"},
           "transform": {"cmd": ["sh", "-c", SCRIPT], **({"image": image} if image else {})},
           "runtime": runtime, "parallelism": 2, "datum_batch": batch}
    spec = tmp_path / "upper.yaml"
    spec.write_text(json.dumps(doc))
    mount.vfsctl("pipeline", "create", "-f", str(spec))
    branch = mount.path / "images@main"
    for i in range(4):
        (branch / f"f{i}.txt").write_text(f"data {i}")
    first = mount.commit("images@main")
    out = mount.vfsctl("wait", f"images@{first}", "--timeout", "60").stdout.split()
    assert len(out) == 1
    output = mount.path / "upper@main"
    names = sorted(p.name for p in output.iterdir())
    assert names == sorted([f"f{i}.txt.up" for i in range(4)]
                           + [f"f{i}.txt.env" for i in range(4)])  # no .rw: read-only
    assert (output / "f2.txt.up").read_text() == "DATA 2"
    datum_id, commit, images_commit = (output / "f2.txt.env").read_text().split()
    assert commit == images_commit == first and len(datum_id) == 16
    (branch / "new.txt").write_text("one more")
    second = mount.commit("images@main")
    mount.vfsctl("wait", f"images@{second}", "--timeout", "60")
    job = json.loads(mount.vfsctl("job", "list", "upper", "--json").stdout)[-1]
    assert (job["datums_processed"], job["datums_skipped"]) == (1, 4)
    assert (mount.path / "upper@main" / "new.txt.up").read_text() == "ONE MORE"
    prov = json.loads(mount.vfsctl("provenance", "upper@main", "--json").stdout)
    assert prov["inputs"][0]["commit"] == second
    assert prov["image"] == ("host" if image is None else prov["image"]) and prov["image"]


def test_bwrap_pipeline(mount: Mount, tmp_path) -> None:
    _need("bwrap")
    _run_pipeline(mount, tmp_path, "bwrap", None)


def test_runc_pipeline_on_a_busybox_root_filesystem(mount: Mount, tmp_path,
                                                    busybox_rootfs: Path) -> None:
    _need("runc")
    _run_pipeline(mount, tmp_path, "runc", str(busybox_rootfs))


def test_runc_pipeline_with_batches(mount: Mount, tmp_path, busybox_rootfs: Path) -> None:
    _need("runc")
    _run_pipeline(mount, tmp_path, "runc", str(busybox_rootfs), batch=3)
