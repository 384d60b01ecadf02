"""The monitoring endpoint: GET /metrics (Prometheus) and GET /healthz, on the relay's
own event loop.

A small HTTP/1.1 server of asyncio streams, one request per connection, rather than
prometheus_client's start_http_server: that one runs in a thread of its own, where
/healthz could not ask the listener and the spool in step with the loop, and its every
request would take the GIL from the loop; here a probe is two system calls on the loop,
and a scrape's directory listings and formatting run in a worker thread. Clients outside
`metrics.allow` are refused, as the listener refuses them.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable, Sequence

from .config import IPNetwork, MetricsConfig
from .metrics import Metrics

logger = logging.getLogger("relay.monitor")

# A probe or a scrape sends one short request; anything longer or slower is not one.
MAX_REQUEST_HEAD = 8192
REQUEST_SECONDS = 10.0
# A check returns None when all is well, else what is wrong, for the 503's body.
Check = Callable[[], str | None]


class Monitor:
    """Serves `metrics` and the named health checks at metrics.address:metrics.port."""

    def __init__(self, config: MetricsConfig, metrics: Metrics,
                 checks: Sequence[tuple[str, Check]]) -> None:
        self.config = config
        self.metrics = metrics
        self.checks = checks
        self._server: asyncio.Server | None = None

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """Where it is bound (the real port when the config asked for port 0)."""
        if self._server is None:
            return []
        return [s.getsockname()[:2] for s in self._server.sockets]

    async def start(self) -> None:
        """Bind; raises OSError (port in use, no permission) as the listener does."""
        self._server = await asyncio.start_server(
            self._serve, host=self.config.address, port=self.config.port,
            limit=MAX_REQUEST_HEAD)

    def reconfigure(self, config: MetricsConfig) -> None:
        """A reload's `allow` (address and port need a restart)."""
        self.config = config

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def problems(self) -> list[str]:
        """What keeps the relay from accepting mail now; empty when healthy."""
        found = []
        for name, check in self.checks:
            problem = check()
            if problem is not None:
                found.append(f"{name}: {problem}")
        return found

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if not _allowed(writer.get_extra_info("peername"), self.config.allow):
                await _respond(writer, 403, "forbidden: not in metrics.allow\n")
                return
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_SECONDS)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
                await _respond(writer, 400, "bad request\n")
                return
            status, body, content_type = await self._answer(head)
            await _respond(writer, status, body, content_type,
                           head_only=head.startswith(b"HEAD "))
        except (ConnectionError, OSError):
            pass  # the client went away; nothing to tell it
        except Exception:
            logger.exception("monitoring endpoint: request failed")
        finally:
            writer.close()

    async def _answer(self, head: bytes) -> tuple[int, str | bytes, str]:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return 400, "bad request\n", TEXT
        method, target = parts[0], parts[1].split("?", 1)[0]
        if target not in ("/metrics", "/healthz"):
            return 404, "not found: try /metrics or /healthz\n", TEXT
        if method not in ("GET", "HEAD"):
            return 405, "method not allowed\n", TEXT
        if target == "/healthz":
            problems = self.problems()
            return (503, "\n".join(problems) + "\n", TEXT) if problems else (200, "ok\n", TEXT)
        accept = next((line.split(":", 1)[1].strip() for line in lines[1:]
                       if line.lower().startswith("accept:")), "")
        body, content_type = await asyncio.to_thread(self.metrics.exposition, accept)
        return 200, body, content_type


TEXT = "text/plain; charset=utf-8"
_REASONS = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
            405: "Method Not Allowed", 503: "Service Unavailable"}


async def _respond(writer: asyncio.StreamWriter, status: int, body: str | bytes,
                   content_type: str = TEXT, head_only: bool = False) -> None:
    data = body.encode() if isinstance(body, str) else body
    head = (f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(data)}\r\nCache-Control: no-store\r\n"
            "Connection: close\r\n\r\n")
    writer.write(head.encode() + (b"" if head_only else data))
    await writer.drain()


def _allowed(peer: object, allow: tuple[IPNetwork, ...]) -> bool:
    if not isinstance(peer, tuple) or not peer:
        return False
    try:
        address = ipaddress.ip_address(peer[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return any(address in network for network in allow)
