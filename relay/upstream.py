"""One upstream SMTP session (aiosmtplib): connect, TLS, AUTH, send one envelope at a time.

Every failure comes back as a value (`policy.AttemptResult`), never as an exception: the
caller asks `policy` what it means. The session is reused for consecutive messages (RSET
between them) while it is fresh, and dropped after any error that may have left it in an
unknown state. Knows nothing of the spool.
"""

from __future__ import annotations

import re
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import replace

import aiosmtplib

from .config import UpstreamConfig
from .policy import AttemptResult, Reply, Stage, is_recipient_limit

# Postfix reuses a cached connection for 2 s (smtp_connection_cache_time_limit); a little
# longer suits bursts from one application, and a server that dropped an idle connection
# is noticed by the RSET that precedes reuse.
REUSE_IDLE_SECONDS = 10.0
# A session whose last transaction just ended with the final dot's 2xx is in the initial
# state already (RFC 5321 4.1.1.4): within this many seconds the next MAIL follows without
# an RSET round trip. A server that closed it meanwhile fails that MAIL, and the message
# goes out on a new session at once.
RESET_FREE_SECONDS = 2.0
# A CR or LF that is not part of a CRLF (the same rule as aiosmtplib's own data()).
_BARE_LINE_END = re.compile(rb"\r\n|\n|\r(?!\n)")


def make_tls_context(config: UpstreamConfig) -> ssl.SSLContext | None:
    """The client TLS context: system CAs plus ca_file; verification off only if asked."""
    if config.tls == "none":
        return None
    context = ssl.create_default_context()
    if config.ca_file is not None:
        context.load_verify_locations(cafile=str(config.ca_file))
    if not config.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class SessionError(Exception):
    """A step of opening the session (connect, starttls, auth) failed with `reply`."""

    def __init__(self, reply: Reply, step: str = "session") -> None:
        super().__init__(str(reply))
        self.reply = reply
        self.step = step


def _ignore(step: str, detail: str) -> None:
    """The default step reporter of UpstreamSession.open: delivery does not narrate."""


