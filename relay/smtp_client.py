"""One upstream SMTP session: connect, TLS, AUTH, then one envelope at a time.

aiosmtplib sets the session up (connect, EHLO, STARTTLS, AUTH). Then the connection is
taken over by a `relay.link.Link`, which writes a transaction's MAIL, RCPT and DATA in
one go when the server offers PIPELINING (RFC 2920), as Postfix does, and reads the
replies in order: two round trips per message instead of four, which aiosmtplib cannot.

Every failure comes back as a value (`outcome.AttemptResult`), never as an exception: the
caller asks `policy` what it means. The session is reused for consecutive messages while
it is fresh: at once within RESET_FREE_SECONDS of a transaction that ended cleanly, else
after an RSET; it is dropped after any error that may have left it in an unknown state.
Knows nothing of the spool.

Replies are matched to their commands strictly (RFC 2920): nothing may wait unread when a
command is sent, 354 answers DATA alone, nothing may follow the final dot's reply, and a
transaction that ends without its DATA (a refused sender, refused recipients, a refused
DATA) is confirmed by an RSET before any refusal is taken for good. Anything that does
not fit ends the session as a protocol error, and no recipient of that transaction is
marked sent or failed. Reply text is kept printable and bounded (`link.printable`).
"""

from __future__ import annotations

import functools
import re
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import replace

import aiosmtplib
from aiosmtplib.email import quote_address

from .config import UpstreamConfig
from .errors import ConfigError, CredentialsRejected, ReplyTimeout, SessionError
from .link import Link, printable
from .outcome import AttemptResult, Reply, Stage
from .policy import is_recipient_limit

# Postfix reuses a cached connection for 2 s (smtp_connection_cache_time_limit); a little
# longer suits bursts from one application, and a server that dropped an idle connection
# is noticed by the RSET that precedes reuse.
REUSE_IDLE_SECONDS = 10.0
# After a final dot's 2xx the session is in its initial state (RFC 5321 4.1.1.4): within
# this many seconds the next MAIL goes without an RSET round trip. If the server closed it
# meanwhile, that MAIL fails and the message goes out on a new session at once.
RESET_FREE_SECONDS = 2.0
# A CR or LF that is not part of a CRLF (the same rule as aiosmtplib's own data()).
_BARE_LINE_END = re.compile(rb"\r\n|\n|\r(?!\n)")
_BARE_CR = re.compile(rb"\r(?!\n)")
_DOT_AT_LINE_START = re.compile(rb"\n\.")


def make_tls_context(config: UpstreamConfig) -> ssl.SSLContext | None:
    """The client TLS context: system CAs plus ca_file; verification off only if asked.
    Raises ConfigError naming upstream.ca_file when that file holds no usable CA."""
    if config.tls == "none":
        return None
    context = ssl.create_default_context()
    if config.ca_file is not None:
        try:
            context.load_verify_locations(cafile=str(config.ca_file))
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError("upstream.ca_file", f"{config.ca_file} holds no CA certificate "
                              f"in PEM form: {printable(str(exc))}") from None
    if not config.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _ignore(stage: Stage, detail: str) -> None:
    """The default step reporter of UpstreamSession.open: delivery does not narrate."""


