"""The control protocol: a real trio server (``serve_control``) and the real client.

The server runs in the test's trio loop with a fake handler; the blocking client
runs in a worker thread, as ``vfsctl`` would in its own process.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator

import pytest
import trio

import vfs.errors
from daemon import control, sdnotify
from daemon.control import serve_control
from daemon.protocol import (
    DAEMON_FILE,
    DaemonClient,
    DaemonUnavailable,
    find_daemon,
    read_daemon_file,
    remove_daemon_file,
    user_socket_path,
    write_daemon_file,
)
from vfs.errors import VfsError

STORE_ID = "0123456789abcdef"


class FakeHandler:
    """Answers a few made-up requests and remembers what it was asked."""

    def __init__(self, store_id: str = STORE_ID) -> None:
        self.store_id = store_id
        self.calls: list[tuple[str, dict]] = []
        self.cancel_scope: trio.CancelScope | None = None

    def dispatch(self, op: str, args: dict) -> object:
        self.calls.append((op, args))
        if op == "hello":
            return {"store_id": self.store_id, "pid": os.getpid()}
        if op == "echo":
            return args
        if op == "fail":
            raise getattr(vfs.errors, args["type"])(args["message"])
        if op == "crash":
            raise RuntimeError("boom")
        if op == "unserializable":
            return {"value": object()}
        if op == "stop":
            # Like the daemon's unmount: ask the server to stop from inside a request.
            assert self.cancel_scope is not None
            trio.from_thread.run_sync(self.cancel_scope.cancel)
            return {"stopping": True}
        raise VfsError(f"unknown request {op!r}")


@pytest.fixture
def socket_dir() -> Iterator[str]:
    # Not tmp_path: Unix socket paths must stay under 108 bytes.
    directory = tempfile.mkdtemp(prefix="vfs-proto-", dir="/tmp")
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def socket_path(socket_dir: str) -> str:
    return os.path.join(socket_dir, "vfsd.sock")


async def call(path: str, op: str, **args: object) -> object:
    client = DaemonClient(path, timeout=10)
    return await trio.to_thread.run_sync(lambda: client.call(op, **args))


def raw_exchange(path: str, data: bytes, answers: int) -> list[dict]:
    """Send raw bytes on one connection and read ``answers`` answer lines."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)  # like `printf ... | socat`: then the server's EOF
        received = b""
        while received.count(b"\n") < answers:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    return [json.loads(line) for line in received.splitlines()]


# -- the server and the client ---------------------------------------------------------


@pytest.mark.trio
async def test_round_trip(socket_path: str) -> None:
    handler = FakeHandler()
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, socket_path, handler)
        args = {"repo": "images", "sources": ["/a b/ç.png"], "n": 3, "flag": True,
                "nested": {"x": None}, "from": "images@main"}
        assert await call(socket_path, "echo", **args) == args
        # Several requests on one connection are answered in order.
        answers = await trio.to_thread.run_sync(raw_exchange, socket_path,
                                                b'{"op":"echo","args":{"i":1}}\n'
                                                b'{"op":"echo","args":{"i":2}}\n', 2)
        assert answers == [{"ok": True, "result": {"i": 1}}, {"ok": True, "result": {"i": 2}}]
        nursery.cancel_scope.cancel()
    assert [op for op, _ in handler.calls] == ["echo", "echo", "echo"]
    assert not os.path.exists(socket_path), "the socket file is removed on exit"


@pytest.mark.trio
async def test_many_clients_at_once(socket_path: str) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, socket_path, FakeHandler())
        results: dict[int, object] = {}

        async def one(i: int) -> None:
            results[i] = await call(socket_path, "echo", i=i)

        async with trio.open_nursery() as clients:
            for i in range(20):
                clients.start_soon(one, i)
        assert results == {i: {"i": i} for i in range(20)}
        nursery.cancel_scope.cancel()