class UpstreamSession:
    def __init__(self, config: UpstreamConfig, tls_context: ssl.SSLContext | None,
                 local_hostname: str | None = None) -> None:
        self.config = config
        self._tls_context = tls_context
        self._local_hostname = local_hostname or socket.getfqdn()
        self._smtp: aiosmtplib.SMTP | None = None
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
            smtp, unprobed = await self._ready_session()
        except SessionError as exc:
            stage = Stage.AUTH if exc.step == "auth" else Stage.SESSION
            return AttemptResult(relay=relay, error=exc.reply, stage=stage)
        replies: dict[str, Reply] = {}
        remaining = recipients
        try:
            while True:
                try:
                    result = await self._transaction(smtp, sender, remaining, content, smtputf8)
                except SessionError as exc:
                    if not (unprobed and exc.step == "mail"):
                        raise
                    # Reused without RSET and already gone: nothing of this message was
                    # sent, so it goes on a new session now rather than after a backoff.
                    await self.close()
                    smtp = self._smtp = await self.open()
                    result = await self._transaction(smtp, sender, remaining, content, smtputf8)
                unprobed = False
                replies.update(result.recipients)
                over_limit = [r for r in remaining
                              if r in result.recipients and is_recipient_limit(result.recipients[r])]
                progress = any(_is_positive(result.recipients.get(r)) for r in remaining)
                if result.error is not None or not over_limit or not progress:
                    return replace(result, recipients=replies)
                remaining = over_limit
        except SessionError as exc:
            # Replies already heard stand: a recipient sent in an earlier transaction of
            # this attempt must not be sent again.
            await self.close()
            return AttemptResult(relay=relay, recipients=replies, error=exc.reply,
                                 stage=Stage.SESSION)
        finally:
            self._last_used = time.monotonic()

    async def close(self) -> None:
        smtp, self._smtp = self._smtp, None
        self._clean = False
        if smtp is None or not smtp.is_connected:
            return
        try:
            await smtp.quit(timeout=5)
        except (aiosmtplib.SMTPException, OSError):
            smtp.close()

    async def _ready_session(self) -> tuple[aiosmtplib.SMTP, bool]:
        """The session to send on, and whether it is reused without an RSET to prove it."""
        clean, self._clean = self._clean, False
        if self._smtp is not None and self._smtp.is_connected:
            idle = time.monotonic() - self._last_used
            if clean and idle < RESET_FREE_SECONDS:
                return self._smtp, True
            if idle < REUSE_IDLE_SECONDS:
                try:
                    await self._smtp.rset()
                    return self._smtp, False
                except (aiosmtplib.SMTPException, OSError):
                    pass
            await self.close()
        self._smtp = await self.open()
        return self._smtp, False

    async def open(self, report: Callable[[str, str], None] = _ignore) -> aiosmtplib.SMTP:
        """Connect, force TLS as configured, and log in; `report(step, detail)` hears each
        step that succeeded. Raises SessionError naming the step that failed."""
        config = self.config
        smtp = aiosmtplib.SMTP(
            hostname=config.host, port=config.port, timeout=config.timeout,
            local_hostname=self._local_hostname, use_tls=config.tls == "implicit",
            # STARTTLS is issued explicitly below, never opportunistically: aiosmtplib's
            # default (None) would let a stripped STARTTLS through to AUTH and mail in
            # clear (RFC 3207 section 6).
            start_tls=False, tls_context=self._tls_context,
        )
        step = "connect"
        try:
            response = await smtp.connect()
            report(step, f"{response.code} {_one_line(response.message)}")
            if config.tls == "starttls":
                step = "starttls"
                response = await smtp.starttls()
                report(step, f"{response.code} {_one_line(response.message)}")
            if config.tls != "none":
                step = "tls"
                ssl_object = smtp.get_transport_info("ssl_object")
                if ssl_object is None:
                    raise SessionError(Reply(None, "TLS is not in effect; refusing to continue"),
                                       step)
                verified = "certificate verified" if config.verify else "certificate NOT verified"
                report(step, f"{ssl_object.version()}, {verified} for {config.host}")
            if config.username is not None and config.password is not None:
                step = "auth"
                response = await smtp.login(config.username, config.password)
                report(step, f"{response.code} {_one_line(response.message)}")
        except BaseException as exc:
            smtp.close()
            if isinstance(exc, SessionError):
                raise
            if isinstance(exc, (aiosmtplib.SMTPException, OSError, ssl.SSLError)):
                raise SessionError(reply_of(exc), step) from None
            raise
        return smtp

    async def _transaction(self, smtp: aiosmtplib.SMTP, sender: str, recipients: list[str],
                           content: bytes, smtputf8: bool) -> AttemptResult:
        relay = self.config.name
        options: list[str] = []
        encoding = "ascii"
        if smtputf8 and smtp.supports_extension("smtputf8"):
            options.append("SMTPUTF8")
            encoding = "utf-8"
        elif not all(a.isascii() for a in (sender, *recipients)):
            reply = Reply(550, "5.6.7 upstream does not offer SMTPUTF8, needed for these addresses")
            return AttemptResult(relay=relay, error=reply, stage=Stage.MAIL)
        if not content.isascii() and smtp.supports_extension("8bitmime"):
            options.append("BODY=8BITMIME")
        try:
            await smtp.mail(sender, options=options, encoding=encoding)
        except aiosmtplib.SMTPResponseException as exc:
            return AttemptResult(relay=relay, error=_refusal(exc), stage=Stage.MAIL)
        except ValueError as exc:  # aiosmtplib refuses to put this address on the wire
            return AttemptResult(relay=relay, error=_unsendable(exc), stage=Stage.MAIL)
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise SessionError(reply_of(exc), "mail") from None
        replies: dict[str, Reply] = {}
        accepted: list[str] = []
        for recipient in recipients:
            try:
                await smtp.rcpt(recipient, encoding=encoding)
                accepted.append(recipient)
            except aiosmtplib.SMTPResponseException as exc:
                replies[recipient] = _refusal(exc)
            except ValueError as exc:
                replies[recipient] = _unsendable(exc)
            except (aiosmtplib.SMTPException, OSError) as exc:
                raise SessionError(reply_of(exc)) from None
        if not accepted:
            return AttemptResult(relay=relay, recipients=replies)
        try:
            response = await _data(smtp, wire_form(content))
        except aiosmtplib.SMTPResponseException as exc:
            return AttemptResult(relay=relay, recipients=replies, error=_refusal(exc),
                                 stage=Stage.DATA)
        except (aiosmtplib.SMTPTimeoutError, TimeoutError):
            # The upstream may hold the whole message and have answered too late (RFC 5321
            # 4.5.3.2.6, RFC 1047): the retry is correct but may deliver it a second time.
            raise SessionError(Reply(None, "timed out in DATA: the upstream may have the "
                                           "message, so the retry may deliver it twice")) from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise SessionError(reply_of(exc)) from None
        done = Reply(response.code, _one_line(response.message))
        replies.update((r, done) for r in accepted)
        self._clean = True
        return AttemptResult(relay=relay, recipients=replies)


