"""Names, paths and REPO@REF[:/path] references."""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vfs import RefSpec, parse_branch, parse_ref
from vfs.errors import InvalidName, InvalidPath, InvalidRef, VfsError
from vfs.names import (
    ancestors,
    check_name,
    join,
    looks_like_commit,
    normalize_path,
    parent_and_name,
)

_FIRST = string.ascii_letters + string.digits
_REST = _FIRST + "._-"


def _is_valid_name(name: str) -> bool:
    """The naming rule, written independently of the library's regex."""
    return (
        1 <= len(name) <= 64
        and name[0] in _FIRST
        and all(c in _REST for c in name[1:])
    )


# -- names -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["a", "Z", "0", "repo", "my-repo", "my_repo.v2", "A" * 64, "9lives", "a..b", "x-"],
)
def test_valid_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "-a",
        ".hidden",
        "_x",
        "A" * 65,
        "a b",
        "a/b",
        "a@b",
        "a:b",
        "a~1",
        "ümlaut",
        "a\n",
        "\na",
        "a\0",
        "٣",  # a non-ASCII digit
    ],
)
def test_invalid_names(name: str) -> None:
    with pytest.raises(InvalidName) as info:
        check_name(name, "branch")
    message = str(info.value)
    assert "branch" in message and repr(name) in message
    assert "1-64 characters" in message  # says what the rule is


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=70), st.text(alphabet=_REST, max_size=70)))
def test_check_name_follows_the_rule(name: str) -> None:
    if _is_valid_name(name):
        assert check_name(name) == name
    else:
        with pytest.raises(InvalidName):
            check_name(name)


# -- paths -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, expected",
    [
        ("", ""),
        ("/", ""),
        ("//", ""),
        (".", ""),
        ("/a", "a"),
        ("a/", "a"),
        ("/a//b/./c/", "a/b/c"),
        ("./a", "a"),
        ("a/.../b", "a/.../b"),  # '...' is a name, not a parent reference
        ("..a/b..", "..a/b.."),
        ("dir with spaces/ü", "dir with spaces/ü"),
    ],
)
def test_normalize_path(path: str, expected: str) -> None:
    assert normalize_path(path) == expected


@pytest.mark.parametrize("path", ["..", "/..", "a/../b", "a/..", "../etc/passwd", "/a/b/../../.."])
def test_normalize_path_refuses_parent_components(path: str) -> None:
    with pytest.raises(InvalidPath, match=r"'\.\.'"):
        normalize_path(path)


@pytest.mark.parametrize("path", ["a\0b", "\0", "dir/\0/x"])
def test_normalize_path_refuses_nul(path: str) -> None:
    with pytest.raises(InvalidPath, match="NUL"):
        normalize_path(path)


def test_normalize_path_component_length_is_counted_in_utf8_bytes() -> None:
    assert normalize_path("a" * 255) == "a" * 255
    assert normalize_path("x/" + "é" * 127 + "/y") == "x/" + "é" * 127 + "/y"  # 254 bytes
    with pytest.raises(InvalidPath, match="longer than 255 bytes"):
        normalize_path("a" * 256)
    with pytest.raises(InvalidPath, match="longer than 255 bytes"):
        normalize_path("ok/" + "é" * 128)  # 128 characters, 256 bytes


def test_normalize_path_refuses_undecodable_names() -> None:
    # Python gives a file name that is not valid UTF-8 (b"\xff") as a lone surrogate
    # (surrogateescape). It cannot be stored in a tree (UTF-8 JSON); the user must get
    # an InvalidPath naming it, not a UnicodeEncodeError from deep inside put.
    with pytest.raises(InvalidPath):
        normalize_path("dir/\udcffname")


path_parts = st.lists(
    st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="/\0"),
            min_size=1, max_size=10).filter(lambda p: p not in (".", "..")),
    max_size=6,
)


