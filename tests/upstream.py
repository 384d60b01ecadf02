"""A real upstream for tests: aiosmtpd on 127.0.0.1, a free port, STARTTLS and AUTH.

It records every transaction and what the relay did on the wire (TLS in effect, AUTH
seen, connections made). Replies are scripted by recipient (`tempfail@...` gets 451 at
RCPT, `reject@...` 550, `drop@...` a reset connection), by attempt (`data_replies`: the
next DATA answers, e.g. two 451s then 250) and per command (`mail_reply`, `auth_reply`,
`starttls_reply`, `rcpt_replies`, `rcpt_limit`). A scripted reply given as bytes goes on
the wire as it is (a Latin-1 server's `450 4.2.1 bo\xeete pleine`). `extra_replies`
makes the next MAILs answered twice, putting the replies out of step with the commands.
With `fail_rate`, a share of transactions meets one of `fault_kinds` at random. It
offers PIPELINING, as providers do, unless told not to, and keeps each read that began
with MAIL to show what was pipelined.
"""

from __future__ import annotations

import asyncio
import base64
import random
import ssl
import threading
import time
from dataclasses import dataclass

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from ports import reusable_port

USERNAME = "postmaster@mg.example.com"
# What fail_rate may inject: a reset at MAIL, a second reply to MAIL (out of step), a 451
# to the final dot, or a 451 whose text is Latin-1, not UTF-8.
FAULT_KINDS = ("reset", "out-of-step", "tempfail", "latin1")
LATIN1_REPLY = b"451 4.3.0 Empf\xe4nger tempor\xe4r nicht erreichbar"
PASSWORD = "s3cret-Upstream-Pa55"


def secret_forms() -> list[bytes]:
    """The password as it could leak: plain, base64, inside AUTH PLAIN, and the base64
    user name that AUTH LOGIN sends just before it."""
    return [PASSWORD.encode(), base64.b64encode(PASSWORD.encode()),
            base64.b64encode(f"\0{USERNAME}\0{PASSWORD}".encode()),
            base64.b64encode(USERNAME.encode())]


@dataclass(frozen=True)
class Transaction:
    sender: str
    recipients: tuple[str, ...]
    data: bytes
    tls: bool
    authenticated: bool
    mail_options: tuple[str, ...]
    at: float = 0.0  # time.time() when the final dot was answered


