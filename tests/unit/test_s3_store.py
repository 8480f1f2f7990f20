"""The s3 backend's error classes and botocore settings, and the store stack
``open_object_store`` builds, without a server: S3Store talks to a scripted client.

Which class an S3 failure becomes decides whether RetryingStore tries again, so
these tests pin the split: throttling, 5xx and broken connections are transient
(``StoreUnavailable``); denied access, missing buckets and rejected requests are not.
"""

from __future__ import annotations

import io
from typing import Any

import pytest
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
    ResponseStreamingError,
)

from vfs.errors import (
    ObjectNotFound,
    PreconditionFailed,
    StoreAccessDenied,
    StoreError,
    StoreFull,
    StoreNotFound,
    StoreUnavailable,
)
from vfs.objstore import LocalStore, MemoryStore, open_object_store
from vfs.objstore.s3 import S3Store
from vfs.objstore.wrappers import RetryingStore


def _client_error(code: str, status: int, operation: str = "GetObject") -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": f"{code} (scripted)"},
         "ResponseMetadata": {"HTTPStatusCode": status}},
        operation,
    )


class _ScriptedClient:
    """Stands in for a boto3 S3 client: raises the scripted errors in turn, then answers."""

    def __init__(self, *failures: BaseException) -> None:
        self.failures = list(failures)
        self.calls = 0

    def _answer(self, response: dict[str, Any]) -> dict[str, Any]:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return response

    def get_object(self, **_: Any) -> dict[str, Any]:
        return self._answer({"Body": io.BytesIO(b"data"), "ETag": '"tag"'})

    def put_object(self, **_: Any) -> dict[str, Any]:
        return self._answer({"ETag": '"tag"'})

    def delete_object(self, **_: Any) -> dict[str, Any]:
        return self._answer({})

    def close(self) -> None:
        pass


# -- the store stack -------------------------------------------------------------------


def test_s3_url_opens_a_retrying_store_around_s3(aws_env: None) -> None:
    store = open_object_store("s3://bucket/some/prefix", s3_endpoint="http://127.0.0.1:9")
    try:
        assert isinstance(store, RetryingStore)
        assert isinstance(store.inner, S3Store)
        assert store.inner.bucket == "bucket" and store.inner.prefix == "some/prefix"
        assert store.url == "s3://bucket/some/prefix"
        assert store.attempts > 1
    finally:
        store.close()


@pytest.mark.parametrize("url", ["{tmp}/store", "file://{tmp}/store"])
def test_local_url_opens_a_bare_local_store(tmp_path, url: str) -> None:
    # Local errors (EACCES, EIO, ENOSPC) do not go away by waiting: no retries.
    store = open_object_store(url.format(tmp=tmp_path), create=True)
    assert type(store) is LocalStore


def test_memory_url_opens_a_bare_memory_store() -> None:
    assert type(open_object_store("memory://")) is MemoryStore


# -- botocore settings -----------------------------------------------------------------


def test_botocore_does_not_retry_on_its_own(aws_env: None) -> None:
    # RetryingStore owns the policy; botocore retrying as well multiplies the tries
    # (its "max_attempts" counts retries, not tries: 1 there means 2 requests).
    store = S3Store("bucket", endpoint_url="http://127.0.0.1:9")
    try:
        assert store._client.meta.config.retries["total_max_attempts"] == 1
    finally:
        store.close()


def test_botocore_requests_time_out(aws_env: None) -> None:
    # A stuck connection must fail (and be retried), not hang a commit forever.
    store = S3Store("bucket", endpoint_url="http://127.0.0.1:9")
    try:
        config = store._client.meta.config
        assert 0 < config.connect_timeout <= 30
        assert 0 < config.read_timeout <= 120
    finally:
        store.close()


# -- error classes ---------------------------------------------------------------------

TRANSIENT = [
    _client_error("SlowDown", 503),
    _client_error("ServiceUnavailable", 503),
    _client_error("InternalError", 500),
    _client_error("BadGateway", 502),
    _client_error("GatewayTimeout", 504),
    _client_error("Throttling", 400),
    _client_error("ThrottlingException", 400),
    _client_error("RequestTimeout", 400),
    _client_error("TooManyRequests", 429),
    EndpointConnectionError(endpoint_url="http://s3.test"),
    ConnectionClosedError(endpoint_url="http://s3.test"),
    ReadTimeoutError(endpoint_url="http://s3.test"),
    ConnectTimeoutError(endpoint_url="http://s3.test"),
    ResponseStreamingError(error="connection reset while reading the body"),
]


