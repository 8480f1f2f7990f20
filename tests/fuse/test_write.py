"""Writing through a real mount on ``data@main``: os calls and everyday tools.

Changes made through the mount are visible at once, staged in the branch's open
commit (``vfsctl status``) and, after ``vfsctl commit``, exactly what ``vfsctl
cat`` / ``get`` and the commit path give back. Most tests do the same thing to
the mount and to a plain directory (the model) and compare the two trees.
"""

from __future__ import annotations

import errno
import os
import random
import stat
import subprocess
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from fuse_checks import staged, tree_of

if TYPE_CHECKING:
    from conftest import Mount




def cat(mount: Mount, ref: str) -> bytes:
    return mount.vfsctl("cat", ref, text=False).stdout


def get(mount: Mount, ref: str, dest: Path) -> Path:
    mount.vfsctl("get", ref, str(dest))
    return dest


def make_tree(root: Path, seed: int) -> Path:
    """A small tree of files of assorted sizes (one spans several chunks), dirs and links."""
    rng = random.Random(seed)
    for directory in ("", "a", "a/b", "a/b/c", "empty-dir", "d"):
        (root / directory).mkdir(parents=True, exist_ok=True)
    for i, size in enumerate([0, 1, 100, 5000, 70_000, 300_000, 1 << 20, 6 << 20]):
        directory = ["", "a", "a/b", "a/b/c", "d"][i % 5]
        (root / directory / f"file-{i}.bin").write_bytes(rng.randbytes(size))
    (root / "d" / "script.sh").write_text("#!/bin/sh\nexit 0\n")
    os.chmod(root / "d" / "script.sh", 0o755)
    os.symlink("../a/file-1.bin", root / "d" / "link")
    return root


# -- file contents ---------------------------------------------------------------------


def test_writes_at_random_offsets(mount: Mount, branch: Path) -> None:
    rng = random.Random(5)
    model = bytearray()
    os.mkdir(branch / "notes")
    path = branch / "notes" / "a.bin"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        for _ in range(60):
            offset = rng.randrange(3 << 20)
            data = rng.randbytes(rng.choice([1, 100, 4096, 65_536, 300_000]))
            assert os.pwrite(fd, data, offset) == len(data)
            model.extend(bytes(max(0, offset - len(model))))
            model[offset : offset + len(data)] = data
        assert os.fstat(fd).st_size == len(model)
        assert path.read_bytes() == model  # another handle, while this one is open
    finally:
        os.close(fd)
    assert path.read_bytes() == model
    assert os.stat(path).st_size == len(model)
    assert staged(mount) == {"/notes/a.bin": "added"}
    commit = mount.commit("data@main")
    assert cat(mount, "data@main:/notes/a.bin") == model
    assert (mount.path / f"data@{commit}" / "notes" / "a.bin").read_bytes() == model


def test_overwrite_and_append_a_committed_file(mount: Mount, branch: Path) -> None:
    data = random.Random(6).randbytes(5 << 20)
    (branch / "f.bin").write_bytes(data)
    mount.commit("data@main")
    with open(branch / "f.bin", "r+b") as f:
        f.seek(1 << 20)
        f.write(b"X" * 10)
    with open(branch / "f.bin", "ab") as f:
        f.write(b"tail")
    expected = data[: 1 << 20] + b"X" * 10 + data[(1 << 20) + 10 :] + b"tail"
    assert (branch / "f.bin").read_bytes() == expected
    assert staged(mount) == {"/f.bin": "modified"}
    mount.commit("data@main")
    assert cat(mount, "data@main:/f.bin") == expected


def test_a_commit_stores_a_file_still_open_as_it_is_then(mount: Mount, branch: Path) -> None:
    with open(branch / "log.txt", "wb") as f:
        f.write(b"first\n")
        f.flush()  # to the daemon (a write), not closed
        first = mount.commit("data@main")
        f.write(b"second\n")
    second = mount.commit("data@main")
    assert (mount.path / f"data@{first}" / "log.txt").read_bytes() == b"first\n"
    assert (mount.path / f"data@{second}" / "log.txt").read_bytes() == b"first\nsecond\n"
    assert (branch / "log.txt").read_bytes() == b"first\nsecond\n"