class Upstream:
    def __init__(self, tls_context: ssl.SSLContext | None, *, require_auth: bool = True,
                 offer_starttls: bool = True, implicit_tls: bool = False,
                 smtputf8: bool = True, pipelining: bool = True) -> None:
        # Implicit TLS (port 465) wraps the whole connection; STARTTLS is then not offered.
        self.implicit_context = tls_context if implicit_tls else None
        self.tls_context = tls_context if offer_starttls and not implicit_tls else None
        self.require_auth = require_auth
        self.smtputf8 = smtputf8
        self.pipelining = pipelining  # advertised, as Mailgun and Postfix do
        self.command_reads: list[bytes] = []  # each read that began with MAIL, as received
        self.transactions: list[Transaction] = []
        self.data_seen: list[bytes] = []  # every message whose final dot arrived, kept or not
        self.data_replies: list[str | bytes] = []
        self.auth_attempts = 0
        self.ehlo_names: list[str] = []  # the name each EHLO gave
        self.mail_commands = 0
        self.rset_commands = 0
        self.abort_next_mail = False  # drop the connection at the next MAIL, once
        self.password = PASSWORD
        self.data_delay = 0.0  # seconds before answering the final dot: a slow provider
        self.data_started = threading.Event()  # set when a final dot has been received
        self.mail_reply = ""  # if set, MAIL FROM gets this reply instead of 250
        self.auth_reply = ""  # if set, every AUTH fails with this reply
        self.starttls_reply = ""  # if set, STARTTLS gets this reply and no handshake
        self.rcpt_replies: dict[str, str | bytes] = {}  # address -> the reply its RCPT gets
        self.rcpt_limit = 0  # if set, RCPTs beyond it in one transaction get rcpt_limit_reply
        self.rcpt_limit_reply = "452 4.5.3 Error: too many recipients"
        self.reset_after_data = False  # reset the connection right after DATA's 250
        # Answer DATA with 354 even when every RCPT was refused (RFC 2920 allows it; the
        # client must then send an empty message, which is recorded but never kept).
        self.data_without_recipients = False
        self.extra_replies = 0  # the next MAILs get a second 250 each
        # With fail_rate > 0, that share of transactions meets a fault of fault_kinds at
        # random: an unreliable provider for soak tests. `faults` counts what was injected.
        self.fail_rate = 0.0
        self.fault_kinds: tuple[str, ...] = ("reset", "tempfail")
        self.faults: dict[str, int] = {}
        self.random = random.Random(0)
        self.connections = 0
        self.port = reusable_port()  # tests stop and restart the upstream on this port
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._protocols: set[SMTP] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

    # --- control from the test thread --------------------------------------------------

    def start(self) -> Upstream:
        future = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        self.port = future.result(timeout=10)
        return self

    def stop(self) -> None:
        """Close the listening socket and every session: the port now refuses connections."""
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(timeout=10)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def messages(self) -> list[Transaction]:
        with self._lock:
            return list(self.transactions)

    def open_sessions(self) -> int:
        return len(self._protocols)

    def delivered_to(self, address: str) -> list[Transaction]:
        return [t for t in self.messages() if address in t.recipients]

    # --- the server --------------------------------------------------------------------

    async def _start(self) -> int:
        self._server = await self._loop.create_server(
            self._protocol, host="127.0.0.1", port=self.port, reuse_address=True,
            ssl=self.implicit_context)
        return self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for protocol in list(self._protocols):
            if protocol.transport is not None:
                protocol.transport.close()

    async def _shutdown(self) -> None:
        await self._stop()
        sessions = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in sessions:
            task.cancel()
        await asyncio.gather(*sessions, return_exceptions=True)

    def _protocol(self) -> SMTP:
        protocol = _RecordingSMTP(
            self, self,
            hostname="localhost",
            tls_context=self.tls_context,
            require_starttls=self.tls_context is not None,
            auth_required=self.require_auth,
            auth_require_tls=self.tls_context is not None and self.implicit_context is None,
            authenticator=self._authenticate,
            enable_SMTPUTF8=self.smtputf8,
            decode_data=False,
        )
        self._protocols.add(protocol)
        self.connections += 1
        return protocol

    def _authenticate(self, server: SMTP, session: Session, envelope: Envelope,
                      mechanism: str, auth_data: LoginPassword) -> AuthResult:
        self.auth_attempts += 1
        if self.auth_reply:
            return AuthResult(success=False, handled=False, message=self.auth_reply)
        ok = auth_data.login.decode() == USERNAME and auth_data.password.decode() == self.password
        return AuthResult(success=ok, handled=False)

    # --- aiosmtpd hooks ----------------------------------------------------------------

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        self.ehlo_names.append(hostname)
        if self.pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        self.mail_commands += 1
        if self.abort_next_mail:
            self.abort_next_mail = False
            server.transport.abort()
            return "421 4.4.2 gone"
        if self.mail_reply:
            return self.mail_reply
        fault = self._roll_fault()
        session.fault = fault  # type: ignore[attr-defined]  # for handle_DATA
        if fault == "reset":
            server.transport.abort()
            return "421 4.4.2 gone"
        if fault == "out-of-step" or self.extra_replies:
            self.extra_replies = max(self.extra_replies - 1, 0)
            server._writer.write(b"250 2.1.0 Ok\r\n")  # one reply too many
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    def _roll_fault(self) -> str | None:
        if not self.fail_rate or self.random.random() >= self.fail_rate:
            return None
        kind = self.random.choice(self.fault_kinds)
        with self._lock:
            self.faults[kind] = self.faults.get(kind, 0) + 1
        return kind

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.rset_commands += 1
        return "250 2.0.0 Ok"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str | bytes:
        if address in self.rcpt_replies:
            return self.rcpt_replies[address]
        local = address.split("@")[0]
        if local.startswith("tempfail"):
            return "451 4.2.0 Mailbox busy, try later"
        if local.startswith("reject"):
            return "550 5.1.1 No such user"
        if local.startswith("drop"):
            server.transport.abort()  # a poison message: the connection dies every time
            return "421 4.4.2 gone"
        if self.rcpt_limit and len(envelope.rcpt_tos) >= self.rcpt_limit:
            return self.rcpt_limit_reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session,
                          envelope: Envelope) -> str | bytes:
        with self._lock:
            self.data_seen.append(bytes(envelope.original_content or b""))
        self.data_started.set()
        if self.data_delay:
            await asyncio.sleep(self.data_delay)
        with self._lock:
            if self.data_replies:
                reply = self.data_replies.pop(0)
                if not (reply.startswith("2") if isinstance(reply, str)
                        else reply.startswith(b"2")):
                    return reply
            fault = getattr(session, "fault", None)
            if fault == "tempfail":
                return "451 4.3.0 Random failure, try again"
            if fault == "latin1":
                return LATIN1_REPLY
            if self.reset_after_data:
                # The 250 is written before this callback runs, then the connection is
                # reset: the client must count the message as delivered.
                asyncio.get_running_loop().call_soon(server.transport.abort)
            if envelope.rcpt_tos == ["nobody@invalid"]:
                return "250 2.0.0 Ok: nothing to deliver"
            self.transactions.append(Transaction(
                sender="" if envelope.mail_from == "<>" else str(envelope.mail_from),
                recipients=tuple(envelope.rcpt_tos),
                data=bytes(envelope.original_content or b""),
                tls=session.ssl is not None or self.implicit_context is not None,
                authenticated=session.authenticated,
                mail_options=tuple(envelope.mail_options),
                at=time.time(),
            ))
        return "250 2.0.0 Ok: queued upstream"


class _RecordingSMTP(SMTP):
    def __init__(self, upstream: Upstream, handler: Upstream, **kwargs: object) -> None:
        super().__init__(handler, **kwargs)  # type: ignore[arg-type]
        self._upstream = upstream

    async def smtp_STARTTLS(self, arg: str) -> None:
        if self._upstream.starttls_reply:
            await self.push(self._upstream.starttls_reply)
            return
        await super().smtp_STARTTLS(arg)

    async def smtp_DATA(self, arg: str) -> None:
        if self._upstream.data_without_recipients and self.envelope is not None \
                and not self.envelope.rcpt_tos:
            self.envelope.rcpt_tos.append("nobody@invalid")
        await super().smtp_DATA(arg)

    def data_received(self, data: bytes) -> None:
        if data.startswith(b"MAIL"):
            self._upstream.command_reads.append(data)
        super().data_received(data)

    def connection_lost(self, error: Exception | None) -> None:
        self._upstream._protocols.discard(self)
        super().connection_lost(error)
