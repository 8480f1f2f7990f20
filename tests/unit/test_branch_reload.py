"""A branch view reloads without holding its lock while it reads the store.

The mount's requests on a branch take its view's lock (listings, counts, opens,
every change). A reload (another node's commit noticed, a ``vfsctl`` command through
the daemon) reads the store, which may take seconds: it must not hold them up, and
what they stage meanwhile must survive it.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

import vfs
from daemon.flusher import Flusher
from daemon.views import BranchView
from vfs.tree import DIR


@pytest.fixture
def view(store: vfs.Store, tmp_path: Path):
    store.create_repo("data")
    spool = tmp_path / "spool"
    spool.mkdir()
    flusher = Flusher(store, str(spool))
    flusher.start()
    try:
        yield BranchView(store, "data@main", "data", "main", flusher)
    finally:
        flusher.close()


def test_a_change_staged_while_a_reload_reads_the_store_survives_it(
        view: BranchView, store: vfs.Store, monkeypatch: pytest.MonkeyPatch) -> None:
    read, go_on = threading.Event(), threading.Event()
    real = store.open_commit

    def slow_open_commit(*args, **kwargs):
        found = real(*args, **kwargs)
        if not read.is_set():  # the first read only: a slow store
            read.set()
            assert go_on.wait(10)
        return found

    monkeypatch.setattr(store, "open_commit", slow_open_commit)
    reload = threading.Thread(target=view.reload)
    reload.start()
    assert read.wait(10)
    # The store is being read: the branch's lock is free for a change.
    def mkdir() -> None:
        with view.staging():
            view.mkdir("d", 0o755)

    staged = threading.Thread(target=mkdir)
    staged.start()
    staged.join(5)
    stuck = staged.is_alive()
    go_on.set()
    reload.join(10)
    staged.join(10)
    assert not stuck, "a change waited for a reload reading the store"
    entry = view.lookup("d")
    assert entry is not None and entry.kind == DIR, entry
    assert [change.path for change in view.open_commit.staged()] == ["d"]
