"""Address rules (the config's `addresses:` section): local recipients and their aliases,
the senders the upstream may send for, and staging's redirection.

Pure: no I/O. The listener asks once per step: `check_sender` at MAIL, `check_recipient`
at RCPT, and `apply` once the message is in, for the envelope and header edits to store
with the queue entry; the config checks its aliases with `alias_problem` before the relay
starts. Headers are edited as bytes: From: may change, Reply-To: and X-Original-To: may
be added, and every other byte of the message stays as it came.
"""

from __future__ import annotations

import email.utils
import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from email_validator import EmailNotValidError, validate_email

from .hostname import SystemName
from .spool import is_unsafe_address

if TYPE_CHECKING:
    from .config import AddressesConfig

MAX_ADDRESS_OCTETS = 254  # RFC 5321 4.5.3.1.3: a path is 256 octets including < and >
MAX_LOCAL_PART_OCTETS = 64  # RFC 5321 4.5.3.1.1
MAX_ALIAS_DEPTH = 10  # aliases that lead to aliases, at most this deep
WILDCARD = "*"
LINE_WIDTH = 78  # RFC 5322 2.1.1: header lines should not be longer
_SPECIALS = frozenset('()<>[]:;@\\,."')
_FOLD = re.compile(r"\r?\n(?=[ \t])")
# Control characters: an address with one is left alone, and in a display name they
# become spaces, so that its words stay apart (relay.text's "?" is for fields without words).
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Answered at DATA when a reload changed the rules after MAIL or RCPT accepted an address:
# the client's retry meets the new rules at MAIL and RCPT, with their own replies.
RULES_CHANGED = "451 4.3.0 Error: address rules reloaded during the transaction; try again"


# An application sends from a handful of addresses, often to the same few: the answer for
# each is kept (a pure function of its arguments) instead of running email-validator
# again for every MAIL and RCPT.
@functools.lru_cache(maxsize=4096)
def address_problem(address: str, smtputf8: bool) -> str | None:
    """Why `address` is not a syntactically valid mailbox, or None if it is. No DNS."""
    # aiosmtpd keeps bytes that are not UTF-8 as surrogates: counted, then refused.
    if len(address.encode("utf-8", "surrogateescape")) > MAX_ADDRESS_OCTETS:
        return f"address longer than {MAX_ADDRESS_OCTETS} octets"
    local, _, _ = address.rpartition("@")
    if len(local.encode("utf-8", "surrogateescape")) > MAX_LOCAL_PART_OCTETS:
        return f"local part longer than {MAX_LOCAL_PART_OCTETS} octets"
    try:
        validate_email(address, check_deliverability=False, globally_deliverable=False,
                       allow_quoted_local=True, allow_domain_literal=True, allow_smtputf8=True)
    except EmailNotValidError as exc:
        return str(exc)
    if not smtputf8 and not address.isascii():
        return "non-ASCII address without the SMTPUTF8 parameter"
    if is_unsafe_address(address):
        return "control characters, '<' or '>' are not relayed"
    return None


@dataclass(frozen=True)
class Rules:
    """The `addresses:` section with the relay's own names filled in."""

    hostname: str  # the relay's name: qualifies bare and local addresses
    local_domains: frozenset[str]  # lower-case; an address at one of them is local
    aliases: Mapping[str, tuple[str, ...]]  # lower-case local name, or "*": its targets
    sender_domains: frozenset[str] = frozenset()  # lower-case; empty: any
    default_sender: str | None = None
    redirect_to: str | None = None

    def is_local(self, address: str) -> bool:
        """A bare name, or a name at one of the relay's own names."""
        return _is_local(address, self.local_domains)

    def qualify(self, address: str) -> str:
        """A bare or local address at the relay's host name; any other as it is."""
        if not address or not self.is_local(address):
            return address
        return f"{_local_part(address)}@{self.hostname}"

    def outside(self, address: str) -> bool:
        """Whether a (qualified) address is outside sender_domains, when they are given."""
        return bool(self.sender_domains) and _domain(address) not in self.sender_domains


