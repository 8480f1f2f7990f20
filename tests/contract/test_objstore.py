"""The ObjectStore contract, run against every backend, and tests of the wrappers."""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import pytest

from vfs.errors import (
    ObjectNotFound,
    PreconditionFailed,
    StoreAccessDenied,
    StoreFull,
    StoreNotFound,
    StoreUnavailable,
)
from vfs.objstore import MemoryStore, ObjectInfo, ObjectStore
from vfs.objstore.wrappers import CountingStore, FaultyStore, LoggingStore, RetryingStore

MIB = 1024 * 1024

# -- the contract -------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 1000, 5 * MIB], ids=["empty", "1B", "1000B", "5MiB"])
def test_put_get_round_trip(object_store: ObjectStore, size: int) -> None:
    data = os.urandom(size)
    tag = object_store.put("objects/one", data)
    assert isinstance(tag, str) and tag
    assert object_store.get("objects/one") == data
    assert object_store.get_tagged("objects/one") == (data, tag)
    assert object_store.stat("objects/one").size == size


def test_put_accepts_bytearray_and_memoryview(object_store: ObjectStore) -> None:
    object_store.put("a", bytearray(b"from a bytearray"))
    object_store.put("b", memoryview(b"from a memoryview"))
    assert object_store.get("a") == b"from a bytearray"
    assert object_store.get("b") == b"from a memoryview"


def test_put_replaces(object_store: ObjectStore) -> None:
    object_store.put("k", b"old contents")
    object_store.put("k", b"new")
    assert object_store.get("k") == b"new"
    assert object_store.stat("k").size == 3


def test_get_range(object_store: ObjectStore) -> None:
    data = bytes(range(256)) * 4
    object_store.put("packs/p", data)
    assert object_store.get_range("packs/p", 100, 50) == data[100:150]
    assert object_store.get_range("packs/p", 0, 1) == data[:1]
    assert object_store.get_range("packs/p", 1000, 100) == data[1000:]  # truncated at the end
    assert object_store.get_range("packs/p", 1024, 10) == b""  # starts at the end
    assert object_store.get_range("packs/p", 5000, 10) == b""  # starts past the end
    assert object_store.get_range("packs/p", 10, 0) == b""


def test_get_range_of_empty_object(object_store: ObjectStore) -> None:
    object_store.put("empty", b"")
    assert object_store.get_range("empty", 0, 10) == b""


@pytest.mark.parametrize(
    "read",
    [
        lambda s: s.get("no/such/key"),
        lambda s: s.get_range("no/such/key", 0, 10),
        lambda s: s.stat("no/such/key"),
        lambda s: s.get_tagged("no/such/key"),
    ],
    ids=["get", "get_range", "stat", "get_tagged"],
)
def test_missing_key_raises_object_not_found(object_store: ObjectStore, read) -> None:
    with pytest.raises(ObjectNotFound):
        read(object_store)


def test_exists(object_store: ObjectStore) -> None:
    assert not object_store.exists("k")
    object_store.put("k", b"")
    assert object_store.exists("k")


def test_delete(object_store: ObjectStore) -> None:
    object_store.put("k", b"data")
    object_store.delete("k")
    with pytest.raises(ObjectNotFound):
        object_store.get("k")
    object_store.delete("k")  # absent now: not an error
    object_store.delete("never/existed")


def test_deferred_puts_are_readable_at_once_and_sync_is_repeatable(
        object_store: ObjectStore) -> None:
    """put_deferred + sync (what packs use): readable before the sync, and a sync
    copes with an object deleted since it was written and with nothing to do."""
    for i in range(20):
        object_store.put_deferred(f"packs/{i % 3:02x}/p{i}", bytes([i]) * 1000)
    object_store.put_deferred("index/gone", b"deleted before the sync")
    assert object_store.get("packs/01/p1") == bytes([1]) * 1000
    object_store.delete("index/gone")
    object_store.sync()
    object_store.sync()
    assert sorted(info.key for info in object_store.list("packs/")) == sorted(
        f"packs/{i % 3:02x}/p{i}" for i in range(20))


def test_stat(object_store: ObjectStore) -> None:
    before = time.time()
    object_store.put("dir/k", b"12345")
    info = object_store.stat("dir/k")
    assert info.key == "dir/k"
    assert info.size == 5
    assert before - 5 <= info.mtime <= time.time() + 5  # S3 times have 1 s resolution


