"""The configured upstreams at run time: each one's connections and its gate.

An SMTP upstream has a pool of sessions (relay.smtp_client), at most `connections` of them,
the one used last handed out first, so that the others can stay closed; an API upstream
has one HTTPS client (relay.mailgun) that keeps its own connections. Each upstream's gate
(relay.routing: its circuit breaker and rate bucket) is kept here, and its state is
published in the spool for `relay queue` and `relay check` whenever it changes. Runs on
the event loop; `prepare` builds what can fail (TLS contexts, API clients) beforehand.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Protocol

from .breaker import Circuit
from .config import AnyUpstream, Config, UpstreamConfig
from .outcome import AttemptResult
from .routing import Gate
from .smtp_client import UpstreamSession, make_tls_context


class Transport(Protocol):
    """An SMTP session or the API's client: one envelope at a time, the same result."""

    async def deliver(self, sender: str, recipients: list[str], content: bytes,
                      smtputf8: bool) -> AttemptResult: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class Prepared:
    """What the upstreams of a config need that can fail to build: made in a thread
    before a reload switches over, so that a bad ca_file refuses the reload whole."""

    config: Config
    tls: dict[str, ssl.SSLContext | None]
    apis: dict[str, Transport]


def prepare(config: Config) -> Prepared:
    """TLS contexts and API clients for every upstream. Raises ConfigError or OSError."""
    tls: dict[str, ssl.SSLContext | None] = {}
    apis: dict[str, Transport] = {}
    for upstream in config.upstreams:
        if isinstance(upstream, UpstreamConfig):
            tls[upstream.name] = make_tls_context(upstream)
        else:
            # httpx is an optional extra; the config was refused without it.
            from .mailgun import MailgunApi
            apis[upstream.name] = MailgunApi(upstream)
    return Prepared(config, tls, apis)


def display(upstream: AnyUpstream) -> str:
    """How logs and the queue name the relay of an attempt: NAME[host]:port, as Postfix
    writes relay=host[address]:port; host:port alone when the name is that already."""
    if upstream.name == upstream.address:
        return upstream.address
    host, _, port = upstream.address.rpartition(":")
    return f"{upstream.name}[{host}]:{port}"


class Upstreams:
    def __init__(self, prepared: Prepared, hostname: str | None,
                 published: Callable[[dict[str, Gate]], None]) -> None:
        self.config = prepared.config
        self._prepared = prepared
        self._hostname = hostname  # EHLO's name towards the upstreams
        self._published = published  # told of the gates when a circuit changes
        self.gates: dict[str, Gate] = {u.name: Gate() for u in prepared.config.upstreams}
        self._slots = {u.name: asyncio.Semaphore(u.connections)
                       for u in prepared.config.upstreams}
        self._idle: dict[str, list[UpstreamSession]] = {}

    @property
    def workers(self) -> int:
        """Delivery workers enough to keep every connection of the busiest upstream busy."""
        return max((u.connections for u in self.config.upstreams), default=1)

    def set_gate(self, name: str, gate: Gate) -> None:
        before = self.gates.get(name)
        self.gates[name] = gate
        if before is None or before.breaker.circuit is not gate.breaker.circuit:
            self._published(self.gates)

    def retry_down(self, now: float) -> None:
        """An operator put mail back in the queue (flush, release, requeue): an upstream
        marked down is probed at once rather than at the end of its backoff, as Postfix's
        flush retries dead destinations. One paused for rejected credentials stays paused:
        only a reload, or its time, tries them again."""
        for name, gate in list(self.gates.items()):
            breaker = gate.breaker
            if breaker.circuit is Circuit.OPEN and not breaker.paused and breaker.until > now:
                self.set_gate(name, Gate(replace(breaker, until=now), gate.bucket))
        self._published(self.gates)

    @contextlib.asynccontextmanager
    async def transport(self, upstream: AnyUpstream) -> AsyncIterator[Transport]:
        """A connection to `upstream`, once one of its `connections` is free."""
        async with self._slots[upstream.name]:
            api = self._prepared.apis.get(upstream.name)
            if api is not None:
                yield api
                return
            assert isinstance(upstream, UpstreamConfig)
            idle = self._idle.setdefault(upstream.name, [])
            session = idle.pop() if idle else UpstreamSession(
                upstream, self._prepared.tls[upstream.name], self._hostname)
            try:
                yield session
            finally:
                idle.append(session)

    async def close(self) -> None:
        """Close every idle session and the API clients (at stop, or replaced by a reload)."""
        sessions = [s for idle in self._idle.values() for s in idle]
        self._idle.clear()
        for transport in (*sessions, *self._prepared.apis.values()):
            with contextlib.suppress(Exception):  # a goodbye that fails changes nothing
                await transport.close()