def rules_for(config: AddressesConfig, system: SystemName) -> Rules:
    """The rules of a config on this system: its hostname defaults to the system's FQDN
    (its short name when it has none), and mail to any of these names is local."""
    hostname = config.hostname or system.fqdn or system.short
    names = {"localhost", hostname, system.short, system.fqdn or "localhost"}
    return Rules(hostname=hostname, local_domains=frozenset(n.lower() for n in names),
                 aliases=config.aliases,
                 sender_domains=frozenset(d.lower() for d in config.sender_domains),
                 default_sender=config.default_sender, redirect_to=config.redirect_to)


# --- aliases ------------------------------------------------------------------------


@dataclass(frozen=True)
class Expansion:
    targets: tuple[str, ...]  # the addresses a local name leads to, in order, once each
    problem: str | None = None  # why it leads nowhere: no entry, or a loop


def expand(aliases: Mapping[str, tuple[str, ...]], local_domains: Iterable[str],
           name: str) -> Expansion:
    """Where the local name `name` goes, as aliases(5) reads a table: case-insensitive,
    aliases may name further local names, "*" stands for any name without an entry, and
    `postmaster` falls back on `root` before "*" (RFC 5321 4.1.1.3)."""
    targets: dict[str, None] = {}
    problem = _expand(aliases, frozenset(local_domains), name, (), targets)
    return Expansion(() if problem else tuple(targets), problem)


def alias_problem(aliases: Mapping[str, tuple[str, ...]],
                  local_domains: Iterable[str]) -> tuple[str, str] | None:
    """The first entry of an alias table that loops or leads to a name without an entry,
    and why; None when every entry leads to addresses."""
    local = frozenset(local_domains)
    for name, targets in aliases.items():
        for target in targets if name == WILDCARD else (name,):
            if _is_local(target, local):
                problem = expand(aliases, local, _local_part(target)).problem
                if problem is not None:
                    return name, problem
    return None


def _expand(aliases: Mapping[str, tuple[str, ...]], local_domains: frozenset[str],
            name: str, path: tuple[str, ...], targets: dict[str, None]) -> str | None:
    key = name.lower()
    if key in path:
        return "alias loop: " + " -> ".join((*path, key))
    if len(path) >= MAX_ALIAS_DEPTH:
        return f"aliases nested deeper than {MAX_ALIAS_DEPTH}: " + " -> ".join(path)
    values = aliases.get(key)
    if values is None and key == "postmaster":
        values = aliases.get("root")
    if values is None:
        values = aliases.get(WILDCARD)
    if values is None:
        return f"no entry for {name}, and no \"*\""
    for value in values:
        if _is_local(value, local_domains):
            problem = _expand(aliases, local_domains, _local_part(value), (*path, key), targets)
            if problem is not None:
                return problem
        else:
            targets[value] = None
    return None


# --- the three steps ----------------------------------------------------------------


def check_sender(rules: Rules, sender: str, smtputf8: bool) -> str | None:
    """MAIL: the reply refusing `sender`, or None to accept it. `<>` is always accepted."""
    if not sender:
        return None
    qualified = rules.qualify(sender)
    problem = address_problem(qualified, smtputf8)
    if problem is not None:
        return f"553 5.1.3 Error: bad sender address syntax: {problem}"
    if rules.default_sender is None and rules.outside(qualified):
        return (f"553 5.7.1 Error: sender domain {_domain(qualified)} is not in "
                "addresses.sender_domains, and addresses.default_sender is not set")
    return None