@pytest.mark.trio
@pytest.mark.parametrize("error", ["PathNotFound", "Conflict", "StoreFull", "NothingToCommit",
                                   "VfsError"])
async def test_vfs_errors_cross_the_socket(socket_path: str, error: str) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, socket_path, FakeHandler())
        message = f"{error} happened: do something about it"
        with pytest.raises(VfsError) as caught:
            await call(socket_path, "fail", type=error, message=message)
        assert type(caught.value) is getattr(vfs.errors, error)
        assert str(caught.value) == message
        nursery.cancel_scope.cancel()


@pytest.mark.trio
@pytest.mark.expect_warnings
async def test_internal_errors_become_vfs_errors(socket_path: str,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, socket_path, FakeHandler())
        with pytest.raises(VfsError) as caught:
            await call(socket_path, "crash")
        assert type(caught.value) is VfsError
        assert str(caught.value).startswith("internal error in vfsd: RuntimeError: boom")
        with pytest.raises(VfsError, match="internal error in vfsd: result not serializable"):
            await call(socket_path, "unserializable")
        # The server survives both.
        assert await call(socket_path, "echo", ok=1) == {"ok": 1}
        nursery.cancel_scope.cancel()
    logged = [r for r in caplog.records if r.name == "daemon.control" and r.levelname == "ERROR"]
    assert len(logged) == 2 and logged[0].exc_info is not None  # with the traceback


@pytest.mark.trio
async def test_malformed_requests_get_an_error_answer(socket_path: str) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, socket_path, FakeHandler())
        answers = await trio.to_thread.run_sync(
            raw_exchange, socket_path,
            b"not json\n[1, 2]\n{\"op\": 7}\n{\"op\": \"echo\", \"args\": []}\n\xff\xfe\n"
            b'{"op": "echo", "args": {"still": "serving"}}\n', 6)
        assert [a["ok"] for a in answers] == [False] * 5 + [True]
        for answer in answers[:5]:
            assert answer["error"]["type"] == "VfsError"
            assert answer["error"]["message"].startswith("malformed request")
        assert answers[5]["result"] == {"still": "serving"}
        # A request without "args" is a request without arguments.
        answers = await trio.to_thread.run_sync(raw_exchange, socket_path,
                                                b'{"op": "echo"}', 1)
        assert answers == [{"ok": True, "result": {}}]
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_oversized_request_is_refused(socket_path: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(control, "MAX_MESSAGE", 4096)
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, socket_path, FakeHandler())
        answers = await trio.to_thread.run_sync(raw_exchange, socket_path,
                                                b'{"op": "echo", "args": {"x": "' + b"a" * 5000,
                                                1)
        assert answers[0]["ok"] is False and "larger than 4096 bytes" in \
            answers[0]["error"]["message"]
        assert await call(socket_path, "echo") == {}
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_a_request_is_answered_while_the_server_stops(socket_path: str) -> None:
    handler = FakeHandler()
    async with trio.open_nursery() as nursery:
        handler.cancel_scope = nursery.cancel_scope
        await nursery.start(serve_control, socket_path, handler)
        # The request cancels the server; its answer must still arrive.
        assert await call(socket_path, "stop") == {"stopping": True}
    assert not os.path.exists(socket_path)


# -- the socket file -------------------------------------------------------------------


@pytest.mark.trio
async def test_socket_is_private(socket_path: str) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, socket_path, FakeHandler())
        mode = os.lstat(socket_path).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_stale_socket_file_is_replaced(socket_path: str) -> None:
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(socket_path)  # bound but never listening, then closed: a dead daemon's file
    dead.close()
    assert stat.S_ISSOCK(os.lstat(socket_path).st_mode)
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, socket_path, FakeHandler())
        assert await call(socket_path, "echo", a=1) == {"a": 1}
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_live_socket_is_refused(socket_path: str) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, socket_path, FakeHandler())
        before = os.lstat(socket_path).st_ino
        with pytest.raises(VfsError, match="another vfsd serves"):
            await serve_control(socket_path, FakeHandler())
        # The first server keeps its socket and keeps serving.
        assert os.lstat(socket_path).st_ino == before
        assert await call(socket_path, "echo", a=2) == {"a": 2}
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_path_that_is_not_a_socket_is_refused(socket_path: str) -> None:
    with open(socket_path, "w") as f:
        f.write("precious")
    with pytest.raises(VfsError, match="is not a socket"):
        await serve_control(socket_path, FakeHandler())
    with open(socket_path) as f:
        assert f.read() == "precious"