LISTED = {
    "config": b"c",
    "packs/ab/abcd": b"1",
    "packs/ab/abef": b"22",
    "packs/cd/cdef": b"333",
    "packs/index": b"4444",
    "refs/release": b"55555",
    "refs/repo/main": b"666666",
    "refsx": b"7",
}


@pytest.mark.parametrize(
    "prefix",
    ["", "packs/", "packs/ab/", "packs/ab/ab", "packs/a", "refs/re", "refs/", "refs", "nothing/"],
)
def test_list(object_store: ObjectStore, prefix: str) -> None:
    for key in reversed(list(LISTED)):  # written out of order on purpose
        object_store.put(key, LISTED[key])
    listed = list(object_store.list(prefix))
    expected = sorted(key for key in LISTED if key.startswith(prefix))
    assert [info.key for info in listed] == expected
    assert all(isinstance(info, ObjectInfo) for info in listed)
    assert [info.size for info in listed] == [len(LISTED[key]) for key in expected]
    assert all(info.mtime > 0 for info in listed)


def test_etag_names_one_version_in_listings_and_stat(object_store: ObjectStore) -> None:
    # A watcher lists refs/ and reads only the refs whose etag changed: the etag must
    # change with the content even when the size does not, and stay put otherwise.
    object_store.put("refs/r/main", b'{"commit":"aaaa"}')
    object_store.put("refs/r/dev", b'{"commit":"dddd"}')
    first = {info.key: info.etag for info in object_store.list("refs/")}
    assert all(first.values()), first
    assert {info.key: info.etag for info in object_store.list("refs/")} == first
    assert object_store.stat("refs/r/main").etag == first["refs/r/main"]
    object_store.put("refs/r/main", b'{"commit":"bbbb"}')  # same size, new content
    second = {info.key: info.etag for info in object_store.list("refs/")}
    assert second["refs/r/main"] != first["refs/r/main"]
    assert second["refs/r/dev"] == first["refs/r/dev"]
    assert object_store.stat("refs/r/main").etag == second["refs/r/main"]


def test_list_default_prefix_lists_everything(object_store: ObjectStore) -> None:
    object_store.put("b/1", b"")
    object_store.put("a", b"")
    assert [info.key for info in object_store.list()] == ["a", "b/1"]


def test_if_absent(object_store: ObjectStore) -> None:
    tag = object_store.put("refs/main", b"first", if_absent=True)
    with pytest.raises(PreconditionFailed):
        object_store.put("refs/main", b"second", if_absent=True)
    assert object_store.get_tagged("refs/main") == (b"first", tag)


def test_if_match(object_store: ObjectStore) -> None:
    object_store.put("refs/main", b"one")
    data, tag = object_store.get_tagged("refs/main")
    assert data == b"one"
    new_tag = object_store.put("refs/main", b"two", if_match=tag)
    assert new_tag != tag
    assert object_store.get_tagged("refs/main") == (b"two", new_tag)
    # The tag returned by put is good for the next compare-and-swap.
    newest = object_store.put("refs/main", b"three", if_match=new_tag)
    assert object_store.get_tagged("refs/main") == (b"three", newest)


def test_if_match_with_stale_tag(object_store: ObjectStore) -> None:
    stale = object_store.put("refs/main", b"one")
    object_store.put("refs/main", b"two")
    with pytest.raises(PreconditionFailed):
        object_store.put("refs/main", b"three", if_match=stale)
    assert object_store.get("refs/main") == b"two"


def test_if_match_on_missing_key(object_store: ObjectStore) -> None:
    tag = object_store.put("refs/other", b"x")
    with pytest.raises(PreconditionFailed):
        object_store.put("refs/main", b"x", if_match=tag)
    assert not object_store.exists("refs/main")


def test_if_match_after_delete(object_store: ObjectStore) -> None:
    tag = object_store.put("refs/main", b"x")
    object_store.delete("refs/main")
    with pytest.raises(PreconditionFailed):
        object_store.put("refs/main", b"y", if_match=tag)


def test_concurrent_compare_and_swap(object_store: ObjectStore) -> None:
    threads, increments = 8, 20
    object_store.put("counter", b"0")
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(increments):
                while True:
                    data, tag = object_store.get_tagged("counter")
                    try:
                        object_store.put("counter", b"%d" % (int(data) + 1), if_match=tag)
                        break
                    except PreconditionFailed:
                        continue
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert not errors
    assert int(object_store.get("counter")) == threads * increments


RACERS = 8


