"""Pipeline specs: parsing, defaults, validation errors, the registry's versions and checks."""

from __future__ import annotations

import json

import pytest

from vfs.errors import AlreadyExists, InvalidSpec, PipelineNotFound
from vfs.pipeline import registry
from vfs.pipeline.datums import Glob
from vfs.pipeline.spec import load_spec_text, parse_spec, spec_from_stored

YAML = """
pipeline: edges
description: detect edges
input:
  repo: images
  glob: "/*"
transform:
  cmd: ["sh", "-c", "cp -r /pfs/images/. /pfs/out/"]
  env: {THRESHOLD: 0.4, MODE: fast}
runtime: bwrap
parallelism: 2
resources: {memory: 512M}
"""


def spec_doc(**overrides) -> dict:
    doc = {"pipeline": "edges", "input": {"repo": "images"},
           "transform": {"cmd": ["true"]}, "runtime": "process"}
    doc.update(overrides)
    return doc


def test_yaml_spec_gets_defaults_and_normalized_values() -> None:
    spec = load_spec_text(YAML)
    assert spec.pipeline == "edges"
    assert spec.input_branch == "main"
    assert spec.env == {"THRESHOLD": "0.4", "MODE": "fast"}
    assert spec.memory == 512 << 20
    assert spec.datum_tries == 3 and spec.datum_batch == 1 and spec.network is False
    assert spec.output_branch == "main"


def test_datums_run_unprivileged_and_bounded_unless_the_spec_says_otherwise() -> None:
    spec = load_spec_text(YAML)
    assert spec.user == (65534, 65534) and spec.pids == 512
    spec = load_spec_text(YAML.replace("resources: {memory: 512M}",
                                       "resources: {memory: 512M, pids: 64}")
                          + "user: 1000:59\n")
    # YAML 1.1 would read 1000:59 as the base-60 number 60059: the spec keeps it as text.
    assert spec.user == (1000, 59) and spec.pids == 64
    assert parse_spec(spec_doc(user=4242)).user == (4242, 4242)
    assert parse_spec(spec_doc(user=[10, 20])).user == (10, 20)


def test_json_spec_and_round_trip_through_the_stored_form() -> None:
    spec = load_spec_text(json.dumps(spec_doc(parallelism=4, user="7:8",
                                              resources={"pids": 99})))
    again = parse_spec(json.loads(json.dumps(spec.to_dict())))
    assert again == spec


def test_relative_runc_image_is_taken_from_the_spec_directory(tmp_path) -> None:
    spec = parse_spec(spec_doc(runtime="runc", transform={"cmd": ["true"],
                                                          "image": "./rootfs"}),
                      base_dir=str(tmp_path))
    assert spec.image == str(tmp_path / "rootfs")


@pytest.mark.parametrize(("doc", "message"), [
    (spec_doc(paralelism=2), "unknown key 'paralelism'"),
    (spec_doc(input={"repo": "images", "glub": "/*"}), "unknown key 'input.glub'"),
    (spec_doc(runtime="lxc"), "unknown runtime 'lxc'"),
    (spec_doc(input={"repo": "images", "glob": "*"}), "must start with '/'"),
    (spec_doc(input={"repo": "images", "glob": "/a//b"}), "empty"),
    (spec_doc(input={"repo": "images", "glob": "/**/x"}), "only allowed as the last"),
    (spec_doc(input={"repo": "images", "glob": "/[ab"}), "unbalanced"),
    (spec_doc(transform={"cmd": "echo hi"}), "must be a list of strings"),
    (spec_doc(transform={"cmd": []}), "non-empty list"),
    (spec_doc(transform={"cmd": ["true"], "env": {"VFS_JOB_ID": "x"}}), "reserved"),
    (spec_doc(runtime="runc"), "needs 'transform.image'"),
    (spec_doc(parallelism=0), "'parallelism' must be"),
    (spec_doc(pipeline="bad name"), "invalid pipeline name"),
    (spec_doc(resources={"memory": "lots"}), "not a size"),
    (spec_doc(user=0), "unprivileged numeric uid"),
    (spec_doc(user="1000:0"), "unprivileged numeric uid"),
    (spec_doc(user="root"), "not a name"),
    (spec_doc(user=True), "unprivileged numeric uid"),
    (spec_doc(user="1:2:3"), "unprivileged numeric uid"),
    (spec_doc(user=1 << 32), "unprivileged numeric uid"),
    (spec_doc(resources={"pids": 0}), "'resources.pids' must be"),
    (spec_doc(resources={"pids": "many"}), "'resources.pids' must be"),
    ({"input": {"repo": "x"}}, "'pipeline'"),
    ([1, 2], "must be a mapping"),
])
def test_invalid_specs_are_refused_with_the_reason(doc, message) -> None:
    with pytest.raises(InvalidSpec, match=message.replace("[", r"\[").replace("*", r"\*")):
        parse_spec(doc)


