"""The versioned store: repositories, branches, open commits, commits and history.

Most tests use the shared ``store`` fixture (a local store in tmp_path that must pass
``fsck --deep`` at teardown). Tests that close and reopen a store open their own and
run fsck themselves.
"""

from __future__ import annotations

import io
import json
import os
import random
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import vfs
from vfs import fsck
from vfs.errors import (
    AlreadyExists,
    AmbiguousRef,
    BranchNotFound,
    CommitNotFound,
    Conflict,
    InvalidName,
    InvalidPath,
    InvalidRef,
    IsADirectory,
    NothingToCommit,
    PathNotFound,
    PathTooLong,
    RepoNotFound,
    UnsupportedFormat,
    VfsError,
)
from vfs.refs import Commit, canonical_json, commit_key
from vfs.tree import DIR, FILE, SYMLINK

REPO = "data"


# -- helpers -----------------------------------------------------------------------------


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def ref(text: str) -> vfs.RefSpec:
    return vfs.parse_ref(text)


def files_of(store: vfs.Store, spec: str) -> dict[str, bytes | str]:
    """The view of a ref: path -> bytes for files, "<dir>" for directories, "-> t" links."""
    _, snapshot = store.snapshot(ref(spec))
    out: dict[str, bytes | str] = {}
    for path, entry in snapshot.walk():
        if entry.kind == DIR:
            out[path] = "<dir>"
        elif entry.kind == SYMLINK:
            out[path] = f"-> {entry.ref}"
        else:
            out[path] = vfs.read_file(store, ref(f"{spec}:/{path}"))
    return out


def staged_paths(store: vfs.Store, branch: str = "main") -> dict[str, str]:
    _, open_commit = store.open_commit(REPO, branch)
    return {c.path: ("deleted" if c.entry is None else c.entry.kind)
            for c in open_commit.staged()}


def put(store: vfs.Store, dest: str, *sources: Path, branch: str = "main",
        recursive: bool = False) -> vfs.PutResult:
    return vfs.put(store, REPO, branch, dest, [str(s) for s in sources], recursive=recursive)


@pytest.fixture
def src(tmp_path: Path) -> Path:
    directory = tmp_path / "src"
    directory.mkdir()
    return directory


@pytest.fixture
def repo(store: vfs.Store) -> vfs.Store:
    store.create_repo(REPO, "test data")
    return store


def _open(path: Path, cache: Path, **kwargs) -> vfs.Store:
    return vfs.open_store(str(path), cache_dir=str(cache), **kwargs)


def _assert_fsck_ok(store: vfs.Store) -> None:
    report = fsck.check(store, deep=True)
    assert report.ok, report.problems


# -- repositories --------------------------------------------------------------------------


def test_repo_lifecycle(store: vfs.Store) -> None:
    assert store.list_repos() == []
    info = store.create_repo("images", "photos")
    assert (info.name, info.description) == ("images", "photos")
    assert store.repo("images") == info
    assert [r.name for r in store.list_repos()] == ["images"]
    assert store.list_branches("images") == [vfs.BranchInfo("images", "main", None)]
    with pytest.raises(AlreadyExists, match="images already exists"):
        store.create_repo("images")
    store.delete_repo("images")
    with pytest.raises(RepoNotFound, match="vfsctl repo create images"):
        store.repo("images")
    assert store.list_repos() == []


def test_repo_names_are_checked(store: vfs.Store) -> None:
    for bad in ("", "-x", "a/b", "a b", "x" * 65):
        with pytest.raises(InvalidName):
            store.create_repo(bad)
    with pytest.raises(RepoNotFound):
        store.list_branches("missing")


def test_delete_repo_needs_force_when_it_has_commits(repo: vfs.Store, src: Path) -> None:
    put(repo, "/f", write(src / "f", "x"))
    repo.commit(REPO, "main", "one")
    with pytest.raises(VfsError, match="--force"):
        repo.delete_repo(REPO)
    assert repo.repo(REPO).name == REPO  # still there
    repo.delete_repo(REPO, force=True)
    with pytest.raises(RepoNotFound):
        repo.repo(REPO)
    assert not list(repo.objects.list(f"refs/{REPO}/"))
    # The name can be used again, for a fresh repository.
    repo.create_repo(REPO)
    assert repo.head(REPO, "main").commit is None


# -- branches -------------------------------------------------------------------------------


def test_branch_lifecycle(repo: vfs.Store, src: Path) -> None:
    put(repo, "/f", write(src / "f", "one"))
    first = repo.commit(REPO, "main", "one")
    dev = repo.create_branch(REPO, "dev", ref(f"{REPO}@main"))
    assert dev == vfs.BranchInfo(REPO, "dev", first.id)
    empty = repo.create_branch(REPO, "empty")
    assert empty.head is None
    assert {b.name: b.head for b in repo.list_branches(REPO)} == {
        "dev": first.id, "empty": None, "main": first.id}
    with pytest.raises(AlreadyExists):
        repo.create_branch(REPO, "dev")
    with pytest.raises(InvalidName):
        repo.create_branch(REPO, "bad name")
    repo.create_repo("other")
    with pytest.raises(InvalidRef, match="--from"):
        repo.create_branch(REPO, "x", ref("other@main"))

    # Committing on dev does not move main.
    put(repo, "/g", write(src / "g", "two"), branch="dev")
    second = repo.commit(REPO, "dev", "two")
    assert second.parents == (first.id,)
    assert repo.head(REPO, "main").commit == first.id
    assert set(files_of(repo, f"{REPO}@dev")) == {"f", "g"}
    assert set(files_of(repo, f"{REPO}@main")) == {"f"}

    repo.delete_branch(REPO, "dev")
    with pytest.raises(BranchNotFound, match="branch list"):
        repo.head(REPO, "dev")
    whys = [(e.branch, e.why) for e in repo.reflog(REPO)]
    assert ("dev", "branch created") in whys
    assert ("dev", "branch deleted") in whys
    # The commit made on the deleted branch is still readable by id.
    assert repo.resolve(ref(f"{REPO}@{second.id}")) == second


# -- put, commit, log, diff -------------------------------------------------------------------