class UpstreamSession:
    def __init__(self, config: UpstreamConfig, tls_context: ssl.SSLContext | None,
                 local_hostname: str | None = None) -> None:
        self.config = config
        self._tls_context = tls_context
        self._local_hostname = local_hostname or socket.getfqdn()
        self._link: Link | None = None
        self._last_used = 0.0
        self._clean = False  # the last transaction ended with a 2xx to the final dot

    async def deliver(self, sender: str, recipients: list[str], content: bytes,
                      smtputf8: bool) -> AttemptResult:
        """Send one envelope to the still-pending recipients; report per-recipient replies.

        Recipients the server refuses only for its per-transaction limit are sent at once
        in a further transaction on the same session, as long as each one makes progress.
        """
        relay = self.config.name
        try:
            link, unprobed = await self._ready_session()
        except SessionError as exc:
            return AttemptResult(relay=relay, error=exc.reply, stage=exc.stage)
        replies: dict[str, Reply] = {}
        remaining = recipients
        try:
            while True:
                try:
                    result = await self._transaction(link, sender, remaining, content, smtputf8)
                except SessionError as exc:
                    if not (unprobed and exc.stage is Stage.MAIL):
                        raise
                    # Reused without RSET and already gone: nothing of this message was
                    # sent, so it goes on a new session now rather than after a backoff.
                    await self.close()
                    link = self._link = await self._connect()
                    result = await self._transaction(link, sender, remaining, content, smtputf8)
                unprobed = False
                replies.update(result.recipients)
                over_limit = [r for r in remaining if r in result.recipients
                              and is_recipient_limit(result.recipients[r])]
                progress = any(_is_positive(result.recipients.get(r)) for r in remaining)
                if result.error is not None or not over_limit or not progress:
                    return replace(result, recipients=replies)
                remaining = over_limit
        except SessionError as exc:
            # Replies already heard stand, so no recipient of this attempt is sent twice;
            # those of the failed transaction are dropped, none being certain. A new
            # session that failed at AUTH keeps its stage: refused credentials pause delivery.
            await self.close()
            return AttemptResult(relay=relay, recipients=replies, error=exc.reply,
                                 stage=exc.stage)
        finally:
            self._last_used = time.monotonic()

    async def close(self) -> None:
        link, self._link = self._link, None
        self._clean = False
        if link is not None:
            await link.quit()

    async def _ready_session(self) -> tuple[Link, bool]:
        """The session to send on, and whether it is reused without an RSET to prove it."""
        clean, self._clean = self._clean, False
        link = self._link
        # Bytes waiting unasked for would be read as the next command's reply.
        if link is not None and link.is_connected and not link.unread:
            idle = time.monotonic() - self._last_used
            if clean and idle < RESET_FREE_SECONDS:
                return link, True
            if idle < REUSE_IDLE_SECONDS:
                try:
                    link.send(b"RSET\r\n", Stage.RSET)
                    if _is_positive(await link.reply(Stage.RSET)):
                        return link, False
                except SessionError:
                    pass
        await self.close()
        self._link = await self._connect()
        return self._link, False

    async def _connect(self) -> Link:
        return Link(await self.open(), self.config.timeout)

    async def open(self, report: Callable[[Stage, str], None] = _ignore) -> aiosmtplib.SMTP:
        """Connect, force TLS as configured, and log in; `report(stage, detail)` hears each
        step that succeeded. Raises SessionError naming the stage that failed, and
        CredentialsRejected for a 5xx to AUTH. The greeting has upstream.greeting_timeout,
        each later command upstream.timeout."""
        config = self.config
        smtp = aiosmtplib.SMTP(
            hostname=config.host, port=config.port, timeout=config.timeout,
            local_hostname=self._local_hostname, use_tls=config.tls == "implicit",
            # STARTTLS is issued explicitly below, never opportunistically: aiosmtplib's
            # default (None) would let a stripped STARTTLS through to AUTH and mail in
            # clear (RFC 3207 section 6).
            start_tls=False, tls_context=self._tls_context,
        )
        stage = Stage.CONNECT
        try:
            # The timeout given to connect() covers the TCP connect, an implicit TLS
            # handshake and the greeting, and is not kept for the commands after them.
            response = await smtp.connect(timeout=config.greeting_timeout)
            report(stage, f"{response.code} {printable(response.message)}")
            if config.tls == "starttls":
                stage = Stage.STARTTLS
                response = await smtp.starttls()
                report(stage, f"{response.code} {printable(response.message)}")
            if config.tls != "none":
                stage = Stage.TLS
                ssl_object = smtp.get_transport_info("ssl_object")
                if ssl_object is None:
                    raise SessionError(Reply(None, "TLS is not in effect; refusing to continue"),
                                       stage)
                verified = "certificate verified" if config.verify else "certificate NOT verified"
                report(stage, f"{ssl_object.version()}, {verified} for {config.host}")
            if config.username is not None and config.password is not None:
                stage = Stage.AUTH
                response = await smtp.login(config.username, config.password)
                report(stage, f"{response.code} {printable(response.message)}")
            if smtp.is_ehlo_or_helo_needed:
                # aiosmtplib greets lazily, from its own commands: without AUTH (and after
                # STARTTLS) nothing has sent EHLO yet, and the transactions are ours.
                stage = Stage.EHLO
                try:
                    await smtp.ehlo()
                except aiosmtplib.SMTPHeloError:
                    if not smtp.is_connected:
                        raise
                    await smtp.helo()
        except BaseException as exc:
            smtp.close()
            if isinstance(exc, SessionError):
                raise
            if isinstance(exc, (aiosmtplib.SMTPException, OSError, ssl.SSLError)):
                reply = _failure_reply(exc, config)
                if stage is Stage.AUTH and reply.code is not None and 500 <= reply.code < 600:
                    raise CredentialsRejected(reply, stage) from None
                raise SessionError(reply, stage) from None
            raise
        return smtp

    def _envelope(self, link: Link, sender: str, recipients: list[str], content: bytes,
                  smtputf8: bool) -> AttemptResult | tuple[bytes, list[tuple[str, bytes]],
                                                           dict[str, Reply]]:
        """The MAIL command, the RCPT command of each recipient that can be sent, and the
        replies of those that cannot; or the result when nothing can be sent."""
        relay = self.config.name
        options: list[str] = []
        encoding = "ascii"
        if smtputf8 and "smtputf8" in link.extensions:
            options.append("SMTPUTF8")
            encoding = "utf-8"
        elif not all(a.isascii() for a in (sender, *recipients)):
            reply = Reply(550, "5.6.7 upstream does not offer SMTPUTF8, needed for these addresses")
            return AttemptResult(relay=relay, error=reply, stage=Stage.MAIL)
        if not content.isascii() and "8bitmime" in link.extensions:
            options.append("BODY=8BITMIME")
        try:
            mail = _command("MAIL FROM:", sender, options, encoding)
        except ValueError as exc:  # aiosmtplib's address rules refuse it
            return AttemptResult(relay=relay, error=_unsendable(exc), stage=Stage.MAIL)
        replies: dict[str, Reply] = {}
        sendable: list[tuple[str, bytes]] = []
        for recipient in recipients:
            try:
                sendable.append((recipient, _command("RCPT TO:", recipient, [], encoding)))
            except ValueError as exc:
                replies[recipient] = _unsendable(exc)
        if not sendable:
            return AttemptResult(relay=relay, recipients=replies)
        return mail, sendable, replies

    async def _transaction(self, link: Link, sender: str, recipients: list[str],
                           content: bytes, smtputf8: bool) -> AttemptResult:
        relay = self.config.name
        envelope = self._envelope(link, sender, recipients, content, smtputf8)
        if isinstance(envelope, AttemptResult):
            return envelope
        mail, sendable, replies = envelope
        pipelining = "pipelining" in link.extensions
        link.send(b"".join([mail, *(c for _, c in sendable), b"DATA\r\n"]) if pipelining
                  else mail, Stage.MAIL)
        reply = await link.reply(Stage.MAIL)
        if not _is_positive(reply):
            refusal = _refusal(link, reply, Stage.MAIL)
            if pipelining:
                if not _is_permanent(refusal):
                    # Its RCPTs and DATA are answered too; rather than read them, start
                    # the next message on a new session (a refused sender is rare).
                    link.abort("the sender was refused")
                    return AttemptResult(relay=relay, recipients=replies, error=refusal,
                                         stage=Stage.MAIL)
                await self._read_refused(link, len(sendable) + 1)
            return await self._ended_early(link, AttemptResult(
                relay=relay, recipients=replies, error=refusal, stage=Stage.MAIL))
        accepted: list[str] = []
        for recipient, command in sendable:
            if not pipelining:
                link.send(command, Stage.RCPT)
            reply = await link.reply(Stage.RCPT)
            if _is_positive(reply):
                accepted.append(recipient)
            else:
                replies[recipient] = _refusal(link, reply, Stage.RCPT)
        if not pipelining:
            if not accepted:
                return await self._ended_early(link, AttemptResult(relay=relay,
                                                                   recipients=replies))
            link.send(b"DATA\r\n", Stage.DATA)
        reply = await link.reply(Stage.DATA)
        if reply.code != 354:
            refusal = _refusal(link, reply, Stage.DATA)
            # Without accepted recipients DATA is refused as it should be, and says nothing.
            return await self._ended_early(link, AttemptResult(
                relay=relay, recipients=replies, error=refusal if accepted else None,
                stage=Stage.DATA))
        if not accepted:
            # A server that takes DATA with no recipient gets an empty message, which it
            # must not deliver (RFC 2920 section 3.1).
            link.send(b".\r\n", Stage.DATA)
            await link.reply(Stage.DATA)
            return AttemptResult(relay=relay, recipients=replies)
        return await self._content(link, content, accepted, replies)

    async def _content(self, link: Link, content: bytes, accepted: list[str],
                       replies: dict[str, Reply]) -> AttemptResult:
        """After 354: the message and its final dot, and the one reply for every accepted
        recipient."""
        relay = self.config.name
        link.send(wire_form(content), Stage.DATA)
        try:
            reply = await link.reply(Stage.DATA)
        except ReplyTimeout:
            # The upstream may hold the whole message and have answered too late (RFC 5321
            # 4.5.3.2.6, RFC 1047): the retry is correct but may deliver it a second time.
            raise SessionError(Reply(None, "timed out in DATA: the upstream may have the "
                                           "message, so the retry may deliver it twice"),
                               Stage.DATA) from None
        if link.unread:
            # Whichever of them answered the final dot, it cannot be told.
            raise link.out_of_step("more replies than commands after the final dot; the "
                                   "upstream may have the message, so the retry may "
                                   "deliver it twice", Stage.DATA)
        if not _is_positive(reply):
            return AttemptResult(relay=relay, recipients=replies,
                                 error=_refusal(link, reply, Stage.DATA), stage=Stage.DATA)
        replies.update((r, reply) for r in accepted)
        self._clean = True
        return AttemptResult(relay=relay, recipients=replies)

    async def _read_refused(self, link: Link, count: int) -> None:
        """Read the replies to the RCPTs and DATA pipelined after a refused MAIL: each must
        refuse too, or the replies are out of step with the commands."""
        for _ in range(count):
            reply = await link.reply(Stage.RCPT)
            if reply.code is None or not 400 <= reply.code < 600:
                raise link.out_of_step(f"{reply} to a command after a refused MAIL",
                                       Stage.RCPT)

    async def _ended_early(self, link: Link, result: AttemptResult) -> AttemptResult:
        """A transaction that ended without its DATA. A permanent refusal in it is taken for
        good only once an RSET proves the replies in step: a reply left over from an extra
        or a missing one would answer the RSET. The session is then reset for reuse."""
        replies = (*result.recipients.values(), *([result.error] if result.error else []))
        if any(_is_permanent(r) for r in replies):
            link.send(b"RSET\r\n", Stage.RSET)
            reply = await link.reply(Stage.RSET)
            if not _is_positive(reply) or link.unread:
                raise link.out_of_step(f"RSET answered {reply}", Stage.RSET)
            self._clean = True
        return result


