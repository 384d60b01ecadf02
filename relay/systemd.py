"""The sd_notify protocol: readiness, status and watchdog messages to systemd.

A datagram to the unix socket named by $NOTIFY_SOCKET (sd_notify(3)); no extra
dependency. Without $NOTIFY_SOCKET every call is a no-op, so `relay serve` behaves the
same in a terminal.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

logger = logging.getLogger("relay.systemd")


def notify(message: str, environ: Mapping[str, str] | None = None) -> None:
    """Send one sd_notify message such as READY=1 or STATUS=...; never raises."""
    address = (os.environ if environ is None else environ).get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):  # abstract namespace socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        logger.warning("cannot notify systemd at %s: %s", address, exc.strerror)


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec), or None when not asked for."""
    environ = os.environ if environ is None else environ
    usec = environ.get("WATCHDOG_USEC", "")
    pid = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1_000_000 / 2
