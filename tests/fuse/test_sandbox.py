"""What a datum can see and do, probed from inside by a real pipeline on a real vfsd.

vfsd runs as root, as on a worker node, with the store's credentials in its
environment, in ``/etc/vfs/vfs.env`` and in files of the store, the cache and
``/root``. A probe pipeline reports, from inside each runtime's sandbox, everything
it could reach; the test asserts the report is empty of the host. The same probe
under the unsandboxed ``process`` runtime must find the leaks: that shows the probe
can see them.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import secrets
import shutil
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from conftest import _require_fuse, _socket_path, check_after, mounted

import vfs
from daemon.runtimes.rootfs import make_busybox_rootfs
from daemon.runtimes.runc import DEFAULT_USERNS_BASE
from vfs.pipeline import registry
from vfs.pipeline.spec import load_spec_file

if TYPE_CHECKING:
    from conftest import Mount

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox is probed as root")

# Reports one line per thing the datum could reach. ${VFS_PFS} so that it runs under
# the process runtime too. The secret's pattern is written so that it does not match
# its own text (in the command line and the script).
PROBE = r'''
P=${VFS_PFS:-/pfs}; out=$P/out
report() { echo "$*" >> "$out/report"; }
report "uid $(id -u) $(id -g)"
report "uidmap $(cat /proc/self/uid_map)"
for f in /etc/shadow /etc/vfs/vfs.env "$PROBE_ETC" "$PROBE_ROOT" "$PROBE_STORE/secret" \
         "$PROBE_CACHE/secret"; do
  if cat "$f" >/dev/null 2>&1; then report "readable $f"; fi
done
for d in "$PROBE_STORE" "$PROBE_CACHE" /etc/vfs /home; do
  if [ -n "$(ls -A "$d" 2>/dev/null)" ]; then report "listable $d"; fi
done
if [ -e "$PROBE_SOCKET" ]; then report "visible $PROBE_SOCKET"; fi
if (echo x > "$P/probe/new") 2>/dev/null; then report "wrote input"; fi
if (echo x > /usr/vfs-probe) 2>/dev/null; then report "wrote /usr"; rm -f /usr/vfs-probe; fi
if [ "$(readlink /bin/wget)" = busybox ]; then  # the static busybox wget crashes: nc
  printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 3 127.0.0.1 "$PROBE_PORT" > "$out/net" 2>/dev/null
else
  wget -q -T 3 -O - "http://127.0.0.1:$PROBE_PORT/" > "$out/net" 2>/dev/null
fi
if grep -q reached "$out/net"; then report "network"; fi
rm -f "$out/net"
n=0; for p in /proc/[0-9]*; do n=$((n + 1)); done; report "processes $n"
report "top $(ls / | tr '\n' ' ')"
env > "$out/env"
if [ "$PROBE_GREP" = 1 ]; then
  for d in /*; do
    case $d in /proc|/sys|/dev|/usr|/lib*|/bin|/sbin) continue;; esac
    grep -rlsE 'vfs[p]robe-secret' "$d" | sed 's/^/secret-in /' >> "$out/report"
  done
  grep -lsE 'vfs[p]robe-secret' /proc/[0-9]*/environ /proc/[0-9]*/cmdline \
    | sed 's/^/secret-in /' >> "$out/report"
fi
cp /bin/id "$out/id" && chmod 4755 "$out/id"
'''


@pytest.fixture
def secret() -> str:
    return f"vfsprobe-secret-{secrets.token_hex(8)}"


@pytest.fixture
def planted(secret: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    """The node's credentials where a worker node has them: /etc/vfs/vfs.env (or a file
    beside it if the machine has its own) and a file in /root."""
    etc = Path("/etc/vfs/vfs.env")
    made_dir = not etc.parent.exists()
    if etc.exists():
        etc = etc.parent / f"probe-{secret[-8:]}.env"
    etc.parent.mkdir(parents=True, exist_ok=True)
    etc.write_text(f"AWS_SECRET_ACCESS_KEY={secret}\n")
    etc.chmod(0o600)
    root = Path(f"/root/.vfs-probe-{secret[-8:]}")
    root.write_text(secret)
    root.chmod(0o600)
    try:
        yield {"PROBE_ETC": str(etc), "PROBE_ROOT": str(root)}
    finally:
        etc.unlink()
        root.unlink()
        if made_dir:
            with contextlib.suppress(OSError):
                etc.parent.rmdir()


@pytest.fixture
def listener() -> Iterator[int]:
    """An HTTP server on the host's loopback; returns its port."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"reached\n")

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def node_dir() -> Iterator[Path]:
    """Where the node keeps its store and cache: a directory others can search, as
    /var/lib/vfs (runc then gives datums a user namespace)."""
    path = Path(tempfile.mkdtemp(prefix="vfs-node-", dir="/var/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def node(request: pytest.FixtureRequest, node_dir: Path, secret: str,
         monkeypatch: pytest.MonkeyPatch) -> Iterator[Mount]:
    """A vfsd as on a worker node: root, credentials in its environment."""
    _require_fuse()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "vfsprobe-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    with mounted(node_dir, "--allow-process-runtime") as m:
        for directory in (m.store_dir, m.cache_dir):
            (Path(directory) / "secret").write_text(secret)
        yield m
    check_after(m, log=not request.node.get_closest_marker("expect_warnings"))


def _runtime_image(runtime: str, node_dir: Path) -> str | None:
    if shutil.which("runc" if runtime == "runc" else "bwrap") is None and runtime != "process":
        pytest.skip(f"{runtime} is not installed (scripts/setup.sh installs it)")
    return make_busybox_rootfs(str(node_dir / "rootfs")) if runtime == "runc" else None


def _probe(mount: Mount, tmp_path: Path, runtime: str, image: str | None, env: dict,
           *, network: bool, name: str) -> dict:
    doc = {"pipeline": name, "input": {"repo": "probe", "glob": "/*"},
           "transform": {"cmd": ["sh", "-c", PROBE], "env": env,
                         **({"image": image} if image else {})},
           "runtime": runtime, "network": network}
    spec = tmp_path / f"{name}.json"
    spec.write_text(json.dumps(doc))
    mount.vfsctl("pipeline", "create", "-f", str(spec))
    return doc


def _report(mount: Mount, name: str) -> list[str]:
    return (mount.path / f"{name}@main" / "report").read_text().splitlines()


@pytest.mark.parametrize("runtime", ["bwrap", "runc"])
def test_a_datum_sees_nothing_of_the_host(runtime: str, node: Mount, tmp_path: Path,
                                          planted: dict, listener: int, secret: str,
                                          node_dir: Path) -> None:
    image = _runtime_image(runtime, node_dir)
    socket_path = _socket_path(node.cache_dir.parent / f"vfsd-{node.path.name}.sock")
    assert os.path.exists(socket_path)
    env = {**planted, "PROBE_STORE": str(node.store_dir), "PROBE_CACHE": str(node.cache_dir),
           "PROBE_SOCKET": socket_path,
           "PROBE_PORT": str(listener), "PROBE_GREP": "1"}
    node.vfsctl("repo", "create", "probe")
    _probe(node, tmp_path, runtime, image, env, network=False, name="closed")
    _probe(node, tmp_path, runtime, image, env, network=True, name="open")
    (node.path / "probe@main" / "input.txt").write_text("data\n")
    commit = node.commit("probe@main")
    node.vfsctl("wait", f"probe@{commit}", "--timeout", "90")

    for name, network in (("closed", False), ("open", True)):
        report = _report(node, name)
        uid = next(line for line in report if line.startswith("uid "))
        assert uid == "uid 65534 65534", report
        uidmap = next(line for line in report if line.startswith("uidmap ")).split()[1:]
        # runc: a user namespace in which even the container's root is nobody here.
        assert uidmap == (["0", str(DEFAULT_USERNS_BASE), "65536"] if runtime == "runc"
                          else ["0", "0", "4294967295"]), report
        processes = int(next(line for line in report if line.startswith("processes "))[10:])
        assert processes < 10, report  # its own, not the host's hundreds
        top = set(next(line for line in report if line.startswith("top ")).split()[1:])
        if runtime == "bwrap":  # the host's programs and nothing else of the host
            assert top <= {"bin", "dev", "etc", "lib", "lib32", "lib64", "libx32", "pfs",
                           "proc", "sbin", "tmp", "usr"}, report
        findings = [line for line in report
                    if not line.startswith(("uid", "processes ", "top ", "network"))]
        assert findings == [], report
        assert ("network" in report) == network, report
        datum_env = (node.path / f"{name}@main" / "env").read_text()
        assert secret not in datum_env and "AWS_" not in datum_env, datum_env

        # A setuid program written by the datum never comes back out setuid.
        target = tmp_path / f"id-{name}"
        node.vfsctl("get", f"{name}@main:/id", str(target))
        assert stat.S_IMODE(target.stat().st_mode) & 0o7000 == 0
        assert stat.S_IMODE(target.stat().st_mode) == 0o755


def test_the_probe_finds_the_leaks_of_the_unsandboxed_runtime(
        node: Mount, tmp_path: Path, planted: dict, listener: int) -> None:
    env = {**planted, "PROBE_STORE": str(node.store_dir), "PROBE_CACHE": str(node.cache_dir),
           "PROBE_SOCKET": "/nonexistent", "PROBE_PORT": str(listener), "PROBE_GREP": "0"}
    node.vfsctl("repo", "create", "probe")
    _probe(node, tmp_path, "process", None, env, network=False, name="closed")
    (node.path / "probe@main" / "input.txt").write_text("data\n")
    node.vfsctl("wait", f"probe@{node.commit('probe@main')}", "--timeout", "60")
    report = _report(node, "closed")
    assert "uid 0 0" in report
    for leak in ("readable /etc/shadow", f"readable {planted['PROBE_ETC']}",
                 f"readable {planted['PROBE_ROOT']}", f"readable {node.store_dir}/secret",
                 "network"):
        assert leak in report, report


@pytest.mark.expect_warnings  # the refused job is logged
def test_a_root_vfsd_refuses_the_process_runtime_unless_allowed(
        request: pytest.FixtureRequest, tmp_path: Path) -> None:
    _require_fuse()
    with mounted(tmp_path) as mount:
        mount.vfsctl("repo", "create", "probe")
        doc = {"pipeline": "p", "input": {"repo": "probe"}, "runtime": "process",
               "transform": {"cmd": ["sh", "-c", "id -u > $VFS_PFS/out/uid"]}}
        (tmp_path / "p.json").write_text(json.dumps(doc))
        refused = mount.vfsctl("pipeline", "create", "-f", str(tmp_path / "p.json"),
                               check=False)
        assert refused.returncode == 1
        message = refused.stderr
        assert "runtime process runs commands unsandboxed, and this vfsd runs as root" \
            in message and "--allow-process-runtime" in message
        # Created by a node that allows it: this one still does not run it.
        with vfs.open_store(str(mount.store_dir), cache_dir=str(tmp_path / "other")) as other:
            registry.create(other, load_spec_file(str(tmp_path / "p.json")))
        (mount.path / "probe@main" / "a").write_text("a")
        commit = mount.commit("probe@main")
        waited = mount.vfsctl("wait", f"probe@{commit}", "--timeout", "5", check=False)
        assert waited.returncode != 0
        assert not (mount.path / "p@main" / "uid").exists()
    log = mount.log.read_text()
    assert "runtime process runs commands unsandboxed, and this vfsd runs as root" in log


def test_outputs_belong_to_the_datum_user_and_keep_their_modes(
        node: Mount, tmp_path: Path, busybox_rootfs: Path) -> None:
    if shutil.which("runc") is None:
        pytest.skip("runc is not installed")
    node.vfsctl("repo", "create", "probe")
    script = ('cd /pfs/out && echo a > private && chmod 600 private && '
              'echo b > shared && chmod 644 shared && cp /bin/busybox tool && '
              'chmod 750 tool && cat /pfs/probe/secret-mode > copy')
    doc = {"pipeline": "modes", "input": {"repo": "probe", "glob": "/"},
           "transform": {"cmd": ["sh", "-c", script], "image": str(busybox_rootfs)},
           "runtime": "runc"}
    (tmp_path / "modes.json").write_text(json.dumps(doc))
    node.vfsctl("pipeline", "create", "-f", str(tmp_path / "modes.json"))
    source = node.path / "probe@main" / "secret-mode"
    source.write_text("readable by the datum although 0600\n")
    source.chmod(0o600)
    commit = node.commit("probe@main")
    node.vfsctl("wait", f"probe@{commit}", "--timeout", "60")
    out = node.path / "modes@main"
    assert stat.S_IMODE((out / "private").stat().st_mode) == 0o600
    assert stat.S_IMODE((out / "shared").stat().st_mode) == 0o644
    assert stat.S_IMODE((out / "tool").stat().st_mode) == 0o750
    assert (out / "copy").read_text() == "readable by the datum although 0600\n"