def test_put_commit_log_diff(repo: vfs.Store, src: Path) -> None:
    write(src / "a.txt", "alpha")
    write(src / "sub" / "b.bin", os.urandom(300_000))  # chunked, not inlined
    result = put(repo, "/", src, recursive=True)
    assert result.staged == 2 and result.read == 2
    assert staged_paths(repo) == {"a.txt": FILE, "sub": DIR, "sub/b.bin": FILE}
    first = repo.commit(REPO, "main", "first", author="someone")
    assert (first.files, first.bytes, first.message, first.author) == (
        2, 300_005, "first", "someone")
    assert first.parents == ()
    assert staged_paths(repo) == {}
    assert repo.read_commit(first.id) == first

    write(src / "a.txt", "alpha, changed")
    write(src / "c.txt", "gamma")
    put(repo, "/a.txt", src / "a.txt")
    put(repo, "/c.txt", src / "c.txt")
    vfs.remove(repo, REPO, "main", "/sub", recursive=True)
    second = repo.commit(REPO, "main", "second")
    assert second.parents == (first.id,)
    assert files_of(repo, f"{REPO}@main") == {"a.txt": b"alpha, changed", "c.txt": b"gamma"}
    assert files_of(repo, f"{REPO}@main~1")["sub/b.bin"] == (src / "sub" / "b.bin").read_bytes()

    assert [c.id for c in repo.log(ref(f"{REPO}@main"))] == [second.id, first.id]
    assert [c.id for c in repo.log(ref(f"{REPO}@main"), limit=1)] == [second.id]
    assert list(repo.log(ref(f"{REPO}@main~1"))) == [first]

    changes = {(c.status, c.path) for c in repo.diff(ref(f"{REPO}@main"))}
    assert changes == {("modified", "a.txt"), ("added", "c.txt"), ("deleted", "sub/b.bin")}
    backwards = {(c.status, c.path)
                 for c in repo.diff(ref(f"{REPO}@{first.id}"), ref(f"{REPO}@{second.id}"))}
    assert backwards == {("modified", "a.txt"), ("deleted", "c.txt"), ("added", "sub/b.bin")}
    first_diff = {(c.status, c.path) for c in repo.diff(ref(f"{REPO}@{first.id}"))}
    assert first_diff == {("added", "a.txt"), ("added", "sub/b.bin")}


def test_diff_restricted_to_a_path(repo: vfs.Store, src: Path) -> None:
    write(src / "t" / "a.txt", "1")
    write(src / "t" / "sub" / "b", "1")
    write(src / "t" / "same", "same")
    put(repo, "/", src / "t", recursive=True)
    repo.commit(REPO, "main", "one")
    write(src / "t" / "a.txt", "22")
    write(src / "t" / "sub" / "b", "22")
    put(repo, "/", src / "t", recursive=True)
    repo.commit(REPO, "main", "two")

    def diff(path: str) -> set[tuple[str, str]]:
        return {(c.status, c.path) for c in repo.diff(ref(f"{REPO}@main:{path}"))}

    assert diff("/") == {("modified", "a.txt"), ("modified", "sub/b")}
    assert diff("/sub") == {("modified", "sub/b")}
    assert diff("/same") == set()
    assert diff("/nothing") == set()
    # A path naming a file shows that file's change (today: nothing at all).
    assert diff("/a.txt") == {("modified", "a.txt")}
    assert diff("/sub/b") == {("modified", "sub/b")}


def test_log_with_a_path(repo: vfs.Store, src: Path) -> None:
    ids = []
    for name, content in [("a", "1"), ("b", "1"), ("a", "2"), ("b", "2"), ("c", "1")]:
        put(repo, f"/dir/{name}", write(src / name, content))
        ids.append(repo.commit(REPO, "main", f"{name}={content}").id)
    head = ref(f"{REPO}@main")
    assert [c.id for c in repo.log(head, path="dir/a")] == [ids[2], ids[0]]
    assert [c.id for c in repo.log(head, path="dir/b")] == [ids[3], ids[1]]
    assert [c.id for c in repo.log(head, path="dir/c")] == [ids[4]]
    assert [c.id for c in repo.log(head, path="dir")] == ids[::-1]
    assert [c.id for c in repo.log(head, path="dir/a", limit=1)] == [ids[2]]
    assert list(repo.log(head, path="nothing/here")) == []
    vfs.remove(repo, REPO, "main", "/dir/a")
    gone = repo.commit(REPO, "main", "rm a").id
    assert [c.id for c in repo.log(head, path="dir/a")] == [gone, ids[2], ids[0]]


def test_put_of_an_unchanged_file_stages_nothing(repo: vfs.Store, src: Path) -> None:
    write(src / "f", b"same bytes" * 1000)
    put(repo, "/f", src / "f")
    repo.commit(REPO, "main", "one")
    result = put(repo, "/f", src / "f")
    assert result.changes == {} and result.unchanged == 1 and result.staged == 0
    assert staged_paths(repo) == {}
    with pytest.raises(NothingToCommit, match="nothing to commit"):
        repo.commit(REPO, "main", "again")
    # Same bytes under a new mtime (copied again) are still unchanged.
    os.utime(src / "f", ns=(1, 1))
    assert put(repo, "/f", src / "f").changes == {}


def test_staging_then_undoing_is_nothing_to_commit(repo: vfs.Store, src: Path) -> None:
    put(repo, "/keep", write(src / "keep", "k"))
    head = repo.commit(REPO, "main", "one")
    put(repo, "/new", write(src / "new", "n"))
    vfs.remove(repo, REPO, "main", "/new")
    with pytest.raises(NothingToCommit, match="equals the head"):
        repo.commit(REPO, "main", "no-op")
    assert repo.head(REPO, "main").commit == head.id
    assert staged_paths(repo) == {}  # the no-op open commit was dropped


