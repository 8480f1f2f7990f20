"""Fixtures of the object store contract tests: one ``object_store`` per backend.

The S3 servers (``moto_endpoint``, ``seaweed_endpoint``) and ``aws_env`` are in
tests/conftest.py. The ``s3`` backend runs twice: against moto (the S3 API as AWS
documents it) and against SeaweedFS (a real storage system with its own S3 gateway).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import boto3
import pytest

from vfs.objstore import LocalStore, MemoryStore, ObjectStore

BACKENDS = ["local", "memory", "s3", "seaweedfs"]


def _admin_client(endpoint: str) -> Any:
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


@contextmanager
def _fresh_bucket(admin: Any) -> Iterator[str]:
    name = f"vfs-test-{uuid.uuid4().hex[:16]}"
    admin.create_bucket(Bucket=name)
    yield name
    for page in admin.get_paginator("list_objects_v2").paginate(Bucket=name):
        for item in page.get("Contents", ()):
            admin.delete_object(Bucket=name, Key=item["Key"])
    admin.delete_bucket(Bucket=name)


@pytest.fixture(scope="session")
def s3_admin(moto_endpoint: str) -> Iterator[Any]:
    """A plain boto3 S3 client of the moto server, for setting up and inspecting."""
    client = _admin_client(moto_endpoint)
    yield client
    client.close()


@pytest.fixture(scope="session")
def seaweed_admin(seaweed_endpoint: str) -> Iterator[Any]:
    """A plain boto3 S3 client of the SeaweedFS server, for setting up and inspecting."""
    client = _admin_client(seaweed_endpoint)
    yield client
    client.close()


@pytest.fixture
def s3_bucket(s3_admin: Any, aws_env: None) -> Iterator[str]:
    """A fresh, empty bucket on the moto server, removed after the test."""
    with _fresh_bucket(s3_admin) as name:
        yield name


@pytest.fixture
def seaweed_bucket(seaweed_admin: Any, aws_env: None) -> Iterator[str]:
    """A fresh, empty bucket on the SeaweedFS server, removed after the test."""
    with _fresh_bucket(seaweed_admin) as name:
        yield name


@pytest.fixture
def s3_store(moto_endpoint: str, s3_bucket: str) -> Iterator[ObjectStore]:
    """An S3Store under a prefix of a fresh bucket on the moto server."""
    from vfs.objstore.s3 import S3Store

    store = S3Store(s3_bucket, "store/prefix", endpoint_url=moto_endpoint)
    yield store
    store.close()


@pytest.fixture
def seaweed_store(seaweed_endpoint: str, seaweed_bucket: str) -> Iterator[ObjectStore]:
    """An S3Store under a prefix of a fresh bucket on the SeaweedFS server."""
    from vfs.objstore.s3 import S3Store

    store = S3Store(seaweed_bucket, "store/prefix", endpoint_url=seaweed_endpoint)
    yield store
    store.close()


@pytest.fixture(params=BACKENDS)
def object_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    """An empty store of each backend in turn."""
    if request.param == "s3":
        yield request.getfixturevalue("s3_store")
        return
    if request.param == "seaweedfs":
        yield request.getfixturevalue("seaweed_store")
        return
    store: ObjectStore
    if request.param == "local":
        store = LocalStore(str(tmp_path / "store"), create=True)
    else:
        store = MemoryStore()
    yield store
    store.close()
