"""The system's own host names, found without asking DNS.

socket.getfqdn() asks the resolver, and on a host whose DNS server cannot be reached it
waits out the resolver's timeouts (5 s per server and try by default) before it answers:
at start-up that would hold the listener back. The fully qualified name is taken from
gethostname() when it holds a dot, else from /etc/hosts, where Debian's installer writes
it (`127.0.1.1 host.example.com host`) and where `hostname -f` finds it first.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from pathlib import Path

HOSTS = Path("/etc/hosts")
MAX_HOSTS_BYTES = 16 << 20  # /etc/hosts with a blocklist can be large; beyond this, no name
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?"
_NAME = re.compile(rf"^{_LABEL}(\.{_LABEL})*$")


@dataclass(frozen=True)
class SystemName:
    short: str  # gethostname() up to its first dot
    fqdn: str | None  # None: the system has no fully qualified name


def system_name(hosts: Path = HOSTS) -> SystemName:
    """The host's names: gethostname(), and its FQDN from the name itself or /etc/hosts."""
    name = socket.gethostname().strip(".")
    if not _NAME.match(name):
        return SystemName("localhost", None)
    short = name.split(".")[0]
    if "." in name:
        return SystemName(short, name.lower())
    try:
        with hosts.open("rb") as f:
            text = f.read(MAX_HOSTS_BYTES).decode("utf-8", errors="replace")
    except OSError:
        return SystemName(short, None)
    return SystemName(short, fqdn_from_hosts(text, short))


def fqdn_from_hosts(text: str, short: str) -> str | None:
    """The first line of an /etc/hosts text naming `short` gives its FQDN: the line's
    canonical (first) name when it holds a dot, else an alias that is `short.domain`."""
    short = short.lower()
    if short == "localhost":
        return None
    for line in text.splitlines():
        names = [n.lower() for n in line.split("#", 1)[0].split()[1:]]
        if not any(n == short or n.startswith(short + ".") for n in names):
            continue
        dotted = [n for n in names if "." in n and _NAME.match(n)]
        if dotted and dotted[0] == names[0]:
            return names[0]
        for candidate in dotted:
            if candidate.startswith(short + "."):
                return candidate
    return None