def test_truncate_grows_and_shrinks(mount: Mount, branch: Path) -> None:
    data = random.Random(7).randbytes(2 << 20)
    (branch / "t.bin").write_bytes(data)
    mount.commit("data@main")
    os.truncate(branch / "t.bin", 5 << 20)  # no open handle: a setattr on the path
    expected = data + bytes(3 << 20)
    assert os.stat(branch / "t.bin").st_size == len(expected)
    assert (branch / "t.bin").read_bytes() == expected
    os.truncate(branch / "t.bin", 1000)
    assert (branch / "t.bin").read_bytes() == data[:1000]
    with open(branch / "t.bin", "r+b") as f:  # through an open handle
        f.truncate(100)
        f.seek(0, os.SEEK_END)
        f.write(b"end")
        f.truncate(200)
    expected = data[:100] + b"end" + bytes(97)
    assert (branch / "t.bin").read_bytes() == expected
    os.truncate(branch / "t.bin", 0)
    os.truncate(branch / "t.bin", 10)
    assert (branch / "t.bin").read_bytes() == bytes(10)
    assert staged(mount) == {"/t.bin": "modified"}
    mount.commit("data@main")
    assert cat(mount, "data@main:/t.bin") == bytes(10)


# -- the namespace -------------------------------------------------------------------------


def _namespace_changes(base: Path) -> None:
    """The same changes, applied to the mount and to the model directory."""
    (base / "new" / "sub").mkdir(parents=True)
    (base / "new" / "sub" / "x.txt").write_bytes(b"x" * 3000)
    (base / "new" / "y.txt").write_bytes(b"y")
    os.rename(base / "new" / "y.txt", base / "new" / "y2.txt")  # within a directory
    os.rename(base / "new" / "y2.txt", base / "old" / "y.txt")  # across directories
    os.rename(base / "new", base / "old" / "moved-new")  # a new non-empty directory
    os.rename(base / "old" / "deep", base / "deep-moved")  # a committed non-empty one
    os.rename(base / "old" / "replaced.txt", base / "top.txt")  # over an existing file
    os.unlink(base / "old" / "gone.txt")
    (base / "empty").mkdir()
    os.rmdir(base / "empty")
    os.symlink("deep-moved/inner/z.txt", base / "link")
    os.chmod(base / "old" / "keep.txt", 0o600)
    os.chmod(base / "deep-moved", 0o700)
    os.utime(base / "old" / "y.txt", ns=(1_500_000_000_000_000_001, 1_500_000_000_000_000_001))


def _committed_base(base: Path) -> None:
    (base / "old" / "deep" / "inner").mkdir(parents=True)
    (base / "old" / "deep" / "inner" / "z.txt").write_bytes(b"z" * 100_000)
    for name in ("keep.txt", "gone.txt", "replaced.txt"):
        (base / "old" / name).write_text(name)
    (base / "top.txt").write_text("top")


