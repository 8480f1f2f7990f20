"""The control protocol between ``vfsctl`` and ``vfsd``, and how one finds the other.

While a daemon owns a store on this node, every ``vfsctl`` command that changes
state asks the daemon to do it, so the mount and the command line never disagree.
This module is the only part of ``daemon/`` that ``cli`` imports: it uses the
standard library and :mod:`vfs` only (no trio, no pyfuse3).

Framing: newline-delimited JSON over a Unix stream socket. A request is one line
``{"op": str, "args": {...}}``; the answer is one line, either
``{"ok": true, "result": <json>}`` or
``{"ok": false, "error": {"type": <vfs.errors class name>, "message": str}}``.
A connection may carry several requests, one after the other; the client here
sends one per connection.

Discovery: the daemon writes ``<store cache dir>/daemon.json`` =
``{"socket": path, "pid": int, "mount": mountpoint, "store_id": str}`` once its
socket listens, and removes it when it stops. :func:`find_daemon` trusts that file
only after the pid is alive and the socket answers ``hello`` with the same store id.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import socket
import stat
import tempfile
from dataclasses import asdict
from typing import Any

import vfs.errors
from vfs.errors import VfsError
from vfs.refs import Commit

DAEMON_FILE = "daemon.json"
SOCKET_NAME = "vfsd.sock"
ROOT_SOCKET_DIR = "/run/vfs"
MAX_MESSAGE = 16 * 1024 * 1024  # a request or answer larger than this is refused

# sockaddr_un.sun_path is 108 bytes on Linux, including the terminating NUL.
_MAX_SOCKET_PATH = 107
_CONNECT_TIMEOUT = 10.0
_HELLO_TIMEOUT = 10.0

COMMIT_FIELDS = ("id", "repo", "branch", "parents", "tree", "message", "author", "time",
                 "files", "bytes", "provenance", "metadata")


class DaemonUnavailable(VfsError):
    """A daemon owns the store but cannot be reached (or stopped answering)."""


# -- shapes shared by both sides -------------------------------------------------------


def commit_to_dict(commit: Commit) -> dict:
    """A commit as plain JSON data, with stable keys in a fixed order.

    ``vfsctl commit --json`` prints exactly this, whether the commit was made by
    ``vfsctl`` itself or by the daemon (which answers ``commit`` and ``rollback``
    requests with it).
    """
    body = asdict(commit)
    body["parents"] = list(commit.parents)
    return {key: body[key] for key in COMMIT_FIELDS}


def ordered_commit(data: dict) -> dict:
    """A commit dict from the daemon in :data:`COMMIT_FIELDS` order (same JSON either way)."""
    return {key: data.get(key) for key in COMMIT_FIELDS}


def encode_message(message: dict) -> bytes:
    """One protocol line: compact JSON plus ``\\n`` (JSON strings never hold a raw newline)."""
    return json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def error_message(exc: VfsError) -> dict:
    """The error answer for a :class:`VfsError`."""
    return {"ok": False, "error": {"type": type(exc).__name__, "message": str(exc)}}


def error_from_answer(error: object) -> VfsError:
    """Rebuild the :mod:`vfs.errors` exception an error answer names (else VfsError)."""
    if not isinstance(error, dict):
        return VfsError(f"vfsd sent a malformed error: {error!r}")
    message = str(error.get("message", "vfsd reported an error without a message"))
    cls = getattr(vfs.errors, str(error.get("type", "")), None)
    if isinstance(cls, type) and issubclass(cls, VfsError):
        try:
            return cls(message)
        except TypeError:  # a class with a different constructor: keep the message
            pass
    return VfsError(message)


# -- daemon.json ------------------------------------------------------------------------


def daemon_file_path(cache_dir: str) -> str:
    return os.path.join(cache_dir, DAEMON_FILE)


def write_daemon_file(cache_dir: str, info: dict) -> None:
    """Atomically write ``<cache_dir>/daemon.json`` (temporary file, fsync, rename).

    Args:
        cache_dir: the per-store cache directory (``Store.cache_dir``).
        info: ``{"socket": str, "pid": int, "mount": str, "store_id": str}``.
    """
    data = json.dumps(info, indent=2, sort_keys=True).encode() + b"\n"
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".daemon.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # readable by anyone who may use this cache dir
        os.replace(tmp, daemon_file_path(cache_dir))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_daemon_file(cache_dir: str) -> dict | None:
    """The daemon file's content, or None if there is none or it is unreadable."""
    try:
        with open(daemon_file_path(cache_dir), "rb") as f:
            info = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def remove_daemon_file(cache_dir: str, expected: dict | None = None) -> None:
    """Remove ``<cache_dir>/daemon.json`` (if ``expected`` is given, only if it still says that).

    The check narrows the race with a daemon that starts meanwhile and writes its
    own file: a client cleaning up a stale file must not delete a fresh one.
    """
    if expected is not None and read_daemon_file(cache_dir) != expected:
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(daemon_file_path(cache_dir))


