"""A TCP proxy in front of a real server (SeaweedFS, moto), for store faults in tests.

One node's vfsd is pointed at the proxy instead of the server; the test then
makes that node's store slow or unreachable while the others keep working::

    with FaultProxy(("127.0.0.1", 8333)) as proxy:
        endpoint = proxy.endpoint          # http://127.0.0.1:<port>
        proxy.delay = 2.0                  # every request waits 2 s first
        proxy.delay_if = b"/refs/"         # ...only requests whose first bytes hold this
        proxy.cut()                        # drop every connection, refuse new ones
        proxy.restore()                    # back to normal
        proxy.requests, proxy.request_lines  # what went through: a count, request lines

It works on bytes, not HTTP: a delay applies to each chunk a client sends that
starts a request (a keep-alive connection carries one request after another).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from urllib.parse import urlparse

_CHUNK = 64 * 1024
_REQUEST_STARTS = (b"GET ", b"PUT ", b"POST ", b"HEAD ", b"DELETE ")


class FaultProxy:
    """Forwards connections to ``upstream`` (host, port) or an ``http://`` URL."""

    def __init__(self, upstream: tuple[str, int] | str) -> None:
        if isinstance(upstream, str):
            parsed = urlparse(upstream)
            upstream = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self.upstream = upstream
        self.delay = 0.0
        self.delay_if: bytes | None = None  # only requests whose first chunk holds this
        self.requests = 0
        self.request_lines: list[str] = []  # "GET /bucket?list-type=2&prefix=... HTTP/1.1"
        self._cut = False
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._listener.close()
        self._close_all()

    def cut(self) -> None:
        """The store is unreachable: open connections drop, new ones are refused."""
        self._cut = True
        self._close_all()

    def restore(self) -> None:
        self._cut = False
        self.delay = 0.0
        self.delay_if = None

    # -- the proxy ----------------------------------------------------------------------------

    def _close_all(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self._cut:
                client.close()
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._sockets.update((client, server))
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False),
                             daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, from_client: bool) -> None:
        try:
            while True:
                data = source.recv(_CHUNK)
                if not data or self._cut:
                    break
                if from_client and data.startswith(_REQUEST_STARTS):
                    self.requests += 1
                    self.request_lines.append(
                        data.split(b"\r\n", 1)[0].decode("latin-1", "replace"))
                    if self.delay and (self.delay_if is None or self.delay_if in data):
                        time.sleep(self.delay)
                    if self._cut:
                        break
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
