"""Telling systemd how the daemon is doing (``Type=notify`` units, sd_notify(3)).

systemd passes a datagram socket in ``$NOTIFY_SOCKET``: a path, or a name in the
abstract namespace written with a leading ``@``. Outside systemd the variable is
unset and every function here does nothing, so the daemon calls them freely.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("daemon.sdnotify")

# Taken out of the environment on first use: programs the daemon starts (pipeline
# containers) must not inherit it. ``runc run`` with NOTIFY_SOCKET set waits for the
# container to send READY=1, which a pipeline command never does.
_address: str | None = os.environ.pop("NOTIFY_SOCKET", None)


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``, newline-separated assignments) to systemd.

    Returns:
        True if it was sent; False when not run by systemd or the send failed
        (logged: a lost notification must not stop the daemon).
    """
    address = _address
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        log.error("ignoring NOTIFY_SOCKET=%r: neither a path nor an abstract socket name",
                  address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.error("cannot notify systemd (%s) of %r: %s", address.lstrip("\0"), state, exc)
        return False
    return True


def notify_ready() -> bool:
    """The daemon is serving: systemd may consider the unit started."""
    return notify("READY=1")


def notify_stopping() -> bool:
    """The daemon is shutting down (unmounting, flushing)."""
    return notify("STOPPING=1")


def notify_status(text: str) -> bool:
    """A one-line status shown by ``systemctl status``."""
    return notify("STATUS=" + " ".join(text.splitlines()))


__all__ = ["notify", "notify_ready", "notify_status", "notify_stopping"]
