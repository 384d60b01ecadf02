"""`relay sendmail`: the sendmail-compatible entry point for cron, PHP's mail() and scripts.

Parses sendmail's options as Postfix's sendmail does (harmless flags it does not need are
accepted and ignored), reads the message on stdin, builds the envelope and submits it over
SMTP to the local listener, which alone validates addresses and content. It never drops a
message silently: whatever keeps the listener from taking the message is an exit status
(75 try again later, 65 refused) and a message on stderr. `--send-at TIME` and
`--send-in DURATION` ask the listener to hold the message until then, with RFC 4865's
MAIL parameter HOLDUNTIL (relay.schedule).
"""

from __future__ import annotations

import email.parser
import email.policy
import email.utils
import getpass
import re
import smtplib
import socket
from dataclasses import dataclass, field

from .config import parse_duration
from .errors import SubmissionFailed, UsageError
from .headers import split_header
from .schedule import hold_parameter, parse_time

# Options that take a value (attached, -fSENDER, or as the next argument) and that we ignore.
_IGNORED_WITH_VALUE = set("BCOhLNRVX")
# Flags that take no value and change nothing for us.
_IGNORED_FLAGS = set("nmUGAq")


@dataclass
class Options:
    sender: str | None = None
    full_name: str | None = None
    recipients: list[str] = field(default_factory=list)
    extract_recipients: bool = False  # -t
    dot_ends_input: bool = True  # cleared by -i / -oi
    verbose: bool = False  # -v: print the queue ID
    config: str | None = None
    send_at: str | None = None  # --send-at TIME
    send_in: str | None = None  # --send-in DURATION


def parse_args(argv: list[str]) -> Options:
    """sendmail's command line. Raises UsageError for what cannot be honoured."""
    options = Options()
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--":
            options.recipients += args
            break
        name, equals, attached = arg.partition("=")
        if name in _LONG:
            value = attached if equals else _value(arg, "", args)
            if name != "--config" and not value.strip():
                raise UsageError(f"option {name} needs a value")
            setattr(options, _LONG[name], value)
        elif not arg.startswith("-") or arg == "-":
            options.recipients.append(arg)
        elif arg in ("-t", "-i", "-oi", "-v"):
            options.extract_recipients |= arg == "-t"
            options.dot_ends_input &= arg not in ("-i", "-oi")
            options.verbose |= arg == "-v"
        elif arg[1] in "fr":
            options.sender = _value(arg, arg[2:], args)
        elif arg[1] == "F":
            options.full_name = _value(arg, arg[2:], args)
        elif arg[1] == "b":
            if arg != "-bm":
                raise UsageError(f"sendmail mode {arg} is not supported; only -bm (deliver mail)")
        elif arg[1] == "o":
            if arg == "-o":
                _value(arg, "", args)
        elif arg[1] in _IGNORED_WITH_VALUE:
            _value(arg, arg[2:], args)
        elif arg[1] not in _IGNORED_FLAGS:
            raise UsageError(f"unknown option {arg}")
    if options.send_at is not None and options.send_in is not None:
        raise UsageError("give --send-at or --send-in, not both")
    return options


_LONG = {"--config": "config", "--send-at": "send_at", "--send-in": "send_in"}


def send_time(options: Options, now: float) -> float | None:
    """When the message is to be sent, from --send-at or --send-in; None: now. A time
    already past means now. Raises UsageError naming the flag for a value it cannot read."""
    if options.send_in is not None:
        try:
            when = now + parse_duration(options.send_in)
        except ValueError as exc:
            raise UsageError(f"--send-in: {exc}") from None
    elif options.send_at is not None:
        try:
            when = parse_time(options.send_at)
        except ValueError as exc:
            raise UsageError(f"--send-at: {exc}") from None
    else:
        return None
    return when if when > now else None


def _value(flag: str, attached: str, rest: list[str]) -> str:
    if attached:
        return attached
    if not rest:
        raise UsageError(f"option {flag} needs a value")
    return rest.pop(0)