def test_client_without_daemon(socket_path: str) -> None:
    with pytest.raises(DaemonUnavailable, match="no vfsd listens"):
        DaemonClient(socket_path).call("hello")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(socket_path)
    dead.close()
    with pytest.raises(DaemonUnavailable, match="no vfsd listens"):
        DaemonClient(socket_path).call("hello")


def test_client_when_daemon_dies_mid_request(socket_path: str) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(socket_path)
    server.listen(1)

    def accept_and_hang_up() -> None:
        conn, _ = server.accept()
        conn.recv(65536)
        conn.close()

    thread = threading.Thread(target=accept_and_hang_up)
    thread.start()
    try:
        with pytest.raises(DaemonUnavailable, match="without answering 'commit'"):
            DaemonClient(socket_path).call("commit", repo="r", branch="b")
    finally:
        thread.join()
        server.close()


# -- finding the daemon ----------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_daemon_file_round_trip(socket_dir: str) -> None:
    info = {"socket": "/x.sock", "pid": 1, "mount": "/pfs", "store_id": STORE_ID}
    write_daemon_file(socket_dir, info)
    assert read_daemon_file(socket_dir) == info
    assert sorted(os.listdir(socket_dir)) == [DAEMON_FILE]  # no temporary left behind
    remove_daemon_file(socket_dir, {**info, "pid": 2})  # not what it says: kept
    assert read_daemon_file(socket_dir) == info
    remove_daemon_file(socket_dir)
    remove_daemon_file(socket_dir)  # idempotent
    assert read_daemon_file(socket_dir) is None


def test_find_daemon_without_a_daemon(socket_dir: str, socket_path: str) -> None:
    assert find_daemon(socket_dir, STORE_ID) is None
    # A dead daemon's file is removed.
    write_daemon_file(socket_dir, {"socket": socket_path, "pid": _dead_pid(), "mount": "/pfs",
                                   "store_id": STORE_ID})
    assert find_daemon(socket_dir, STORE_ID) is None
    assert not os.path.exists(os.path.join(socket_dir, DAEMON_FILE))
    # A live pid (reused by another process) with nothing on the socket: no daemon either.
    write_daemon_file(socket_dir, {"socket": socket_path, "pid": os.getpid(), "mount": "/pfs",
                                   "store_id": STORE_ID})
    assert find_daemon(socket_dir, STORE_ID) is None
    assert not os.path.exists(os.path.join(socket_dir, DAEMON_FILE))
    # Garbage is no daemon.
    with open(os.path.join(socket_dir, DAEMON_FILE), "w") as f:
        f.write("{not json")
    assert find_daemon(socket_dir, STORE_ID) is None


@pytest.mark.trio
async def test_find_daemon_with_a_daemon(socket_dir: str, socket_path: str) -> None:
    info = {"socket": socket_path, "pid": os.getpid(), "mount": "/pfs", "store_id": STORE_ID}
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, socket_path, FakeHandler())
        write_daemon_file(socket_dir, info)
        client = await trio.to_thread.run_sync(find_daemon, socket_dir, STORE_ID)
        assert client is not None
        assert (client.socket_path, client.pid, client.mount) == (socket_path, os.getpid(),
                                                                  "/pfs")
        assert await trio.to_thread.run_sync(lambda: client.call("echo", b=1)) == {"b": 1}
        # A daemon file of another store, or a socket answering for another store: not ours.
        assert await trio.to_thread.run_sync(find_daemon, socket_dir, "another") is None
        nursery.cancel_scope.cancel()
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, socket_path, FakeHandler(store_id="other"))
        assert await trio.to_thread.run_sync(find_daemon, socket_dir, STORE_ID) is None
        nursery.cancel_scope.cancel()


