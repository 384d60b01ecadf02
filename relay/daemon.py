"""`relay serve`: the listener and delivery on one event loop, signals, readiness, drain.

Lifecycle like uvicorn's Server: start-up (spool lock, crash recovery, bind, workers,
READY=1), run until SIGTERM or SIGINT, shutdown (close the listener, stop claiming, give
in-flight deliveries DRAIN_SECONDS, then cancel them: their entries stay queued).
No business logic lives here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket

from .config import Config
from .delivery import Delivery
from .entry import Entry
from .listener import Handler, local_hostname, make_server_factory
from .log import log_event
from .spool import Spool

logger = logging.getLogger("relay.daemon")

# How long SIGTERM waits for deliveries in flight; systemd's TimeoutStopSec must exceed it.
DRAIN_SECONDS = 10.0


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.spool = Spool(config.spool.path, config.spool.min_free)
        self.delivery = Delivery(self.spool, config)
        self._server: asyncio.Server | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """Where the listener is bound (the real port when the config asked for port 0)."""
        assert self._server is not None
        return [s.getsockname()[:2] for s in self._server.sockets]

    async def start(self) -> None:
        """Take the spool, recover it, bind the listener, start delivery. Raises RelayError
        or OSError (port in use, no permission) before anything is accepted."""
        self.spool.open()
        self.spool.lock()
        due = await asyncio.to_thread(self.spool.recover)
        for entry_id, when in due:
            self.delivery.schedule(entry_id, when)
        listen = self.config.listen
        handler = Handler(self.spool, listen, self._stored, local_hostname())
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(make_server_factory(handler, listen),
                                                host=listen.address, port=listen.port)
        self.delivery.start()
        self._watcher = asyncio.create_task(self.delivery.watch_incoming())
        upstream = self.config.upstream
        where = ", ".join(f"{host}:{port}" for host, port in self.addresses)
        log_event(logging.INFO, None, event="start", listening=where,
                  spool=str(self.spool.path), queued=len(due),
                  upstream=f"{upstream.name} ({upstream.tls})" if upstream else
                  "none (mail is kept in the queue until one is configured)")
        notify("READY=1")

    def _stored(self, entry: Entry) -> None:
        self.delivery.schedule(entry.id)

    def request_stop(self) -> None:
        self._stop.set()

    async def wait_stopped(self) -> None:
        await self._stop.wait()

    async def stop(self) -> None:
        notify("STOPPING=1")
        if self._server is not None:
            self._server.close()
        if self._watcher is not None:
            self._watcher.cancel()
        await self.delivery.stop(DRAIN_SECONDS)
        self.spool.unlock()
        log_event(logging.INFO, None, event="stop", status="stopped")


async def serve(config: Config) -> None:
    """Run until SIGTERM or SIGINT; raises what Daemon.start raises."""
    daemon = Daemon(config)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, daemon.request_stop)
    try:
        await daemon.start()
        await daemon.wait_stopped()
    finally:
        await daemon.stop()


def notify(message: str) -> None:
    """Tell systemd (sd_notify protocol, a datagram to $NOTIFY_SOCKET); no-op without it."""
    address = os.environ.get("NOTIFY_SOCKET")
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
