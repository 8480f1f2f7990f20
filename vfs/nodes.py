"""Node records: what every node using a store publishes for gc (docs/format.md §10.2).

A *node* is one cache directory (one LMDB index) using a store: a worker running
vfsd, or a machine where vfsctl works on the store directly. Its identity (a random
id and a name) is kept in ``<cache>/<store id>/node.json``.

Before a write first relies on the node's view of gc's condemnations, the node's
record in the store says *active*; a command-line process that finishes its writes
marks it *idle* again. The record also names the node's **pins** (the base commits
and staged entries of its open commits, which no ref names yet) and its
**acknowledgement** ``gc_seen``: the newest condemnation it had read. gc carries a
condemnation out only when every active node acknowledged it.

A vfsd's record is also its **heartbeat** (docs/format.md §10.2): it says ``vfsd``,
how many datums the node runs now, and is refreshed every third of its ttl, so
``vfsctl nodes`` shows every worker node, what it does, and whether it is alive. Two
live vfsd never share a name (:func:`unique_name`).
"""

from __future__ import annotations

import json
import os
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass

import blake3

from vfs.errors import AlreadyExists, Corruption, ObjectNotFound, PreconditionFailed
from vfs.objstore.base import ObjectStore
from vfs.refs import canonical_json, now_iso
from vfs.staging import decode_change

RECORDS = "nodes/"
DEFAULT_TTL = 300.0  # seconds an active record stays fresh without a refresh
ACTIVE = "active"
IDLE = "idle"


def record_key(node_id: str) -> str:
    return f"{RECORDS}{node_id}"


def clock_key(node_id: str) -> str:
    return f"gc/clock/{node_id}"


@dataclass(frozen=True)
class NodeIdentity:
    id: str
    name: str


def node_identity(directory: str) -> NodeIdentity:
    """This node's id and name, made on first use (``$VFS_NODE_NAME`` names it)."""
    path = os.path.join(directory, "node.json")
    try:
        with open(path) as f:
            raw = json.load(f)
        return NodeIdentity(raw["id"], os.environ.get("VFS_NODE_NAME") or raw["name"])
    except FileNotFoundError:
        pass
    except (ValueError, KeyError, TypeError) as exc:
        raise Corruption(
            f"{path} is damaged ({exc}): delete it to give the node a new id") from exc
    identity = NodeIdentity(secrets.token_hex(16),
                            os.environ.get("VFS_NODE_NAME") or socket.gethostname())
    tmp = _write_identity(path, identity)
    try:
        os.link(tmp, path)  # two processes starting at once agree on one id
    except FileExistsError:
        os.unlink(tmp)
        return node_identity(directory)
    os.unlink(tmp)
    return identity


def _write_identity(path: str, identity: NodeIdentity) -> str:
    """Write ``identity`` to a temporary file beside ``path``; return its name."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump({"id": identity.id, "name": identity.name}, f)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def rename_identity(directory: str, identity: NodeIdentity, name: str) -> NodeIdentity:
    """Keep ``name`` as this node's default name from now on (``$VFS_NODE_NAME``
    still overrides it)."""
    path = os.path.join(directory, "node.json")
    renamed = NodeIdentity(identity.id, name)
    os.replace(_write_identity(path, renamed), path)
    return renamed


def store_now(objects: ObjectStore, node_id: str) -> float:
    """The store's current time: the modification time of an object just written.

    Every age gc compares (grace, staleness) is taken from the store, so the
    clocks of the nodes never enter (docs/format.md §10, G5).
    """
    key = clock_key(node_id)
    objects.put(key, b"")
    return objects.stat(key).mtime


@dataclass(frozen=True)
class NodeRecord:
    """One node's record as read from the store; ``mtime`` is its store time."""

    node: str
    name: str
    state: str
    ttl: float
    gc_seen: int
    pins: str | None
    written: str
    mtime: float = 0.0
    vfsd: bool = False  # a vfsd's heartbeat: refreshed every ttl / 3 while it runs
    running: int = 0  # datums the node was running when it wrote the record

    def encode(self) -> bytes:
        return canonical_json({"v": 1, "node": self.node, "name": self.name,
                               "state": self.state, "ttl": self.ttl,
                               "gc_seen": self.gc_seen, "pins": self.pins,
                               "written": self.written, "vfsd": self.vfsd,
                               "running": self.running})

    def alive(self, now: float) -> bool:
        """Active and refreshed within its ttl at store time ``now``."""
        return self.state == ACTIVE and now - self.mtime <= self.ttl

    def matches(self, name_or_id: str) -> bool:
        return name_or_id in (self.node, self.name)