def _race(racers: int, attempt) -> list[tuple[int, Any]]:
    """Run ``attempt(n)`` in ``racers`` threads released at once; return each outcome.

    An outcome is ``(n, tag)`` for a write that won and ``(n, exception)`` otherwise.
    """
    start = threading.Barrier(racers)
    outcomes: list[tuple[int, Any]] = []
    lock = threading.Lock()

    def run(n: int) -> None:
        start.wait()
        try:
            result: Any = attempt(n)
        except BaseException as exc:  # collected and judged by the caller
            result = exc
        with lock:
            outcomes.append((n, result))

    threads = [threading.Thread(target=run, args=(n,)) for n in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


def _one_winner(outcomes: list[tuple[int, Any]]) -> tuple[int, str]:
    winners = [(n, tag) for n, tag in outcomes if isinstance(tag, str)]
    losers = [exc for _, exc in outcomes if not isinstance(exc, str)]
    assert len(winners) == 1, f"{len(winners)} conditional writes won: {winners}"
    assert all(isinstance(exc, PreconditionFailed) for exc in losers), losers
    return winners[0]


def test_racing_if_absent_has_one_winner(object_store: ObjectStore) -> None:
    """Create-if-absent is atomic: of writers racing on one key exactly one wins,
    and the object is that winner's (the reflog and commit ids rely on this)."""
    for round_ in range(5):
        key = f"reflog/repo/{round_:016d}"
        outcomes = _race(RACERS, lambda n, key=key: object_store.put(
            key, b"writer %d" % n, if_absent=True))
        winner, tag = _one_winner(outcomes)
        assert object_store.get_tagged(key) == (b"writer %d" % winner, tag)


def test_racing_compare_and_swap_has_one_winner_per_round(object_store: ObjectStore) -> None:
    """If-Match is atomic: writers holding the same tag race, exactly one swaps in
    its object each round (a branch moves to one commit, never to two)."""
    tag = object_store.put("refs/repo/main", b"round -1")
    for round_ in range(5):
        outcomes = _race(RACERS, lambda n, tag=tag, round_=round_: object_store.put(
            "refs/repo/main", b"round %d writer %d" % (round_, n), if_match=tag))
        winner, tag = _one_winner(outcomes)
        assert object_store.get_tagged("refs/repo/main") == (
            b"round %d writer %d" % (round_, winner), tag)


class _CheckThenWriteStore(MemoryStore):
    """Conditional puts that check, pause, then write: what a non-atomic service does."""

    def put(self, key: str, data: Any, *, if_absent: bool = False,
            if_match: str | None = None) -> str:
        if not if_absent and if_match is None:
            return super().put(key, data)
        try:
            current: str | None = self.get_tagged(key)[1]
        except ObjectNotFound:
            current = None
        if (if_absent and current is not None) or (if_match is not None and current != if_match):
            raise PreconditionFailed(f"object {key} exists or changed")
        time.sleep(0.01)  # the window in which another writer's check also passes
        return super().put(key, data)


@pytest.mark.parametrize(
    "race", [test_racing_if_absent_has_one_winner,
             test_racing_compare_and_swap_has_one_winner_per_round])
def test_race_tests_catch_a_non_atomic_store(race) -> None:
    with pytest.raises(AssertionError, match="conditional writes won"):
        race(_CheckThenWriteStore())


# -- the s3 backend specifically -------------------------------------------------------


def test_s3_keys_live_under_the_prefix(
    s3_store: ObjectStore, s3_bucket: str, s3_admin: Any, moto_endpoint: str
) -> None:
    from vfs.objstore import open_object_store

    assert s3_store.url == f"s3://{s3_bucket}/store/prefix"
    s3_store.put("refs/main", b"x")
    s3_admin.put_object(Bucket=s3_bucket, Key="store/prefixed-neighbour", Body=b"not ours")
    keys = [o["Key"] for o in s3_admin.list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert keys == ["store/prefix/refs/main", "store/prefixed-neighbour"]
    assert [info.key for info in s3_store.list()] == ["refs/main"]

    other = open_object_store(f"s3://{s3_bucket}/store", s3_endpoint=moto_endpoint)
    assert other.url == f"s3://{s3_bucket}/store"
    assert other.get("prefix/refs/main") == b"x"
    other.close()


def test_s3_unreachable_endpoint_is_store_unavailable(aws_env: None) -> None:
    import socket

    from vfs.objstore.s3 import S3Store

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store = S3Store("bucket", endpoint_url=f"http://127.0.0.1:{port}")
    with pytest.raises(StoreUnavailable):
        store.get("k")
    with pytest.raises(StoreUnavailable):
        store.put("k", b"x", if_absent=True)
    with pytest.raises(StoreUnavailable):
        list(store.list())
    store.close()


def test_s3_missing_bucket_is_store_not_found(aws_env: None, moto_endpoint: str) -> None:
    # Not StoreUnavailable: a missing bucket does not appear by retrying.
    from vfs.objstore.s3 import S3Store

    store = S3Store("no-such-bucket-here", endpoint_url=moto_endpoint)
    with pytest.raises(StoreNotFound, match="does not exist"):
        store.get("k")
    store.close()


def test_seaweed_wrong_credentials_are_access_denied(
    seaweed_endpoint: str, seaweed_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SeaweedFS checks signatures (moto does not): a real 403, which must not be retried.
    from vfs.objstore import open_object_store

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "not-a-key")
    store = open_object_store(f"s3://{seaweed_bucket}", s3_endpoint=seaweed_endpoint)
    assert isinstance(store, RetryingStore)
    store._sleep = lambda _: pytest.fail("a denied request must not be retried")
    with pytest.raises(StoreAccessDenied):
        store.get("k")
    store.close()


def test_seaweed_missing_bucket_is_store_not_found(seaweed_endpoint: str, aws_env: None) -> None:
    from vfs.objstore.s3 import S3Store

    store = S3Store("no-such-bucket-here", endpoint_url=seaweed_endpoint)
    with pytest.raises(StoreNotFound, match="does not exist"):
        store.get("k")
    store.close()


def test_seaweed_through_open_object_store(seaweed_endpoint: str, seaweed_bucket: str) -> None:
    """The stack production uses (RetryingStore around S3Store) on SeaweedFS."""
    from vfs.objstore import open_object_store

    store = open_object_store(f"s3://{seaweed_bucket}/vfs", s3_endpoint=seaweed_endpoint)
    test_if_match(store)
    test_list(store, "packs/")
    assert store.url == f"s3://{seaweed_bucket}/vfs"
    store.close()


# -- wrappers ------------------------------------------------------------------------


def test_wrapped_store_keeps_the_contract() -> None:
    """A stack of all wrappers behaves like the store it wraps."""
    store = RetryingStore(LoggingStore(FaultyStore(MemoryStore())), sleep=lambda _: None)
    assert store.url == "memory://"
    test_if_match(store)
    test_list(store, "packs/")
    test_get_range(store)
    with pytest.raises(ObjectNotFound):
        store.get("missing")
    assert store.exists("refs/main")


def test_retrying_store_recovers_from_transient_failures() -> None:
    faulty = FaultyStore(MemoryStore())
    faulty.fail_once(1, StoreUnavailable)
    faulty.fail_once(2, StoreUnavailable)
    sleeps: list[float] = []
    store = RetryingStore(faulty, attempts=5, base_delay=0.1, max_delay=0.15, sleep=sleeps.append)
    store.put("k", b"data")
    assert faulty.calls["put"] == 3
    assert store.get("k") == b"data"
    assert len(sleeps) == 2
    assert 0.05 <= sleeps[0] <= 0.1  # base_delay with jitter
    assert 0.075 <= sleeps[1] <= 0.15  # doubled, capped at max_delay, with jitter


def test_retrying_store_gives_up_after_attempts() -> None:
    faulty = FaultyStore(MemoryStore())
    faulty.fail_after(1, lambda: StoreUnavailable("down"), ops=("get", "list"))
    store = RetryingStore(faulty, attempts=3, sleep=lambda _: None)
    with pytest.raises(StoreUnavailable, match="down"):
        store.get("k")
    assert faulty.calls["get"] == 3
    with pytest.raises(StoreUnavailable):
        list(store.list())
    assert faulty.calls["list"] == 3


@pytest.mark.parametrize(
    "exc_factory",
    [lambda: PreconditionFailed("lost"), ObjectNotFound, StoreFull, StoreAccessDenied,
     StoreNotFound],
)
def test_retrying_store_does_not_retry_other_errors(exc_factory) -> None:
    faulty = FaultyStore(MemoryStore())
    faulty.fail_after(1, exc_factory)
    store = RetryingStore(faulty, sleep=lambda _: pytest.fail("must not retry"))
    with pytest.raises(type(exc_factory())):
        store.put("k", b"x")
    assert faulty.calls["put"] == 1


def test_retrying_store_does_not_retry_a_real_precondition_failure() -> None:
    faulty = FaultyStore(MemoryStore())
    store = RetryingStore(faulty, sleep=lambda _: pytest.fail("must not retry"))
    store.put("k", b"x", if_absent=True)
    with pytest.raises(PreconditionFailed):
        store.put("k", b"y", if_absent=True)
    with pytest.raises(ObjectNotFound):
        store.get("missing")
    assert faulty.calls["put"] == 2 and faulty.calls["get"] == 1


def test_retrying_store_resumes_a_broken_listing() -> None:
    class BreakingStore(MemoryStore):
        """Its first listing breaks before the 3rd key, its second before the 6th."""

        breaks = [2, 5]

        def list(self, prefix: str = ""):
            for n, info in enumerate(super().list(prefix)):
                if self.breaks and n == self.breaks[0]:
                    self.breaks.pop(0)
                    raise StoreUnavailable("connection reset")
                yield info

    inner = BreakingStore()
    keys = [f"k{i:02d}" for i in range(10)]
    for key in keys:
        inner.put(key, b"")
    # Two failures with attempts=2 are fine: progress in between resets the count.
    store = RetryingStore(inner, attempts=2, sleep=lambda _: None)
    assert [info.key for info in store.list()] == keys


def test_faulty_store_fails_at_the_nth_put() -> None:
    store = FaultyStore(MemoryStore())
    store.fail_after(3, lambda: StoreFull("quota exceeded"))
    store.put("a", b"1")
    store.put("b", b"2")
    with pytest.raises(StoreFull, match="quota"):
        store.put("c", b"3")
    with pytest.raises(StoreFull):
        store.put("d", b"4")
    assert store.get("a") == b"1"  # other operations are unaffected
    assert [info.key for info in store.list()] == ["a", "b"]
    store.clear()
    store.put("e", b"5")
    assert store.calls["put"] == 5 and store.calls["get"] == 1 and store.calls["list"] == 1


def test_faulty_store_fail_once_and_after_the_write() -> None:
    store = FaultyStore(MemoryStore())
    store.fail_once(2, StoreUnavailable, ops=None, after=True)
    store.put("a", b"1")
    with pytest.raises(StoreUnavailable):
        store.put("b", b"2")  # the write happened; only the answer was lost
    assert store.get("b") == b"2"


def test_counting_store_counts_calls_per_operation() -> None:
    store = CountingStore(MemoryStore())
    store.put("a", b"1", if_absent=True)
    store.put_deferred("packs/p", [b"x", b"y"])  # a write like any put
    store.sync()
    assert store.get("a") == b"1"
    assert store.get_range("packs/p", 0, 1) == b"x"
    with pytest.raises(ObjectNotFound):
        store.stat("missing")  # failed calls are requests too
    assert [info.key for info in store.list()] == ["a", "packs/p"]
    store.delete("a")
    assert store.calls == {"put": 2, "sync": 1, "get": 1, "get_range": 1, "stat": 1,
                           "list": 1, "delete": 1}
    assert store.total() == 8


def test_counting_store_reset_returns_the_counts_so_far() -> None:
    store = CountingStore(MemoryStore())
    store.put("a", b"1")
    store.get("a")
    assert store.reset() == {"put": 1, "get": 1}
    assert store.calls == {} and store.total() == 0
    store.get("a")
    assert store.reset() == {"get": 1}


def test_counting_store_below_retries_counts_every_try() -> None:
    faulty = FaultyStore(MemoryStore())
    faulty.fail_once(1, StoreUnavailable)
    counting = CountingStore(faulty)
    store = RetryingStore(counting, sleep=lambda _: None)
    store.put("k", b"x")
    assert counting.calls["put"] == 2


def test_counting_store_is_thread_safe() -> None:
    store = CountingStore(MemoryStore())
    store.put("k", b"x")
    threads, calls = 8, 2000

    def work() -> None:
        for _ in range(calls):
            store.exists("k")

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert store.calls["exists"] == threads * calls


def test_logging_store_logs_calls(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test.objstore")
    store = LoggingStore(MemoryStore(), logger)
    with caplog.at_level(logging.DEBUG, logger="test.objstore"):
        store.put("refs/main", b"12345", if_absent=True)
        with pytest.raises(ObjectNotFound):
            store.get("missing")
    messages = [record.getMessage() for record in caplog.records]
    assert messages[0].startswith("put refs/main (5 B, if_absent=True) ok in ")
    assert messages[1].startswith("get missing failed in ")
    assert "ObjectNotFound" in messages[1]
    assert all(record.levelno == logging.DEBUG for record in caplog.records)