def check_recipient(rules: Rules, address: str, smtputf8: bool) -> str | None:
    """RCPT: the reply refusing `address`, or None to accept it."""
    problem = address_problem(rules.qualify(address), smtputf8)
    if problem is not None:
        return f"553 5.1.3 Error: bad recipient address syntax: {problem}"
    if not rules.is_local(address):
        return None
    expansion = local_targets(rules, address)
    if expansion.problem is not None:
        return (f"550 5.1.1 <{address}>: no such local recipient: addresses.aliases has "
                f"{expansion.problem}")
    return None


def local_targets(rules: Rules, address: str) -> Expansion:
    """Where a local recipient goes. Postmaster is always accepted (RFC 5321 4.1.1.3):
    with no alias that takes it, it goes upstream as postmaster at the relay's name."""
    local = _local_part(address)
    expansion = expand(rules.aliases, rules.local_domains, local)
    if expansion.problem is not None and local.lower() == "postmaster":
        return Expansion((f"postmaster@{rules.hostname}",))
    return expansion


@dataclass(frozen=True)
class Applied:
    """A message's envelope and content after the rules, and what they replaced."""

    sender: str
    recipients: tuple[str, ...]
    parts: tuple[bytes, ...]  # the content: the message itself, or edited header + the rest
    original_sender: str | None  # as received, when the rules changed it
    original_recipients: tuple[str, ...] | None  # as received, when the rules changed them


def apply(rules: Rules, sender: str, recipients: Sequence[str], message: bytes,
          head: list[bytes]) -> Applied | str:
    """DATA: the envelope and content to store (`head`: the message's header lines), or
    the reply refusing it when a reload changed the rules since MAIL and RCPT."""
    new_sender = sender
    if sender:
        new_sender = rules.qualify(sender)
        if rules.outside(new_sender):
            if rules.default_sender is None:
                return RULES_CHANGED
            new_sender = rules.default_sender
    targets: dict[str, None] = {}
    for address in recipients:
        if not rules.is_local(address):
            targets[address] = None
            continue
        expansion = local_targets(rules, address)
        if expansion.problem is not None:
            return RULES_CHANGED
        targets.update(dict.fromkeys(expansion.targets))
    given = tuple(recipients)
    final = (rules.redirect_to,) if rules.redirect_to else tuple(targets)
    edited = _edit_header(rules, head, given)
    parts = (message,) if edited is None else (edited, message[sum(map(len, head)):])
    return Applied(new_sender, final, parts, None if new_sender == sender else sender,
                   None if final == given else given)


def describe(rules: Rules, address: str) -> tuple[bool, str]:
    """`sendmail -bv`: whether `address` would be accepted, and where it would go."""
    refusal = check_recipient(rules, address, smtputf8=True)
    if refusal is not None:
        return False, f"refused: {refusal}"
    if rules.redirect_to:
        return True, f"relayed to {rules.redirect_to} (addresses.redirect_to)"
    if rules.is_local(address):
        targets = local_targets(rules, address).targets
        return True, f"local; relayed to {', '.join(targets)} (addresses.aliases)"
    return True, "relayed as it is"


# --- header edits -------------------------------------------------------------------


def _edit_header(rules: Rules, head: list[bytes], recipients: tuple[str, ...]) -> bytes | None:
    """The header section with the rules' edits, or None when it needs none."""
    edits: list[tuple[int, int, tuple[bytes, bytes | None]]] = []  # From: fields' lines
    for start, line in enumerate(head):
        if line[:5].lower() != b"from:":
            continue
        end = start + 1
        while end < len(head) and head[end][:1] in (b" ", b"\t"):
            end += 1
        rewritten = _edit_from(rules, b"".join(head[start:end]))
        if rewritten is not None:
            edits.append((start, end, rewritten))
    if not edits and not rules.redirect_to:
        return None
    out: list[bytes] = []
    if rules.redirect_to:
        eol = b"\n" if head and not head[0].endswith(b"\r\n") else b"\r\n"
        out.append(_field("X-Original-To", recipients, eol))
    reply_to_wanted = not any(line[:9].lower() == b"reply-to:" for line in head)
    done = 0
    for start, end, (new_from, reply_to) in edits:
        out += head[done:start]
        out.append(new_from)
        if reply_to is not None and reply_to_wanted:
            out.append(reply_to)
            reply_to_wanted = False
        done = end
    out += head[done:]
    return b"".join(out)


