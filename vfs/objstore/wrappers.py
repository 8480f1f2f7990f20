"""Stores that wrap another store to add retries, counting, fault injection or logging.

Each wrapper implements :class:`~vfs.objstore.base.ObjectStore` by delegating to an
inner store, so they stack freely, e.g.
``RetryingStore(LoggingStore(S3Store(...), log))``. Every delegated operation goes
through :meth:`DelegatingStore._call`, the one hook a wrapper overrides.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from vfs.errors import StoreUnavailable
from vfs.objstore.base import Buffers, ObjectInfo, ObjectStore

T = TypeVar("T")

_log = logging.getLogger("vfs.objstore")


class DelegatingStore(ObjectStore):
    """A store that forwards every operation to ``inner`` through :meth:`_call`.

    Args:
        inner: the store that does the work.
    """

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.url = inner.url

    def _call(self, op: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)``, the inner store's method named ``op``."""
        return fn(*args, **kwargs)

    def get(self, key: str) -> bytes:
        return self._call("get", self.inner.get, key)

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        return self._call("get_range", self.inner.get_range, key, offset, length)

    def get_tagged(self, key: str) -> tuple[bytes, str]:
        return self._call("get_tagged", self.inner.get_tagged, key)

    def put(
        self,
        key: str,
        data: bytes | bytearray | memoryview,
        *,
        if_absent: bool = False,
        if_match: str | None = None,
    ) -> str:
        return self._call("put", self.inner.put, key, data, if_absent=if_absent, if_match=if_match)

    def put_deferred(self, key: str, data: Buffers) -> None:
        # Counted as a "put": faults and retries treat both kinds of write alike.
        self._call("put", self.inner.put_deferred, key, data)

    def sync(self) -> None:
        self._call("sync", self.inner.sync)

    def delete(self, key: str) -> None:
        self._call("delete", self.inner.delete, key)

    def stat(self, key: str) -> ObjectInfo:
        return self._call("stat", self.inner.stat, key)

    def exists(self, key: str) -> bool:
        return self._call("exists", self.inner.exists, key)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        # Materialise inside _call so that errors raised while iterating a lazy
        # inner listing are seen (and retried, logged, ...) by the wrapper.
        return iter(self._call("list", lambda p: [*self.inner.list(p)], prefix))

    def close(self) -> None:
        self.inner.close()


