"""The ``/etc`` of a sandbox around host programs: made up, never the host's.

A worker node's ``/etc`` holds its secrets: ``/etc/shadow``, ``/etc/vfs/vfs.env`` with
the store's credentials, ssh host keys, tokens in ``pip.conf``, ``npmrc`` or
``gitconfig``. A datum sees none of it. Its ``/etc`` is a fresh, read-only directory
holding:

- files written for the sandbox (:func:`sandbox_files`): ``passwd`` and ``group``
  naming root and the datum's user, ``hosts``, ``nsswitch.conf`` (files, then dns),
  ``resolv.conf`` (only with network, a copy of the host's), ``mtab``;
- what programs need from the host and is the same on every machine, listed by name
  in :data:`HOST_ENTRIES` (the dynamic linker's cache, CA certificates, time zone,
  ``alternatives`` links, ...), each shown read-only where the host has it.

Anything else a program wants from ``/etc`` is absent; a test run under bwrap on the
node shows what.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

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


@dataclass(frozen=True)
class EtcEntry:
    """One entry of the sandbox's ``/etc``: a file of ours, a host path, or a symlink."""

    name: str  # relative to /etc
    source: str | None = None  # host path to show read-only
    symlink: str | None = None  # target, for a symlink


def _python_dirs(etc: str) -> list[str]:
    try:
        return sorted(name for name in os.listdir(etc)
                      if name.startswith("python3.") and name[8:].isdigit())
    except OSError:
        return []


def host_entries(etc: str = "/etc") -> list[EtcEntry]:
    """The :data:`HOST_ENTRIES` this host has (plus its ``python3.N`` directories),
    symlinks kept as symlinks (their targets are in ``/usr``, shown anyway)."""
    entries = []
    for name in (*HOST_ENTRIES, *_python_dirs(etc)):
        path = os.path.join(etc, name)
        if os.path.islink(path):
            entries.append(EtcEntry(name, symlink=os.readlink(path)))
        elif os.path.exists(path):
            entries.append(EtcEntry(name, source=path))
    return entries


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


def write_sandbox_etc(directory: str, files: dict[str, str]) -> list[EtcEntry]:
    """Write ``files`` into ``directory`` (world-readable) and return them as entries."""
    os.makedirs(directory, exist_ok=True)
    entries = []
    for name, content in files.items():
        path = os.path.join(directory, name)
        with open(path, "w") as f:
            f.write(content)
        os.chmod(path, 0o644)
        entries.append(EtcEntry(name, source=path))
    entries.append(EtcEntry("mtab", symlink="/proc/self/mounts"))
    return entries
