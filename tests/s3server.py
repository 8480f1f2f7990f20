"""Run a real moto S3 server in a subprocess, for tests of the ``s3`` backend.

Usage::

    with start_moto_server() as endpoint:  # "http://127.0.0.1:PORT"
        store = S3Store("bucket", endpoint_url=endpoint)

The server accepts any credentials; set dummy ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` and ``AWS_DEFAULT_REGION=us-east-1`` in the client's
environment. Create buckets before use.

moto (5.2) honours ``If-None-Match: *`` and ``If-Match`` on PutObject, but checks
the condition and stores the object without a lock, while serving requests on
many threads: two racing conditional writes to one key can both succeed, which
real S3 never allows. By default the server is therefore started through moto's
own ``main()`` with its WSGI entry point wrapped in one lock, so requests run one
at a time and conditional writes are atomic, as on S3 (moto is bound by the GIL
anyway, so little throughput is lost). ``serialize=False`` runs plain
``moto_server``.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

HOST = "127.0.0.1"

# moto_server, with every request handled under one lock (see the module docstring).
_SERIALIZED_MOTO = """
import sys, threading
from moto.moto_server import werkzeug_app

_lock = threading.Lock()
_call = werkzeug_app.DomainDispatcherApplication.__call__

def _serialized_call(self, environ, start_response):
    with _lock:
        return _call(self, environ, start_response)

werkzeug_app.DomainDispatcherApplication.__call__ = _serialized_call

from moto.server import main
main(sys.argv[1:])
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except urllib.error.HTTPError:
        return True  # any HTTP answer means the server is up
    except OSError:
        return False


@contextmanager
def start_moto_server(timeout: float = 30.0, *, serialize: bool = True) -> Iterator[str]:
    """Start ``moto_server`` on a free localhost port; yield its endpoint URL.

    The server is terminated when the block exits. Its log (one line per request)
    goes to a temporary file that is shown if the server fails to start.

    Args:
        timeout: how long to wait for the server to answer, in seconds.
        serialize: handle one request at a time, which makes conditional writes
            atomic as on real S3 (see the module docstring).

    Raises:
        RuntimeError: the server did not answer within ``timeout`` seconds.
    """
    if serialize:
        command = [sys.executable, "-c", _SERIALIZED_MOTO]
    else:
        command = [sys.executable, "-m", "moto.server"]  # what the moto_server script runs
    with tempfile.TemporaryFile() as log:
        for _ in range(3):  # the free port may be taken before moto binds it
            port = _free_port()
            endpoint = f"http://{HOST}:{port}"
            proc = subprocess.Popen(
                [*command, "-H", HOST, "-p", str(port)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            try:
                deadline = time.monotonic() + timeout
                while proc.poll() is None and time.monotonic() < deadline:
                    if _answers(f"{endpoint}/moto-api/"):
                        break
                    time.sleep(0.1)
                else:
                    if proc.poll() is not None:
                        continue  # exited (port taken?): try another port
                    raise RuntimeError(f"moto_server did not answer at {endpoint}")
                yield endpoint
                return
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        log.seek(0)
        output = log.read().decode(errors="replace")[-4000:]
        raise RuntimeError(f"moto_server failed to start:\n{output}")