@pytest.mark.parametrize(("text", "message"), [
    ("datum_timeout: .nan", "'datum_timeout' must be a positive duration"),
    ("datum_timeout: .inf", "'datum_timeout' must be a positive duration"),
    ("datum_timeout: -.inf", "'datum_timeout' must be a positive duration"),
    ("datum_timeout: 0", "'datum_timeout' must be a positive duration"),
    ("datum_timeout: -5", "'datum_timeout' must be a positive duration"),
    ("datum_timeout: 0s", "'datum_timeout' must be a positive duration"),
    ("datum_timeout: 10 minutes", "'datum_timeout' must be a positive duration"),
    ("datum_timeout: nans", "'datum_timeout' must be a positive duration"),
    ("datum_timeout: true", "'datum_timeout' must be a positive duration"),
    ("resources: {cpu: .nan}", "'resources.cpu' must be a positive number of CPUs"),
    ("resources: {cpu: .inf}", "'resources.cpu' must be a positive number of CPUs"),
    ("resources: {cpu: 1e300}", "'resources.cpu' must be a positive number of CPUs"),
    ("resources: {cpu: '2'}", "'resources.cpu' must be a positive number of CPUs"),
    ("resources: {memory: .nan}", "'resources.memory': nan is not a size"),
    ("resources: {memory: .inf}", "'resources.memory': inf is not a size"),
    ("resources: {memory: 1e30}", "'resources.memory'"),
    ("resources: {memory: 10000000000000000000000}", "'resources.memory': .* above"),
    ("resources: {memory: 0.5}", "below 1 MiB"),
])
def test_numbers_must_be_finite_and_positive(text: str, message: str) -> None:
    with pytest.raises(InvalidSpec, match=message) as raised:
        load_spec_text(YAML + text + "\n")
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(("value", "seconds"), [
    (90, 90.0), (0.5, 0.5), ("30s", 30.0), ("10m", 600.0), ("1h", 3600.0),
    ("1.5h", 5400.0), ("2 h", 7200.0), ("45", 45.0), ("1d", 86400.0),
])
def test_datum_timeout_takes_seconds_or_a_duration_with_a_unit(value, seconds) -> None:
    spec = parse_spec(spec_doc(datum_timeout=value))
    assert spec.datum_timeout == seconds
    assert parse_spec(json.loads(json.dumps(spec.to_dict()))) == spec


def test_a_stored_spec_an_older_version_accepted_still_loads_and_says_why_not() -> None:
    # Older versions stored these; the registry must still list the pipeline (so that
    # it can be updated or deleted) and the watcher fail its jobs with the reason.
    stored = json.loads(json.dumps(spec_doc(datum_timeout=float("nan"),
                                            resources={"cpu": float("inf")})))
    spec = spec_from_stored(stored)
    assert spec.datum_timeout is None and spec.cpu is None
    assert "'resources.cpu' must be a positive number of CPUs" in spec.invalid
    assert parse_spec(spec_doc()).invalid == ""


def test_malformed_yaml_names_the_line() -> None:
    with pytest.raises(InvalidSpec, match="line 3"):
        load_spec_text("pipeline: x\ninput: [unclosed\n")


@pytest.mark.parametrize(("pattern", "path", "datum"), [
    ("/*", "a.png", "a.png"),
    ("/*", "dir/sub/a.png", "dir"),
    ("/*/*", "dir/sub/a.png", "dir/sub"),
    ("/*/*", "a.png", None),
    ("/", "dir/a", ""),
    ("/**", "dir/sub/a.png", "dir/sub/a.png"),
    ("/images/**", "images/x/y", "images/x/y"),
    ("/images/**", "other/x", None),
    ("/*.png", "a.jpg", None),
])
def test_glob_maps_a_changed_file_to_its_datum(pattern, path, datum) -> None:
    assert Glob(pattern).datum_of(path) == datum


def test_registry_keeps_every_version_and_checks_inputs(store) -> None:
    spec = parse_spec(spec_doc())
    with pytest.raises(InvalidSpec, match="input repository images does not exist"):
        registry.create(store, spec)
    store.create_repo("images")
    first = registry.create(store, spec)
    assert first.version == 1
    assert store.repo("edges").description == "output of pipeline edges"
    with pytest.raises(AlreadyExists, match="pipeline update"):
        registry.create(store, spec)
    second = registry.update(store, parse_spec(spec_doc(parallelism=3)), keep_outputs=True)
    assert second.version == 2 and second.keep_outputs
    assert [v.version for v in registry.versions(store.objects, "edges")] == [1, 2]
    registry.delete(store, "edges")
    assert registry.current(store.objects, "edges") is None
    with pytest.raises(PipelineNotFound):
        registry.get(store.objects, "edges")
    # The history stays, and the name can be registered again (output repo reused).
    again = registry.create(store, spec)
    assert again.version == 4


def test_registry_refuses_a_name_taken_by_a_repository(store) -> None:
    store.create_repo("images")
    store.create_repo("edges")
    with pytest.raises(InvalidSpec, match="repository named edges already exists"):
        registry.create(store, parse_spec(spec_doc()))


def test_registry_refuses_cycles(store) -> None:
    store.create_repo("images")
    registry.create(store, parse_spec(spec_doc()))  # images -> edges
    registry.create(store, parse_spec(spec_doc(pipeline="thumbs",
                                               input={"repo": "edges"})))  # edges -> thumbs
    # images -> edges -> thumbs -> edges would loop.
    with pytest.raises(InvalidSpec, match="cycle: thumbs -> edges -> thumbs"):
        registry.update(store, parse_spec(spec_doc(input={"repo": "thumbs"})))
    store.create_repo("selfish")
    with pytest.raises(InvalidSpec, match="cycle: selfish -> selfish"):
        registry.create(store, parse_spec(spec_doc(pipeline="selfish",
                                                   input={"repo": "selfish"})))
    with pytest.raises(InvalidSpec, match="feeds thumbs"):
        registry.delete(store, "edges")