# -- where the socket lives ------------------------------------------------------------


def default_socket_path(cache_dir: str) -> str:
    """The control socket's default path.

    ``/run/vfs/vfsd.sock`` for root (the system daemon; one per node), else
    ``<cache_dir>/vfsd.sock``. A path too long for a Unix socket (107 bytes) is
    replaced by ``/tmp/vfs-<uid>/<hash>.sock``, the directory private to the user.

    Raises:
        VfsError: the short-path directory exists but is not private to this user.
    """
    uid = os.getuid()
    if uid == 0:
        os.makedirs(ROOT_SOCKET_DIR, mode=0o755, exist_ok=True)
        return os.path.join(ROOT_SOCKET_DIR, SOCKET_NAME)
    return user_socket_path(cache_dir, uid)


def user_socket_path(cache_dir: str, uid: int, tmp_dir: str = "/tmp") -> str:
    """``<cache_dir>/vfsd.sock``, or ``<tmp_dir>/vfs-<uid>/<hash>.sock`` if that is too long.

    Raises:
        VfsError: the short-path directory exists but is not private to ``uid``.
    """
    path = os.path.join(os.path.abspath(cache_dir), SOCKET_NAME)
    if len(os.fsencode(path)) <= _MAX_SOCKET_PATH:
        return path
    directory = os.path.join(tmp_dir, f"vfs-{uid}")
    with contextlib.suppress(FileExistsError):
        os.mkdir(directory, 0o700)
    info = os.lstat(directory)
    # /tmp is shared: someone else could have made this directory first to catch our socket.
    if (not stat.S_ISDIR(info.st_mode) or info.st_uid != uid
            or info.st_mode & (stat.S_IRWXG | stat.S_IRWXO)):
        raise VfsError(f"{directory} is not a private directory of this user: remove it, "
                       "or give the daemon a shorter --cache or an explicit --socket")
    digest = hashlib.blake2b(os.fsencode(path), digest_size=8).hexdigest()
    return os.path.join(directory, f"{digest}.sock")


# -- the client ------------------------------------------------------------------------


