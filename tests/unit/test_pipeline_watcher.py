"""The watcher's handling of failures it does not expect, in-process on a real store.

A runtime that raises something else than the errors it documents (a bug) must fail
the datums of that start with the exception's own message, never the whole job with
"ExceptionGroup: Exceptions from Trio nursery", and never take the daemon down.
"""

from __future__ import annotations

import pytest
import trio

import vfs
from daemon.runtimes import ContainerRun, Runtime
from daemon.watcher import Watcher, describe
from vfs.errors import InvalidSpec
from vfs.pipeline import records, registry
from vfs.pipeline.records import JobRecord
from vfs.pipeline.spec import parse_spec


class BrokenRuntime(Runtime):
    """A runtime whose start fails inside a trio nursery, as a bug would."""

    name = "process"

    def check(self, image: str | None) -> None:
        pass

    def image_digest(self, image: str | None) -> str:
        return "host"

    def unsupported_limits(self, memory, cpus, pids=None) -> list[str]:
        return []

    async def run(self, run: ContainerRun) -> list[int]:
        async def fail() -> None:
            raise ValueError("cannot convert float NaN to integer")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(fail)
        return [0] * len(run.datums)


async def _last_job(store: vfs.Store) -> JobRecord:
    with trio.fail_after(30):
        while True:
            jobs = await trio.to_thread.run_sync(records.list_jobs, store.objects, "edges")
            if jobs and jobs[-1].done:
                return jobs[-1]
            await trio.sleep(0.05)


@pytest.mark.expect_warnings  # the bug's traceback and the failed job are logged
@pytest.mark.trio
async def test_an_unexpected_error_fails_the_datum_with_its_message(store: vfs.Store,
                                                                    tmp_path) -> None:
    store.create_repo("images")
    registry.create(store, parse_spec({
        "pipeline": "edges", "input": {"repo": "images"}, "transform": {"cmd": ["true"]},
        "runtime": "process", "datum_tries": 1}))
    (tmp_path / "a.txt").write_bytes(b"a")
    vfs.put(store, "images", "main", "a.txt", [str(tmp_path / "a.txt")])
    store.commit("images", "main", "input")
    watcher = Watcher(store, str(tmp_path / "jobs"), poll_interval=0.05, debounce=0)
    watcher._runtimes["process"] = BrokenRuntime()
    async with trio.open_nursery() as nursery:
        await nursery.start(watcher.run)
        job = await _last_job(store)
        nursery.cancel_scope.cancel()
    assert job.state == "failed"
    assert "(/a.txt)" in job.error
    assert "ValueError: cannot convert float NaN to integer" in job.error
    assert "ExceptionGroup" not in job.error


def test_describe_flattens_exception_groups() -> None:
    group = ExceptionGroup("Exceptions from Trio nursery", [
        ExceptionGroup("inner", [ValueError("bad number")]), InvalidSpec("no image"),
        ValueError("bad number")])
    assert describe(group) == "ValueError: bad number; no image"
    assert describe(KeyError("x")) == "KeyError: 'x'"