def _command(verb: str, address: str, options: list[str], encoding: str) -> bytes:
    """`MAIL FROM:<a> options` or `RCPT TO:<a>`, with aiosmtplib's address rules."""
    line = verb + _quoted(address) + "".join(" " + o for o in options)
    return line.encode(encoding) + b"\r\n"


# aiosmtplib's quote_address parses with email.utils and raises ValueError for an address
# unsafe on a command line; a relay sends from and to the same few addresses again and again.
_quoted = functools.lru_cache(maxsize=4096)(quote_address)


def wire_form(content: bytes) -> bytes:
    """`content` as DATA sends it (RFC 5321 4.5.2): every line ending in CRLF, a leading
    dot doubled, then the final dot: the bytes aiosmtplib's data() produces, without its
    two regular expressions over the whole message. A message of CRLF lines with no line
    that starts with a dot costs four scans in C (counts of one byte, and searches that
    lead with a literal byte, found with memchr) and is not copied before the final join.
    With no CR that lacks its LF, as many CRs as LFs means that every LF has its CR.
    """
    if content.count(b"\r") != content.count(b"\n") or _BARE_CR.search(content):
        content = _BARE_LINE_END.sub(b"\r\n", content)
    if not content.endswith(b"\r\n"):
        content += b"\r\n"
    if _DOT_AT_LINE_START.search(content):
        content = content.replace(b"\n.", b"\n..")
    return b"".join((b"." if content.startswith(b".") else b"", content, b".\r\n"))


