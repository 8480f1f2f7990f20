"""The ``s3`` backend: an object store in an S3 bucket (AWS, MinIO, Ceph, moto).

Key ``k`` is stored as ``<prefix>/k`` in the bucket. A tag is the object's ETag
exactly as S3 returns it (quotes included), so conditional writes map directly
onto S3's conditional PutObject:

* ``put(if_absent=True)`` sends ``If-None-Match: *``;
* ``put(if_match=tag)`` sends ``If-Match: <etag>``.

S3 answers a lost condition with 412 PreconditionFailed, or with 409
ConditionalRequestConflict when two conditional writes race; both become
:class:`~vfs.errors.PreconditionFailed`. ``If-Match`` on an absent key answers
404 NoSuchKey, which also means "the condition did not hold".

Real S3 evaluates the condition and the write atomically, and so must any
service this store is pointed at. moto 5.2 honours both headers with the same
status codes as S3 (412 on a lost condition, 404 NoSuchKey for If-Match on an
absent key), but its server checks the condition and then stores the object
without holding a lock, so two conditional writes racing on one key can both
succeed. This module does not paper over that with a client-side lock (it would
convoy contended writers on real S3 and could not help across processes);
``tests/s3server.py`` instead runs moto with its requests serialised. SeaweedFS
(``weed mini``, 4.48) evaluates both conditions atomically with S3's status codes,
including 412 for If-Match on an absent key; the contract tests race writers on it.

Retries are deliberately off in botocore: :class:`vfs.objstore.wrappers.RetryingStore`
(which :func:`vfs.objstore.open_object_store` puts around every S3Store) owns the
retry policy, so each call here is one request. Which error class a failure becomes
is what that policy acts on:

* :class:`~vfs.errors.StoreUnavailable` (retried): throttling (SlowDown, 429, ...),
  5xx except 501/505, RequestTimeout, and connections that could not be opened,
  broke, or timed out (connect and read timeouts are finite, so a stuck request
  fails instead of hanging its caller);
* everything else is permanent: ``ObjectNotFound`` (404), ``PreconditionFailed``
  (a lost condition), ``StoreNotFound`` (no bucket), ``StoreAccessDenied`` (401,
  403, no credentials), ``StoreFull`` (507, quotas) and plain ``StoreError`` for a
  request the service rejects (other 4xx: waiting does not change the answer).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    ParamValidationError,
    PartialCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from vfs.errors import (
    ObjectNotFound,
    PreconditionFailed,
    StoreAccessDenied,
    StoreError,
    StoreFull,
    StoreNotFound,
    StoreUnavailable,
)
from vfs.objstore.base import ObjectInfo, ObjectStore

_CONFIG = Config(
    connect_timeout=5,
    read_timeout=60,
    max_pool_connections=16,
    # One try per call: RetryingStore retries. (botocore's "max_attempts" counts
    # retries, so max_attempts=1 meant two requests per call.)
    retries={"mode": "standard", "total_max_attempts": 1},
)

_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_PRECONDITION = {"PreconditionFailed", "412", "ConditionalRequestConflict"}
_FULL = {"XMinioStorageFull", "InsufficientStorage", "QuotaExceeded", "507"}
# Codes that mean "try again later" whatever their HTTP status (some come with a 400).
_TRANSIENT = {
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException",
    "RequestThrottled", "RequestThrottledException", "TooManyRequestsException",
    "RequestLimitExceeded", "BandwidthLimitExceeded", "RequestTimeout",
    "RequestTimeoutException", "PriorRequestNotComplete", "OperationAborted",
    "InternalError", "ServiceUnavailable",
}
_TRANSIENT_STATUS = {408, 429}
_PERMANENT_5XX = {501, 505}  # not implemented, HTTP version: the same answer next time


class S3Store(ObjectStore):
    """Object store under a prefix of an S3 bucket.

    Args:
        bucket: bucket name; the bucket must exist.
        prefix: key prefix inside the bucket (no leading or trailing ``/`` needed).
        endpoint_url: URL of an S3-compatible service; ``None`` means AWS.
        client: an existing boto3 S3 client to use instead of creating one (the
            store then does not close it).

    Credentials and region come from the usual boto3 sources (environment,
    ``~/.aws``, instance metadata). One client is shared by all threads.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        client: Any = None,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._key_base = f"{self.prefix}/" if self.prefix else ""
        self._owns_client = client is None
        if client is None:
            config = _CONFIG
            if endpoint_url:  # S3-compatible services rarely do virtual-host buckets
                config = config.merge(Config(s3={"addressing_style": "path"}))
            # A private session: the boto3 default session is not thread-safe.
            client = boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)
        self._client = client

    # -- helpers ---------------------------------------------------------------

    def _s3_key(self, key: str) -> str:
        if not key or key.startswith("/"):
            raise ValueError(f"invalid object key {key!r}")
        return self._key_base + key

    @contextmanager
    def _errors(self, key: str, *, conditional: bool = False) -> Iterator[None]:
        """Translate botocore exceptions into :mod:`vfs.errors` ones."""
        try:
            yield
        except ClientError as exc:
            raise self._translate(exc, key, conditional) from exc
        except (BotoConnectionError, HTTPClientError, IncompleteReadError) as exc:
            # Refused, reset or closed connections and connect/read timeouts
            # (EndpointConnectionError, ConnectionClosedError, ReadTimeoutError,
            # ConnectTimeoutError, ResponseStreamingError): the next try may work.
            raise StoreUnavailable(f"cannot reach {self.url} for {key}: {exc}") from exc
        except (NoCredentialsError, PartialCredentialsError) as exc:
            raise StoreAccessDenied(
                f"no usable S3 credentials for {self.url}: {exc} (set AWS_ACCESS_KEY_ID "
                f"and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
            ) from exc
        except ParamValidationError:
            raise  # a bug in this module, not a store failure
        except BotoCoreError as exc:  # configuration problems: no region, bad endpoint...
            raise StoreError(f"cannot use {self.url} for {key}: {exc}") from exc

    def _translate(self, exc: ClientError, key: str, conditional: bool) -> Exception:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        message = error.get("Message") or code
        if code in _PRECONDITION or (conditional and status in (409, 412)):
            return PreconditionFailed(f"object {key} exists or changed meanwhile in {self.url}")
        if code == "NoSuchBucket":
            return StoreNotFound(
                f"bucket {self.bucket} does not exist ({self.url}): create it first"
            )
        if code in _NOT_FOUND or status == 404:
            if conditional:  # If-Match on an absent object
                return PreconditionFailed(f"object {key} does not exist in {self.url}")
            return ObjectNotFound(f"object {key} does not exist in {self.url}")
        if code in _FULL or status == 507:
            return StoreFull(f"{self.url} has no space left while writing {key}: {message}")
        if code in _TRANSIENT or status in _TRANSIENT_STATUS or (
            status >= 500 and status not in _PERMANENT_5XX
        ):
            return StoreUnavailable(
                f"{self.url} failed on {key}: {code} {message} (HTTP {status})"
            )
        if status in (401, 403):
            return StoreAccessDenied(
                f"access to {key} in {self.url} denied ({code}): check the credentials"
            )
        return StoreError(
            f"{self.url} rejected the request for {key}: {code} {message} (HTTP {status})"
        )

    # -- interface -------------------------------------------------------------

    def get(self, key: str) -> bytes:
        s3_key = self._s3_key(key)
        with self._errors(key):
            response = self._client.get_object(Bucket=self.bucket, Key=s3_key)
            return response["Body"].read()

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError(f"negative range {offset}+{length} of {key}")
        s3_key = self._s3_key(key)
        if length == 0:
            return b""
        with self._errors(key):
            try:
                response = self._client.get_object(
                    Bucket=self.bucket, Key=s3_key, Range=f"bytes={offset}-{offset + length - 1}"
                )
            except ClientError as exc:
                # 416: the range starts at or past the end (any range of an empty object).
                if exc.response.get("Error", {}).get("Code") == "InvalidRange":
                    return b""
                raise
            return response["Body"].read()

    def get_tagged(self, key: str) -> tuple[bytes, str]:
        s3_key = self._s3_key(key)
        with self._errors(key):
            response = self._client.get_object(Bucket=self.bucket, Key=s3_key)
            return response["Body"].read(), response["ETag"]

    def put(
        self,
        key: str,
        data: bytes | bytearray | memoryview,
        *,
        if_absent: bool = False,
        if_match: str | None = None,
    ) -> str:
        s3_key = self._s3_key(key)
        args: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": s3_key,
            "Body": data if isinstance(data, bytes) else bytes(data),
        }
        if if_absent:
            args["IfNoneMatch"] = "*"
        if if_match is not None:
            args["IfMatch"] = if_match
        with self._errors(key, conditional=if_absent or if_match is not None):
            return self._client.put_object(**args)["ETag"]

    def delete(self, key: str) -> None:
        s3_key = self._s3_key(key)
        with self._errors(key):
            self._client.delete_object(Bucket=self.bucket, Key=s3_key)

    def stat(self, key: str) -> ObjectInfo:
        s3_key = self._s3_key(key)
        with self._errors(key):
            response = self._client.head_object(Bucket=self.bucket, Key=s3_key)
        return ObjectInfo(key, response["ContentLength"], response["LastModified"].timestamp(),
                          response.get("ETag", ""))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        # S3 lists keys in UTF-8 byte order, which is Python's str order, so the
        # pages arrive sorted and can be streamed without collecting them.
        strip = len(self._key_base)
        paginator = self._client.get_paginator("list_objects_v2")
        pages = paginator.paginate(Bucket=self.bucket, Prefix=self._key_base + prefix)
        with self._errors(f"{prefix}*"):
            for page in pages:
                for item in page.get("Contents", ()):
                    yield ObjectInfo(
                        item["Key"][strip:], item["Size"], item["LastModified"].timestamp(),
                        item.get("ETag", ""),
                    )

    def close(self) -> None:
        if self._owns_client:
            self._client.close()