def wire_form(content: bytes) -> bytes:
    """`content` as DATA sends it (RFC 5321 4.5.2): every line ending in CRLF, a leading
    dot doubled, then the final dot. The same bytes as aiosmtplib's data() produces, whose
    two regular expressions over the whole message cost more CPU than the rest of a
    delivery at 100 KiB; here a message that is already all CRLF lines, as everything the
    listener accepts is, costs three counts and one replace in C."""
    crlf = content.count(b"\r\n")
    if content.count(b"\r") != crlf or content.count(b"\n") != crlf:
        content = _BARE_LINE_END.sub(b"\r\n", content)
    if not content.endswith(b"\r\n"):
        content += b"\r\n"
    stuffed = content.replace(b"\n.", b"\n..")
    return b"".join((b"." if stuffed.startswith(b".") else b"", stuffed, b".\r\n"))


async def _data(smtp: aiosmtplib.SMTP, wire: bytes) -> aiosmtplib.SMTPResponse:
    """DATA with a message already in wire form: aiosmtplib's data() would transform it
    again. Its protocol's write and read_response, back to back, keep replies paired with
    commands as its own data() does; what it does on a lost or silent server (close the
    session) is done here too."""
    response = await smtp.execute_command(b"DATA")
    if response.code != 354:
        raise aiosmtplib.SMTPDataError(response.code, response.message)
    protocol = smtp.protocol
    if protocol is None:
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    try:
        protocol.write(wire)
        response = await protocol.read_response(timeout=smtp.timeout)
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
        smtp.close()
        raise
    if response.code != 250:
        raise aiosmtplib.SMTPDataError(response.code, response.message)
    return response


def likely_cause(error: SessionError, config: UpstreamConfig) -> str:
    """A hint for `relay check`: what usually makes this step fail."""
    text = error.reply.text.lower()
    if error.step == "auth":
        if error.reply.code is not None and 500 <= error.reply.code < 600:
            return ("credentials rejected: check upstream.username and the password "
                    "(for Mailgun, the SMTP credentials of the sending domain)")
        return "the server did not accept AUTH; check the port and TLS mode"
    if error.step == "starttls":
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
    if config.tls == "starttls" and "timed out" in text:
        return ("no greeting: a port that expects TLS from the start (465) needs "
                "tls: implicit")
    return (f"cannot reach {config.host}:{config.port}: check upstream.host and upstream.port, "
            "and that outbound connections to it are allowed")


def reply_of(exc: BaseException) -> Reply:
    """The SMTP reply an exception carries, or a description of the failure without one."""
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return Reply(exc.code, _one_line(exc.message))
    if isinstance(exc, (aiosmtplib.SMTPTimeoutError, TimeoutError)):
        return Reply(None, f"timed out: {_one_line(str(exc)) or 'no reply'}")
    if isinstance(exc, ssl.SSLError) or isinstance(exc.__cause__, ssl.SSLError):
        return Reply(None, f"TLS failure: {_one_line(str(exc.__cause__ or exc))}")
    if isinstance(exc, (aiosmtplib.SMTPConnectError, aiosmtplib.SMTPServerDisconnected, OSError)):
        return Reply(None, f"connection failed: {_one_line(str(exc))}")
    return Reply(None, _one_line(str(exc)))


def _refusal(exc: aiosmtplib.SMTPResponseException) -> Reply:
    """The reply that refused a command. A reply that refuses nothing (250 where 354 was
    due, say) means replies and commands are out of step: nothing more from this session
    can be trusted, so it ends and the attempt counts as failed for now, never as sent."""
    if 400 <= exc.code < 600:
        return reply_of(exc)
    raise SessionError(Reply(None, f"protocol error: unexpected reply "
                                   f"{exc.code} {_one_line(exc.message)}"))


def _is_positive(reply: Reply | None) -> bool:
    return reply is not None and reply.code is not None and 200 <= reply.code < 300


def _unsendable(exc: ValueError) -> Reply:
    """An address the client library will not send: a permanent failure of ours, so it is
    kept in failed/ with the reason instead of being retried forever."""
    return Reply(553, f"5.1.3 address cannot be sent safely: {_one_line(str(exc))}")


def _one_line(text: str) -> str:
    return " ".join(text.split())
