"""OCI image layout directories: reading them, and unpacking their layers into a rootfs.

An OCI image layout (``oci-layout``, ``index.json``, ``blobs/<alg>/<hex>``) is what
``skopeo copy docker://... oci:DIR``, ``buildah push ... oci:DIR`` or ``docker buildx
--output type=oci`` produce. Its identity is the digest of the image manifest
``index.json`` points at. To run it, runc needs a plain directory: the manifest's
layers (tar, gzip or zstd) are applied in order into a root filesystem cached under
``<cache>/<alg>-<hex>/rootfs``, once per manifest digest; ``image.json`` next to it
keeps the image's ``Env``. A cached root filesystem is never modified afterwards.

Every blob is checked against its digest while it is read. A layer entry that would
land outside the root filesystem (``..``, or through a symlink) is refused; device
nodes are skipped (the container gets its own ``/dev``). Whiteouts are handled the
minimal way the layer format needs: ``.wh.<name>`` removes ``<name>`` of the lower
layers, ``.wh..wh..opq`` empties its directory of what lower layers put there.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import platform
import posixpath
import re
import shutil
import stat
import tarfile
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from vfs.errors import InvalidSpec

_DIGEST = re.compile(r"(sha256|sha512):([0-9a-f]{64}|[0-9a-f]{128})")
_MANIFEST_TYPES = ("application/vnd.oci.image.manifest.v1+json",
                   "application/vnd.docker.distribution.manifest.v2+json")
_INDEX_TYPES = ("application/vnd.oci.image.index.v1+json",
                "application/vnd.docker.distribution.manifest.list.v2+json")
_ARCHITECTURES = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386",
                  "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}
_MAX_JSON = 16 << 20  # manifests and configs are small: refuse absurd ones
_READ_SIZE = 1 << 20
_WHITEOUT = ".wh."
_OPAQUE = ".wh..wh..opq"

_Fail = Callable[[str], InvalidSpec]  # makes the error, naming the layout or the layer
_unpack_locks: dict[str, threading.Lock] = {}
_unpack_locks_guard = threading.Lock()


@dataclass(frozen=True)
class Layer:
    media_type: str
    digest: str
    size: int


@dataclass(frozen=True)
class ImageManifest:
    """The parts of an image the runtime uses."""

    digest: str  # of the manifest: the image's identity
    layers: tuple[Layer, ...]
    env: dict[str, str]  # the image config's Env


@dataclass(frozen=True)
class UnpackedImage:
    rootfs: str
    env: dict[str, str]


def is_layout(path: str) -> bool:
    """Whether ``path`` is (meant to be) an OCI image layout rather than a rootfs."""
    return (os.path.isfile(os.path.join(path, "index.json"))
            or os.path.isfile(os.path.join(path, "oci-layout")))


def read_manifest(layout: str, *, check_layers: bool = False) -> ImageManifest:
    """Read the image manifest and config ``layout/index.json`` points at.

    Args:
        check_layers: also check that every layer blob is present with its size.

    Raises:
        InvalidSpec: the layout is malformed, incomplete or ambiguous.
    """

    def fail(message: str) -> InvalidSpec:
        return InvalidSpec(f"OCI image layout {layout}: {message}")

    marker = _read_json(layout, os.path.join(layout, "oci-layout"), fail)
    if not isinstance(marker, dict) or "imageLayoutVersion" not in marker:
        raise fail("oci-layout has no imageLayoutVersion")
    index = _read_json(layout, os.path.join(layout, "index.json"), fail)
    descriptor = _pick_manifest(layout, index, fail)
    manifest = _read_blob_json(layout, descriptor, fail)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("layers"), list):
        raise fail(f"manifest {descriptor['digest']} has no list of layers")
    config = _read_blob_json(layout, _descriptor(manifest.get("config"), fail), fail)
    env: dict[str, str] = {}
    for item in ((config.get("config") or {}).get("Env") or []) if isinstance(config, dict) else []:
        if isinstance(item, str) and "=" in item:
            key, value = item.split("=", 1)
            env[key] = value
    layers = []
    for raw in manifest["layers"]:
        descriptor_ = _descriptor(raw, fail)
        layers.append(Layer(descriptor_["mediaType"], descriptor_["digest"], descriptor_["size"]))
        _compression(layers[-1], fail)
        if check_layers:
            path = _blob_path(layout, layers[-1].digest)
            try:
                size = os.path.getsize(path)
            except OSError:
                raise fail(f"layer blob {layers[-1].digest} is missing") from None
            if size != layers[-1].size:
                raise fail(f"layer blob {layers[-1].digest} has {size} bytes, "
                           f"the manifest says {layers[-1].size}")
    return ImageManifest(descriptor["digest"], tuple(layers), env)


def unpack(layout: str, cache_dir: str) -> UnpackedImage:
    """The root filesystem of the image at ``layout``, unpacked into ``cache_dir`` once.

    Synchronous and slow the first time: call it from a worker thread. Several
    threads or processes may unpack the same image at once: each builds its own copy
    in a temporary directory and the first rename wins.

    Raises:
        InvalidSpec: the layout is malformed, a blob does not match its digest, or a
            layer cannot be applied.
    """
    manifest = read_manifest(layout)
    key = manifest.digest.replace(":", "-")
    final = os.path.join(cache_dir, key)
    unpacked = _load_unpacked(final)
    if unpacked is not None:
        return unpacked
    with _unpack_locks_guard:
        lock = _unpack_locks.setdefault(key, threading.Lock())
    with lock:
        unpacked = _load_unpacked(final)
        if unpacked is not None:
            return unpacked
        os.makedirs(cache_dir, exist_ok=True)
        scratch = tempfile.mkdtemp(prefix=f".{key}.", dir=cache_dir)
        try:
            os.chmod(scratch, 0o755)
            rootfs = os.path.join(scratch, "rootfs")
            os.mkdir(rootfs, 0o755)
            for layer in manifest.layers:
                _apply_layer(layout, layer, rootfs)
            with open(os.path.join(scratch, "image.json"), "w") as f:
                json.dump({"manifest": manifest.digest, "env": manifest.env}, f)
            try:
                os.rename(scratch, final)
            except OSError:
                if _load_unpacked(final) is None:
                    raise
                shutil.rmtree(scratch)  # another process finished first
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
    unpacked = _load_unpacked(final)
    assert unpacked is not None
    return unpacked


def _load_unpacked(directory: str) -> UnpackedImage | None:
    try:
        with open(os.path.join(directory, "image.json")) as f:
            info = json.load(f)
    except (FileNotFoundError, ValueError):
        return None
    return UnpackedImage(os.path.join(directory, "rootfs"), dict(info.get("env") or {}))


def _read_json(layout: str, path: str, fail: _Fail) -> object:
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_JSON + 1)
    except FileNotFoundError:
        raise fail(f"{os.path.relpath(path, layout)} is missing") from None
    except OSError as exc:
        raise fail(f"{os.path.relpath(path, layout)} cannot be read: {exc.strerror}") from None
    try:
        return json.loads(data)
    except ValueError:
        raise fail(f"{os.path.relpath(path, layout)} is not JSON") from None


def _descriptor(raw: object, fail: _Fail) -> dict:
    if (not isinstance(raw, dict) or not isinstance(raw.get("digest"), str)
            or not isinstance(raw.get("mediaType"), str) or not isinstance(raw.get("size"), int)):
        raise fail(f"malformed descriptor {raw!r} (needs mediaType, digest and size)")
    if not _DIGEST.fullmatch(raw["digest"]):
        raise fail(f"unsupported digest {raw['digest']!r} (sha256 or sha512 expected)")
    return raw


def _blob_path(layout: str, digest: str) -> str:
    algorithm, hexdigest = digest.split(":", 1)
    return os.path.join(layout, "blobs", algorithm, hexdigest)


def _read_blob_json(layout: str, descriptor: dict, fail: _Fail) -> dict:
    digest = descriptor["digest"]
    if descriptor["size"] > _MAX_JSON:
        raise fail(f"blob {digest} is too large for a manifest or config")
    try:
        with open(_blob_path(layout, digest), "rb") as f:
            data = f.read(_MAX_JSON + 1)
    except FileNotFoundError:
        raise fail(f"blob {digest} is missing") from None
    algorithm, expected = digest.split(":", 1)
    if hashlib.new(algorithm, data).hexdigest() != expected:
        raise fail(f"blob {digest} does not match its digest: the layout is damaged")
    try:
        document = json.loads(data)
    except ValueError:
        raise fail(f"blob {digest} is not JSON") from None
    if not isinstance(document, dict):
        raise fail(f"blob {digest} is not a JSON object")
    return document


def _pick_manifest(layout: str, index: object, fail: _Fail) -> dict:
    """The manifest descriptor for this machine, following nested indexes."""
    machine = _ARCHITECTURES.get(platform.machine(), platform.machine())
    for _ in range(8):
        if not isinstance(index, dict) or not isinstance(index.get("manifests"), list):
            raise fail("index.json has no list of manifests")
        entries = [_descriptor(raw, fail) for raw in index["manifests"]]
        entries = [entry for entry in entries if _platform_matches(entry, machine)]
        if not entries:
            raise fail(f"no image for linux/{machine} in index.json")
        if len(entries) > 1:
            latest = [entry for entry in entries if (entry.get("annotations") or {}).get(
                "org.opencontainers.image.ref.name") == "latest"]
            if len(latest) != 1:
                names = [(entry.get("annotations") or {}).get(
                    "org.opencontainers.image.ref.name", entry["digest"]) for entry in entries]
                raise fail(f"index.json lists several images ({', '.join(names)}): keep one "
                           "(e.g. skopeo copy oci:DIR:TAG oci:NEWDIR)")
            entries = latest
        entry = entries[0]
        if entry["mediaType"] in _MANIFEST_TYPES:
            return entry
        if entry["mediaType"] not in _INDEX_TYPES:
            raise fail(f"unsupported manifest type {entry['mediaType']}")
        index = _read_blob_json(layout, entry, fail)
    raise fail("index.json nests image indexes too deeply")


def _platform_matches(entry: dict, machine: str) -> bool:
    platform_ = entry.get("platform")
    if not isinstance(platform_, dict):
        return True
    return platform_.get("os", "linux") == "linux" and platform_.get("architecture") in (
        None, machine)


def _compression(layer: Layer, fail: _Fail) -> str:
    media_type = layer.media_type
    if media_type.endswith(("+gzip", ".tar.gzip")):
        return "gzip"
    if media_type.endswith("+zstd"):
        return "zstd"
    if media_type.endswith((".tar", "layer.v1.tar")):
        return "tar"
    raise fail(f"layer {layer.digest} has unsupported media type {media_type}")


class _DigestReader:
    """A file reader that hashes what passes through it, to check a blob as it streams."""

    def __init__(self, raw: BinaryIO, digest: str) -> None:
        algorithm, self._expected = digest.split(":", 1)
        self._raw = raw
        self._hash = hashlib.new(algorithm)

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self._hash.update(data)
        return data

    def matches(self) -> bool:
        while self.read(_READ_SIZE):
            pass
        return self._hash.hexdigest() == self._expected


def _apply_layer(layout: str, layer: Layer, rootfs: str) -> None:
    def fail(message: str) -> InvalidSpec:
        return InvalidSpec(f"OCI image layout {layout}: layer {layer.digest}: {message}")

    compression = _compression(layer, fail)
    try:
        raw = open(_blob_path(layout, layer.digest), "rb")
    except FileNotFoundError:
        raise fail("the blob is missing") from None
    with raw:
        reader = _DigestReader(raw, layer.digest)
        if compression == "gzip":
            stream: object = gzip.GzipFile(fileobj=reader, mode="rb")  # type: ignore[call-overload]
        elif compression == "zstd":
            import zstandard

            stream = zstandard.ZstdDecompressor().stream_reader(
                reader, read_across_frames=True)  # type: ignore[arg-type]
        else:
            stream = reader
        created: set[str] = set()
        try:
            with tarfile.open(fileobj=stream, mode="r|") as tar:  # type: ignore[call-overload]
                for member in tar:
                    _apply_member(tar, member, rootfs, created, fail)
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise fail(f"cannot be unpacked: {exc}") from None
        if not reader.matches():
            raise fail("the blob does not match its digest: the layout is damaged")


def _apply_member(tar: tarfile.TarFile, member: tarfile.TarInfo, rootfs: str,
                  created: set[str], fail: _Fail) -> None:
    name = _clean(member.name, fail)
    if not name:
        return  # the layer's root directory entry
    directory, base = posixpath.split(name)
    parent = _real_directory(rootfs, directory, fail, create=True)
    if base.startswith(_WHITEOUT):
        if base == _OPAQUE:
            for child in os.listdir(parent):
                if posixpath.join(directory, child) not in created:
                    _remove(os.path.join(parent, child))
        else:
            _remove(os.path.join(parent, base[len(_WHITEOUT):]))
        return
    if member.ischr() or member.isblk():
        return
    target = os.path.join(parent, base)
    try:
        existing = os.lstat(target)
    except FileNotFoundError:
        existing = None
    if existing is not None and not (member.isdir() and stat.S_ISDIR(existing.st_mode)):
        # Never write through what a lower layer put there (it may be a symlink).
        _remove(target)
    member.name = name
    if member.islnk():
        member.linkname = _clean(member.linkname, fail)
        link_directory = posixpath.dirname(member.linkname)
        _real_directory(rootfs, link_directory, fail, create=False)
    # Our own checks above replace tarfile's filters (Python >= 3.11.4); the "tar" and
    # "data" filters would refuse what root filesystems legitimately hold.
    extra = {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}
    tar.extract(member, rootfs, numeric_owner=True, **extra)  # type: ignore[arg-type]
    created.add(name)


def _clean(name: str, fail: _Fail) -> str:
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise fail(f"entry {name!r} points outside the image")
    return "/".join(parts)


def _real_directory(rootfs: str, directory: str, fail: _Fail, *, create: bool) -> str:
    """The host path of ``directory`` in ``rootfs``, refusing symlinks on the way."""
    path = rootfs
    for part in directory.split("/") if directory else []:
        path = os.path.join(path, part)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            if not create:
                raise fail(f"a hard link points into missing directory {directory!r}") from None
            os.mkdir(path, 0o755)
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise fail(f"an entry goes through {part!r} in {directory!r}, which is not a "
                       "directory (writing through symlinks is refused)")
    return path


def _remove(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)