def test_a_commit_clears_only_what_it_sealed(repo: vfs.Store,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Changes staged while a commit is being made (after it read the open commit)
    are not lost: they stay staged, on top of the new commit."""
    vfs.put_stream(repo, REPO, "main", "/a", io.BytesIO(b"a1"))
    vfs.put_stream(repo, REPO, "main", "/b", io.BytesIO(b"b1"))
    read_open_commit = repo._open_commit

    def racing(repo_name: str, branch: str):
        result = read_open_commit(repo_name, branch)
        monkeypatch.setattr(repo, "_open_commit", read_open_commit)  # once
        # Another writer, between the commit's read and its end:
        vfs.put_stream(repo, REPO, "main", "/a", io.BytesIO(b"a2"))  # changed again
        vfs.put_stream(repo, REPO, "main", "/c", io.BytesIO(b"c1"))  # new
        return result

    monkeypatch.setattr(repo, "_open_commit", racing)
    first = repo.commit(REPO, "main", "sealed a1 and b1")
    _, snapshot = repo.snapshot(ref(f"{REPO}@{first.id}"))
    assert sorted(snapshot.root_entries()) == ["a", "b"]
    assert vfs.read_file(repo, ref(f"{REPO}@{first.id}:/a")) == b"a1"
    # a2 and c1 are still staged, now on top of the new commit.
    assert sorted(repo.index.staged(REPO, "main")) == ["a", "c"]
    assert repo.index.staging_base(REPO, "main") == first.id
    second = repo.commit(REPO, "main", "the rest")
    assert second.parents == (first.id,)
    assert vfs.read_file(repo, ref(f"{REPO}@main:/a")) == b"a2"
    assert vfs.read_file(repo, ref(f"{REPO}@main:/b")) == b"b1"
    assert vfs.read_file(repo, ref(f"{REPO}@main:/c")) == b"c1"
    assert repo.index.staged(REPO, "main") == {}
    assert repo.index.staging_base(REPO, "main") is None


def test_discard(repo: vfs.Store, src: Path) -> None:
    put(repo, "/a", write(src / "a", "a"))
    put(repo, "/d/b", write(src / "b", "b"))
    assert repo.discard(REPO, "main") == 3  # a, the new directory d, and d/b
    assert staged_paths(repo) == {}
    with pytest.raises(NothingToCommit):
        repo.commit(REPO, "main")


def test_put_stream_and_cat(repo: vfs.Store) -> None:
    data = os.urandom(700_000)  # larger than a chunk's minimum: goes through the chunker
    result = vfs.put_stream(repo, REPO, "main", "/streamed/blob", io.BytesIO(data), mode=0o600)
    assert result.read == 1 and result.bytes_read == len(data)
    small = vfs.put_stream(repo, REPO, "main", "/small", io.BytesIO(b"tiny"))
    assert small.staged == 1
    repo.commit(REPO, "main", "streams")
    out = io.BytesIO()
    assert vfs.cat(repo, ref(f"{REPO}@main:/streamed/blob"), out) == len(data)
    assert out.getvalue() == data
    assert vfs.read_file(repo, ref(f"{REPO}@main:/small")) == b"tiny"
    _, snapshot = repo.snapshot(ref(f"{REPO}@main"))
    assert snapshot.lookup("streamed/blob").mode == 0o600
    with pytest.raises(IsADirectory):
        vfs.cat(repo, ref(f"{REPO}@main:/streamed"), io.BytesIO())
    with pytest.raises(PathNotFound):
        vfs.cat(repo, ref(f"{REPO}@main:/nope"), io.BytesIO())
    with pytest.raises(InvalidPath):
        vfs.put_stream(repo, REPO, "main", "/", io.BytesIO(b"x"))
    with pytest.raises(IsADirectory):
        vfs.put_stream(repo, REPO, "main", "/streamed", io.BytesIO(b"x"))


def test_put_stream_from_a_pipe_with_short_reads(repo: vfs.Store) -> None:
    # An unbuffered pipe (a socket, a subprocess's stdout with bufsize=0) returns at most
    # what is available, 64 KiB here, from read(n). put_stream must keep reading until
    # EOF: today it takes the first short read for the whole stream and silently stores
    # a truncated file.
    data = os.urandom(1 << 20)
    read_end, write_end = os.pipe()

    def feed() -> None:
        try:
            with os.fdopen(write_end, "wb") as f:
                f.write(data)
        except BrokenPipeError:
            pass  # the reader stopped early; the assertions below say so

    writer = threading.Thread(target=feed)
    writer.start()
    try:
        with os.fdopen(read_end, "rb", buffering=0) as stream:
            result = vfs.put_stream(repo, REPO, "main", "/piped", stream)
    finally:
        writer.join(timeout=10)
    repo.commit(REPO, "main", "piped")
    stored = vfs.read_file(repo, ref(f"{REPO}@main:/piped"))
    assert (result.bytes_read, len(stored)) == (len(data), len(data))
    assert stored == data


def test_remove_errors(repo: vfs.Store, src: Path) -> None:
    put(repo, "/d/f", write(src / "f", "x"))
    with pytest.raises(PathNotFound):
        vfs.remove(repo, REPO, "main", "/missing")
    with pytest.raises(IsADirectory, match="-r"):
        vfs.remove(repo, REPO, "main", "/d")
    assert vfs.remove(repo, REPO, "main", "/d", recursive=True) == 1


def test_put_errors_stage_nothing(repo: vfs.Store, src: Path) -> None:
    write(src / "dir" / "f", "x")
    with pytest.raises(PathNotFound):
        put(repo, "/x", src / "missing")
    with pytest.raises(IsADirectory, match="-r"):
        put(repo, "/x", src / "dir")
    with pytest.raises(InvalidPath):
        vfs.put(repo, REPO, "main", "/../x", [str(src / "dir" / "f")])
    with pytest.raises(BranchNotFound):
        put(repo, "/x", src / "dir" / "f", branch="nope")
    assert staged_paths(repo) == {}


def test_put_refuses_file_names_that_are_not_utf8(repo: vfs.Store, src: Path) -> None:
    # On Linux a file name is bytes; Python shows an undecodable one as a lone surrogate.
    # Such a name cannot be stored in a (UTF-8) tree: put must refuse it with a VfsError
    # naming the problem (the CLI shows VfsErrors as one line; anything else is a crash).
    write(src / "tree" / "good", "g")
    with open(os.path.join(os.fsencode(src / "tree"), b"bad\xffname"), "wb") as f:
        f.write(b"b")
    with pytest.raises(InvalidPath):
        put(repo, "/in", src / "tree", recursive=True)
    assert staged_paths(repo) == {}


# -- files cache ------------------------------------------------------------------------------


def test_files_cache_skips_unchanged_files(repo: vfs.Store, src: Path) -> None:
    tree = src / "tree"
    for i in range(200):
        # Mix of inlined (tiny) and stored (over the 1 KiB inline limit) files.
        write(tree / f"d{i % 7}" / f"f{i}", os.urandom(10 if i % 2 else 2000))
    first = put(repo, "/", tree, recursive=True)
    assert (first.files, first.read, first.staged) == (200, 200, 200)
    repo.commit(REPO, "main", "200 files")

    again = put(repo, "/", tree, recursive=True)
    assert (again.files, again.read, again.bytes_read, again.unchanged) == (200, 0, 0, 200)
    assert again.changes == {}

    target = tree / "d3" / "f3"
    write(target, b"new content of f3")
    once = put(repo, "/", tree, recursive=True)
    assert once.read == 1
    assert once.staged == 1 and once.unchanged == 199
    assert set(once.changes) == {"d3/f3"}

    # Touching without changing the bytes reads the file again, and stages nothing new.
    repo.commit(REPO, "main", "f3 changed")
    st = (tree / "d5" / "f5").stat()
    os.utime(tree / "d5" / "f5", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    touched = put(repo, "/", tree, recursive=True)
    assert touched.read == 1 and touched.changes == {}


def test_files_cache_survives_a_store_reopen(tmp_path: Path, src: Path) -> None:
    for i in range(20):
        write(src / "t" / f"f{i}", os.urandom(3000))
    with _open(tmp_path / "s", tmp_path / "c", create=True) as store:
        store.create_repo(REPO)
        assert put(store, "/", src / "t", recursive=True).read == 20
    with _open(tmp_path / "s", tmp_path / "c") as store:
        assert put(store, "/", src / "t", recursive=True).read == 0
        store.commit(REPO, "main", "x")
        _assert_fsck_ok(store)


def test_files_cache_is_not_fooled_by_gc_of_a_files_chunks(tmp_path: Path, src: Path) -> None:
    # A put whose open commit is discarded leaves its packs as garbage. gc deletes the
    # packs holding only a large file's chunks, but keeps the pack holding its manifest
    # when that pack is mostly live data of another file. The files cache entry of the
    # large file checks only that the manifest blob exists: a later put of the unchanged
    # file must not trust it, or the commit references chunks that no longer exist.
    from vfs.config import StoreConfig, create_config
    from vfs.gc import collect
    from vfs.objstore.local import LocalStore

    objects = LocalStore(str(tmp_path / "s"), create=True)
    config = create_config(objects, StoreConfig(pack_target_size=1 << 20))  # many packs
    with vfs.Store(objects, config, str(tmp_path / "c")) as store:
        store.create_repo(REPO)
        # Seeded: the pack layout (which blobs share a pack) must not vary between runs.
        rnd = random.Random(1)
        big = write(src / "t" / "A.bin", rnd.randbytes(10 << 20))  # chunks, then manifest
        other = write(src / "t" / "B.bin", rnd.randbytes(3 << 19))  # packed with the manifest
        assert put(store, "/", src / "t", recursive=True).read == 2
        store.discard(REPO, "main")
        put(store, "/B.bin", other)
        store.commit(REPO, "main", "B only")  # keeps the manifest's pack alive
        assert collect(store, grace=0).packs_deleted > 0

        put(store, "/A.bin", big)
        store.commit(REPO, "main", "A too")
        assert vfs.read_file(store, ref(f"{REPO}@main:/A.bin")) == big.read_bytes()
        _assert_fsck_ok(store)


# -- shape changes: files and directories replacing each other ------------------------------


def test_rm_recursive_then_put(repo: vfs.Store, src: Path) -> None:
    write(src / "d" / "x", "x")
    write(src / "d" / "sub" / "y", "y")
    put(repo, "/d", src / "d", recursive=True)
    repo.commit(REPO, "main", "one")
    assert vfs.remove(repo, REPO, "main", "/d", recursive=True) == 2
    put(repo, "/d/z", write(src / "z", "z"))
    repo.commit(REPO, "main", "two")
    assert files_of(repo, f"{REPO}@main") == {"d": "<dir>", "d/z": b"z"}


def test_rm_recursive_then_put_within_one_open_commit(repo: vfs.Store, src: Path) -> None:
    write(src / "d" / "x", "x")
    put(repo, "/d", src / "d", recursive=True)
    vfs.remove(repo, REPO, "main", "/d", recursive=True)
    put(repo, "/d/y", write(src / "y", "y"))
    repo.commit(REPO, "main", "one")
    assert files_of(repo, f"{REPO}@main") == {"d": "<dir>", "d/y": b"y"}


def test_put_file_onto_a_directory_goes_inside_it(repo: vfs.Store, src: Path) -> None:
    # Like cp: a single file put at an existing directory lands in it under its own name.
    put(repo, "/d/old", write(src / "old", "old"))
    repo.commit(REPO, "main", "one")
    put(repo, "/d", write(src / "new", "new"))
    repo.commit(REPO, "main", "two")
    assert files_of(repo, f"{REPO}@main") == {"d": "<dir>", "d/new": b"new", "d/old": b"old"}


def test_put_file_where_a_directory_was_after_rm(repo: vfs.Store, src: Path) -> None:
    put(repo, "/p/inner", write(src / "inner", "i"))
    repo.commit(REPO, "main", "one")
    vfs.remove(repo, REPO, "main", "/p", recursive=True)
    put(repo, "/p", write(src / "file", "now a file"))
    repo.commit(REPO, "main", "two")
    assert files_of(repo, f"{REPO}@main") == {"p": b"now a file"}


def test_put_directory_where_a_file_is_replaces_it(repo: vfs.Store, src: Path) -> None:
    put(repo, "/p", write(src / "file", "a file"))
    repo.commit(REPO, "main", "one")
    write(src / "dir" / "x", "x")
    put(repo, "/p", src / "dir", recursive=True)
    repo.commit(REPO, "main", "two")
    assert files_of(repo, f"{REPO}@main") == {"p": "<dir>", "p/x": b"x"}
    assert files_of(repo, f"{REPO}@main~1") == {"p": b"a file"}


def test_put_below_a_file_replaces_the_file_with_a_directory(repo: vfs.Store,
                                                             src: Path) -> None:
    put(repo, "/a", write(src / "f", "file a"))
    repo.commit(REPO, "main", "one")
    put(repo, "/a/b/c", write(src / "g", "deep"))
    repo.commit(REPO, "main", "two")
    assert files_of(repo, f"{REPO}@main") == {"a": "<dir>", "a/b": "<dir>", "a/b/c": b"deep"}


def test_put_with_a_trailing_slash_goes_inside(repo: vfs.Store, src: Path) -> None:
    put(repo, "/new/", write(src / "f", "f"))  # "new" does not exist yet
    put(repo, "/file", write(src / "g", "g"))
    put(repo, "/file/", write(src / "h", "h"))  # a file in the way becomes a directory
    repo.commit(REPO, "main", "one")
    assert files_of(repo, f"{REPO}@main") == {
        "new": "<dir>", "new/f": b"f", "file": "<dir>", "file/h": b"h"}


def test_put_delete_mirrors_a_directory(repo: vfs.Store, src: Path) -> None:
    write(src / "d" / "a", "a")
    write(src / "d" / "b", "b")
    write(src / "d" / "sub" / "c", "c")
    put(repo, "/m", src / "d", recursive=True)
    put(repo, "/other", write(src / "other", "untouched"))
    repo.commit(REPO, "main", "one")
    (src / "d" / "b").unlink()
    (src / "d" / "sub" / "c").unlink()
    write(src / "d" / "a", "a2")
    result = vfs.put(repo, REPO, "main", "/m", [str(src / "d")], recursive=True, delete=True)
    assert result.deleted == 2
    repo.commit(REPO, "main", "mirror")
    assert files_of(repo, f"{REPO}@main") == {
        "m": "<dir>", "m/a": b"a2", "m/sub": "<dir>", "other": b"untouched"}
    with pytest.raises(InvalidPath, match="exactly one directory"):
        vfs.put(repo, REPO, "main", "/m", [str(src / "other")], delete=True)


def test_rm_root_empties_the_repository(repo: vfs.Store, src: Path) -> None:
    write(src / "t" / "a", "a")
    write(src / "t" / "d" / "b", "b")
    put(repo, "/", src / "t", recursive=True)
    repo.commit(REPO, "main", "one")
    assert vfs.remove(repo, REPO, "main", "/", recursive=True) == 2
    repo.commit(REPO, "main", "empty")
    assert files_of(repo, f"{REPO}@main") == {}
    put(repo, "/again", write(src / "again", "x"))
    repo.commit(REPO, "main", "refill")
    assert files_of(repo, f"{REPO}@main") == {"again": b"x"}


# -- get ---------------------------------------------------------------------------------------


def _sample_tree(root: Path) -> dict[str, bytes]:
    content = {
        "small.txt": b"hello",
        "exec.sh": b"#!/bin/sh\necho hi\n",
        "big/chunked.bin": os.urandom(1_500_000),
        "big/empty": b"",
        "deep/er/still/file": b"x" * 5000,
    }
    for path, data in content.items():
        write(root / path, data)
    (root / "exec.sh").chmod(0o755)
    (root / "small.txt").chmod(0o600)
    (root / "link").symlink_to("small.txt")
    (root / "dangling").symlink_to("/no/such/target")
    (root / "empty-dir").mkdir()
    os.utime(root / "small.txt", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    return content


def test_get_round_trips_bytes_modes_and_symlinks(repo: vfs.Store, tmp_path: Path,
                                                  src: Path) -> None:
    content = _sample_tree(src / "t")
    put(repo, "/", src / "t", recursive=True)
    repo.commit(REPO, "main", "sample")
    out = tmp_path / "out"
    result = vfs.get(repo, ref(f"{REPO}@main"), str(out))
    assert result.files == len(content) + 2
    assert result.bytes == sum(len(v) for v in content.values())
    for path, data in content.items():
        assert (out / path).read_bytes() == data, path
    assert stat.S_IMODE((out / "exec.sh").stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "small.txt").stat().st_mode) == 0o600
    assert (out / "small.txt").stat().st_mtime_ns == 1_600_000_000_123_456_789
    assert os.readlink(out / "link") == "small.txt"
    assert os.readlink(out / "dangling") == "/no/such/target"
    assert (out / "empty-dir").is_dir() and not list((out / "empty-dir").iterdir())
    assert not list(out.rglob("*.vfs-partial"))

    # One file, into an existing directory and to a new name.
    single = tmp_path / "single"
    single.mkdir()
    vfs.get(repo, ref(f"{REPO}@main:/big/chunked.bin"), str(single))
    assert (single / "chunked.bin").read_bytes() == content["big/chunked.bin"]
    vfs.get(repo, ref(f"{REPO}@main:/exec.sh"), str(single / "renamed.sh"))
    assert (single / "renamed.sh").read_bytes() == content["exec.sh"]
    # A subdirectory's contents go under dest.
    vfs.get(repo, ref(f"{REPO}@main:/deep"), str(tmp_path / "sub"))
    assert (tmp_path / "sub" / "er" / "still" / "file").read_bytes() == b"x" * 5000


def test_get_refuses_to_overwrite_and_writes_nothing(repo: vfs.Store, tmp_path: Path,
                                                     src: Path) -> None:
    _sample_tree(src / "t")
    put(repo, "/", src / "t", recursive=True)
    repo.commit(REPO, "main", "sample")
    out = tmp_path / "out"
    write(out / "deep" / "er" / "still" / "file", "mine")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(AlreadyExists, match="refusing to overwrite"):
        vfs.get(repo, ref(f"{REPO}@main"), str(out))
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert (out / "deep" / "er" / "still" / "file").read_text() == "mine"

    existing = write(tmp_path / "one.txt", "mine")
    with pytest.raises(AlreadyExists):
        vfs.get(repo, ref(f"{REPO}@main:/small.txt"), str(existing))
    assert existing.read_text() == "mine"
    # A file where get needs a directory is refused too.
    blocker = write(tmp_path / "blocked" / "big", "a file, not a dir")
    with pytest.raises(AlreadyExists):
        vfs.get(repo, ref(f"{REPO}@main"), str(tmp_path / "blocked"))
    assert sorted(p.name for p in (tmp_path / "blocked").iterdir()) == ["big"]
    assert blocker.read_text() == "a file, not a dir"


def test_get_never_touches_a_local_file_named_like_its_temporary(repo: vfs.Store,
                                                                tmp_path: Path,
                                                                src: Path) -> None:
    # get writes each file to "<target>.vfs-partial" and renames it into place. A file of
    # the user's that happens to have that name must not be truncated and renamed away:
    # "existing files are never overwritten".
    put(repo, "/f", write(src / "f", "from the repository"))
    repo.commit(REPO, "main", "one")
    out = tmp_path / "out"
    mine = write(out / "f.vfs-partial", "the user's own data")
    vfs.get(repo, ref(f"{REPO}@main:/f"), str(out))
    assert (out / "f").read_text() == "from the repository"
    assert mine.exists() and mine.read_text() == "the user's own data"


def test_get_of_names_that_collide_with_its_temporaries(repo: vfs.Store, tmp_path: Path,
                                                        src: Path) -> None:
    # A repository may hold both "f" and a directory "f.vfs-partial": get must materialize
    # it (today writing "f" opens the directory as its temporary file and fails with a
    # raw IsADirectoryError, leaving a partial tree).
    write(src / "t" / "f", "file f")
    write(src / "t" / "f.vfs-partial" / "x", "inside")
    put(repo, "/", src / "t", recursive=True)
    repo.commit(REPO, "main", "one")
    vfs.get(repo, ref(f"{REPO}@main"), str(tmp_path / "out"))
    assert (tmp_path / "out" / "f").read_text() == "file f"
    assert (tmp_path / "out" / "f.vfs-partial" / "x").read_text() == "inside"


def test_get_of_a_missing_path(repo: vfs.Store, tmp_path: Path, src: Path) -> None:
    put(repo, "/a", write(src / "a", "a"))
    repo.commit(REPO, "main", "one")
    with pytest.raises(PathNotFound):
        vfs.get(repo, ref(f"{REPO}@main:/b"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


# -- rollback -----------------------------------------------------------------------------------


def test_rollback_makes_a_new_commit_and_keeps_history(repo: vfs.Store, src: Path) -> None:
    put(repo, "/f", write(src / "f", "v1"))
    c1 = repo.commit(REPO, "main", "v1")
    put(repo, "/f", write(src / "f", "v2"))
    put(repo, "/g", write(src / "g", "g"))
    c2 = repo.commit(REPO, "main", "v2")

    back = repo.rollback(REPO, "main", ref(f"{REPO}@{c1.id[:8]}"))
    assert back.id not in (c1.id, c2.id)
    assert back.tree == c1.tree
    assert back.parents == (c2.id,)
    assert back.metadata == {"rollback_to": c1.id}
    assert repo.head(REPO, "main").commit == back.id
    assert [c.id for c in repo.log(ref(f"{REPO}@main"))] == [back.id, c2.id, c1.id]
    assert files_of(repo, f"{REPO}@main") == {"f": b"v1"}
    last = repo.reflog(REPO, "main")[-1]
    assert (last.old, last.new) == (c2.id, back.id)
    assert c1.id in last.why and "rollback" in last.why

    # Rolling forward again works the same way, by ancestor reference.
    again = repo.rollback(REPO, "main", ref(f"{REPO}@main~1"))
    assert again.tree == c2.tree
    assert files_of(repo, f"{REPO}@main") == {"f": b"v2", "g": b"g"}


def test_rollback_refusals(repo: vfs.Store, src: Path) -> None:
    with pytest.raises(CommitNotFound):
        repo.rollback(REPO, "main", ref(f"{REPO}@main"))  # no commits yet
    put(repo, "/f", write(src / "f", "v1"))
    c1 = repo.commit(REPO, "main", "v1")
    with pytest.raises(NothingToCommit):
        repo.rollback(REPO, "main", ref(f"{REPO}@{c1.id}"))  # already there
    repo.create_repo("other")
    with pytest.raises(InvalidRef):
        repo.rollback(REPO, "main", ref("other@main"))
    put(repo, "/f", write(src / "f", "v2"))
    with pytest.raises(VfsError, match="staged changes"):
        repo.rollback(REPO, "main", ref(f"{REPO}@{c1.id}"))
    repo.discard(REPO, "main")


def test_commit_after_rollback_is_not_a_conflict(repo: vfs.Store, src: Path) -> None:
    # A put that changed nothing must not pin the open commit's base: after a rollback
    # moves the branch, a new change to the rolled-back path is made on the new head and
    # must commit cleanly. (Today the empty put records the old head as the base, the
    # rollback keeps it, and commit then reports a Conflict with the rollback itself.)
    put(repo, "/a", write(src / "a", "1"))
    c1 = repo.commit(REPO, "main", "1")
    put(repo, "/a", write(src / "a", "2"))
    repo.commit(REPO, "main", "2")
    assert put(repo, "/a", src / "a").changes == {}  # unchanged: stages nothing
    repo.rollback(REPO, "main", ref(f"{REPO}@{c1.id}"))
    put(repo, "/a", write(src / "a", "3"))
    repo.commit(REPO, "main", "3")
    assert files_of(repo, f"{REPO}@main") == {"a": b"3"}


# -- resolving refs ------------------------------------------------------------------------------


def test_commit_prefixes_and_ancestors(repo: vfs.Store, src: Path) -> None:
    ids = []
    for i in range(4):
        put(repo, "/f", write(src / "f", f"v{i}"))
        ids.append(repo.commit(REPO, "main", f"v{i}").id)
    for commit_id in ids:
        assert repo.resolve(ref(f"{REPO}@{commit_id[:6]}")).id == commit_id
        assert repo.resolve(ref(f"{REPO}@{commit_id}")).id == commit_id
    assert repo.resolve(ref(f"{REPO}@main")).id == ids[-1]
    assert repo.resolve(ref(f"{REPO}@main~3")).id == ids[0]
    assert repo.resolve(ref(f"{REPO}@{ids[2][:7]}~2")).id == ids[0]
    with pytest.raises(CommitNotFound, match="history is shorter"):
        repo.resolve(ref(f"{REPO}@main~4"))

    missing = next(p for p in (f"{n:06x}" for n in range(1 << 24))
                   if not any(i.startswith(p) for i in ids))
    with pytest.raises(CommitNotFound, match=f"no branch or commit {missing}"):
        repo.resolve(ref(f"{REPO}@{missing}"))
    with pytest.raises(BranchNotFound):
        repo.resolve(ref(f"{REPO}@nobranch"))
    with pytest.raises(RepoNotFound):
        repo.resolve(ref(f"nope@{ids[0][:6]}"))
    # A commit of another repository is not found through this one.
    repo.create_repo("other")
    with pytest.raises(CommitNotFound):
        repo.resolve(ref(f"other@{ids[0][:6]}"))


def test_branch_names_win_over_commit_prefixes(repo: vfs.Store, src: Path) -> None:
    put(repo, "/f", write(src / "f", "one"))
    first = repo.commit(REPO, "main", "one")
    put(repo, "/f", write(src / "f", "two"))
    second = repo.commit(REPO, "main", "two")
    # A branch whose name looks like a prefix of the second commit, pointing at the first.
    repo.create_branch(REPO, second.id[:8], ref(f"{REPO}@{first.id}"))
    assert repo.resolve(ref(f"{REPO}@{second.id[:8]}")).id == first.id
    assert repo.resolve(ref(f"{REPO}@{second.id[:9]}")).id == second.id


# Two commit objects of repository "data" whose ids share the first 6 hex digits
# (found once by brute force over the message; the ids are BLAKE3 hashes).
_FORGED = ("forged 102", "forged 562")


def _forged_commit(message: str) -> Commit:
    return Commit(repo=REPO, branch="main", parents=(), tree="00" * 32, message=message,
                  author="t", time="2020-01-01T00:00:00.000000Z").with_id()


def test_ambiguous_commit_prefix(repo: vfs.Store) -> None:
    a, b = (_forged_commit(m) for m in _FORGED)
    assert a.id[:6] == b.id[:6] and a.id != b.id
    for commit in (a, b):
        repo.objects.put(commit_key(commit.id), commit.encode())
    with pytest.raises(AmbiguousRef, match="give more digits"):
        repo.resolve(ref(f"{REPO}@{a.id[:6]}"))
    differ = next(i for i in range(6, 64) if a.id[i] != b.id[i]) + 1
    assert repo.resolve(ref(f"{REPO}@{a.id[:differ]}")).id == a.id
    assert repo.resolve(ref(f"{REPO}@{b.id[:differ]}")).id == b.id
    for commit in (a, b):  # unreachable junk; keep the teardown fsck about real data
        repo.objects.delete(commit_key(commit.id))


# -- reopening: open commits and interrupted state live in the node-local index -----------


def test_open_commit_survives_reopening_the_store(tmp_path: Path, src: Path) -> None:
    with _open(tmp_path / "s", tmp_path / "c", create=True) as store:
        store.create_repo(REPO)
        put(store, "/a", write(src / "a", "a"))
        first = store.commit(REPO, "main", "one")
        put(store, "/b/c", write(src / "c", os.urandom(5000)))
        vfs.remove(store, REPO, "main", "/a")
    with _open(tmp_path / "s", tmp_path / "c") as store:
        assert store.head(REPO, "main").commit == first.id
        assert staged_paths(store) == {"a": "deleted", "b": DIR, "b/c": FILE}
        second = store.commit(REPO, "main", "two")
        assert second.parents == (first.id,)
        assert files_of(store, f"{REPO}@main") == {"b": "<dir>", "b/c": (src / "c").read_bytes()}
        _assert_fsck_ok(store)


def test_a_node_reads_commits_written_by_another_node(tmp_path: Path, src: Path) -> None:
    # Nodes share the object store, each with its own index (docs/format.md, "Node").
    # A node must be able to read a commit another node wrote: a blob missing from its
    # local index should make it learn the new index/<pack> objects, not fail with
    # "Corruption: ... not in the local index" on perfectly healthy data.
    with _open(tmp_path / "s", tmp_path / "c1", create=True) as one:
        one.create_repo(REPO)
        put(one, "/a", write(src / "a", os.urandom(5000)))
        one.commit(REPO, "main", "one")
        with _open(tmp_path / "s", tmp_path / "c2") as two:
            assert files_of(two, f"{REPO}@main") == {"a": (src / "a").read_bytes()}
            _assert_fsck_ok(two)


def test_open_commits_are_node_local(tmp_path: Path, src: Path) -> None:
    with _open(tmp_path / "s", tmp_path / "c1", create=True) as one:
        one.create_repo(REPO)
        put(one, "/a", write(src / "a", "a"))
        with _open(tmp_path / "s", tmp_path / "c2") as two:
            assert staged_paths(two) == {}
            with pytest.raises(NothingToCommit):
                two.commit(REPO, "main")
        assert staged_paths(one) == {"a": FILE}
        one.commit(REPO, "main", "one")
        _assert_fsck_ok(one)


def _learn_other_nodes_packs(store: vfs.Store) -> None:
    # Works around nodes not learning each other's packs on read (see the test above).
    fsck.rebuild_index(store)


def test_commit_rebases_onto_another_nodes_disjoint_change(tmp_path: Path,
                                                          src: Path) -> None:
    with _open(tmp_path / "s", tmp_path / "c1", create=True) as one:
        one.create_repo(REPO)
        put(one, "/a", write(src / "a", "a"))
        base = one.commit(REPO, "main", "one")
        put(one, "/b", write(src / "b", "b"))
        with _open(tmp_path / "s", tmp_path / "c2") as two:
            _learn_other_nodes_packs(two)
            put(two, "/c", write(src / "c", "c"))
            theirs = two.commit(REPO, "main", "from two")
            _assert_fsck_ok(two)
        _learn_other_nodes_packs(one)
        merged = one.commit(REPO, "main", "from one")
        assert merged.parents == (theirs.id,) and theirs.parents == (base.id,)
        assert files_of(one, f"{REPO}@main") == {"a": b"a", "b": b"b", "c": b"c"}
        _assert_fsck_ok(one)


def test_conflicting_change_from_another_node(tmp_path: Path, src: Path) -> None:
    with _open(tmp_path / "s", tmp_path / "c1", create=True) as one:
        one.create_repo(REPO)
        put(one, "/d/a", write(src / "a", "a"))
        base = one.commit(REPO, "main", "one")
        put(one, "/d/a", write(src / "a1", "from one"))
        with _open(tmp_path / "s", tmp_path / "c2") as two:
            _learn_other_nodes_packs(two)
            put(two, "/d/a", write(src / "a2", "from two"))
            theirs = two.commit(REPO, "main", "from two")
        _learn_other_nodes_packs(one)
        with pytest.raises(Conflict, match="discard"):
            one.commit(REPO, "main", "from one")
        assert one.head(REPO, "main").commit == theirs.id != base.id
        assert one.discard(REPO, "main") == 1  # the open commit is kept until discarded
        _assert_fsck_ok(one)


# -- store format ---------------------------------------------------------------------------------


def test_newer_format_version_is_refused(tmp_path: Path) -> None:
    with _open(tmp_path / "s", tmp_path / "c", create=True) as store:
        raw = json.loads(store.objects.get("config"))
        raw["format_version"] = 99
        store.objects.put("config", canonical_json(raw))
    with pytest.raises(UnsupportedFormat, match="format version 99") as info:
        _open(tmp_path / "s", tmp_path / "c")
    assert "upgrade vfs" in str(info.value)
    # create=True on an existing store reads its config: refused the same way.
    with pytest.raises(UnsupportedFormat):
        _open(tmp_path / "s", tmp_path / "c", create=True)


def test_open_store_that_does_not_exist(tmp_path: Path) -> None:
    from vfs.errors import StoreNotFound

    with pytest.raises(StoreNotFound, match="vfsctl init"):
        _open(tmp_path / "nothing", tmp_path / "c")


def test_create_is_idempotent_and_keeps_the_config(tmp_path: Path) -> None:
    with _open(tmp_path / "s", tmp_path / "c", create=True) as store:
        store_id = store.config.store_id
    with _open(tmp_path / "s", tmp_path / "c", create=True) as store:
        assert store.config.store_id == store_id


def test_long_paths_stage_commit_and_unstage(repo: vfs.Store, tmp_path: Path) -> None:
    """Paths longer than an LMDB key (511 bytes) up to the 1024-byte limit: staged,
    listed, committed, removed with their directory; longer ones are refused clearly."""
    deep = "/".join(c * 200 for c in "abcd")  # 803 bytes
    src = tmp_path / "f.txt"
    src.write_bytes(b"long")
    vfs.put(repo, REPO, "main", f"/{deep}/f.txt", [str(src)])
    vfs.put(repo, REPO, "main", f"/{deep}/g.txt", [str(src)])
    assert f"{deep}/f.txt" in repo.index.staged(REPO, "main")
    repo.commit(REPO, "main", "deep")
    assert vfs.read_file(repo, ref(f"{REPO}@main:/{deep}/f.txt")) == b"long"
    assert repo.index.staged(REPO, "main") == {}
    # Removing a directory whose own key is long drops the long keys below it.
    vfs.put(repo, REPO, "main", f"/{deep}/h.txt", [str(src)])
    vfs.remove(repo, REPO, "main", "/" + deep.rsplit("/", 1)[0], recursive=True)
    staged = repo.index.staged(REPO, "main")
    assert not any(p.startswith(deep) for p in staged), staged
    repo.commit(REPO, "main", "gone")
    _, snapshot = repo.snapshot(ref(f"{REPO}@main"))
    assert snapshot.lookup("a" * 200) is not None
    assert snapshot.lookup(deep) is None
    with pytest.raises(PathTooLong, match="longer than 1024 bytes"):
        vfs.put(repo, REPO, "main", "/" + "/".join(["x" * 250] * 5), [str(src)])
    with pytest.raises(PathTooLong):
        vfs.put(repo, REPO, "main", "/" + "y" * 256, [str(src)])


def test_files_cache_of_long_local_paths(repo: vfs.Store, tmp_path: Path) -> None:
    """A source file whose local path is longer than an LMDB key is put, and put
    again from the files cache."""
    directory = tmp_path
    for c in "pqr":
        directory = directory / (c * 200)
    directory.mkdir(parents=True)
    (directory / "x.bin").write_bytes(b"x" * 5000)
    first = vfs.put(repo, REPO, "main", "/x.bin", [str(directory / "x.bin")])
    assert first.read == 1
    second = vfs.put(repo, REPO, "main", "/x.bin", [str(directory / "x.bin")])
    assert second.cached == 1


# -- sources that are not files: FIFOs, devices ----------------------------------------------

_PUT_IN_A_CHILD = """
import resource, sys
import vfs
# A put that reads /dev/zero would eat memory until it is killed: fail fast instead.
resource.setrlimit(resource.RLIMIT_DATA, (1 << 30, 1 << 30))
store = vfs.open_store(sys.argv[1], cache_dir=sys.argv[2])
try:
    vfs.put(store, "data", "main", "/x", [sys.argv[3]])
    print("staged")
except vfs.VfsError as exc:
    print(type(exc).__name__, exc)
"""


def _put_in_a_child(store: vfs.Store, source: str) -> str:
    """Put ``source`` from another process, so that a hang fails the test, not blocks it."""
    store_dir = store.objects.root
    cache_dir = os.path.dirname(store.cache_dir)
    try:
        proc = subprocess.run([sys.executable, "-c", _PUT_IN_A_CHILD, store_dir, cache_dir,
                               source], capture_output=True, timeout=20, text=True)
    except subprocess.TimeoutExpired:
        pytest.fail(f"put of {source} hung")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero"])
def test_put_refuses_a_source_that_is_not_a_regular_file(repo: vfs.Store, src: Path,
                                                         kind: str) -> None:
    if kind == "fifo":
        source = src / "pipe"
        os.mkfifo(source)
    else:
        source = Path(kind)
    out = _put_in_a_child(repo, str(source))
    assert out.startswith("InvalidPath") and str(source) in out, out
    assert staged_paths(repo) == {}


def test_put_of_a_directory_skips_the_special_files_in_it(repo: vfs.Store, src: Path) -> None:
    write(src / "d" / "file", "data")
    os.mkfifo(src / "d" / "pipe")
    os.mkfifo(src / "d" / "sub-pipe")
    result = put(repo, "/d", src / "d", recursive=True)
    assert staged_paths(repo) == {"d": DIR, "d/file": FILE}
    assert result.skipped == [str(src / "d" / "pipe"), str(src / "d" / "sub-pipe")]
    repo.discard(REPO, "main")