def likely_cause(error: SessionError, config: UpstreamConfig) -> str:
    """A hint for `relay check`: what usually makes this stage fail."""
    text = error.reply.text.lower()
    if isinstance(error, CredentialsRejected):
        return ("credentials rejected: check upstream.username and the password "
                "(for Mailgun, the SMTP credentials of the sending domain)")
    if error.stage is Stage.AUTH:
        return "the server did not accept AUTH; check the port and TLS mode"
    if error.stage is Stage.STARTTLS:
        if "not supported" in text:
            return ("the server does not offer STARTTLS: wrong port for tls: starttls "
                    "(Mailgun: 587 with starttls, 465 with implicit), or something strips it")
        if "certificate" in text:
            return ("certificate not trusted or not for this host name; set upstream.ca_file "
                    "for a private CA, and check upstream.host")
        return "the TLS handshake failed; check the port and TLS mode"
    if "certificate" in text:
        return ("certificate not trusted or not for this host name; set upstream.ca_file "
                "for a private CA, and check upstream.host")
    if config.tls == "implicit" and ("wrong version" in text or "tls failure" in text):
        return "the server does not speak TLS from the start: use tls: starttls (port 587)"
    if "no greeting" in text and config.tls != "implicit":
        return IMPLICIT_TLS_HINT
    if "no tls handshake" in text:
        return STARTTLS_HINT
    return (f"cannot reach {config.host}:{config.port}: check upstream.host and upstream.port, "
            "and that outbound connections to it are allowed")


