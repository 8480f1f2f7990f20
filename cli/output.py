"""Formatting for ``vfsctl``: sizes, times, aligned tables, JSON documents, progress.

Everything a command prints for a person goes through here, so the look of the
output is decided in one place; ``--json`` output is plain data with stable
snake_case keys, built by the ``*_json`` helpers.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime

import click

from daemon.protocol import commit_to_dict
from vfs import Commit, Entry, ReflogEntry
from vfs.tree import permission_bits

_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB")
_KIND_NAMES = {"f": "file", "d": "dir", "l": "symlink"}
SHORT_ID = 12


def human_size(size: int) -> str:
    """``1536`` -> ``"1.5 KiB"``; sizes under 1 KiB are shown in bytes."""
    if size < 1024:
        return f"{size} B"
    value = float(size)
    for unit in _UNITS:
        value /= 1024
        if value < 1024 or unit == _UNITS[-1]:
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def short(commit_id: str | None, length: int = SHORT_ID) -> str:
    """A commit id cut for people; ``-`` for no commit."""
    return commit_id[:length] if commit_id else "-"


def local_time(iso: str) -> str:
    """A stored UTC time (``...Z``) shown in the local time zone, to the second."""
    try:
        when = datetime.strptime(iso, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    except ValueError:
        return iso
    return when.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def ns_time(mtime_ns: int, *, iso: bool = False) -> str:
    when = datetime.fromtimestamp(mtime_ns / 1e9, tz=UTC)
    if iso:
        return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return when.astimezone().strftime("%Y-%m-%d %H:%M")


def first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def repo_path(path: str) -> str:
    """A normalized repository path as shown to users: always with a leading ``/``."""
    return "/" + path


def kind_name(kind: str) -> str:
    return _KIND_NAMES.get(kind, kind)


# -- printing --------------------------------------------------------------------------


def emit_json(document: object) -> None:
    """Write one JSON document to stdout."""
    click.echo(json.dumps(document, indent=2, ensure_ascii=False))


def note(message: str) -> None:
    """A message for the person at the terminal (stderr, so stdout stays data)."""
    click.echo(message, err=True)


def table(rows: Sequence[Sequence[object]], headers: Sequence[str] | None = None) -> None:
    """Print rows as left-aligned columns separated by two spaces.

    The last column is not padded, so free text (messages, names) may be long.
    """
    all_rows = [[str(c) for c in row] for row in ([headers] if headers else []) + list(rows)]
    if not all_rows:
        return
    widths = [max(len(row[i]) for row in all_rows) for i in range(len(all_rows[0]) - 1)]
    for row in all_rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        click.echo("  ".join([*cells, row[-1]]).rstrip())


def fields(pairs: Sequence[tuple[str, object]]) -> None:
    """Print ``key  value`` lines with the keys aligned (for ``inspect``)."""
    width = max(len(k) for k, _ in pairs)
    for key, value in pairs:
        click.echo(f"{key.ljust(width)}  {value}")


# -- JSON shapes -----------------------------------------------------------------------


def commit_json(commit: Commit) -> dict:
    # The daemon answers commit and rollback with the same shape (daemon.protocol).
    return commit_to_dict(commit)


def entry_json(path: str, entry: Entry) -> dict:
    return {
        "path": repo_path(path),
        "name": entry.name,
        "type": kind_name(entry.kind),
        "size": entry.size,
        "mode": permission_bits(entry.mode),
        "mtime": ns_time(entry.mtime_ns, iso=True),
        "mtime_ns": entry.mtime_ns,
        "target": entry.ref if entry.kind == "l" else None,
    }


def reflog_json(entry: ReflogEntry) -> dict:
    return {
        "seq": entry.seq,
        "branch": entry.branch,
        "when": entry.when,
        "who": entry.who,
        "from": entry.old,
        "to": entry.new,
        "why": entry.why,
    }


# -- progress --------------------------------------------------------------------------


@contextmanager
def progress(label: str, total: int | None = None, *,
             unit: str = "bytes") -> Iterator[Callable[[int], None] | None]:
    """Yield a progress callback (increments) for a long transfer, or None.

    A bar is drawn only when stderr is a terminal; scripts and logs stay quiet.
    With no known ``total`` a running count is shown instead of a bar.
    """
    if not sys.stderr.isatty():
        yield None
        return
    lock = threading.Lock()  # library workers may report from several threads
    if total:
        with click.progressbar(length=total, label=label, file=sys.stderr) as bar:
            def advance(n: int) -> None:
                with lock:
                    bar.update(n)

            yield advance
            bar.update(max(0, total - bar.pos))
        return
    done = 0
    last = 0.0

    def count(n: int) -> None:
        nonlocal done, last
        with lock:
            done += n
            now = time.monotonic()
            if now - last >= 0.1:
                last = now
                shown = human_size(done) if unit == "bytes" else f"{done} {unit}"
                click.echo(f"\r{label} {shown}", nl=False, err=True)

    try:
        yield count
    finally:
        if last:
            click.echo("\r\x1b[K", nl=False, err=True)
