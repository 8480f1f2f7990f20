"""The control socket of ``vfsd``: where ``vfsctl`` asks the daemon to change state.

:func:`serve_control` is a trio service (``await nursery.start(serve_control, ...)``)
speaking the protocol of :mod:`daemon.protocol`: newline-delimited JSON requests
on a Unix stream socket, answered one at a time per connection, many connections
at once. Each request runs ``handler.dispatch(op, args)`` in a worker thread,
because the library calls behind it (LMDB, chunking, uploads) are synchronous.

A request that was read is always answered, even while the daemon shuts down:
its work and its answer run in a shielded scope. That is what lets ``vfsctl
unmount`` get an answer from the very request that stops the daemon, and it
keeps a commit from being abandoned halfway by a SIGTERM.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket as stdlib_socket
import stat
import struct
from typing import Protocol

import trio

from daemon.protocol import MAX_MESSAGE, encode_message, error_message
from vfs.errors import VfsError

log = logging.getLogger("daemon.control")

SOCKET_MODE = 0o600
_BACKLOG = 64
# Requests run concurrently, each in its own thread; this bounds them so a burst of
# vfsctl processes cannot starve the FUSE layer of worker threads.
_MAX_CONCURRENT_REQUESTS = 8
_SEND_TIMEOUT = 10.0  # a client that does not read its answer is dropped after this
_PROBE_TIMEOUT = 5.0


class Handler(Protocol):
    """What the control socket serves: the daemon's request handler."""

    def dispatch(self, op: str, args: dict) -> object:
        """Run request ``op`` with keyword ``args`` (synchronously, in a worker thread).

        Returns:
            A JSON-serializable result.

        Raises:
            VfsError: sent to the client as the same class and message.
        """
        ...


async def serve_control(socket_path: str, handler: Handler, *,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``handler`` on the Unix socket ``socket_path`` until cancelled.

    A socket file left by a dead daemon is replaced; ``task_status.started()`` is
    called once the socket accepts connections. The socket file is removed on exit
    (if it is still ours).

    Raises:
        VfsError: another daemon answers on ``socket_path``, or the path is taken by
            something that is not a socket, or it cannot be bound.
    """
    await _remove_stale_socket(socket_path)
    sock = trio.socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    bound: os.stat_result | None = None
    try:
        try:
            await sock.bind(socket_path)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise VfsError(f"another vfsd serves {socket_path} (it appeared while this "
                               "one started): stop it first, or give a different --socket"
                               ) from None
            raise VfsError(f"cannot create the control socket {socket_path}: "
                           f"{exc.strerror or exc}") from None
        bound = os.stat(socket_path)
        # Set the mode before listen(): until then every connect is refused, so no
        # client ever reaches the socket with the umask's looser mode.
        #
        # Only root (or the daemon's own user) may talk to the daemon: the daemon
        # reads any local path a put names, with its own rights. A site that wants
        # a group of users to run vfsctl can instead, when a group named ``vfs``
        # exists, ``os.chown(socket_path, 0, grp.getgrnam("vfs").gr_gid)`` and use
        # mode 0660; it must then trust that group with the daemon's read access
        # (or check each caller's uid with SO_PEERCRED, see _peer_credentials).
        os.chmod(socket_path, SOCKET_MODE)
        sock.listen(_BACKLOG)
        listener = trio.SocketListener(sock)
    except BaseException:
        sock.close()
        if bound is not None:
            _remove_own_socket(socket_path, bound)
        raise
    limiter = trio.CapacityLimiter(_MAX_CONCURRENT_REQUESTS)

    async def serve_connection(stream: trio.SocketStream) -> None:
        await _serve_connection(stream, handler, limiter)

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, serve_connection, [listener])
            log.debug("control socket listening on %s", socket_path)
            task_status.started()
    finally:
        _remove_own_socket(socket_path, bound)


# -- the socket file -------------------------------------------------------------------


async def _remove_stale_socket(path: str) -> None:
    """Remove a socket file nobody answers on; refuse to touch a live one."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise VfsError(f"{path} exists and is not a socket: remove it, or give vfsd "
                       "a different --socket")
    probe = trio.socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    try:
        with trio.move_on_after(_PROBE_TIMEOUT):
            await probe.connect(path)
        # Connected, or still waiting in a full backlog: either way a daemon is there.
        raise VfsError(f"another vfsd serves {path}: stop it first (vfsctl unmount), "
                       "or give this one a different --socket")
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise VfsError(f"cannot check the control socket {path}: "
                           f"{exc.strerror or exc}") from None
    finally:
        probe.close()
    log.info("removing the stale control socket %s of a dead vfsd", path)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _remove_own_socket(path: str, bound: os.stat_result | None) -> None:
    """Remove the socket file if it is still the one this daemon bound.

    A daemon that is stopping must not delete the socket of a new one that has
    already replaced it.
    """
    try:
        info = os.lstat(path)
        if bound is not None and (info.st_ino, info.st_dev) != (bound.st_ino, bound.st_dev):
            return
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.error("cannot remove the control socket %s: %s", path, exc)