def test_rename_unlink_mkdir_rmdir_symlink_chmod_utime(mount: Mount, branch: Path,
                                                      tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    for base in (model, branch):
        _committed_base(base)
    mount.commit("data@main")
    for base in (model, branch):
        _namespace_changes(base)

    assert tree_of(branch, modes=True) == tree_of(model, modes=True)
    assert os.stat(branch / "old" / "y.txt").st_mtime_ns == 1_500_000_000_000_000_001
    assert not (branch / "old" / "deep").exists()
    with pytest.raises(OSError) as raised:
        os.rmdir(branch / "deep-moved")
    assert raised.value.errno == errno.ENOTEMPTY
    assert staged(mount) == {
        "/deep-moved/": "added", "/link": "added", "/old/deep/inner/z.txt": "deleted",
        "/old/gone.txt": "deleted", "/old/keep.txt": "modified",
        "/old/moved-new/sub/x.txt": "added", "/old/replaced.txt": "deleted",
        "/old/y.txt": "added", "/top.txt": "modified",
    }

    commit = mount.commit("data@main")
    restored = get(mount, f"data@{commit}", tmp_path / "restored")
    assert tree_of(restored) == tree_of(model)
    assert tree_of(mount.path / f"data@{commit}", modes=True) == tree_of(model, modes=True)
    assert cat(mount, "data@main:/top.txt") == b"replaced.txt"


@pytest.mark.parametrize("change", ["chmod", "utime"])
def test_chmod_and_utime_of_a_directory_keep_what_is_in_it(mount: Mount, branch: Path,
                                                            change: str) -> None:
    """What ``cp -a``, ``tar -x`` and ``rsync -a`` do to every directory they fill."""
    (branch / "committed").mkdir()
    (branch / "committed" / "old.txt").write_bytes(b"old")
    mount.commit("data@main")
    (branch / "committed" / "new.txt").write_bytes(b"new")
    (branch / "fresh").mkdir()
    (branch / "fresh" / "f.txt").write_bytes(b"f")
    for directory in ("committed", "fresh"):
        if change == "chmod":
            os.chmod(branch / directory, 0o700)
        else:
            os.utime(branch / directory, ns=(1_300_000_000_000_000_000,) * 2)
    assert sorted(os.listdir(branch / "committed")) == ["new.txt", "old.txt"]
    assert os.listdir(branch / "fresh") == ["f.txt"]
    commit = mount.commit("data@main")
    assert sorted(os.listdir(mount.path / f"data@{commit}" / "committed")) \
        == ["new.txt", "old.txt"]
    assert os.listdir(mount.path / f"data@{commit}" / "fresh") == ["f.txt"]


def test_chmod_and_utime_of_an_open_file_are_kept(mount: Mount, branch: Path) -> None:
    """fchmod / futimens after the bytes were stored (fsync) must still be staged."""
    mtime = 1_400_000_000_000_000_000
    fd = os.open(branch / "f.txt", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, b"data")
        os.fsync(fd)
        os.fchmod(fd, 0o600)
        os.utime(fd, ns=(mtime, mtime))
    finally:
        os.close(fd)
    st = os.stat(branch / "f.txt")
    assert (oct(stat.S_IMODE(st.st_mode)), st.st_mtime_ns) == (oct(0o600), mtime)
    commit = mount.commit("data@main")
    st = os.stat(mount.path / f"data@{commit}" / "f.txt")
    assert (oct(stat.S_IMODE(st.st_mode)), st.st_mtime_ns) == (oct(0o600), mtime)


def test_setuid_setgid_and_sticky_bits_are_dropped(mount: Mount, branch: Path,
                                                    tmp_path: Path) -> None:
    """As on a filesystem that does not keep them: the calls succeed, the bits are gone.

    Otherwise a setuid program planted through the mount would come back out of
    ``vfsctl get`` run as root setuid-root.
    """
    (branch / "id").write_bytes(b"\x7fELF not really")
    os.chmod(branch / "id", 0o4755)
    umask = os.umask(0)  # the kernel applies it to mkdir and create
    try:
        os.mkdir(branch / "tmp", 0o1777)
        os.close(os.open(branch / "tmp" / "made", os.O_CREAT | os.O_WRONLY, 0o2755))
    finally:
        os.umask(umask)
    expected = {"id": 0o755, "tmp": 0o777, "tmp/made": 0o755}

    def modes(root: Path) -> dict[str, str]:
        return {rel: oct(stat.S_IMODE(os.stat(root / rel).st_mode)) for rel in expected}

    assert modes(branch) == {rel: oct(mode) for rel, mode in expected.items()}
    commit = mount.commit("data@main")
    assert modes(mount.path / f"data@{commit}") == modes(branch)
    assert modes(get(mount, "data@main", tmp_path / "restored")) == modes(branch)


def test_an_unlinked_open_file_still_works_through_its_handle(mount: Mount,
                                                               branch: Path) -> None:
    """The temporary-file idiom: open, unlink, then keep using the descriptor."""
    (branch / "kept.txt").write_bytes(b"kept")
    with open(branch / "scratch.bin", "w+b") as f:
        f.write(b"a" * 10_000)
        f.flush()
        os.unlink(branch / "scratch.bin")
        f.write(b"b" * 10_000)
        f.flush()
        assert os.fstat(f.fileno()).st_size == 20_000
        f.seek(0)
        assert f.read() == b"a" * 10_000 + b"b" * 10_000
    assert os.listdir(branch) == ["kept.txt"]
    assert staged(mount) == {"/kept.txt": "added"}


def test_long_paths_up_to_1024_bytes(mount: Mount, branch: Path) -> None:
    """Deep paths longer than an index key work up to 1024 bytes in all (closed files,
    commit, restart); a longer one, or a name over 255 bytes, is ENAMETOOLONG."""
    directory = branch
    for c in "abc":
        directory = directory / (c * 250)
        directory.mkdir()
    target = directory / ("d" * 200)  # 3 * 251 + 200 = 953 bytes below the branch
    target.write_bytes(b"deep")
    os.symlink("d" * 200, directory / ("e" * 200))
    os.rename(target, directory / ("f" * 200))
    for name in ("g" * 260, "h" * 256):  # names over 255 bytes
        with pytest.raises(OSError) as failed:
            (directory / name).write_bytes(b"x")
        assert failed.value.errno == errno.ENAMETOOLONG
    with pytest.raises(OSError) as failed:
        os.mkdir(directory / ("i" * 255) / "x")  # the parent does not exist anyway
    assert failed.value.errno in (errno.ENOENT, errno.ENAMETOOLONG)
    with pytest.raises(OSError) as failed:
        os.mkdir(directory / ("j" * 255))  # 1008 bytes: fine
        os.mkdir(directory / ("j" * 255) / ("k" * 20))  # 1029: too long
    assert failed.value.errno == errno.ENAMETOOLONG
    commit = mount.commit("data@main")
    mount.restart()
    committed = mount.path / f"data@{commit}" / ("a" * 250) / ("b" * 250) / ("c" * 250)
    assert (committed / ("f" * 200)).read_bytes() == b"deep"
    assert os.readlink(committed / ("e" * 200)) == "d" * 200
    assert sorted(p.name[0] for p in committed.iterdir()) == ["e", "f", "j"]


def test_hard_links_are_refused(branch: Path) -> None:
    (branch / "a").write_bytes(b"a")
    with pytest.raises(OSError) as raised:
        os.link(branch / "a", branch / "b")
    assert raised.value.errno == errno.EPERM


# -- tools -----------------------------------------------------------------------------


def run(*args: str | Path, cwd: Path | None = None) -> str:
    """Run a program; its stdout (it must succeed)."""
    done = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, f"{args} failed: {done.stderr}"
    return done.stdout


def test_cp_r_in_and_out(mount: Mount, branch: Path, tmp_path: Path) -> None:
    source = make_tree(tmp_path / "source", seed=8)
    run("cp", "-r", source, branch / "copy")
    assert tree_of(branch / "copy") == tree_of(source)
    run("cp", "-r", branch / "copy", tmp_path / "out")
    assert tree_of(tmp_path / "out") == tree_of(source)
    run("cp", "-a", source, branch / "archive")  # modes and mtimes too
    assert tree_of(branch / "archive", modes=True) == tree_of(source, modes=True)
    for path in source.rglob("*.bin"):
        relative = path.relative_to(source)
        assert os.stat(branch / "archive" / relative).st_mtime_ns == path.stat().st_mtime_ns
    commit = mount.commit("data@main")
    assert tree_of(mount.path / f"data@{commit}" / "copy") == tree_of(source)
    assert tree_of(get(mount, f"data@{commit}:/archive", tmp_path / "got"), modes=True) \
        == tree_of(source, modes=True)


def test_tar_extract_into_the_branch_and_create_from_it(mount: Mount, branch: Path,
                                                       tmp_path: Path) -> None:
    source = make_tree(tmp_path / "source", seed=9)
    run("tar", "-cf", tmp_path / "in.tar", "-C", source, ".")
    (branch / "extracted").mkdir()
    run("tar", "-xf", tmp_path / "in.tar", "-C", branch / "extracted")
    assert tree_of(branch / "extracted", modes=True) == tree_of(source, modes=True)
    for path in source.rglob("*"):
        if path.is_file() and not path.is_symlink():
            relative = path.relative_to(source)
            assert int(os.stat(branch / "extracted" / relative).st_mtime) \
                == int(path.stat().st_mtime), relative
    run("tar", "-cf", tmp_path / "out.tar", "-C", branch / "extracted", ".")
    (tmp_path / "out").mkdir()
    run("tar", "-xf", tmp_path / "out.tar", "-C", tmp_path / "out")
    assert tree_of(tmp_path / "out", modes=True) == tree_of(source, modes=True)
    with tarfile.open(tmp_path / "in.tar") as given, tarfile.open(tmp_path / "out.tar") as made:
        assert sorted(member.name for member in made) == sorted(member.name for member in given)
    commit = mount.commit("data@main")
    assert tree_of(mount.path / f"data@{commit}" / "extracted") == tree_of(source)


def test_find(branch: Path, tmp_path: Path) -> None:
    source = make_tree(tmp_path / "source", seed=10)
    run("cp", "-r", source, branch / "tree")

    def find(root: Path, *predicates: str) -> list[str]:
        return sorted(run("find", root, "-mindepth", "1", *predicates, "-printf",
                          "%y %P\n").splitlines())

    assert find(branch / "tree") == find(source)
    assert find(branch / "tree", "-type", "f", "-size", "+100k") \
        == find(source, "-type", "f", "-size", "+100k")
    assert find(branch / "tree", "-name", "*.sh") == ["f d/script.sh"]
    sizes = run("find", branch / "tree", "-type", "f", "-printf", "%s %P\n")
    assert sorted(sizes.splitlines()) == sorted(
        run("find", source, "-type", "f", "-printf", "%s %P\n").splitlines())


SQL_CREATE = """
create table t(id integer primary key, name text, value real);
with recursive c(x) as (select 1 union all select x + 1 from c where x < 4000)
insert into t select x, 'name-' || x, x * 1.5 from c;
create index t_name on t(name);
"""
SQL_CHANGE = "update t set value = value + 1 where id % 7 = 0; delete from t where id % 100 = 0;"
SQL_QUERY = "pragma integrity_check; select count(*), sum(value), max(name) from t;"


def test_sqlite3(mount: Mount, branch: Path, tmp_path: Path) -> None:
    (branch / "db").mkdir()
    answers = []
    for database in (branch / "db" / "test.sqlite", tmp_path / "test.sqlite"):
        run("sqlite3", database, SQL_CREATE)
        run("sqlite3", database, SQL_CHANGE)
        answers.append(run("sqlite3", database, SQL_QUERY))
    assert answers[0] == answers[1]
    assert answers[0].startswith("ok\n3960|")
    commit = mount.commit("data@main")
    committed = mount.path / f"data@{commit}" / "db"
    assert os.listdir(committed) == ["test.sqlite"]  # the journal was removed
    assert run("sqlite3", "-readonly", committed / "test.sqlite", SQL_QUERY) == answers[1]
    assert (committed / "test.sqlite").read_bytes() == (branch / "db" / "test.sqlite").read_bytes()


def test_git(mount: Mount, branch: Path) -> None:
    project = branch / "project"
    project.mkdir()

    def git(*args: str, cwd: Path = project) -> str:
        return run("git", "-c", "user.name=Tester", "-c", "user.email=tester@test",
                   "-c", "init.defaultBranch=main", "-c", "safe.directory=*", *args, cwd=cwd)

    git("init", "-q")
    (project / "README").write_text("hello\n")
    (project / "src").mkdir()
    (project / "src" / "main.py").write_text("print('hi')\n" * 100)
    git("add", "-A")
    git("commit", "-q", "-m", "first")
    (project / "README").write_text("hello again\n")
    git("mv", "src/main.py", "src/app.py")
    git("commit", "-q", "-am", "second")
    assert git("log", "--format=%s").split() == ["second", "first"]
    git("fsck", "--full", "--strict")
    assert git("status", "--porcelain") == ""

    commit = mount.commit("data@main")
    committed = mount.path / f"data@{commit}" / "project"
    assert git("log", "--format=%s", cwd=committed).split() == ["second", "first"]
    git("fsck", "--full", cwd=committed)
    assert git("show", "HEAD:src/app.py", cwd=committed) == "print('hi')\n" * 100