def _edit_from(rules: Rules, field: bytes) -> tuple[bytes, bytes | None] | None:
    """A From: field rewritten (and the Reply-To: with the addresses it replaced), or None
    when it stays as it is."""
    eol = b"\r\n" if field.endswith(b"\r\n") else b"\n"
    value = field[5:].decode("utf-8", errors="surrogateescape")
    decision = _from_decision(rules.hostname, rules.local_domains, rules.sender_domains,
                              rules.default_sender, value)
    if decision is None:
        return None
    mailboxes, replaced = decision
    return (_field("From", mailboxes, eol),
            _field("Reply-To", replaced, eol) if replaced else None)


# A relay sees the same few From: fields again and again; each answer is a pure function
# of its arguments, so the parse is kept rather than redone for every message.
@functools.lru_cache(maxsize=1024)
def _from_decision(hostname: str, local_domains: frozenset[str], sender_domains: frozenset[str],
                   default_sender: str | None,
                   value: str) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """The mailboxes a From: value becomes and the originals it replaced, or None when
    it stays: bare and local addresses are qualified, and with default_sender, those
    outside sender_domains become it. A group's mailboxes are listed without the group."""
    rules = Rules(hostname, local_domains, {}, sender_domains, default_sender)
    rewriting = bool(sender_domains) and default_sender is not None
    unfolded = _FOLD.sub("", value).strip()
    try:
        pairs = [(name, address) for name, address in email.utils.getaddresses([unfolded])
                 if address]
    except (RecursionError, ValueError, IndexError):
        pairs = []  # the parser gives up on it (nested comments past its depth, say)
    if any(_CONTROL.search(address) for _, address in pairs):
        pairs = []
    if not pairs:
        # Nothing this parser can read: replaced when it must be, else left alone.
        return ((default_sender,), ()) if rewriting and default_sender and unfolded else None
    mailboxes: dict[str, str] = {}
    replaced: list[str] = []
    changed = False
    for name, address in pairs:
        target = rules.qualify(address)
        if rewriting and rules.outside(target):
            replaced.append(_mailbox(name, target))
            target = default_sender or target
        changed |= target != address
        mailboxes.setdefault(target.lower(), _mailbox(name, target))
    return (tuple(mailboxes.values()), tuple(replaced)) if changed else None


def _mailbox(name: str, address: str) -> str:
    """`name <address>`, the display name quoted only when RFC 5322 needs it; encoded
    words and raw UTF-8 stay as they were written."""
    name = " ".join(_CONTROL.sub(" ", name).split())
    if name.startswith("(") and name.endswith(")"):
        name = name[1:-1].strip()  # a comment standing in as the name: root (Cron Daemon)
    if not name:
        return address
    if any(c in _SPECIALS for c in name):
        name = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"{name} <{address}>"


def _field(name: str, items: Iterable[str], eol: bytes) -> bytes:
    """A header field listing `items`, folded between items before LINE_WIDTH."""
    lines = [f"{name}:"]
    entries = list(items)
    for number, item in enumerate(entries):
        piece = f" {item}" + ("," if number < len(entries) - 1 else "")
        if len(lines[-1]) + len(piece) > LINE_WIDTH and lines[-1] != f"{name}:":
            lines.append("")
        lines[-1] += piece
    return eol.join(line.encode("utf-8", errors="surrogateescape") for line in lines) + eol


def _is_local(address: str, local_domains: frozenset[str]) -> bool:
    at = address.rfind("@")
    return at < 0 or address[at + 1:].lower() in local_domains


def _local_part(address: str) -> str:
    return address.rpartition("@")[0] if "@" in address else address


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower()