def test_find_daemon_that_does_not_answer(socket_dir: str, socket_path: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import daemon.protocol

    monkeypatch.setattr(daemon.protocol, "_HELLO_TIMEOUT", 0.3)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(socket_path)
    server.listen(1)  # accepts (in the kernel) but never answers: a wedged daemon
    try:
        write_daemon_file(socket_dir, {"socket": socket_path, "pid": os.getpid(),
                                       "mount": "/pfs", "store_id": STORE_ID})
        # Never None here: going around a live daemon would make the mount lie.
        with pytest.raises(DaemonUnavailable, match="owns this store but"):
            find_daemon(socket_dir, STORE_ID)
        assert read_daemon_file(socket_dir) is not None
    finally:
        server.close()


def test_socket_path_too_long_for_unix_sockets(socket_dir: str) -> None:
    uid = os.getuid()
    short = os.path.join(socket_dir, "cache")
    assert user_socket_path(short, uid, tmp_dir=socket_dir) == os.path.join(short, "vfsd.sock")
    deep = os.path.join(socket_dir, "c" * 120)
    path = user_socket_path(deep, uid, tmp_dir=socket_dir)
    assert len(os.fsencode(path)) <= 107
    assert os.path.dirname(path) == os.path.join(socket_dir, f"vfs-{uid}")
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    assert user_socket_path(deep, uid, tmp_dir=socket_dir) == path  # stable
    assert user_socket_path(deep + "x", uid, tmp_dir=socket_dir) != path
    os.chmod(os.path.dirname(path), 0o777)  # someone else's trap in /tmp: refused
    with pytest.raises(VfsError, match="not a private directory"):
        user_socket_path(deep, uid, tmp_dir=socket_dir)


# -- systemd notifications -------------------------------------------------------------


def test_sdnotify_sends_to_notify_socket(socket_dir: str,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    path = os.path.join(socket_dir, "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(path)
        receiver.settimeout(5)
        monkeypatch.setattr(sdnotify, "_address", path)  # read from the environment at import
        assert sdnotify.notify_ready()
        assert receiver.recv(4096) == b"READY=1"
        assert sdnotify.notify_status("serving\n/pfs")
        assert receiver.recv(4096) == b"STATUS=serving /pfs"
        assert sdnotify.notify_stopping()
        assert receiver.recv(4096) == b"STOPPING=1"


def test_sdnotify_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"vfs-test-notify-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind("\0" + name)
        receiver.settimeout(5)
        monkeypatch.setattr(sdnotify, "_address", "@" + name)
        assert sdnotify.notify_ready()
        assert receiver.recv(4096) == b"READY=1"


def test_sdnotify_without_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sdnotify, "_address", None)
    assert sdnotify.notify_ready() is False


def test_sdnotify_takes_the_socket_out_of_the_environment() -> None:
    # Children of the daemon (runc!) must not inherit it.
    import subprocess
    import sys

    code = ("import os; os.environ['NOTIFY_SOCKET'] = '@x'; from daemon import sdnotify; "
            "print(sdnotify._address, os.environ.get('NOTIFY_SOCKET'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.split() == ["@x", "None"]


@pytest.mark.expect_warnings
def test_sdnotify_failure_is_logged_not_raised(socket_dir: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", os.path.join(socket_dir, "nobody-listens"))
    assert sdnotify.notify_ready() is False


def test_cli_side_needs_neither_trio_nor_pyfuse3() -> None:
    """``cli -> daemon.protocol`` only: vfsctl must start without the daemon's stack."""
    code = ("import sys; sys.modules['trio'] = None; sys.modules['pyfuse3'] = None; "
            "import daemon.protocol, cli.main")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