class RetryingStore(DelegatingStore):
    """Retries operations that failed with :class:`~vfs.errors.StoreUnavailable`.

    Waits ``base_delay * 2**n`` seconds (capped at ``max_delay``, with random
    jitter of up to half of it) before retry ``n + 1``. Every other error
    (``PreconditionFailed``, ``ObjectNotFound``, ``StoreFull``, bugs) propagates at
    once.

    Note that a conditional ``put`` whose first attempt reached the store but whose
    answer was lost may then fail with ``PreconditionFailed`` on the retry although
    the write happened; callers of conditional writes must re-read to find out.

    Args:
        inner: the store to call.
        attempts: total number of tries per operation (1 means no retry).
        base_delay: wait before the first retry, in seconds.
        max_delay: longest wait between two tries, in seconds.
        sleep: the function that waits (replaceable in tests).
    """

    def __init__(
        self,
        inner: ObjectStore,
        attempts: int = 5,
        base_delay: float = 0.05,
        max_delay: float = 2.0,
        *,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        super().__init__(inner)
        self.attempts = attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self._sleep = sleep

    def _backoff(self, failures: int, op: str, exc: StoreUnavailable) -> None:
        delay = min(self.max_delay, self.base_delay * 2 ** (failures - 1))
        delay *= random.uniform(0.5, 1.0)
        _log.info("%s failed (%s); retry %d in %.2fs", op, exc, failures, delay)
        self._sleep(delay)

    def _call(self, op: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        failures = 0
        while True:
            try:
                return fn(*args, **kwargs)
            except StoreUnavailable as exc:
                failures += 1
                if failures >= self.attempts:
                    raise
                self._backoff(failures, op, exc)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        # Stream the listing; after a failure, list again and skip what was
        # already yielded (listings are in key order). Progress resets the count.
        last: str | None = None
        failures = 0
        while True:
            try:
                for info in self.inner.list(prefix):
                    if last is not None and info.key <= last:
                        continue
                    failures = 0
                    last = info.key
                    yield info
                return
            except StoreUnavailable as exc:
                failures += 1
                if failures >= self.attempts:
                    raise
                self._backoff(failures, "list", exc)


class CountingStore(DelegatingStore):
    """Counts calls per operation, e.g. to measure the requests a command makes.

    :attr:`calls` maps an operation name (``get``, ``get_range``, ``get_tagged``,
    ``put``, ``sync``, ``delete``, ``stat``, ``exists``, ``list``) to its number of
    calls, failed ones included; ``put_deferred`` counts as ``put``. Below a
    :class:`RetryingStore` every try counts, which is what an S3 bill counts. A
    ``list`` counts once however many pages the listing took.

    Args:
        inner: the store to call.
    """

    def __init__(self, inner: ObjectStore) -> None:
        super().__init__(inner)
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()  # Counter's += is a read and a write

    def _count(self, op: str) -> None:
        with self._lock:
            self.calls[op] += 1

    def total(self) -> int:
        """The number of calls of every operation together."""
        with self._lock:
            return self.calls.total()

    def reset(self) -> Counter[str]:
        """Start counting from zero; return the counts until now."""
        with self._lock:
            counted, self.calls = self.calls, Counter()
        return counted

    def _call(self, op: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        self._count(op)
        return fn(*args, **kwargs)


@dataclass
class _Fault:
    ops: frozenset[str] | None  # None: every operation
    first: int  # the first matching call (1-based) that fails
    times: int | None  # how many calls fail from there; None: all later ones
    exc_factory: Callable[[], BaseException]
    after: bool  # fail after the inner store did the work
    seen: int = 0


class FaultyStore(CountingStore):
    """Injects failures into chosen operations, for tests.

    Operations are named like the methods: ``get``, ``get_range``, ``get_tagged``,
    ``put``, ``delete``, ``stat``, ``exists``, ``list``. :attr:`calls` counts every
    call per operation, failed ones included (see :class:`CountingStore`). Each
    arranged fault counts the matching calls made after it was arranged.

    Example::

        store = FaultyStore(MemoryStore())
        store.fail_after(3, lambda: StoreFull("disk full"))  # 3rd and later puts fail
    """

    def __init__(self, inner: ObjectStore) -> None:
        super().__init__(inner)
        self._faults: list[_Fault] = []

    def fail_after(
        self,
        n_calls: int,
        exc_factory: Callable[[], BaseException],
        ops: Iterable[str] | None = ("put",),
        *,
        after: bool = False,
    ) -> None:
        """Make the ``n_calls``-th matching call and every later one raise.

        Args:
            n_calls: which matching call fails first (1 means the next one).
            exc_factory: builds the exception to raise, e.g. ``StoreUnavailable``
                or ``lambda: StoreFull("quota")``.
            ops: the operations that match; ``None`` matches all of them.
            after: let the inner store do the work first and raise afterwards,
                like a reply lost on the network.
        """
        self._arrange(n_calls, None, exc_factory, ops, after)

    def fail_once(
        self,
        n_calls: int,
        exc_factory: Callable[[], BaseException],
        ops: Iterable[str] | None = ("put",),
        *,
        after: bool = False,
    ) -> None:
        """Make only the ``n_calls``-th matching call raise; see :meth:`fail_after`."""
        self._arrange(n_calls, 1, exc_factory, ops, after)

    def clear(self) -> None:
        """Remove every arranged fault (the call counts are kept)."""
        with self._lock:
            self._faults.clear()

    def _arrange(
        self,
        n_calls: int,
        times: int | None,
        exc_factory: Callable[[], BaseException],
        ops: Iterable[str] | None,
        after: bool,
    ) -> None:
        if n_calls < 1:
            raise ValueError("n_calls counts from 1")
        if isinstance(ops, str):
            ops = (ops,)
        fault = _Fault(None if ops is None else frozenset(ops), n_calls, times, exc_factory, after)
        with self._lock:
            self._faults.append(fault)

    def _due(self, op: str) -> _Fault | None:
        """Count a call of ``op`` and return the fault it triggers, if any."""
        due = None
        self._count(op)
        with self._lock:
            for fault in self._faults:
                if fault.ops is not None and op not in fault.ops:
                    continue
                fault.seen += 1
                past = fault.seen - fault.first
                if past >= 0 and (fault.times is None or past < fault.times) and due is None:
                    due = fault
        return due

    def _call(self, op: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        fault = self._due(op)
        if fault is None:
            return fn(*args, **kwargs)
        if fault.after:
            fn(*args, **kwargs)
        raise fault.exc_factory()


class LoggingStore(DelegatingStore):
    """Logs every call, its outcome and its duration at DEBUG level.

    Args:
        inner: the store to call.
        logger: where to log; defaults to the ``vfs.objstore`` logger.
    """

    def __init__(self, inner: ObjectStore, logger: logging.Logger | None = None) -> None:
        super().__init__(inner)
        self.logger = logger or _log

    def _call(self, op: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if not self.logger.isEnabledFor(logging.DEBUG):
            return fn(*args, **kwargs)
        what = _describe(op, args, kwargs)
        start = time.perf_counter()
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            ms = (time.perf_counter() - start) * 1000
            self.logger.debug("%s failed in %.1f ms: %s: %s", what, ms, type(exc).__name__, exc)
            raise
        ms = (time.perf_counter() - start) * 1000
        self.logger.debug("%s ok in %.1f ms", what, ms)
        return result


def _describe(op: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """A short text for one call: ``put refs/main (41 B, if_match='v3')``."""
    text = f"{op} {args[0] if args else ''}"
    details = []
    if op == "put":
        details.append(f"{memoryview(args[1]).nbytes} B")
    elif op == "get_range":
        details.append(f"{args[1]}+{args[2]}")
    details += [f"{name}={value!r}" for name, value in kwargs.items() if value]
    return f"{text} ({', '.join(details)})" if details else text
