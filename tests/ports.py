"""Loopback ports that a test server can give up and take back.

A port from the kernel's ephemeral range (what binding port 0 gives) is only safe while
it stays bound: once a server lets it go, any connect() on the machine may take it as its
source port (the relay's own connects to the stopped server included, which then connect
to themselves), and the server cannot bind it again until that connection's TIME_WAIT is
over. connect() never picks a port below the ephemeral range, so a server that stops and
restarts on the same port, as a provider and a crashed relay do, takes one from there.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

LOWEST = 10000  # above the ports daemons usually bind


def reusable_port() -> int:
    """A port on 127.0.0.1, free now, that no outgoing connection will be given."""
    first_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for port in random.sample(range(LOWEST, first_ephemeral), 100):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {LOWEST}-{first_ephemeral - 1} on 127.0.0.1")