@settings(max_examples=200, deadline=None)
@given(path_parts, st.booleans(), st.booleans())
def test_normalize_path_is_idempotent(parts: list[str], lead: bool, trail: bool) -> None:
    text = ("/" if lead else "") + "/".join(parts) + ("/" if trail else "")
    normal = normalize_path(text)
    assert normal == "/".join(parts)
    assert normalize_path(normal) == normal
    assert not normal.startswith("/") and not normal.endswith("/")


def test_path_helpers() -> None:
    assert parent_and_name("a/b/c") == ("a/b", "c")
    assert parent_and_name("a") == ("", "a")
    assert join("", "a") == "a"
    assert join("a/b", "c") == "a/b/c"
    assert ancestors("") == [""]
    assert ancestors("a") == [""]
    assert ancestors("a/b/c") == ["", "a", "a/b"]


# -- refs --------------------------------------------------------------------------------


def test_parse_ref_repo_at_branch() -> None:
    assert parse_ref("images@main") == RefSpec("images", "main", "", 0)
    assert str(parse_ref("images@main")) == "images@main"


def test_parse_ref_commit_prefix() -> None:
    spec = parse_ref("images@0123abcd")
    assert spec == RefSpec("images", "0123abcd", "", 0)
    assert looks_like_commit(spec.ref)
    full = "ab" * 32
    assert parse_ref(f"images@{full}").ref == full


def test_parse_ref_with_path() -> None:
    assert parse_ref("images@main:/raw/cat.png") == RefSpec("images", "main", "raw/cat.png")
    assert parse_ref("images@main:raw//cat.png/") == RefSpec("images", "main", "raw/cat.png")
    assert parse_ref("images@main:/") == RefSpec("images", "main", "")
    assert parse_ref("images@abcdef:/x").ref == "abcdef"
    assert str(parse_ref("images@main:/a/b")) == "images@main:/a/b"


def test_parse_ref_ancestor() -> None:
    assert parse_ref("images@main~2") == RefSpec("images", "main", "", 2)
    assert parse_ref("images@main~0") == RefSpec("images", "main", "", 0)
    assert parse_ref("images@abcdef12~10:/x") == RefSpec("images", "abcdef12", "x", 10)
    assert str(parse_ref("images@main~3:/p")) == "images@main~3:/p"


def test_parse_ref_default_ref() -> None:
    assert parse_ref("images", default_ref="main") == RefSpec("images", "main")
    assert parse_ref("images:/a", default_ref="main") == RefSpec("images", "main", "a")


def test_parse_ref_path_not_allowed() -> None:
    with pytest.raises(InvalidRef, match="path is not allowed"):
        parse_ref("images@main:/x", allow_path=False)


def test_parse_branch() -> None:
    assert parse_branch("r@dev") == RefSpec("r", "dev")
    assert parse_branch("r@dev:/x", allow_path=True) == RefSpec("r", "dev", "x")
    with pytest.raises(InvalidRef, match="ancestor"):
        parse_branch("r@dev~1")


@pytest.mark.parametrize(
    "text, error, words",
    [
        ("images", InvalidRef, "REPO@BRANCH"),
        ("images@", InvalidRef, "no branch or commit"),
        ("images@~2", InvalidRef, "no branch or commit"),
        ("@main", InvalidName, "repository"),
        ("bad repo@main", InvalidName, "repository"),
        ("images@bad branch", InvalidName, "branch"),
        ("images@main~x", InvalidName, "branch"),
        ("images@main:/../etc", InvalidPath, ".."),
        ("images@main:/a\0b", InvalidPath, "NUL"),
    ],
)
def test_parse_ref_errors(text: str, error: type[VfsError], words: str) -> None:
    with pytest.raises(error) as info:
        parse_ref(text)
    assert isinstance(info.value, VfsError)
    assert words in str(info.value)


def test_looks_like_commit() -> None:
    assert looks_like_commit("abcdef")
    assert looks_like_commit("0" * 64)
    assert not looks_like_commit("abcde")  # shorter than the minimum prefix
    assert not looks_like_commit("0" * 65)
    assert not looks_like_commit("ABCDEF")  # ids are lowercase
    assert not looks_like_commit("main")
