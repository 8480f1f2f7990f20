"""Times through the mount as POSIX says: a directory's mtime and ctime follow its
entries, ctime follows every change of an inode, atime is kept and settable.

A branch view keeps atime, ctime and the entries-changed mtime of directories for the
daemon's lifetime (daemon/times.py); commits keep mtimes only.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from conftest import Mount

PAST_NS = 1_500_000_000 * 10**9  # 2017


def _times(path: Path) -> tuple[int, int, int]:
    st = os.lstat(path)
    return st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns


def _moves(directory: Path, change) -> None:
    """``change()`` moves the mtime and the ctime of ``directory`` forward."""
    _, mtime, ctime = _times(directory)
    time.sleep(0.002)
    change()
    _, mtime2, ctime2 = _times(directory)
    assert mtime2 > mtime and ctime2 > ctime and ctime2 >= mtime2


def test_a_directory_changes_with_its_entries(branch: Path) -> None:
    d, e = branch / "d", branch / "e"
    d.mkdir()
    e.mkdir()
    _moves(d, lambda: (d / "f").write_bytes(b"x"))  # create
    _moves(d, lambda: (d / "sub").mkdir())  # mkdir
    _moves(d, lambda: (d / "sub").rmdir())  # rmdir
    _moves(d, lambda: os.symlink("f", d / "link"))  # symlink
    _moves(d, lambda: (d / "link").unlink())  # unlink
    _moves(d, lambda: (d / "f").rename(d / "g"))  # rename within
    _moves(e, lambda: (d / "g").rename(e / "g"))  # rename into another directory...
    _moves(d, lambda: (e / "g").rename(d / "g"))  # ...and back out of it
    _moves(branch, lambda: (branch / "top").write_bytes(b"y"))  # the branch's root


def test_a_running_python_imports_a_module_created_after_it_looked(branch: Path) -> None:
    script = (
        "import sys, time, pathlib\n"
        f"d = pathlib.Path({str(branch)!r}) / 'pkgdir'\n"
        "d.mkdir()\n"
        "sys.path.insert(0, str(d))\n"
        "try:\n"
        "    import later\n"
        "    raise SystemExit('imported a module that does not exist')\n"
        "except ModuleNotFoundError:\n"
        "    pass\n"
        "time.sleep(0.01)\n"
        "(d / 'later.py').write_text('VALUE = 42\\n')\n"
        "import later\n"  # no importlib.invalidate_caches(): the dir's mtime tells
        "print(later.VALUE)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "42"


def test_ctime_follows_every_change_and_cannot_be_set_back(branch: Path) -> None:
    f = branch / "f"
    f.write_bytes(b"data")
    atime, mtime, ctime = _times(f)
    time.sleep(0.002)
    os.chmod(f, 0o600)  # chmod: ctime moves, mtime does not
    _, mtime2, ctime2 = _times(f)
    assert mtime2 == mtime and ctime2 > ctime
    os.utime(f, ns=(PAST_NS, PAST_NS))  # touch -d: mtime and atime back, ctime now
    atime3, mtime3, ctime3 = _times(f)
    assert (atime3, mtime3) == (PAST_NS, PAST_NS) and ctime3 >= ctime2
    time.sleep(0.002)
    f.write_bytes(b"more data")  # a write: mtime and ctime now
    _, mtime4, ctime4 = _times(f)
    assert mtime4 > ctime3 and ctime4 >= mtime4


def test_atime_is_kept_settable_and_moved_by_reads(branch: Path, mount: Mount) -> None:
    f = branch / "f"
    f.write_bytes(b"data")
    _, mtime, _ = _times(f)
    # touch -a: atime only (mtime UTIME_OMIT)
    subprocess.run(["touch", "-a", "-d", "2017-07-14 02:40:00 UTC", str(f)], check=True)
    atime, mtime2, _ = _times(f)
    assert mtime2 == mtime and atime == 1_500_000_000 * 10**9
    # relatime: a read moves an atime older than the mtime
    f.read_bytes()
    atime2, _, _ = _times(f)
    assert atime2 >= mtime
    # a directory's atime can be set too
    d = branch / "d"
    d.mkdir()
    subprocess.run(["touch", "-a", "-d", "2017-07-14 02:40:00 UTC", str(d)], check=True)
    assert _times(d)[0] == 1_500_000_000 * 10**9

    # A commit keeps mtimes only: atime and ctime of its files are their mtime.
    commit = mount.commit(f"{branch.name}")
    committed = mount.path / f"{branch.name.split('@')[0]}@{commit}" / "f"
    atime_c, mtime_c, ctime_c = _times(committed)
    assert atime_c == mtime_c == ctime_c == mtime


def test_touch_d_backdates_a_directory(branch: Path) -> None:
    d = branch / "d"
    d.mkdir()
    (d / "f").write_bytes(b"x")  # its entries changed: mtime now...
    os.utime(d, ns=(PAST_NS, PAST_NS))  # ...until it is set by hand
    assert _times(d)[:2] == (PAST_NS, PAST_NS)


def test_put_and_rm_through_the_daemon_move_directory_times(branch: Path, mount: Mount,
                                                            tmp_path: Path) -> None:
    """A change made outside the mount (``vfsctl put``/``rm``) moves the times of the
    live view as the same change through the mount would."""
    d = branch / "d"
    d.mkdir()
    (d / "kept").write_bytes(b"k")
    source = tmp_path / "new"
    source.write_bytes(b"new file")
    _moves(d, lambda: mount.vfsctl("put", "data@main:/d/new", str(source)))
    _moves(d, lambda: mount.vfsctl("rm", "data@main:/d/new"))
    _, _, ctime = _times(d / "kept")
    time.sleep(0.002)
    source.write_bytes(b"other bytes")
    mount.vfsctl("put", "data@main:/d/kept", str(source))
    assert (d / "kept").read_bytes() == b"other bytes"
    assert _times(d / "kept")[2] > ctime
