"""Pipeline specs: parsing (YAML or JSON), validation and the normalized form.

A spec names its input (a repository, branch and glob, or several combined: see
:mod:`vfs.pipeline.inputs`), a transform (image, cmd, env), the
runtime that runs it, and how (parallelism, retries, batching, limits). Parsing
fills in defaults and rejects anything unknown or malformed with a message that
names the offending key, so a typo never becomes a silently ignored setting.
Checks that need the store (the input repo exists, no cycle between pipelines)
are in :mod:`vfs.pipeline.registry`; checks that need the node (the runtime's
binary, the image directory) are the daemon's (``daemon.runtimes``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field

import yaml

from vfs.errors import InvalidSpec, VfsError
from vfs.names import check_name
from vfs.pipeline.inputs import Input, Leaf, is_plain, leaves, parse_input, to_dict

RUNTIMES = ("runc", "bwrap", "podman", "docker", "process")
IMAGE_RUNTIMES = ("runc", "podman", "docker")

_TOP_KEYS = {"pipeline", "description", "input", "transform", "runtime", "parallelism",
             "datum_tries", "datum_batch", "datum_timeout", "output_branch", "resources",
             "network", "user"}
_TRANSFORM_KEYS = {"image", "cmd", "env"}
_RESOURCE_KEYS = {"memory", "cpu", "pids"}
#: The uid and gid a datum runs as unless its spec says otherwise: the kernel's overflow
#: id ("nobody"/"nogroup"), which owns no file of a host or an image.
DEFAULT_USER = (65534, 65534)
#: How many processes and threads a datum may have at once unless its spec says otherwise.
DEFAULT_PIDS = 512
#: How long (seconds) a datum may run unless its spec or the node (vfsd --datum-timeout)
#: says otherwise: a datum that never ends must not hold its pipeline forever.
DEFAULT_DATUM_TIMEOUT = 3600.0
_MAX_ID = (1 << 32) - 2  # (uid_t)-1 means "no change" to the kernel
_MAX_PIDS = 1 << 22  # the kernel's largest pid_max
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)?", re.IGNORECASE)
_MAX_MEMORY = 1 << 60  # 1 EiB: beyond, a cgroup limit is no longer a number runc takes
_MAX_CPUS = 8192  # the most CPUs a Linux kernel supports
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd]?)", re.IGNORECASE)
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class _SpecLoader(yaml.SafeLoader):
    """YAML 1.1 without its base-60 numbers: ``user: 1000:59`` stays the text it looks
    like instead of becoming the integer 60059."""


def _no_sexagesimal(constructor):
    def construct(loader: yaml.SafeLoader, node: yaml.ScalarNode):
        text = loader.construct_scalar(node)
        return text if isinstance(text, str) and ":" in text else constructor(loader, node)
    return construct


_SpecLoader.add_constructor("tag:yaml.org,2002:int",
                            _no_sexagesimal(yaml.SafeLoader.construct_yaml_int))
_SpecLoader.add_constructor("tag:yaml.org,2002:float",
                            _no_sexagesimal(yaml.SafeLoader.construct_yaml_float))


@dataclass(frozen=True)
class Spec:
    """A validated pipeline spec with every default filled in."""

    pipeline: str
    input: Input
    cmd: tuple[str, ...]
    runtime: str
    image: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    description: str = ""
    parallelism: int = 1
    datum_tries: int = 3
    datum_batch: int = 1
    datum_timeout: float | None = None
    output_branch: str = "main"
    memory: int | None = None  # bytes
    cpu: float | None = None
    pids: int = DEFAULT_PIDS
    network: bool = False
    user: tuple[int, int] = DEFAULT_USER
    #: Why a stored spec cannot run (values an older version accepted); "" if it can.
    #: Such values are left out of the fields above (see :func:`spec_from_stored`).
    invalid: str = ""

    @property
    def leaves(self) -> list[Leaf]:
        """The repository inputs, in the order the spec names them."""
        return leaves(self.input)

    @property
    def plain(self) -> bool:
        """One repository shown under its own name (the single-input form)."""
        return is_plain(self.input)

    @property
    def input_repo(self) -> str:
        """The first input's repository (the only one of a single-input pipeline)."""
        return self.leaves[0].repo

    @property
    def input_branch(self) -> str:
        return self.leaves[0].branch

    @property
    def glob(self) -> str:
        """What decides which datums there are: the glob of a single-input pipeline;
        for several inputs, the whole expression without its branches."""
        if self.plain:
            return self.leaves[0].glob
        return json.dumps(to_dict(self.input, branches=False), sort_keys=True,
                          separators=(",", ":"))

    def by_input(self, commits: dict[str, str | None]) -> dict[str, str | None]:
        """Commits recorded by input name (a job's, an output commit's), named by this
        spec's inputs: one commit of a single-input record goes under the name of this
        spec's one input (its repository may have changed since)."""
        if len(commits) == 1 and len(self.leaves) == 1:
            return {self.leaves[0].name: next(iter(commits.values()))}
        return dict(commits)

    def to_dict(self) -> dict:
        """The spec in the document form users write (stored, shown by inspect)."""
        out: dict = {
            "pipeline": self.pipeline,
            "description": self.description,
            "input": to_dict(self.input),
            "transform": {"image": self.image, "cmd": list(self.cmd), "env": dict(self.env)},
            "runtime": self.runtime,
            "parallelism": self.parallelism,
            "datum_tries": self.datum_tries,
            "datum_batch": self.datum_batch,
            "datum_timeout": self.datum_timeout,
            "output_branch": self.output_branch,
            "resources": {"memory": self.memory, "cpu": self.cpu, "pids": self.pids},
            "network": self.network,
            "user": f"{self.user[0]}:{self.user[1]}",
        }
        return out

    def transform(self) -> dict:
        """What decides a datum's output besides its input (hashed with the image)."""
        return {"cmd": list(self.cmd), "env": dict(sorted(self.env.items())),
                "runtime": self.runtime, "image": self.image}

    def fields(self) -> dict:
        return asdict(self)


