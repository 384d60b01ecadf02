"""A small asyncio TCP proxy between the relay and the test upstream that misbehaves on
purpose (docs/RELIABILITY-PLAN.md): strip STARTTLS from the EHLO reply, inject
bytes after the 220 that answers STARTTLS, delay every reply, or reset (or cleanly close,
truncating) the connection once the client has sent N bytes. It keeps every byte the
client sent (`sent`): a capture of the wire.
Loopback only, ephemeral port, its own event loop thread.

Also a `BabblingServer`: a fake upstream with no SMTP logic, for replies no real server
library would produce (giant, endless, unsolicited).
"""

from __future__ import annotations

import abc
import asyncio
import threading
from typing import Self


class _LoopbackServer(abc.ABC):
    """A TCP server on 127.0.0.1, ephemeral port, on its own event loop thread."""

    def __init__(self) -> None:
        self.connections = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server: asyncio.Server | None = None

    def start(self) -> Self:
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    async def _start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self._server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @abc.abstractmethod
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one connection."""


class ChaosProxy(_LoopbackServer):
    def __init__(self, target_port: int, *, strip_starttls: bool = False,
                 inject_after_starttls: bytes = b"", reset_after_bytes: int | None = None,
                 truncate: bool = False, resets: int = 1, greeting: bytes = b"",
                 delay: float = 0.0) -> None:
        self.target_port = target_port
        self.strip_starttls = strip_starttls
        self.inject_after_starttls = inject_after_starttls
        self.reset_after_bytes = reset_after_bytes
        self.truncate = truncate  # at reset_after_bytes: close both ends cleanly (FIN), no RST
        self.delay = delay  # seconds before each chunk of the upstream's replies goes on
        self.resets_left = resets  # how many connections get reset; later ones pass
        self.greeting = greeting  # if set, answer with it and hang up, as a busy server does
        self.sent = bytearray()  # everything any client sent towards the upstream
        super().__init__()

    async def _handle(self, client_reader: asyncio.StreamReader,
                      client_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.greeting:
            client_writer.write(self.greeting)
            await client_writer.drain()
            client_writer.close()
            return
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1",
                                                                     self.target_port)
        reset_at = None
        if self.reset_after_bytes is not None and self.resets_left > 0:
            self.resets_left -= 1
            reset_at = self.reset_after_bytes
        starttls_sent = asyncio.Event()

        def abort() -> None:
            for writer in (client_writer, server_writer):
                writer.transport.abort()

        def cut() -> None:
            if not self.truncate:
                abort()
                return
            for writer in (client_writer, server_writer):
                writer.close()

        async def client_to_server() -> None:
            sent = 0
            while data := await client_reader.read(65536):
                self.sent += data
                if b"STARTTLS" in data.upper():
                    starttls_sent.set()
                if reset_at is not None and sent + len(data) > reset_at:
                    server_writer.write(data[:reset_at - sent])
                    await server_writer.drain()
                    cut()
                    return
                sent += len(data)
                server_writer.write(data)
                await server_writer.drain()
            server_writer.close()

        async def server_to_client() -> None:
            while data := await server_reader.read(65536):
                if self.delay:
                    await asyncio.sleep(self.delay)
                if not starttls_sent.is_set() and self.strip_starttls:
                    data = b"".join(line for line in data.splitlines(keepends=True)
                                    if b"STARTTLS" not in line.upper())
                elif starttls_sent.is_set() and data.startswith(b"220 ") and \
                        self.inject_after_starttls:
                    data += self.inject_after_starttls
                    self.inject_after_starttls = b""  # once: the TLS stream follows
                client_writer.write(data)
                await client_writer.drain()
            client_writer.close()

        try:
            await asyncio.gather(client_to_server(), server_to_client())
        except (ConnectionError, OSError):
            abort()


class BabblingServer(_LoopbackServer):
    """Greets with `greeting`, then answers every line the client sends with `answer`
    (written in 64 KiB pieces); with `endless`, the answer repeats until the client
    hangs up. A fake upstream with no SMTP logic at all."""

    def __init__(self, answer: bytes, greeting: bytes = b"220 babbler ESMTP\r\n",
                 endless: bool = False) -> None:
        self.answer = answer
        self.greeting = greeting
        self.endless = endless
        super().__init__()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            writer.write(self.greeting)
            while await reader.readline():
                while True:
                    for start in range(0, len(self.answer), 65536):
                        writer.write(self.answer[start:start + 65536])
                        await writer.drain()
                    if not self.endless:
                        break
        except (ConnectionError, OSError):
            pass
        finally:
            writer.transport.abort()
