"""A vfsd's node record is its heartbeat: vfsd, running datums, alive; names unique.

Two nodes are two caches on one local store, as two vfsd on one host would be.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

import vfs
from vfs.errors import AlreadyExists
from vfs.nodes import describe_nodes, node_identity, read_records, record_key


def open_node(tmp_path: Path, cache: str) -> vfs.Store:
    return vfs.open_store(str(tmp_path / "store"), cache_dir=str(tmp_path / cache))


def age_record(tmp_path: Path, store: vfs.Store, seconds: float) -> None:
    record = tmp_path / "store" / record_key(store.node.id)
    past = time.time() - seconds
    os.utime(record, (past, past))


def test_a_vfsd_record_says_vfsd_and_how_many_datums_it_runs(
        store: vfs.Store, tmp_path: Path) -> None:
    running = [3]
    store.presence.running_datums = lambda: running[0]
    store.keep_active(9.0)
    with open_node(tmp_path, "other") as other:
        [mine] = [n for n in describe_nodes(other.objects, other.node.id)
                  if n["id"] == store.node.id]
        assert (mine["vfsd"], mine["alive"], mine["running"], mine["ttl"]) == (True, True, 3, 9.0)
        running[0] = 0
        store.heartbeat()
        [mine] = [n for n in describe_nodes(other.objects, other.node.id)
                  if n["id"] == store.node.id]
        assert mine["running"] == 0
        age_record(tmp_path, store, 10)  # silent longer than its ttl: the node died
        [mine] = [n for n in describe_nodes(other.objects, other.node.id)
                  if n["id"] == store.node.id]
        assert (mine["alive"], mine["status"], mine["running"]) == (False, "stale", 0)
        assert mine["seen_seconds_ago"] >= 10


def test_a_record_written_before_heartbeats_reads_as_no_vfsd(
        store: vfs.Store, tmp_path: Path) -> None:
    old = {"v": 1, "node": "ab" * 16, "name": "old", "state": "active", "ttl": 300.0,
           "gc_seen": 0, "pins": None, "written": "2026-01-01T00:00:00.000000Z"}
    store.objects.put(record_key("ab" * 16), json.dumps(old).encode())
    [record] = [r for r in read_records(store.objects) if r.name == "old"]
    assert (record.vfsd, record.running) == (False, 0)


def test_two_vfsd_on_one_host_never_share_a_name(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VFS_NODE_NAME", raising=False)
    with vfs.open_store(str(tmp_path / "store"), cache_dir=str(tmp_path / "a"),
                        create=True) as first:
        host = first.node.name
        assert first.claim_node_name(chosen=False) == host
        first.keep_active(30.0)
        with open_node(tmp_path, "b") as second:
            assert second.node.name == host  # the default: the host name, taken
            name = second.claim_node_name(chosen=False)
            assert name == f"{host}-{second.node.id[:6]}"
            assert second.node.name == name == second.presence.identity.name
            second.keep_active(30.0)
            # It keeps that name: the cache remembers it.
            assert node_identity(second.cache_dir).name == name
            names = {n["name"] for n in describe_nodes(first.objects, first.node.id)}
            assert {host, name} <= names
        monkeypatch.setenv("VFS_NODE_NAME", host)
        with open_node(tmp_path, "c") as chosen:
            with pytest.raises(AlreadyExists, match="--node-name"):
                chosen.claim_node_name(chosen=True)
            # Once the first node is silent longer than its ttl, the name is free.
            age_record(tmp_path, first, 31)
            assert chosen.claim_node_name(chosen=True) == host