class DaemonClient:
    """Sends requests to a ``vfsd`` control socket, one connection per request.

    Args:
        socket_path: the daemon's control socket.
        timeout: seconds to wait for an answer (None waits as long as the request takes:
            a large put may legitimately run for hours).
        info: the daemon file this client was found through (pid, mount, ...), if any.
    """

    def __init__(self, socket_path: str, timeout: float | None = 600,
                 info: dict | None = None) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self.info = info or {}

    def __repr__(self) -> str:
        return f"DaemonClient({self.socket_path!r}, pid={self.pid})"

    @property
    def pid(self) -> int | None:
        return self.info.get("pid")

    @property
    def mount(self) -> str | None:
        return self.info.get("mount")

    def call(self, op: str, /, **args: Any) -> Any:
        """Send one request and return its result.

        Args may be given as ``**{"from": ...}`` for names that are Python keywords.

        Raises:
            DaemonUnavailable: nothing listens on the socket, or the daemon went away
                (or did not answer in time) before answering.
            VfsError: the daemon's error, as the same :mod:`vfs.errors` class.
        """
        request = encode_message({"op": op, "args": args})
        with self._connect() as sock:
            try:
                sock.settimeout(self.timeout)
                sock.sendall(request)
                line = _read_line(sock)
            except TimeoutError:
                raise DaemonUnavailable(
                    f"vfsd did not answer {op!r} within {self.timeout:g} s on "
                    f"{self.socket_path}: check its log") from None
            except OSError as exc:
                raise DaemonUnavailable(
                    f"lost the connection to vfsd on {self.socket_path} during {op!r}: "
                    f"{exc.strerror or exc}; check its log") from None
        if line is None:
            raise DaemonUnavailable(
                f"vfsd closed the connection without answering {op!r}: it may have "
                "stopped; check its log, then retry")
        try:
            answer = json.loads(line)
        except ValueError:
            raise VfsError(f"vfsd sent a malformed answer to {op!r}") from None
        if not isinstance(answer, dict) or "ok" not in answer:
            raise VfsError(f"vfsd sent a malformed answer to {op!r}")
        if answer["ok"]:
            return answer.get("result")
        raise error_from_answer(answer.get("error"))

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(_CONNECT_TIMEOUT)
            sock.connect(self.socket_path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            raise DaemonUnavailable(
                f"no vfsd listens on {self.socket_path} ({exc.strerror}): "
                "is it running? (vfsctl mount starts one)") from None
        except PermissionError:
            sock.close()
            raise DaemonUnavailable(
                f"permission denied on {self.socket_path}: the daemon that owns this "
                "store runs as another user; run vfsctl as that user") from None
        except TimeoutError:
            sock.close()
            raise DaemonUnavailable(
                f"vfsd does not accept connections on {self.socket_path}: check its log"
            ) from None
        except OSError:
            sock.close()
            raise
        return sock


def _read_line(sock: socket.socket) -> bytes | None:
    """Read one ``\\n``-terminated line; None if the peer closed before sending one."""
    parts: list[bytes] = []
    size = 0
    while True:
        data = sock.recv(65536)
        if not data:
            return None
        end = data.find(b"\n")
        if end >= 0:
            parts.append(data[:end])
            return b"".join(parts)
        parts.append(data)
        size += len(data)
        if size > MAX_MESSAGE:
            raise VfsError(f"vfsd's answer exceeds {MAX_MESSAGE} bytes")


# -- finding the daemon ----------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (an unreaped dead process)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            # "pid (comm) state ...": comm may hold spaces and parentheses.
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in (b"Z", b"X")


def find_daemon(cache_dir: str, store_id: str, *,
                timeout: float | None = 600) -> DaemonClient | None:
    """The live daemon serving this store on this node, or None.

    Args:
        cache_dir: the per-store cache directory (``Store.cache_dir``).
        store_id: the store's id (``Store.config.store_id``).
        timeout: the answer timeout of the returned client.

    Returns:
        A client whose ``info`` is the daemon file, or None when no daemon runs
        (a daemon file left by a dead daemon is removed).

    Raises:
        DaemonUnavailable: a daemon is alive but does not answer, or cannot be
            reached by this user. Never None in that case: going around a daemon
            that owns the store would make the mount and the store disagree.
    """
    info = read_daemon_file(cache_dir)
    if info is None:
        return None
    pid, socket_path = info.get("pid"), info.get("socket")
    if not isinstance(pid, int) or not isinstance(socket_path, str):
        remove_daemon_file(cache_dir, info)
        return None
    if info.get("store_id") != store_id:
        return None
    if not pid_alive(pid):
        remove_daemon_file(cache_dir, info)
        return None
    probe = DaemonClient(socket_path, timeout=_HELLO_TIMEOUT, info=info)
    try:
        hello = probe.call("hello")
    except DaemonUnavailable as exc:
        if _nothing_listens(socket_path):
            # The pid was reused by another process, or the daemon is going away
            # (it removes its socket before its daemon file): either way, no daemon.
            remove_daemon_file(cache_dir, info)
            return None
        raise DaemonUnavailable(f"vfsd (pid {pid}) owns this store but {exc}") from None
    if not isinstance(hello, dict) or hello.get("store_id") != store_id:
        return None  # the socket now belongs to a daemon of another store
    return DaemonClient(socket_path, timeout=timeout, info=info)


def _nothing_listens(path: str) -> bool:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(_CONNECT_TIMEOUT)
        sock.connect(path)
    except OSError as exc:
        return exc.errno in (errno.ENOENT, errno.ECONNREFUSED)
    finally:
        sock.close()
    return False



__all__ = [
    "COMMIT_FIELDS",
    "DAEMON_FILE",
    "MAX_MESSAGE",
    "DaemonClient",
    "DaemonUnavailable",
    "commit_to_dict",
    "default_socket_path",
    "encode_message",
    "error_from_answer",
    "error_message",
    "find_daemon",
    "ordered_commit",
    "pid_alive",
    "read_daemon_file",
    "remove_daemon_file",
    "user_socket_path",
    "write_daemon_file",
]