def read_records(objects: ObjectStore) -> list[NodeRecord]:
    """Every node record in the store.

    Raises:
        Corruption: a record cannot be decoded (gc must not guess around it).
    """
    records = []
    for info in objects.list(RECORDS):
        try:
            raw = json.loads(objects.get(info.key))
        except ObjectNotFound:
            continue  # the node was forgotten meanwhile
        except ValueError as exc:
            raise Corruption(f"node record {info.key} is damaged: {exc}") from exc
        try:
            record = NodeRecord(str(raw["node"]), str(raw["name"]), str(raw["state"]),
                                float(raw["ttl"]), int(raw["gc_seen"]), raw["pins"],
                                str(raw["written"]), info.mtime,
                                bool(raw.get("vfsd", False)), int(raw.get("running", 0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise Corruption(f"node record {info.key} is damaged: {exc!r}") from exc
        if record.pins is not None and not isinstance(record.pins, str):
            raise Corruption(f"node record {info.key} is damaged: pins is not a key")
        records.append(record)
    return records


@dataclass(frozen=True)
class Pins:
    """What a node's open commits reference that no ref names yet."""

    bases: list[str]
    entries: list[list]  # [kind, ref] of every staged entry

    def encode(self) -> bytes:
        return canonical_json({"bases": self.bases, "entries": self.entries})


def read_pins(objects: ObjectStore, key: str) -> Pins:
    """Raises ObjectNotFound (the node replaced them meanwhile) or Corruption."""
    data = objects.get(key)
    try:
        raw = json.loads(data)
        return Pins([str(b) for b in raw["bases"]], [list(e) for e in raw["entries"]])
    except (ValueError, KeyError, TypeError) as exc:
        raise Corruption(f"pins {key} are damaged: {exc!r}") from exc


def collect_pins(index) -> Pins | None:
    """The pins of every open commit in this node's index (None if there is none)."""
    bases: set[str] = set()
    entries: set[tuple[str, str]] = set()
    for repo, branch in index.open_commits():
        base = index.staging_base(repo, branch)
        if base:
            bases.add(base)
        for value in index.staged(repo, branch).values():
            entry = decode_change(value)
            if entry is not None and entry.ref and not entry.ref.startswith("i:"):
                entries.add((entry.kind, entry.ref))
    if not bases and not entries:
        return None
    return Pins(sorted(bases), [list(e) for e in sorted(entries)])


class Presence:
    """Publishes this node's record (see the module docstring).

    Args:
        objects: the store.
        index: this node's index (it keeps what was last published).
        identity: this node.
        ttl: how long an active record stays fresh.
    """

    def __init__(self, objects: ObjectStore, index, identity: NodeIdentity, *,
                 ttl: float = DEFAULT_TTL) -> None:
        self.objects = objects
        self.index = index
        self.identity = identity
        self.ttl = ttl
        #: Set by vfsd (Store.keep_active): the record is a heartbeat.
        self.vfsd = False
        #: How many datums the node runs now (vfsd sets it to its pipeline watcher's).
        self.running_datums: Callable[[], int] = lambda: 0

    def publish(self, state: str, *, gc_seen: int | None = None) -> NodeRecord:
        """Write the node's record with fresh pins.

        ``gc_seen`` raises the acknowledgement; only a caller holding the node's
        lock exclusively may pass it (no write that checked against an older view
        may still be in flight). Without it the last acknowledgement is kept.
        """
        last = self.index.node_state()
        seen = last.gc_seen if gc_seen is None else max(gc_seen, last.gc_seen)
        pins = collect_pins(self.index)
        pins_key = None
        if pins is not None:
            data = pins.encode()
            pins_key = f"pins/{self.identity.id}/{blake3.blake3(data).hexdigest()[:32]}"
            if pins_key != last.pins:
                try:
                    self.objects.put(pins_key, data, if_absent=True)
                except PreconditionFailed:
                    pass  # the same pins are stored already
        record = NodeRecord(self.identity.id, self.identity.name, state, self.ttl, seen,
                            pins_key, now_iso(), vfsd=self.vfsd,
                            running=self.running_datums() if self.vfsd else 0)
        self.objects.put(record_key(self.identity.id), record.encode())
        self.index.set_node_state(state, seen, pins_key)
        if last.pins and last.pins != pins_key:
            # gc reading the old record meanwhile re-reads it (read_pins raises
            # ObjectNotFound), so the old pins can go at once.
            self.objects.delete(last.pins)
        return record


def unique_name(objects: ObjectStore, identity: NodeIdentity, *, chosen: bool) -> str:
    """The name this node's vfsd should go by: none of another live vfsd's.

    Two vfsd on one host (each with its own cache, so its own id) would both default
    to the host name. A default name that another live vfsd holds becomes
    ``<name>-<first 6 digits of the id>``; a name the user chose is refused.

    Raises:
        AlreadyExists: ``chosen`` and a live vfsd of another node has that name.
    """
    now = store_now(objects, identity.id)
    try:
        records = read_records(objects)
    except Corruption:
        return identity.name  # gc reports the damaged record; a name is no reason to stop
    for record in records:
        if (record.node != identity.id and record.name == identity.name and record.vfsd
                and record.alive(now)):
            if not chosen:
                return f"{identity.name}-{identity.id[:6]}"
            raise AlreadyExists(
                f"node name {identity.name!r} is taken by the running vfsd of node "
                f"{record.node[:12]} (heartbeat {max(0.0, now - record.mtime):.0f} s ago): "
                "give this vfsd a name of its own with --node-name (or $VFS_NODE_NAME); if "
                f"that node is gone, its record goes stale within {record.ttl:g} s")
    return identity.name


def describe_nodes(objects: ObjectStore, node_id: str, *,
                   expiry: float = 86400.0) -> list[dict]:
    """Every node record with its age in store time and what gc makes of it.

    ``status`` is ``idle`` (no write in flight), ``alive`` (active and fresh),
    ``stale`` (active, silent longer than its ttl: gc will not delete) or
    ``expired`` (silent longer than ``expiry``: gc no longer waits for it).
    ``alive`` is true for the ``alive`` status; ``vfsd`` marks a vfsd's heartbeat, and
    ``running`` the datums that node ran at its last heartbeat (0 unless alive).
    """
    now = store_now(objects, node_id)
    out = []
    for record in sorted(read_records(objects), key=lambda r: (r.name, r.node)):
        age = max(0.0, now - record.mtime)
        if age >= expiry:
            status = "expired"
        elif record.state != ACTIVE:
            status = IDLE
        else:
            status = "alive" if age <= record.ttl else "stale"
        alive = status == "alive"
        out.append({"name": record.name, "id": record.node, "state": record.state,
                    "status": status, "alive": alive, "vfsd": record.vfsd,
                    "running": record.running if alive else 0,
                    "seen_seconds_ago": round(age, 1), "ttl": record.ttl,
                    "gc_seen": record.gc_seen, "pins": record.pins})
    return out
