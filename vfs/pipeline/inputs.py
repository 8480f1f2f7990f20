"""A pipeline's inputs: one repository, or several combined by cross, union, join, group.

An input expression is a tree. Its leaves are repository inputs (:class:`Leaf`:
``repo``, ``branch``, ``glob``, and ``name``, the directory under ``/pfs`` and the
key of its commit in provenance, the repository's name unless given); its inner
nodes (:class:`Combine`) combine the datums of their inputs:

* ``cross``: every combination, one datum of each input (the product);
* ``union``: the datums of each input in turn, each on its own;
* ``join``: the datums whose ``join_on`` keys are equal, one of each input per
  combination (the product per key); an input with ``outer: true`` also keeps its
  datums that match nothing;
* ``group``: one datum per ``group_by`` key holding every datum of every input
  with that key.

Keys are made from the glob's capture groups (its parenthesised parts): ``join_on:
"$1"`` is what the first group matched in the datum's root.

Inside a datum's container every input is a directory ``/pfs/<name>`` holding that
datum's files of it (empty when the datum has none), and ``VFS_INPUT_<NAME>_COMMIT``
names the input commit they were read from. Which datums an expression makes over
given commits is :mod:`vfs.pipeline.combine`'s job.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from vfs.errors import InvalidSpec, VfsError
from vfs.names import check_name
from vfs.pipeline.datums import Glob

COMBINATORS = ("cross", "union", "join", "group")
_LEAF_KEYS = ("repo", "branch", "glob", "name", "join_on", "group_by", "outer")
_NOT_ENV = re.compile(r"[^A-Z0-9_]")
_REFERENCE = re.compile(r"\$(?:(\d)|\{(\d+)\})")


@dataclass(frozen=True)
class Leaf:
    """One repository input."""

    repo: str
    branch: str = "main"
    glob: str = "/*"
    name: str = ""  # the directory under /pfs ("" in the constructor: the repo's name)
    join_on: str | None = None
    group_by: str | None = None
    outer: bool = False

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", self.repo)

    @property
    def key_template(self) -> str | None:
        return self.join_on if self.join_on is not None else self.group_by

    def key(self, glob: Glob, root: str) -> str:
        """The ``join_on``/``group_by`` key of the datum at ``root``."""
        template = self.key_template or ""
        groups = glob.captures(root)

        def group(match: re.Match) -> str:
            number = int(match.group(1) or match.group(2))
            return groups[number - 1] if number <= len(groups) else ""

        return _REFERENCE.sub(group, template)


@dataclass(frozen=True)
class Combine:
    """Inputs combined by ``op`` (one of :data:`COMBINATORS`)."""

    op: str
    inputs: tuple[Input, ...]


Input = Leaf | Combine


def leaves(expression: Input) -> list[Leaf]:
    """The repository inputs of an expression, in the order the spec names them."""
    if isinstance(expression, Leaf):
        return [expression]
    return [leaf for child in expression.inputs for leaf in leaves(child)]


def is_plain(expression: Input) -> bool:
    """Whether this is the single-input form every version understood (one repository
    shown under its own name, no keys): its datums keep their plain roots and hashes."""
    return (isinstance(expression, Leaf) and expression.name == expression.repo
            and expression.key_template is None and not expression.outer)


def commit_env_var(name: str) -> str:
    """The environment variable naming input ``name``'s commit in a datum's container:
    ``VFS_INPUT_<NAME>_COMMIT``, the name upper-cased with every character that cannot
    be in a variable name (``-``, ``.``) written ``_``."""
    return f"VFS_INPUT_{_NOT_ENV.sub('_', name.upper())}_COMMIT"


def to_dict(expression: Input, *, branches: bool = True) -> dict:
    """The expression in the form users write (stored with the spec).

    Args:
        branches: include each input's branch (left out of what identifies datums:
            a datum is its files, wherever they were committed).
    """
    if isinstance(expression, Combine):
        return {expression.op: [to_dict(child, branches=branches)
                                for child in expression.inputs]}
    out: dict = {"repo": expression.repo}
    if branches:
        out["branch"] = expression.branch
    out["glob"] = expression.glob
    if expression.name != expression.repo:
        out["name"] = expression.name
    if expression.join_on is not None:
        out["join_on"] = expression.join_on
    if expression.group_by is not None:
        out["group_by"] = expression.group_by
    if expression.outer:
        out["outer"] = True
    return out


def describe(expression: Input) -> str:
    """One line for listings: ``images@main /*`` or ``cross(images@main /*, ...)``."""
    if isinstance(expression, Combine):
        return f"{expression.op}({', '.join(describe(c) for c in expression.inputs)})"
    named = f"{expression.name}=" if expression.name != expression.repo else ""
    key = ""
    if expression.join_on is not None:
        key = f" on {expression.join_on}" + (" outer" if expression.outer else "")
    elif expression.group_by is not None:
        key = f" by {expression.group_by}"
    return f"{named}{expression.repo}@{expression.branch} {expression.glob}{key}"


# -- parsing ------------------------------------------------------------------------------


def parse_input(document: object, fail=InvalidSpec) -> Input:
    """Validate the spec's ``input`` and return its expression.

    Raises:
        InvalidSpec (or what ``fail`` makes): the message names the offending key,
            e.g. ``'input.join[1].join_on'``.
    """
    expression = _parse(document, "input", None, fail)
    names: dict[str, str] = {}
    variables: dict[str, str] = {}
    for leaf in leaves(expression):
        if leaf.name in names:
            raise fail(f"'input': two inputs are named {leaf.name!r} (both would be "
                       f"/pfs/{leaf.name}): give one of them a 'name'")
        names[leaf.name] = leaf.repo
        variable = commit_env_var(leaf.name)
        if variable in variables:
            raise fail(f"'input': inputs {variables[variable]!r} and {leaf.name!r} would "
                       f"both set {variable}: rename one ('name')")
        variables[variable] = leaf.name
    return expression


def _parse(document: object, where: str, within: str | None, fail) -> Input:
    if not isinstance(document, dict):
        raise fail(f"'{where}' must be a mapping" + (" (it is missing)" if document is None
                                                     else ""))
    ops = [key for key in document if key in COMBINATORS]
    if ops:
        op = ops[0]
        if len(document) != 1:
            others = ", ".join(repr(str(k)) for k in document if k != op)
            raise fail(f"'{where}': {op} combines the inputs listed under it and takes no "
                       f"other key (found {others})")
        items = document[op]
        least = 1 if op == "group" else 2
        if not isinstance(items, list) or len(items) < least:
            raise fail(f"'{where}.{op}' must be a list of at least {least} input"
                       f"{'s' if least > 1 else ''}")
        if op in ("join", "group"):
            key = "join_on" if op == "join" else "group_by"
            for i, item in enumerate(items):
                inner = [k for k in item if k in COMBINATORS] if isinstance(item, dict) else []
                if inner:
                    raise fail(f"'{where}.{op}[{i}]': a {op} combines repository inputs "
                               f"(repo, glob, {key}), not a {inner[0]}")
        return Combine(op, tuple(_parse(item, f"{where}.{op}[{i}]", op, fail)
                                 for i, item in enumerate(items)))
    if "repo" not in document:
        unknown = sorted(str(k) for k in document if k not in _LEAF_KEYS)
        if unknown:
            raise fail(f"'{where}': unknown key{'s' if len(unknown) > 1 else ''} "
                       f"{', '.join(repr(k) for k in unknown)}: an input is a repository "
                       f"({', '.join(_LEAF_KEYS)}) or one of {', '.join(COMBINATORS)}")
        raise fail(f"'{where}.repo' (the repository to read) is required")
    return _leaf(document, where, within, fail)


def _leaf(document: dict, where: str, within: str | None, fail) -> Leaf:
    unknown = sorted(str(k) for k in document if k not in _LEAF_KEYS)
    if unknown:
        raise fail(f"unknown key{'s' if len(unknown) > 1 else ''} "
                   f"{', '.join(repr(f'{where}.{k}') for k in unknown)} "
                   f"(known: {', '.join(sorted(_LEAF_KEYS))}; or one of "
                   f"{', '.join(COMBINATORS)})")
    repo = document["repo"]
    branch = document.get("branch", "main")
    for value, key, what in ((repo, "repo", "repository"), (branch, "branch", "branch")):
        if not isinstance(value, str):
            raise fail(f"'{where}.{key}' must be a name")
        try:
            check_name(value, what)
        except VfsError as exc:
            raise fail(f"'{where}.{key}': {exc}") from None
    name = document.get("name", repo)
    if not isinstance(name, str):
        raise fail(f"'{where}.name' must be a name (the directory under /pfs)")
    try:
        check_name(name, "input")
    except VfsError as exc:
        raise fail(f"'{where}.name': {exc}") from None
    if name == "out":
        raise fail(f"'{where}.name': an input cannot be /pfs/out, where the command writes "
                   "its output: choose another 'name'" if "name" in document else
                   f"'{where}.repo': a repository named 'out' cannot be an input under its "
                   "own name (/pfs/out is where the command writes its output): give the "
                   "input another 'name'")
    pattern = document.get("glob", "/*")
    if not isinstance(pattern, str):
        raise fail(f"'{where}.glob' must be a string such as \"/*\"")
    try:
        glob = Glob(pattern)
    except InvalidSpec as exc:
        raise fail(f"'{where}.glob': {exc}") from None
    outer = document.get("outer", False)
    if not isinstance(outer, bool):
        raise fail(f"'{where}.outer' must be true or false")
    if outer and within != "join":
        raise fail(f"'{where}.outer' only means something in a join (it keeps the datums "
                   "of that input that match no other)")
    keys = {}
    for key, op in (("join_on", "join"), ("group_by", "group")):
        template = document.get(key)
        if template is None:
            if within == op:
                raise fail(f"'{where}.{key}' is required in a {op}: the key made from the "
                           f"glob's capture groups, e.g. \"$1\"")
            continue
        if within != op:
            raise fail(f"'{where}.{key}' only means something in a {op}")
        keys[key] = _template(template, glob, f"{where}.{key}", fail)
    return Leaf(repo=repo, branch=branch, glob=pattern, name=name, outer=outer,
                join_on=keys.get("join_on"), group_by=keys.get("group_by"))


def _template(template: object, glob: Glob, where: str, fail) -> str:
    if isinstance(template, int) and not isinstance(template, bool):
        template = f"${template}"
    if not isinstance(template, str):
        raise fail(f"'{where}' must be a string naming capture groups, e.g. \"$1\"")
    if glob.groups == 0:
        raise fail(f"'{where}' needs a capture group in the glob: put the part to match on "
                   f"in parentheses, e.g. \"/(*).csv\" (glob {glob.pattern!r} has none)")
    references = [int(m.group(1) or m.group(2)) for m in _REFERENCE.finditer(template)]
    if not references:
        raise fail(f"'{where}': {template!r} names no capture group: use $1 for the first "
                   "parenthesised part of the glob, $2 for the second...")
    for number in references:
        if not 1 <= number <= glob.groups:
            raise fail(f"'{where}': ${number} names capture group {number}, but glob "
                       f"{glob.pattern!r} has {glob.groups} (its parenthesised parts)")
    return template


__all__ = ["COMBINATORS", "Combine", "Input", "Leaf", "commit_env_var", "describe",
           "is_plain", "leaves", "parse_input", "to_dict"]
