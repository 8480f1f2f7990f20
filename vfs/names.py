"""Names, paths and ``REPO@REF[:/path]`` references: parsing and validation.

Repository and branch names follow one rule: 1 to 64 characters, letters, digits,
``.``, ``_`` and ``-``, starting with a letter or digit. Paths inside a repository
are ``/``-separated; ``.`` components are dropped and ``..`` is refused, so no
path can escape its repository.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from vfs.errors import InvalidName, InvalidPath, InvalidRef, PathTooLong

NAME_RULE = "1-64 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HEX = re.compile(r"[0-9a-f]+")
_ANCESTOR = re.compile(r"^(.*?)~(\d+)$")
MIN_PREFIX = 6
MAX_COMPONENT_BYTES = 255
# A whole path inside a repository, in UTF-8 bytes: S3's limit for a key, and
# what keeps a spool's sidecar within one extended attribute.
MAX_PATH_BYTES = 1024


def check_name(name: str, what: str = "repository") -> str:
    """Return ``name`` if valid, else raise InvalidName naming the rule."""
    if not _NAME.fullmatch(name or ""):
        raise InvalidName(f"invalid {what} name {name!r}: use {NAME_RULE}")
    return name


def normalize_path(path: str) -> str:
    """Normalize a path inside a repository to ``a/b/c`` form ("" is the root).

    Raises:
        InvalidPath: the path contains ``..`` or a NUL byte.
        PathTooLong: a component is over 255 bytes, or the path over 1024.
    """
    if "\0" in path:
        raise InvalidPath(f"path {path!r} contains a NUL byte")
    try:
        path.encode()
    except UnicodeEncodeError:
        raise InvalidPath(
            f"path {path!r} is not valid UTF-8: rename the file to put it in a repository"
        ) from None
    parts = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            raise InvalidPath(f"path {path!r} uses '..', which could escape the repository")
        if len(part.encode()) > MAX_COMPONENT_BYTES:
            raise PathTooLong(f"path component {part[:40]!r}... is longer than 255 bytes")
        parts.append(part)
    normalized = "/".join(parts)
    if len(normalized.encode()) > MAX_PATH_BYTES:
        raise PathTooLong(f"path {normalized[:60]!r}... is longer than {MAX_PATH_BYTES} bytes")
    return normalized


def parent_and_name(path: str) -> tuple[str, str]:
    """Split a normalized path into its parent directory and last component."""
    parent, _, name = path.rpartition("/")
    return parent, name


def join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def ancestors(path: str) -> list[str]:
    """The proper ancestor directories of a normalized path, root ("") first."""
    out = [""]
    parts = path.split("/")[:-1] if path else []
    for i in range(len(parts)):
        out.append("/".join(parts[: i + 1]))
    return out


def looks_like_commit(ref: str) -> bool:
    return len(ref) >= MIN_PREFIX and len(ref) <= 64 and bool(_HEX.fullmatch(ref))


@dataclass(frozen=True)
class RefSpec:
    """A parsed ``REPO@REF[:/path]``; ``ref`` is a branch name or commit id prefix."""

    repo: str
    ref: str
    path: str = ""
    ancestor: int = 0  # ``REF~N``: the Nth first-parent ancestor

    def __str__(self) -> str:
        ref = self.ref + (f"~{self.ancestor}" if self.ancestor else "")
        return f"{self.repo}@{ref}" + (f":/{self.path}" if self.path else "")


def parse_ref(text: str, *, allow_path: bool = True, default_ref: str | None = None) -> RefSpec:
    """Parse ``REPO@REF[:/path]``.

    Args:
        text: the user's string.
        allow_path: accept a ``:/path`` part.
        default_ref: used when ``@REF`` is missing (None makes it an error).

    Raises:
        InvalidRef: the string is not of that form.
        InvalidName: the repository name breaks the naming rule.
        InvalidPath: the path escapes the repository.
    """
    repo_part, at, rest = text.partition("@")
    if not at:
        if default_ref is None:
            raise InvalidRef(f"expected REPO@BRANCH or REPO@COMMIT, got {text!r}")
        repo_part, _, path_part = text.partition(":")
        ref = default_ref
        has_path = ":" in text
    else:
        ref, colon, path_part = rest.partition(":")
        has_path = bool(colon)
    check_name(repo_part, "repository")
    if has_path and not allow_path:
        raise InvalidRef(f"{text!r}: a path is not allowed here")
    ancestor = 0
    match = _ANCESTOR.match(ref)
    if match:
        ref, ancestor = match.group(1), int(match.group(2))
    if not ref:
        raise InvalidRef(f"{text!r} names no branch or commit after '@'")
    if not looks_like_commit(ref):
        check_name(ref, "branch")
    return RefSpec(repo_part, ref, normalize_path(path_part) if has_path else "", ancestor)


def parse_branch(text: str, *, allow_path: bool = False) -> RefSpec:
    """Parse ``REPO@BRANCH[:/path]`` where the ref must be a branch name."""
    spec = parse_ref(text, allow_path=allow_path)
    if spec.ancestor:
        raise InvalidRef(f"{text!r}: expected a branch, not an ancestor reference")
    check_name(spec.ref, "branch")
    return spec
