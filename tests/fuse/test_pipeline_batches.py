"""``datum_batch`` end to end in real sandboxes (bwrap, runc): a datum of a batch must
see exactly what it sees alone, and nothing of the other datums of its batch.

Through a real vfsd and vfsctl; the command lines are busybox/coreutils shell.
"""

from __future__ import annotations

import json
import shutil
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from pathlib import Path

    from conftest import Mount


@pytest.fixture(params=["bwrap", "runc"])
def sandbox(request: pytest.FixtureRequest) -> tuple[str, str | None]:
    """(runtime, image) of each sandboxing runtime installed here."""
    if shutil.which(request.param) is None:
        pytest.skip(f"{request.param} is not installed (scripts/setup.sh installs it)")
    if request.param == "bwrap":
        return "bwrap", None
    return "runc", str(request.getfixturevalue("busybox_rootfs"))


def _create(mount: Mount, tmp_path: Path, sandbox: tuple[str, str | None], script: str,
            **extra) -> None:
    runtime, image = sandbox
    doc = {"pipeline": "batched", "input": {"repo": "images", "glob": "/*"},
           "transform": {"cmd": ["sh", "-c", script], **({"image": image} if image else {})},
           "runtime": runtime, "parallelism": 1, **extra}
    path = tmp_path / "batched.json"
    path.write_text(json.dumps(doc))
    mount.vfsctl("pipeline", "create", "-f", str(path))


def _put(mount: Mount, files: dict[str, str]) -> str:
    branch = mount.path / "images@main"
    for name, text in files.items():
        (branch / name).write_text(text)
    return mount.commit("images@main")


def _outputs(mount: Mount) -> dict[str, str]:
    root = mount.path / "batched@main"
    return {p.name: p.read_text() for p in sorted(root.iterdir())}


def _last_job(mount: Mount) -> dict:
    return json.loads(mount.vfsctl("job", "list", "batched", "--json").stdout)[-1]


# What the command sees of /pfs, written next to a copy of each file it finds.
LOOK = ('for f in $(find /pfs/images -type f); do n=$(basename "$f"); '
        'cp "$f" "/pfs/out/$n.copy"; ls -A /pfs | tr "\\n" " " > "/pfs/out/$n.pfs"; '
        'if [ -L /pfs/out ] || [ -L /pfs/images ]; then echo link > "/pfs/out/$n.link"; fi; '
        'done')


def test_a_batched_datum_sees_real_directories(mount: Mount, tmp_path: Path,
                                              sandbox: tuple[str, str | None]) -> None:
    mount.vfsctl("repo", "create", "images")
    _create(mount, tmp_path, sandbox, LOOK, datum_batch=3)
    commit = _put(mount, {f"f{i}.txt": f"data {i}" for i in range(4)})
    mount.vfsctl("wait", f"images@{commit}", "--timeout", "60")
    expected = {}
    for i in range(4):
        expected[f"f{i}.txt.copy"] = f"data {i}"
        expected[f"f{i}.txt.pfs"] = "images out "
    assert _outputs(mount) == expected


# Datum a.txt leaves a process behind that writes into every output directory it can
# reach but its own (marked with .self-a); b.txt fails while its content is "bad";
# c.txt writes into the other datums' outputs and statuses it can find, and gives a's
# process time to act.
ATTACK = ('for d in /pfs/.out/* /pfs/* /proc/[0-9]*/root/pfs/out /proc/[0-9]*/cwd; do '
          '  [ -e "$d/.self-$1" ] || echo evil > "$d/evil-$1"; done 2>/dev/null; '
          'for s in /pfs/.status/*; do echo 0 > "$s"; done 2>/dev/null; true')
HOSTILE = (
    'attack() { ' + ATTACK + '; }; '
    'n=$(basename /pfs/images/*); touch "/pfs/out/.self-${n%.txt}"; '
    'case $n in '
    '  a.txt) (for i in 1 2 3 4 5 6 7 8 9 10; do attack a; sleep 0.2; done) & ;; '
    '  b.txt) [ "$(cat /pfs/images/b.txt)" != bad ] || exit 7 ;; '
    '  c.txt) attack c; sleep 1; attack c ;; '
    'esac; '
    'echo ok > "/pfs/out/$n.ok"')


@pytest.mark.expect_warnings  # the failed job is logged as an error
def test_a_batched_datum_cannot_touch_the_others(mount: Mount, tmp_path: Path,
                                                 sandbox: tuple[str, str | None]) -> None:
    mount.vfsctl("repo", "create", "images")
    _create(mount, tmp_path, sandbox, HOSTILE, datum_batch=3, datum_tries=1)
    commit = _put(mount, {"a.txt": "a", "b.txt": "bad", "c.txt": "c"})
    done = mount.vfsctl("wait", f"images@{commit}", "--timeout", "60", check=False)
    job = _last_job(mount)
    # c.txt could not overwrite b.txt's status: the job failed, and says why.
    assert job["state"] == "failed", job
    assert "/b.txt" in job["error"] and "exit status 7" in job["error"]
    assert done.returncode != 0
    # Once b.txt is fixed only it runs again; a and c's outputs, recorded by the failed
    # job, are their own.
    commit = _put(mount, {"b.txt": "fixed"})
    mount.vfsctl("wait", f"images@{commit}", "--timeout", "60")
    assert _outputs(mount) == {".self-a": "", ".self-b": "", ".self-c": "",
                               "a.txt.ok": "ok\n", "b.txt.ok": "ok\n", "c.txt.ok": "ok\n"}