IMPLICIT_TLS_HINT = ("the port probably speaks TLS from the first byte (as 465 does): "
                     "use tls: implicit, or port 587 with tls: starttls")
STARTTLS_HINT = ("the port probably expects plain text first (as 587 does): use "
                 "tls: starttls, or port 465 with tls: implicit")


def _failure_reply(exc: BaseException, config: UpstreamConfig) -> Reply:
    """reply_of(exc), with the timeouts of the set-up told apart: a port that speaks the
    other TLS mode stays silent, and the reply says so, in the queue as in `relay check`."""
    if not isinstance(exc, aiosmtplib.SMTPConnectTimeoutError):
        return reply_of(exc)
    within = f"within {config.greeting_timeout:g}s (upstream.greeting_timeout)"
    if "ready" in str(exc):  # aiosmtplib: "Timed out waiting for server ready message"
        hint = "" if config.tls == "implicit" else f"; {IMPLICIT_TLS_HINT}"
        return Reply(None, f"timed out: no greeting {within}{hint}")
    if config.tls == "implicit":
        return Reply(None, f"timed out: no TLS handshake {within}; {STARTTLS_HINT}")
    return Reply(None, f"timed out: no connection {within}")


def reply_of(exc: BaseException) -> Reply:
    """The SMTP reply an exception carries, or a description of the failure without one."""
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return Reply(exc.code, printable(exc.message))
    if isinstance(exc, (aiosmtplib.SMTPTimeoutError, TimeoutError)):
        return Reply(None, f"timed out: {printable(str(exc)) or 'no reply'}")
    if isinstance(exc, ssl.SSLError) or isinstance(exc.__cause__, ssl.SSLError):
        return Reply(None, f"TLS failure: {printable(str(exc.__cause__ or exc))}")
    if isinstance(exc, (aiosmtplib.SMTPConnectError, aiosmtplib.SMTPServerDisconnected, OSError)):
        return Reply(None, f"connection failed: {printable(str(exc))}")
    return Reply(None, printable(str(exc)))


def _refusal(link: Link, reply: Reply, stage: Stage) -> Reply:
    """The reply that refused a command. A reply that refuses nothing (250 where 354 was
    due, 354 to anything but DATA) means replies and commands are out of step: nothing
    more from this session can be trusted, so it ends and the attempt counts as failed for
    now, never as sent."""
    if reply.code is not None and 400 <= reply.code < 600:
        return reply
    raise link.out_of_step(f"{reply} to {stage.value.upper()}", stage)


def _is_positive(reply: Reply | None) -> bool:
    return reply is not None and reply.code is not None and 200 <= reply.code < 300


def _is_permanent(reply: Reply) -> bool:
    return reply.code is not None and 500 <= reply.code < 600


def _unsendable(exc: ValueError) -> Reply:
    """An address the client library will not send: a permanent failure of ours, so it is
    kept in failed/ with the reason instead of being retried forever."""
    return Reply(553, f"5.1.3 address cannot be sent safely: {printable(str(exc))}")
