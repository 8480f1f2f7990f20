"""The ``/etc`` of a sandbox around host programs: made up, never the host's.

A worker node's ``/etc`` holds its secrets: ``/etc/shadow``, ``/etc/vfs/vfs.env`` with
the store's credentials, ssh host keys, tokens in ``pip.conf``, ``npmrc`` or
``gitconfig``. A datum sees none of it. Its ``/etc`` is a fresh, read-only directory
holding:

- files written for the sandbox (:func:`sandbox_files`): ``passwd`` and ``group``
  naming root and the datum's user, ``hosts``, ``nsswitch.conf`` (files, then dns),
  ``resolv.conf`` (only with network, a copy of the host's), ``mtab``;
- copies of what programs need from the host, public and the same on every machine,
  listed by name in :data:`HOST_ENTRIES` (the dynamic linker's cache, CA
  certificates, time zone, ``alternatives`` links, ...) where the host has them.

:class:`SandboxEtc` keeps these directories ready, so a start binds one directory.

Anything else a program wants from ``/etc`` is absent; a test run under bwrap on the
node shows what.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import math
import os
import shutil
import stat
import tempfile
import threading
import time

from daemon.protocol import pid_alive

#: Host ``/etc`` entries a sandbox shows read-only: public, non-secret, and needed to
#: run common programs (shells, coreutils, Python, Perl, TLS clients, fontconfig).
HOST_ENTRIES = (
    "alternatives", "ld.so.cache", "ld.so.conf", "ld.so.conf.d",
    "ssl/certs", "ssl/openssl.cnf", "ca-certificates.conf",
    "localtime", "timezone", "locale.alias",
    "protocols", "services", "networks", "ethertypes", "gai.conf", "host.conf",
    "mime.types", "magic", "magic.mime", "os-release", "debian_version",
    "fonts", "terminfo", "inputrc", "perl", "python3", "xml", "sgml",
)


def _python_dirs(etc: str) -> list[str]:
    try:
        return sorted(name for name in os.listdir(etc)
                      if name.startswith("python3.") and name[8:].isdigit())
    except OSError:
        return []


def host_entries(etc: str = "/etc") -> list[str]:
    """The names of :data:`HOST_ENTRIES` this host has (plus its ``python3.N``
    directories), relative to ``etc``."""
    return [name for name in (*HOST_ENTRIES, *_python_dirs(etc))
            if os.path.lexists(os.path.join(etc, name))]


def sandbox_files(user: tuple[int, int] | None, *, network: bool,
                  etc: str = "/etc") -> dict[str, str]:
    """The files written for the sandbox's ``/etc``: name -> content.

    Args:
        user: the datum's uid and gid (None: it runs as the daemon's user, whose ids
            the host's ``id`` would show).
        network: the sandbox shares the host's network, so it resolves names as the
            host does.
    """
    uid, gid = user if user is not None else (os.geteuid(), os.getegid())
    users = {0: "root", uid: "nobody" if uid == 65534 else "datum"}
    groups = {0: "root", gid: "nogroup" if gid == 65534 else "datum"}
    files = {
        "passwd": "".join(f"{name}:x:{number}:{gid if number == uid else 0}:"
                          f"{name}:{'/root' if number == 0 else '/tmp'}:/usr/sbin/nologin\n"
                          for number, name in users.items()),
        "group": "".join(f"{name}:x:{number}:\n" for number, name in groups.items()),
        "hosts": "127.0.0.1\tlocalhost vfs\n::1\tlocalhost ip6-localhost ip6-loopback\n",
        "nsswitch.conf": ("passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n"
                          "networks: files\nprotocols: files\nservices: files\n"),
    }
    if network:
        try:
            with open(os.path.join(etc, "resolv.conf")) as f:
                files["resolv.conf"] = f.read()
        except OSError:
            pass
    return files


_PREFIX = "vfs-etc-"  # then the pid of the process whose copies they are


class SandboxEtc:
    """Ready-made ``/etc`` directories, one per (user, network, host files), shown to a
    sandbox with a single read-only bind.

    Binding each host entry on its own costs bwrap a mount per entry (4 ms a start for
    about 30); a copy made once costs nothing per start. Copies live in a memory
    filesystem (``/dev/shm``): the ~700 small files and symlinks of a copy take 13 ms
    there and half a second on a disk. A copy is made again when the host's entries
    change (looked at every :attr:`recheck` seconds: an ``apt install`` rewriting
    ``ld.so.cache`` or ``alternatives``) or, with network, when the host's
    ``resolv.conf`` does. Copies are never changed or removed while this object
    lives (a running sandbox may show one); they go when the process exits, or, if it
    was killed, when the next one starts (:func:`sweep`).
    """

    recheck = 10.0

    def __init__(self, root: str | None = None, etc: str = "/etc") -> None:
        """
        Args:
            root: where to keep the copies (default ``/dev/shm``, else the temporary
                directory).
            etc: the host's ``/etc``.
        """
        if root is None:
            root = "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
        sweep(root)
        self.directory = tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-", dir=root)
        os.chmod(self.directory, 0o755)
        atexit.register(shutil.rmtree, self.directory, True)
        self.etc = etc
        self._lock = threading.Lock()
        self._signature = ""
        self._checked = -math.inf

    def _host_signature(self) -> str:
        now = time.monotonic()
        if now - self._checked < self.recheck:
            return self._signature
        parts = []
        for name in host_entries(self.etc):
            try:
                st = os.lstat(os.path.join(self.etc, name))
            except OSError:
                continue
            parts.append(f"{name}:{st.st_mode}:{st.st_size}:{st.st_mtime_ns}")
            if stat.S_ISDIR(st.st_mode):  # one level down: files replaced in place
                with os.scandir(os.path.join(self.etc, name)) as scan:
                    parts += sorted(f"{child.name}:{child.stat(follow_symlinks=False).st_mtime_ns}"
                                    for child in scan)
        self._signature = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
        self._checked = now
        return self._signature

    def path(self, user: tuple[int, int] | None, *, network: bool) -> str:
        """The directory to show at ``/etc`` for a datum running as ``user``. Blocking
        (the first time and after host changes it copies files): call from a thread."""
        with self._lock:
            files = sandbox_files(user, network=network, etc=self.etc)
            key = hashlib.sha256(json.dumps([self._host_signature(), files],
                                            sort_keys=True).encode()).hexdigest()[:16]
            final = os.path.join(self.directory, key)
            if not os.path.isdir(final):
                scratch = tempfile.mkdtemp(prefix=".new-", dir=self.directory)
                os.chmod(scratch, 0o755)
                _fill(scratch, files, self.etc)
                os.rename(scratch, final)
            return final


def sweep(root: str) -> None:
    """Remove the copies that processes killed before they could remove them left in
    ``root`` (named ``vfs-etc-<pid>-...``; only ours, only of dead processes)."""
    try:
        names = os.listdir(root)
    except OSError:
        return
    for name in names:
        pid = name[len(_PREFIX):].split("-", 1)[0]
        if not name.startswith(_PREFIX) or not pid.isdigit():
            continue
        path = os.path.join(root, name)
        if pid_alive(int(pid)):
            continue  # its process still runs
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid():
            shutil.rmtree(path, ignore_errors=True)


def _copy(source: str, target: str) -> None:
    """Copy a file or a tree: contents, symlinks as symlinks, permission bits; nothing
    else (shutil.copytree copies times and xattrs too, 1 ms a symlink: too slow for
    the hundreds in ``alternatives`` and ``ssl/certs``)."""
    st = os.lstat(source)
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(source), target)
    elif stat.S_ISDIR(st.st_mode):
        os.mkdir(target, 0o755)
        with os.scandir(source) as scan:
            for child in scan:
                _copy(child.path, os.path.join(target, child.name))
    elif stat.S_ISREG(st.st_mode):
        shutil.copyfile(source, target)
        os.chmod(target, stat.S_IMODE(st.st_mode) & 0o777)


def _fill(directory: str, files: dict[str, str], etc: str) -> None:
    for name in host_entries(etc):
        target = os.path.join(directory, name)
        os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
        _copy(os.path.join(etc, name), target)
    for name, content in files.items():
        path = os.path.join(directory, name)
        with open(path, "w") as f:
            f.write(content)
        os.chmod(path, 0o644)
    os.symlink("/proc/self/mounts", os.path.join(directory, "mtab"))
