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
from dataclasses import dataclass, field

from .config import parse_duration
from .errors import SubmissionFailed, UsageError
from .headers import split_header
from .schedule import hold_parameter, parse_time

# Postfix's sendmail takes these letters with a value (getopt "B:C:F:GIL:N:O:R:UV:X:b:ce:
# f:h:imno:p:q:r:tvx"); those without one here act alone. -q's interval is optional.
_WITH_VALUE = frozenset("BCFLNORVXbefhopr")
# sendmail's modes (-bX) and what each does here.
MODES = {"m": "deliver", "p": "queue", "v": "verify", "i": "newaliases"}
# How long `relay sendmail` waits for each reply of the listener, which stores the message
# before its last one: a disk this slow is better reported than waited for.
SUBMIT_SECONDS = 60.0

USAGE = """\
usage: sendmail [-t] [-i|-oi] [-f SENDER] [-F NAME] [-v] [--config FILE] [--] [RCPT ...]
       sendmail -bp | -q | -bv RCPT ... | -bi
       mailq, newaliases: the same as sendmail -bp and -bi

Reads a message on stdin and hands it to the relay's listener, which queues it.
  -t          recipients from the To:, Cc: and Bcc: headers too (Bcc: is removed)
  -i, -oi     a line with a single "." does not end the message
  -f SENDER   the envelope sender (default: sendmail.sender, else the invoking user)
  -F NAME     the full name in a From: header that is added when there is none
  -v          print the queue ID
  --send-at TIME       send at TIME (RFC 3339 or RFC 5322), not now
  --send-in DURATION   send after DURATION (5m, 2h, 1d), not now
  -bm         send the message (the default)
  -bp         list the queue (as mailq and relay queue)
  -q          flush: deferred messages become due now (as relay queue flush)
  -bv         say, for each RCPT, whether the relay accepts it and where it goes
  -bi, -I     nothing to do: aliases live in relay.yaml (addresses.aliases)
  --config F  the relay's config file
Other sendmail flags (-odb, -oem, -B8BITMIME, -N, -U, ...) are accepted and ignored.
Exit status: 0 queued, 64 bad command line, 65 refused by the relay, 75 relay unreachable
(the message was not sent), 78 bad config.
"""


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
    mode: str = "deliver"  # or queue (-bp), flush (-q), verify (-bv), newaliases (-bi), help


def parse_args(argv: list[str]) -> Options:
    """sendmail's command line as getopt reads it: flags may be grouped (-ti), a value
    may be attached (-fSENDER) or follow. Unknown flags are ignored, as Postfix does.
    Raises UsageError for what cannot be honoured."""
    options = Options()
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--":
            options.recipients += args
            break
        if arg.startswith("--"):
            _long_option(options, arg, args)
        elif arg.startswith("-") and arg != "-":
            _flags(options, arg, args)
        else:
            options.recipients.append(arg)
    if options.send_at is not None and options.send_in is not None:
        raise UsageError("give --send-at or --send-in, not both")
    return options


_LONG = {"--config": "config", "--send-at": "send_at", "--send-in": "send_in"}


def _long_option(options: Options, arg: str, args: list[str]) -> None:
    name, equals, attached = arg.partition("=")
    if arg == "--help":
        options.mode = "help"
    elif name in _LONG:
        value = attached if equals else _value(arg, "", args)
        if name != "--config" and not value.strip():
            raise UsageError(f"option {name} needs a value")
        setattr(options, _LONG[name], value)
    else:
        raise UsageError(f"unknown option {arg} (sendmail --help lists the options)")


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


def _flags(options: Options, arg: str, args: list[str]) -> None:
    position = 1
    while position < len(arg):
        flag, rest = arg[position], arg[position + 1:]
        position += 1
        if flag == "q":
            options.mode = "flush"  # -q, and -qINTERVAL or -qRsite: the whole queue
            return
        if flag not in _WITH_VALUE:
            options.extract_recipients |= flag == "t"
            options.dot_ends_input &= flag != "i"
            options.verbose |= flag == "v"
            if flag == "I":
                options.mode = "newaliases"
            continue
        value = _value(f"-{flag}", rest, args)
        if flag in "fr":
            options.sender = value
        elif flag == "F":
            options.full_name = value
        elif flag == "o" and value == "i":
            options.dot_ends_input = False
        elif flag == "b":
            if value not in MODES:
                raise UsageError(f"sendmail mode -b{value} is not supported; the relay knows "
                                 "-bm (send), -bp (list the queue), -bv (check recipients) "
                                 "and -bi (aliases)")
            options.mode = MODES[value]
        return


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


def prepare(message: bytes, options: Options, default_sender: str) -> tuple[str, list[str], bytes]:
    """The envelope and the message to submit: recipients from the arguments and, with -t,
    from To/Cc/Bcc; Bcc removed; From and Date added when missing. Bare names (root) stay
    bare: the listener qualifies them and applies the aliases, and adds the Message-ID
    with the relay's host name."""
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
    new_head = [line.encode() + b"\r\n" for line in added] + kept
    return sender, list(dict.fromkeys(recipients)), b"".join(new_head) + b"\r\n" + body


def submit(host: str, port: int, sender: str, recipients: list[str], message: bytes,
           timeout: float = SUBMIT_SECONDS, send_at: float | None = None) -> str:
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
    """The invoking user's name, bare: the listener puts the relay's host name to it."""
    return getpass.getuser()


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