# -- one connection --------------------------------------------------------------------


async def _serve_connection(stream: trio.SocketStream, handler: Handler,
                            limiter: trio.CapacityLimiter) -> None:
    """Answer the requests of one connection, in order, until the client closes it.

    Nothing raised here may escape: it would take the whole server down.
    """
    peer = _peer_credentials(stream)
    buffer = bytearray()
    try:
        while True:
            try:
                line = await _receive_line(stream, buffer)
            except _RequestTooLarge:
                answer = error_message(VfsError(
                    f"request larger than {MAX_MESSAGE} bytes refused by vfsd"))
                with trio.CancelScope(shield=True), trio.move_on_after(_SEND_TIMEOUT):
                    await stream.send_all(encode_message(answer))
                return
            if line is None:
                return
            if not line.strip():
                continue
            # Once read, a request runs to the end and is answered, even if the
            # daemon is being stopped meanwhile (see the module docstring).
            with trio.CancelScope(shield=True):
                answer_bytes = await _answer(line, handler, limiter, peer)
                with trio.move_on_after(_SEND_TIMEOUT) as sending:
                    await stream.send_all(answer_bytes)
            if sending.cancelled_caught:
                log.info("dropped a control client that did not read its answer")
                return
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return  # the client went away
    except Exception:
        log.exception("control connection failed")


class _RequestTooLarge(Exception):
    pass


async def _receive_line(stream: trio.SocketStream, buffer: bytearray) -> bytes | None:
    """The next line from ``stream`` (without its ``\\n``); None at the end of the stream.

    A last line without a newline is still a request (``printf ... | socat``).
    """
    while True:
        end = buffer.find(b"\n")
        if end >= 0:
            line = bytes(buffer[:end])
            del buffer[: end + 1]
            return line
        if len(buffer) > MAX_MESSAGE:
            raise _RequestTooLarge
        data = await stream.receive_some(65536)
        if not data:
            if buffer:
                line = bytes(buffer)
                buffer.clear()
                return line
            return None
        buffer += data


async def _answer(line: bytes, handler: Handler, limiter: trio.CapacityLimiter,
                  peer: str) -> bytes:
    """Run one request line and return the answer line."""
    try:
        request = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return encode_message(error_message(VfsError(
            "malformed request: not a JSON document on one line")))
    op = request.get("op") if isinstance(request, dict) else None
    args = request.get("args", {}) if isinstance(request, dict) else None
    if not isinstance(op, str) or not isinstance(args, dict):
        return encode_message(error_message(VfsError(
            'malformed request: expected {"op": str, "args": {...}}')))
    log.debug("request %s from %s", op, peer)
    try:
        result = await trio.to_thread.run_sync(handler.dispatch, op, args, limiter=limiter)
    except VfsError as exc:
        log.debug("request %s failed: %s: %s", op, type(exc).__name__, exc)
        return encode_message(error_message(exc))
    except Exception as exc:
        log.exception("request %s from %s failed", op, peer)
        return _internal_error(f"{type(exc).__name__}: {exc}")
    try:
        answer = encode_message({"ok": True, "result": result})
    except (TypeError, ValueError) as exc:
        log.exception("the result of request %s cannot be sent", op)
        return _internal_error(f"result not serializable: {exc}")
    if len(answer) > MAX_MESSAGE:
        log.error("the result of request %s is %d bytes: too large to send", op, len(answer))
        return _internal_error(f"result of {op!r} larger than {MAX_MESSAGE} bytes")
    return answer


def _internal_error(detail: str) -> bytes:
    return encode_message(error_message(VfsError(
        f"internal error in vfsd: {detail} (see the vfsd log)")))


def _peer_credentials(stream: trio.SocketStream) -> str:
    """``pid P uid U`` of the connected client, for the log (Linux SO_PEERCRED)."""
    try:
        raw = stream.socket.getsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_PEERCRED,
                                       struct.calcsize("3i"))
        pid, uid, _gid = struct.unpack("3i", raw)
    except (OSError, AttributeError, struct.error):
        return "an unknown client"
    return f"pid {pid} uid {uid}"


__all__ = ["SOCKET_MODE", "Handler", "serve_control"]
