"""sd_notify(3) over $NOTIFY_SOCKET: READY, STOPPING, WATCHDOG, STATUS."""

from __future__ import annotations

import contextlib
import socket


class Notifier:
    """Sends systemd notifications; does nothing when not run by systemd."""

    def __init__(self, environ: dict[str, str]) -> None:
        addr = environ.get("NOTIFY_SOCKET", "")
        self.addr = "\0" + addr[1:] if addr.startswith("@") else addr
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        import os

        mine = not pid or pid == str(os.getpid())
        self.watchdog_seconds = int(usec) / 1e6 if usec.isdecimal() and mine else 0.0

    def send(self, *fields: str) -> None:
        """Send one notification ("READY=1", "STATUS=...")."""
        if not self.addr:
            return
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto("\n".join(fields).encode(), self.addr)