def read_message(data: bytes, dot_ends_input: bool) -> bytes:
    """stdin as sendmail reads it: CRLF line endings; a lone '.' ends it unless -i."""
    lines = re.split(rb"\r?\n", data)
    if lines and lines[-1] == b"":
        lines.pop()
    if dot_ends_input and b"." in lines:
        lines = lines[:lines.index(b".")]
    return b"".join(line + b"\r\n" for line in lines)


def prepare(message: bytes, options: Options, default_sender: str,
            hostname: str) -> tuple[str, list[str], bytes]:
    """The envelope and the message to submit: recipients from the arguments and, with -t,
    from To/Cc/Bcc; Bcc removed; From, Date and Message-ID added when missing."""
    head, body = split_header(message)
    parsed = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(
        b"".join(head) + b"\r\n")
    # Arguments are addresses, not header text: split lists on commas, keep the rest as is
    # so the listener judges exactly what the caller wrote.
    recipients = [part.strip().strip("<>") for arg in options.recipients
                  for part in arg.split(",") if part.strip()]
    if options.extract_recipients:
        fields = [str(v) for name in ("To", "Cc", "Bcc") for v in parsed.get_all(name, [])]
        recipients += [address for _, address in email.utils.getaddresses(fields) if address]
    if not recipients:
        raise UsageError("no recipients: name them as arguments, or use -t with To/Cc/Bcc")
    sender = default_sender if options.sender is None else options.sender.strip("<>")
    kept = _without_bcc(head)
    added = []
    if parsed["From"] is None:
        mailbox = sender or default_sender
        added.append(f"From: {email.utils.formataddr((options.full_name or '', mailbox))}")
    if parsed["Date"] is None:
        added.append(f"Date: {email.utils.formatdate(localtime=True)}")
    if parsed["Message-ID"] is None:
        added.append(f"Message-ID: {email.utils.make_msgid(domain=hostname)}")
    new_head = [line.encode() + b"\r\n" for line in added] + kept
    return sender, list(dict.fromkeys(recipients)), b"".join(new_head) + b"\r\n" + body


def submit(host: str, port: int, sender: str, recipients: list[str], message: bytes,
           timeout: float = 60.0, send_at: float | None = None) -> str:
    """Hand the message to the listener; return its queue ID. All recipients or none:
    if any is refused the transaction is abandoned, so nothing is half sent. With
    `send_at`, the listener must offer FUTURERELEASE, and is asked to hold it till then."""
    try:
        with smtplib.SMTP(host, port, timeout=timeout) as smtp:
            smtp.ehlo()
            options = []
            if not all(a.isascii() for a in (sender, *recipients)):
                options.append("SMTPUTF8")
            if not message.isascii():
                options.append("BODY=8BITMIME")
            what = f"sender <{sender}>"
            if send_at is not None:
                if not smtp.has_extn("futurerelease"):
                    raise SubmissionFailed(f"the relay at {host}:{port} does not offer "
                                           "scheduled delivery (FUTURERELEASE); the message "
                                           "was not sent", permanent=True)
                options.append(hold_parameter(send_at))
                what += f" with {options[-1]}"
            _expect(smtp.mail(sender, options), what)
            for recipient in recipients:
                _expect(smtp.rcpt(recipient), f"recipient <{recipient}>")
            code, reply = smtp.data(message)
            _expect((code, reply), "message")
    except (smtplib.SMTPException, OSError) as exc:
        raise SubmissionFailed(f"cannot hand the message to the relay at {host}:{port}: "
                               f"{exc}; it was not sent", permanent=False) from None
    match = re.search(rb"queued as (\S+)", reply)
    return match.group(1).decode() if match else ""


def default_sender() -> str:
    """The invoking user at this host, as sendmail does."""
    return f"{getpass.getuser()}@{socket.gethostname()}"


def _expect(answer: tuple[int, bytes], what: str) -> None:
    code, reply = answer
    if 200 <= code < 300:
        return
    text = reply.decode("utf-8", errors="replace")
    raise SubmissionFailed(f"{what} refused by the relay: {code} {text}",
                           permanent=code >= 500)


def _without_bcc(head: list[bytes]) -> list[bytes]:
    kept: list[bytes] = []
    dropping = False
    for line in head:
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                kept.append(line)
            continue
        dropping = line.lower().startswith(b"bcc:")
        if not dropping:
            kept.append(line)
    return kept