def _name(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        status = exc.response["ResponseMetadata"]["HTTPStatusCode"]
        return f"{exc.response['Error']['Code']}-{status}"
    return type(exc).__name__


@pytest.mark.parametrize("failure", TRANSIENT, ids=_name)
def test_transient_failures_are_store_unavailable(failure: BaseException) -> None:
    store = S3Store("bucket", client=_ScriptedClient(failure))
    with pytest.raises(StoreUnavailable):
        store.get("k")


PERMANENT = [
    (_client_error("AccessDenied", 403), StoreAccessDenied),
    (_client_error("InvalidAccessKeyId", 403), StoreAccessDenied),
    (_client_error("SignatureDoesNotMatch", 403), StoreAccessDenied),
    (NoCredentialsError(), StoreAccessDenied),
    (_client_error("NoSuchBucket", 404), StoreNotFound),
    (_client_error("NoSuchKey", 404), ObjectNotFound),
    (_client_error("404", 404), ObjectNotFound),  # HEAD answers carry no error code
    (_client_error("InvalidArgument", 400), StoreError),
    (_client_error("EntityTooLarge", 400), StoreError),
    (_client_error("NotImplemented", 501), StoreError),
    (_client_error("XMinioStorageFull", 507), StoreFull),
]
PERMANENT_IDS = [_name(failure) for failure, _ in PERMANENT]


@pytest.mark.parametrize(("failure", "expected"), PERMANENT, ids=PERMANENT_IDS)
def test_permanent_failures_are_not_store_unavailable(
        failure: BaseException, expected: type[StoreError]) -> None:
    store = S3Store("bucket", client=_ScriptedClient(failure))
    with pytest.raises(expected) as caught:
        store.get("k")
    assert not isinstance(caught.value, StoreUnavailable)


@pytest.mark.parametrize(
    ("failure", "put_args"),
    [
        (_client_error("PreconditionFailed", 412, "PutObject"), {"if_absent": True}),
        (_client_error("PreconditionFailed", 412, "PutObject"), {"if_match": '"old"'}),
        (_client_error("ConditionalRequestConflict", 409, "PutObject"), {"if_absent": True}),
        (_client_error("NoSuchKey", 404, "PutObject"), {"if_match": '"old"'}),
    ],
    ids=["412-if_absent", "412-if_match", "409-race", "404-if_match-absent"],
)
def test_lost_conditions_are_precondition_failed(failure: BaseException, put_args) -> None:
    store = S3Store("bucket", client=_ScriptedClient(failure))
    with pytest.raises(PreconditionFailed):
        store.put("refs/main", b"x", **put_args)


# -- retries over the s3 backend -------------------------------------------------------


@pytest.mark.parametrize("failure", TRANSIENT, ids=_name)
def test_transient_failures_are_retried(failure: BaseException) -> None:
    client = _ScriptedClient(failure, failure)
    store = RetryingStore(S3Store("bucket", client=client), attempts=3, sleep=lambda _: None)
    assert store.get("k") == b"data"
    assert client.calls == 3


@pytest.mark.parametrize(("failure", "expected"), PERMANENT, ids=PERMANENT_IDS)
def test_permanent_failures_are_not_retried(
        failure: BaseException, expected: type[StoreError]) -> None:
    client = _ScriptedClient(failure)
    store = RetryingStore(S3Store("bucket", client=client), attempts=3,
                          sleep=lambda _: pytest.fail("must not retry"))
    with pytest.raises(expected):
        store.get("k")
    assert client.calls == 1


def test_lost_condition_is_not_retried() -> None:
    client = _ScriptedClient(_client_error("PreconditionFailed", 412, "PutObject"))
    store = RetryingStore(S3Store("bucket", client=client), attempts=3,
                          sleep=lambda _: pytest.fail("must not retry"))
    with pytest.raises(PreconditionFailed):
        store.put("refs/main", b"x", if_absent=True)
    assert client.calls == 1
