"""vfs: a versioned data filesystem.

Repositories of plain files, versioned by immutable commits on branches, stored
deduplicated (content-defined chunks named by BLAKE3, zstd-compressed, packed)
in a local directory or an S3-compatible object store.

Typical use::

    import vfs

    store = vfs.open_store("/srv/vfs", create=True)
    store.create_repo("images")
    vfs.put(store, "images", "main", "/raw", ["./photos"], recursive=True)
    commit = store.commit("images", "main", "first photos")
    data = vfs.read_file(store, vfs.parse_ref("images@main:/raw/cat.png"))
"""

from __future__ import annotations

from vfs.errors import VfsError
from vfs.export import GetResult, cat, get
from vfs.ingest import PutResult, put, put_stream, remove
from vfs.names import RefSpec, parse_branch, parse_ref
from vfs.refs import Commit, ReflogEntry
from vfs.snapshot import Change, Snapshot
from vfs.store import BranchInfo, RepoInfo, Store, open_store
from vfs.tree import Entry

__all__ = [
    "BranchInfo",
    "Change",
    "Commit",
    "Entry",
    "GetResult",
    "PutResult",
    "RefSpec",
    "ReflogEntry",
    "RepoInfo",
    "Snapshot",
    "Store",
    "VfsError",
    "cat",
    "get",
    "open_store",
    "parse_branch",
    "parse_ref",
    "put",
    "put_stream",
    "read_file",
    "remove",
]


def read_file(store: Store, spec: RefSpec) -> bytes:
    """Return the whole content of the file ``spec`` names (``REPO@REF:/path``)."""
    import io

    out = io.BytesIO()
    cat(store, spec, out)
    return out.getvalue()
