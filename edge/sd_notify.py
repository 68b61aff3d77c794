"""systemd's notify protocol (READY=1, STOPPING=1, WATCHDOG=1, STATUS=...) in a few lines.

A datagram to ``$NOTIFY_SOCKET`` (a leading ``@`` means the abstract namespace); a no-op when
not run by systemd. Stdlib only: ``systemd-python`` needs libsystemd headers to build.
"""

from __future__ import annotations

import os
import socket


def notify(message: str, env: dict[str, str] | None = None) -> bool:
    """Send one notification; returns False when there is no socket to send to."""
    path = (env if env is not None else os.environ).get("NOTIFY_SOCKET")
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(address)
        sock.sendall(message.encode())
    return True


def watchdog_interval_secs(env: dict[str, str] | None = None) -> float | None:
    """Half the watchdog timeout systemd asked for (``WATCHDOG_USEC``), or None."""
    e = env if env is not None else os.environ
    usec = e.get("WATCHDOG_USEC")
    pid = e.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2_000_000
