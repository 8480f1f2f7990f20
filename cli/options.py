"""What every ``vfsctl`` command shares: the global options, the store, argument types."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import click

import vfs
from daemon.protocol import DaemonClient, find_daemon
from vfs.errors import InvalidRef

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@dataclass
class Options:
    """The global options, and the store they lead to (opened lazily)."""

    store_url: str | None
    cache_dir: str | None
    s3_endpoint: str | None
    debug: bool
    _store: vfs.Store | None = field(default=None, repr=False)
    _daemon: DaemonClient | None = field(default=None, repr=False)
    _daemon_checked: bool = field(default=False, repr=False)

    def store(self, *, create: bool = False) -> vfs.Store:
        if self._store is None:
            self._store = vfs.open_store(self.store_url, cache_dir=self.cache_dir,
                                         create=create, s3_endpoint=self.s3_endpoint)
            click.get_current_context().find_root().call_on_close(self._store.close)
        return self._store

    def daemon(self) -> DaemonClient | None:
        """The vfsd that owns this store on this node, if one runs.

        Commands that change state go through it, so the mount and the store agree.

        Raises:
            DaemonUnavailable: a daemon owns the store but does not answer.
        """
        if not self._daemon_checked:
            store = self.store()
            # No answer timeout: a put or commit through the daemon takes as long as
            # the data needs (Ctrl-C stops waiting, the daemon finishes the request).
            self._daemon = find_daemon(store.cache_dir, store.config.store_id, timeout=None)
            self._daemon_checked = True
        return self._daemon


pass_options = click.make_pass_decorator(Options)


class Duration(click.ParamType):
    """``30s``, ``15m``, ``1h``, ``7d``, ``2w`` or plain seconds, as float seconds."""

    name = "DURATION"

    def convert(self, value: object, param: click.Parameter | None,
                ctx: click.Context | None) -> float:
        if isinstance(value, int | float):
            return float(value)
        match = _DURATION.match(str(value))
        if not match:
            self.fail(f"{value!r} is not a duration such as 30s, 15m, 1h, 7d or 0", param, ctx)
        return float(match.group(1)) * _SECONDS[match.group(2)]


def repo_only(text: str) -> str:
    """A bare repository name (``REPO`` or ``REPO@``)."""
    from vfs.names import check_name

    return check_name(text.rstrip("@"), "repository")


def need_path(text: str, spec: vfs.RefSpec, what: str) -> None:
    if ":" not in text.partition("@")[2]:
        raise InvalidRef(f"{what} needs a path: {spec.repo}@{spec.ref}:/PATH")


json_option = click.option("--json", "as_json", is_flag=True,
                           help="Print one JSON document on stdout, for scripts.")
