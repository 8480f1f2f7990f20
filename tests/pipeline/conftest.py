"""Fixtures for the pipeline tests: tiny container images built from a static busybox.

``busybox_rootfs`` (in tests/conftest.py, shared with the mount tests) is a root
filesystem directory (``/bin/busybox`` and a symlink per applet, a minimal ``/etc``);
``oci_layout`` packs it as an OCI image layout of two
layers, the second exercising whiteouts, so that runc's unpacking path runs too.
Both are built once per session and must not be modified by tests (copy them).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard

BUSYBOX = "/bin/busybox"
IMAGE_ENV = ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "IMAGE_VAR=from-image"]


def tar_layer(build: Callable[[tarfile.TarFile], None]) -> bytes:
    """An uncompressed layer: the tar that ``build`` writes."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        build(tar)
    return buffer.getvalue()


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _write_blob(layout: Path, data: bytes) -> dict:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


@pytest.fixture
def make_layout() -> Callable[..., str]:
    """``make_layout(dir, [build, ...], env)``: an OCI layout of layers written by the
    ``build(tar)`` functions; returns the manifest digest."""
    return lambda layout, builds, env, **options: write_oci_layout(
        layout, [tar_layer(build) for build in builds], env, **options)


def write_oci_layout(layout: Path, layers: list[bytes], env: list[str], *,
                     compression: str = "gzip") -> str:
    """Write an OCI image layout of ``layers`` compressed with ``compression`` (gzip,
    zstd or none); returns the manifest digest."""
    (layout / "blobs" / "sha256").mkdir(parents=True)
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    layer_descriptors = []
    diff_ids = []
    for layer in layers:
        if compression == "gzip":
            data, suffix = gzip.compress(layer, mtime=0), "+gzip"
        elif compression == "zstd":
            data, suffix = zstandard.ZstdCompressor().compress(layer), "+zstd"
        else:
            data, suffix = layer, ""
        blob = _write_blob(layout, data)
        layer_descriptors.append(
            {"mediaType": f"application/vnd.oci.image.layer.v1.tar{suffix}", **blob})
        diff_ids.append("sha256:" + hashlib.sha256(layer).hexdigest())
    config = {"architecture": "amd64", "os": "linux",
              "config": {"Env": env, "Cmd": ["/bin/sh"]},
              "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    config_blob = _write_blob(layout, json.dumps(config).encode())
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           **config_blob},
                "layers": layer_descriptors}
    manifest_blob = _write_blob(layout, json.dumps(manifest).encode())
    index = {"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", **manifest_blob,
         "annotations": {"org.opencontainers.image.ref.name": "latest"}}]}
    (layout / "index.json").write_text(json.dumps(index))
    return manifest_blob["digest"]


@pytest.fixture(scope="session")
def oci_layout(busybox_rootfs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``busybox_rootfs`` as an OCI image layout (gzip layers, an image Env).

    Layer 1 is the rootfs plus ``/etc/removed`` and ``/opaque/old``; layer 2 deletes
    ``/etc/removed`` (whiteout), empties ``/opaque`` (opaque whiteout) while adding
    ``/opaque/new``, and adds ``/etc/layer2``. The unpacked image must have
    ``/etc/layer2`` and ``/opaque/new`` only.
    """

    def first(tar: tarfile.TarFile) -> None:
        tar.add(busybox_rootfs, arcname=".")
        _add_bytes(tar, "etc/removed", b"lower layer\n")
        _add_bytes(tar, "opaque/old", b"lower layer\n")

    def second(tar: tarfile.TarFile) -> None:
        _add_bytes(tar, "etc/.wh.removed", b"")
        _add_bytes(tar, "opaque/new", b"upper layer\n")
        _add_bytes(tar, "opaque/.wh..wh..opq", b"")
        _add_bytes(tar, "etc/layer2", b"upper layer\n")
        link = tarfile.TarInfo("etc/passwd.hard")
        link.type = tarfile.LNKTYPE
        link.linkname = "etc/passwd"
        tar.addfile(link)

    layout = tmp_path_factory.mktemp("oci") / "image"
    write_oci_layout(layout, [tar_layer(first), tar_layer(second)], IMAGE_ENV)
    return layout