def load_spec_text(text: str, *, source: str = "spec", base_dir: str | None = None) -> Spec:
    """Parse a YAML or JSON pipeline spec.

    Args:
        text: the document.
        source: where it came from (for messages).
        base_dir: relative ``image`` paths of the runc runtime are taken relative to
            this directory (the spec file's), and stored absolute.

    Raises:
        InvalidSpec: the document is not valid YAML/JSON or not a valid spec.
    """
    try:
        document = yaml.load(text, Loader=_SpecLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InvalidSpec(f"{source}: not valid YAML or JSON{where}: {problem}") from None
    return parse_spec(document, source=source, base_dir=base_dir)


def load_spec_file(path: str) -> Spec:
    """Read and parse the spec file at ``path`` (``-`` is not accepted here)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise InvalidSpec(f"no such spec file: {path}") from None
    except UnicodeDecodeError:
        raise InvalidSpec(f"{path}: not a text file (a pipeline spec is YAML or JSON)") from None
    return load_spec_text(text, source=path, base_dir=os.path.dirname(os.path.abspath(path)))


def parse_spec(document: object, *, source: str = "spec", base_dir: str | None = None) -> Spec:
    """Validate a parsed spec document (a dict) and fill in the defaults."""

    def fail(message: str) -> InvalidSpec:
        return InvalidSpec(f"{source}: {message}")

    top = _mapping(document, "the spec", fail)
    _no_unknown(top, _TOP_KEYS, "", fail)
    name = top.get("pipeline")
    if not isinstance(name, str):
        raise fail("'pipeline' (the pipeline's name, also its output repository) is required")
    try:
        check_name(name, "pipeline")
    except VfsError as exc:
        raise fail(str(exc)) from None

    expression = parse_input(top.get("input"), fail)

    transform = _mapping(top.get("transform"), "'transform'", fail)
    _no_unknown(transform, _TRANSFORM_KEYS, "transform.", fail)
    cmd = transform.get("cmd")
    if isinstance(cmd, str):
        raise fail("'transform.cmd' must be a list of strings, e.g. [\"sh\", \"-c\", \"...\"]")
    if (not isinstance(cmd, list) or not cmd
            or not all(isinstance(part, str) for part in cmd)):
        raise fail("'transform.cmd' is required: a non-empty list of strings")
    env_doc = transform.get("env") or {}
    if not isinstance(env_doc, dict):
        raise fail("'transform.env' must be a mapping of names to values")
    env: dict[str, str] = {}
    for key, value in env_doc.items():
        if not isinstance(key, str) or not _ENV_NAME.fullmatch(key):
            raise fail(f"'transform.env': {key!r} is not a valid environment variable name")
        if key.startswith("VFS_"):
            raise fail(f"'transform.env': {key} is reserved (VFS_* variables are set by vfs)")
        if isinstance(value, (dict, list)) or value is None:
            raise fail(f"'transform.env.{key}' must be a string or a number")
        env[key] = _scalar(value)

    image = transform.get("image")
    if image is not None and not isinstance(image, str):
        raise fail("'transform.image' must be a string")
    runtime = top.get("runtime", "runc" if image else "bwrap")
    if runtime not in RUNTIMES:
        raise fail(f"unknown runtime {runtime!r}: use one of {', '.join(RUNTIMES)}")
    if runtime in IMAGE_RUNTIMES and not image:
        raise fail(f"runtime {runtime} needs 'transform.image' "
                   + ("(a root filesystem or OCI image layout directory)" if runtime == "runc"
                      else "(an image name)"))
    if runtime in ("bwrap", "process") and image:
        raise fail(f"runtime {runtime} runs host binaries: remove 'transform.image' "
                   "or use runtime runc, podman or docker")
    if runtime == "runc" and image and not os.path.isabs(image):
        image = os.path.normpath(os.path.join(base_dir or os.getcwd(), image))

    resources = _mapping(top.get("resources") or {}, "'resources'", fail)
    _no_unknown(resources, _RESOURCE_KEYS, "resources.", fail)
    memory = None
    if resources.get("memory") is not None:
        memory = parse_size(resources["memory"], fail)
    cpu = resources.get("cpu")
    if cpu is not None:
        cpu = parse_cpus(cpu, fail)
    pids = resources.get("pids", DEFAULT_PIDS)
    if isinstance(pids, bool) or not isinstance(pids, int) or not 1 <= pids <= _MAX_PIDS:
        raise fail(f"'resources.pids' must be a whole number of processes from 1 to "
                   f"{_MAX_PIDS} (default {DEFAULT_PIDS})")
    user = parse_user(top.get("user", DEFAULT_USER), fail)
    network = top.get("network", False)
    if not isinstance(network, bool):
        raise fail("'network' must be true or false")
    description = top.get("description") or ""
    if not isinstance(description, str):
        raise fail("'description' must be a string")
    output_branch = top.get("output_branch", "main")
    try:
        check_name(output_branch if isinstance(output_branch, str) else "", "branch")
    except VfsError as exc:
        raise fail(f"'output_branch': {exc}") from None
    timeout = top.get("datum_timeout")
    if timeout is not None:
        timeout = parse_duration(timeout, "'datum_timeout'", fail)
    return Spec(
        pipeline=name,
        input=expression,
        cmd=tuple(cmd),
        runtime=runtime,
        image=image,
        env=env,
        description=description,
        parallelism=_positive(top, "parallelism", 1, fail),
        datum_tries=_positive(top, "datum_tries", 3, fail),
        datum_batch=_positive(top, "datum_batch", 1, fail),
        datum_timeout=timeout,
        output_branch=output_branch,
        memory=memory,
        cpu=cpu,
        pids=pids,
        network=network,
        user=user,
    )


def spec_from_stored(document: dict) -> Spec:
    """A spec as stored by the registry.

    It was validated when it was stored, but by the rules of the version that stored
    it: older versions accepted numbers refused now (``datum_timeout: .nan``, ``cpu:
    .inf``). Such a spec still loads, so that its pipeline can be listed, inspected,
    updated and deleted: those values are left out and :attr:`Spec.invalid` says what
    is wrong, for the watcher to fail the pipeline's jobs with instead of running them.
    """
    try:
        return parse_spec(document, source="stored spec")
    except InvalidSpec as exc:
        problem = str(exc)
    spec = parse_spec(_without_bad_numbers(document), source="stored spec")
    return dataclasses.replace(spec, invalid=problem)


def _without_bad_numbers(document: dict) -> dict:
    """``document`` without the numbers :func:`parse_spec` refuses."""
    top = dict(document)
    resources = dict(top.get("resources") or {})
    checks = ((top, "datum_timeout", parse_duration), (resources, "cpu", parse_cpus),
              (resources, "memory", parse_size))
    for mapping, key, check in checks:
        if mapping.get(key) is not None:
            try:
                check(mapping[key])
            except InvalidSpec:
                mapping[key] = None
    if resources:
        top["resources"] = resources
    return top


def parse_size(value: object, fail=InvalidSpec) -> int:
    """``2G``, ``512Mi``, ``1.5GB`` or a number of bytes -> bytes."""
    if isinstance(value, bool):
        raise fail(f"'resources.memory': {value!r} is not a size")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.fullmatch(str(value).strip())
        if not match:
            raise fail(f"'resources.memory': {value!r} is not a size such as 512M or 2G")
        number, unit = float(match.group(1)), match.group(2).upper()
        size = int(number * (1 << (10 * " KMGT".index(unit or " "))))
    if size < 1 << 20:
        raise fail(f"'resources.memory': {value!r} is below 1 MiB")
    if size > _MAX_MEMORY:
        raise fail(f"'resources.memory': {value!r} is above 1 EiB")
    return size


def parse_cpus(value: object, fail=InvalidSpec) -> float:
    """A number of CPUs (``1``, ``0.5``): finite, positive, at most :data:`_MAX_CPUS`."""
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not 0 < value <= _MAX_CPUS):  # also refuses NaN
        raise fail(f"'resources.cpu' must be a positive number of CPUs, e.g. 1 or 0.5, "
                   f"at most {_MAX_CPUS} (not {value!r})")
    return float(value)


def parse_duration(value: object, what: str = "'datum_timeout'", fail=InvalidSpec) -> float:
    """``90``, ``0.5``, ``"30s"``, ``"10m"``, ``"1.5h"``, ``"1d"`` -> seconds.

    Raises:
        InvalidSpec (or what ``fail`` makes): not a finite, positive duration.
    """
    seconds = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            seconds = float(value)
        except OverflowError:  # an integer too large for a float
            pass
    elif isinstance(value, str):
        match = _DURATION.fullmatch(value.strip())
        if match:
            seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2).lower()]
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        raise fail(f"{what} must be a positive duration: seconds, or a number with a unit "
                   f"s, m, h or d, such as 30s, 10m or 1.5h (not {value!r})")
    return seconds


def parse_user(value: object, fail=InvalidSpec) -> tuple[int, int]:
    """``65534``, ``"1000:1000"`` or ``[uid, gid]`` -> (uid, gid); a lone uid is also the gid.

    Never root: uid 0 and gid 0 are refused (the point of the key is an unprivileged
    user); names are refused too, as the image's /etc/passwd and the host's may differ.
    """
    message = ("'user' must be an unprivileged numeric uid, or uid:gid, such as 65534 or "
               "\"1000:1000\" (not root, not a name)")
    if isinstance(value, (list, tuple)) and len(value) == 2:
        parts = list(value)
    elif isinstance(value, str):
        parts = value.split(":")
    elif isinstance(value, int) and not isinstance(value, bool):
        parts = [value]
    else:
        raise fail(message)
    ids = []
    for part in parts:
        if isinstance(part, str) and part.strip().isdigit():
            part = int(part.strip())
        if isinstance(part, bool) or not isinstance(part, int) or not 1 <= part <= _MAX_ID:
            raise fail(message)
        ids.append(part)
    if len(ids) == 1:
        ids.append(ids[0])
    if len(ids) != 2:
        raise fail(message)
    return ids[0], ids[1]


def _scalar(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _mapping(value: object, what: str, fail) -> dict:
    if not isinstance(value, dict):
        raise fail(f"{what} must be a mapping" + (" (it is missing)" if value is None else ""))
    return value


def _no_unknown(mapping: dict, known: set[str], prefix: str, fail) -> None:
    unknown = sorted(str(key) for key in mapping if key not in known)
    if unknown:
        raise fail(f"unknown key{'s' if len(unknown) > 1 else ''} "
                   f"{', '.join(repr(prefix + key) for key in unknown)} "
                   f"(known: {', '.join(sorted(known))})")


def _positive(top: dict, key: str, default: int, fail) -> int:
    value = top.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise fail(f"'{key}' must be a whole number of at least 1")
    return value


def spec_json(spec: Spec) -> str:
    return json.dumps(spec.to_dict(), indent=2, sort_keys=False)


__all__ = ["DEFAULT_DATUM_TIMEOUT", "DEFAULT_PIDS", "DEFAULT_USER", "IMAGE_RUNTIMES",
           "RUNTIMES", "Spec", "load_spec_file", "load_spec_text", "parse_cpus",
           "parse_duration", "parse_size", "parse_spec", "parse_user", "spec_from_stored"]
