"""The address rules on their own (relay.addresses): tables of addresses and headers in,
replies, envelopes and header bytes out."""

from __future__ import annotations

import pytest

from relay.addresses import (
    LINE_WIDTH,
    RULES_CHANGED,
    Applied,
    Rules,
    alias_problem,
    apply,
    check_recipient,
    check_sender,
    describe,
    expand,
    rules_for,
)
from relay.config import parse_config
from relay.headers import split_header
from relay.hostname import SystemName, fqdn_from_hosts

ALIASES = {
    "root": ("ops@example.com",),
    "www-data": ("root", "web@example.com"),
    "team": ("a@example.com", "B@Example.com", "root@vm.example.com"),
}
LOCAL = frozenset({"vm.example.com", "vm", "localhost"})
PLAIN = Rules("vm.example.com", LOCAL, ALIASES)
STRICT = Rules("vm.example.com", LOCAL, ALIASES, frozenset({"mg.example.com"}))
REWRITING = Rules("vm.example.com", LOCAL, ALIASES, frozenset({"mg.example.com"}),
                  "noreply@mg.example.com")
STAGING = Rules("vm.example.com", LOCAL, ALIASES, redirect_to="staging@example.com")


def rewrite(rules: Rules, header: bytes, sender: str = "app@mg.example.com",
            recipients: tuple[str, ...] = ("user@example.org",)) -> Applied:
    message = header + b"\r\nbody line\r\n.. a dotted line\r\n"
    applied = apply(rules, sender, list(recipients), message, split_header(message)[0])
    assert isinstance(applied, Applied)
    assert b"".join(applied.parts).endswith(b"\r\n\r\nbody line\r\n.. a dotted line\r\n")
    return applied


def header_of(applied: Applied) -> bytes:
    return b"".join(applied.parts).split(b"\r\n\r\n", 1)[0] + b"\r\n"


# --- recipients ---------------------------------------------------------------------


@pytest.mark.parametrize("address", [
    "root", "ROOT", "Root@LocalHost", "root@vm", "root@VM.example.com", "www-data",
    "user@example.org", "Postmaster", "POSTMASTER@localhost",
])
def test_recipients_accepted(address: str) -> None:
    """Known local names in any case and at any own name, postmaster, and remote mail."""
    assert check_recipient(PLAIN, address, smtputf8=False) is None


def test_local_recipient_without_alias_is_refused_naming_the_key() -> None:
    """550 5.1.1 at RCPT, and the reply says where the alias is missing."""
    reply = check_recipient(PLAIN, "nobody@localhost", smtputf8=False)
    assert reply is not None and reply.startswith("550 5.1.1 <nobody@localhost>: ")
    assert "addresses.aliases" in reply and "no entry for nobody" in reply


@pytest.mark.parametrize("address", ["bad@@example.com", "a b", "x" * 65])
def test_malformed_recipients_get_553(address: str) -> None:
    """Bare or not, a malformed address is a syntax error, not an unknown name."""
    reply = check_recipient(PLAIN, address, smtputf8=False)
    assert reply is not None and reply.startswith("553 5.1.3 ")


@pytest.mark.parametrize("aliases, name, targets", [
    ({"root": ("a@x.org",)}, "ROOT", ("a@x.org",)),
    ({"root": ("a@x.org", "b@x.org")}, "root", ("a@x.org", "b@x.org")),
    ({"root": ("admin", "a@x.org"), "admin": ("b@x.org", "a@x.org")}, "root",
     ("b@x.org", "a@x.org")),
    ({"*": ("any@x.org",)}, "whoever", ("any@x.org",)),
    ({"root": ("r@x.org",), "*": ("any@x.org",)}, "postmaster", ("r@x.org",)),
    ({"*": ("any@x.org",)}, "postmaster", ("any@x.org",)),
    ({"postmaster": ("pm@x.org",), "root": ("r@x.org",)}, "PostMaster", ("pm@x.org",)),
    ({"root": ("admin@localhost",), "admin": ("b@x.org",)}, "root", ("b@x.org",)),
])
def test_alias_expansion(aliases: dict[str, tuple[str, ...]], name: str,
                         targets: tuple[str, ...]) -> None:
    """Case-insensitive names, lists, nesting, "*", and postmaster's root fallback."""
    assert expand(aliases, {"localhost"}, name).targets == targets


@pytest.mark.parametrize("aliases, name, problem", [
    ({"a": ("b",), "b": ("a",)}, "a", "alias loop: a -> b -> a"),
    ({"root": ("root", "x@y.org")}, "root", "alias loop: root -> root"),
    ({"*": ("admin",)}, "nobody", "alias loop: nobody -> admin -> admin"),
    ({f"n{i}": (f"n{i + 1}",) for i in range(30)}, "n0", "aliases nested deeper than 10"),
    ({"root": ("admin",)}, "root", 'no entry for admin, and no "*"'),
])
def test_alias_loops_and_dead_ends_are_bounded_and_named(
        aliases: dict[str, tuple[str, ...]], name: str, problem: str) -> None:
    """A loop, a chain too deep or a missing name leads nowhere, and says why."""
    expansion = expand(aliases, {"localhost"}, name)
    assert expansion.targets == ()
    assert expansion.problem is not None and expansion.problem.startswith(problem)


# --- senders ------------------------------------------------------------------------


@pytest.mark.parametrize("rules, sender", [
    (PLAIN, ""), (PLAIN, "root"), (PLAIN, "anyone@anywhere.example"),
    (STRICT, ""), (STRICT, "app@mg.example.com"), (STRICT, "App@MG.Example.COM"),
    (REWRITING, "root"), (REWRITING, "app@elsewhere.example"),
])
def test_senders_accepted(rules: Rules, sender: str) -> None:
    """Any sender without sender_domains; inside them, or with default_sender; and <>."""
    assert check_sender(rules, sender, smtputf8=False) is None


@pytest.mark.parametrize("sender, domain", [
    ("root", "vm.example.com"), ("app@elsewhere.example", "elsewhere.example"),
])
def test_sender_outside_domains_without_default_is_refused(sender: str, domain: str) -> None:
    """553 5.7.1 at MAIL, naming the sender's domain and both keys."""
    reply = check_sender(STRICT, sender, smtputf8=False)
    assert reply is not None and reply.startswith("553 5.7.1 ")
    assert f"sender domain {domain} " in reply
    assert "addresses.sender_domains" in reply and "addresses.default_sender" in reply


@pytest.mark.parametrize("rules, sender, expected", [
    (PLAIN, "root", "root@vm.example.com"),
    (PLAIN, "root@localhost", "root@vm.example.com"),
    (PLAIN, "app@example.org", "app@example.org"),
    (PLAIN, "", ""),
    (REWRITING, "root", "noreply@mg.example.com"),
    (REWRITING, "app@mg.example.com", "app@mg.example.com"),
    (REWRITING, "", ""),
])
def test_envelope_sender(rules: Rules, sender: str, expected: str) -> None:
    """Bare and local senders qualified; outside senders replaced; <> never touched."""
    applied = rewrite(rules, b"Subject: s\r\n", sender=sender)
    assert applied.sender == expected
    assert applied.original_sender == (None if expected == sender else sender)


# --- the envelope's recipients ------------------------------------------------------


@pytest.mark.parametrize("rules, recipients, expected", [
    (PLAIN, ("user@example.org",), ("user@example.org",)),
    (PLAIN, ("root", "user@example.org"), ("ops@example.com", "user@example.org")),
    (PLAIN, ("www-data", "ROOT@localhost"), ("ops@example.com", "web@example.com")),
    (PLAIN, ("team",), ("a@example.com", "B@Example.com", "ops@example.com")),
    (STAGING, ("root", "user@example.org"), ("staging@example.com",)),
])
def test_envelope_recipients(rules: Rules, recipients: tuple[str, ...],
                             expected: tuple[str, ...]) -> None:
    """Aliases expanded once each, remote recipients kept, redirect_to replacing all."""
    applied = rewrite(rules, b"Subject: s\r\n", recipients=recipients)
    assert applied.recipients == expected
    assert applied.original_recipients == (None if expected == recipients else recipients)


def test_a_reload_between_rcpt_and_data_is_a_temporary_refusal() -> None:
    """A recipient accepted under old aliases and unknown under new ones: 451, try again."""
    rules = Rules("vm.example.com", LOCAL, {})
    message = b"Subject: s\r\n\r\nbody\r\n"
    assert apply(rules, "", ["root"], message, split_header(message)[0]) == RULES_CHANGED


def test_untouched_message_is_passed_on_as_the_same_bytes() -> None:
    """No rule applies: the stored content is the received object itself, not a copy."""
    message = b"From: App <app@example.org>\r\nSubject: s\r\n\r\nbody\r\n"
    applied = apply(PLAIN, "app@example.org", ["user@example.org"], message,
                    split_header(message)[0])
    assert isinstance(applied, Applied) and applied.parts[0] is message


# --- From: and the headers added ----------------------------------------------------


@pytest.mark.parametrize("rules, header, expected", [
    # cron's From: a comment standing in for the display name
    (REWRITING, b"From: root (Cron Daemon)\r\n",
     (b"From: Cron Daemon <noreply@mg.example.com>\r\n"
      b"Reply-To: Cron Daemon <root@vm.example.com>\r\n")),
    (REWRITING, b"From: (Cron Daemon) <root@vm>\r\n",
     (b"From: Cron Daemon <noreply@mg.example.com>\r\n"
      b"Reply-To: Cron Daemon <root@vm.example.com>\r\n")),
    # a display name with a comma and quotes stays quoted
    (REWRITING, b'From: "Doe, John \\"JD\\"" <john@elsewhere.example>\r\n',
     (b'From: "Doe, John \\"JD\\"" <noreply@mg.example.com>\r\n'
      b'Reply-To: "Doe, John \\"JD\\"" <john@elsewhere.example>\r\n')),
    # an encoded word is kept as it was written
    (REWRITING, b"From: =?utf-8?q?J=C3=B6rg_M=C3=BCller?= <j@elsewhere.example>\r\n",
     (b"From: =?utf-8?q?J=C3=B6rg_M=C3=BCller?= <noreply@mg.example.com>\r\n"
      b"Reply-To: =?utf-8?q?J=C3=B6rg_M=C3=BCller?= <j@elsewhere.example>\r\n")),
    # raw UTF-8, and bytes that are not UTF-8, survive byte for byte
    (REWRITING, "From: Jörg <j@elsewhere.example>\r\n".encode(),
     "From: Jörg <noreply@mg.example.com>\r\nReply-To: Jörg <j@elsewhere.example>\r\n".encode()),
    (REWRITING, b"From: J\xf6rg <j@elsewhere.example>\r\n",
     b"From: J\xf6rg <noreply@mg.example.com>\r\nReply-To: J\xf6rg <j@elsewhere.example>\r\n"),
    # a folded field
    (REWRITING, b"From: The Nightly\r\n\tBackup Job\r\n <backup@localhost>\r\n",
     (b"From: The Nightly Backup Job <noreply@mg.example.com>\r\n"
      b"Reply-To: The Nightly Backup Job <backup@vm.example.com>\r\n")),
    # several addresses: only those outside the domains are replaced
    (REWRITING, b"From: A <a@mg.example.com>, B <b@elsewhere.example>\r\n",
     (b"From: A <a@mg.example.com>, B <noreply@mg.example.com>\r\n"
      b"Reply-To: B <b@elsewhere.example>\r\n")),
    # a group: its mailboxes, replaced once
    (REWRITING, b"From: Ops: a@elsewhere.example, B <b@other.example>;\r\n",
     (b"From: noreply@mg.example.com\r\n"
      b"Reply-To: a@elsewhere.example, B <b@other.example>\r\n")),
    # nothing a parser can read: replaced all the same
    (REWRITING, b"From: <<<\r\n", b"From: noreply@mg.example.com\r\n"),
    # without sender rules, bare and local addresses are qualified, nothing else
    (PLAIN, b"From: root (Cron Daemon)\r\n", b"From: Cron Daemon <root@vm.example.com>\r\n"),
    (PLAIN, b"From: root\r\n", b"From: root@vm.example.com\r\n"),
    (STRICT, b"From: app@elsewhere.example\r\n", b"From: app@elsewhere.example\r\n"),
])
def test_from_rewriting(rules: Rules, header: bytes, expected: bytes) -> None:
    """From: rewritten with its display name kept; Reply-To: gets what was replaced."""
    applied = rewrite(rules, b"Received: x\r\n" + header + b"Subject: s\r\n")
    assert header_of(applied) == b"Received: x\r\n" + expected + b"Subject: s\r\n"


def test_from_inside_the_domains_is_not_touched() -> None:
    """A From: the upstream may send for: the message is stored as received."""
    message = b"From: The App <app@mg.example.com>\r\nSubject: s\r\n\r\nbody\r\n"
    applied = apply(REWRITING, "app@mg.example.com", ["u@example.org"], message,
                    split_header(message)[0])
    assert isinstance(applied, Applied) and applied.parts == (message,)


def test_existing_reply_to_is_kept_and_none_added() -> None:
    """The original address goes to Reply-To: only when the message has none."""
    applied = rewrite(REWRITING, b"From: root\r\nreply-to: help@example.org\r\n")
    assert header_of(applied) == (b"From: noreply@mg.example.com\r\n"
                                  b"reply-to: help@example.org\r\n")


def test_redirect_lists_the_original_recipients_in_x_original_to() -> None:
    """redirect_to: X-Original-To: first, folded under 78 columns, the rest as it was."""
    recipients = tuple(f"user{n}@example.org" for n in range(12)) + ("root",)
    applied = rewrite(STAGING, b"From: app@example.org\r\nSubject: s\r\n",
                      recipients=recipients)
    header = header_of(applied)
    field, rest = header.split(b"\r\nFrom: ", 1)
    assert rest == b"app@example.org\r\nSubject: s\r\n"
    lines = field.split(b"\r\n")
    assert lines[0].startswith(b"X-Original-To: user0@example.org, ")
    assert all(len(line) <= LINE_WIDTH and line[:1] == b" " for line in lines[1:])
    assert b"".join(lines).split(b": ", 1)[1].split(b", ") == [a.encode() for a in recipients]


def test_describe_says_where_a_recipient_goes() -> None:
    """sendmail -bv's answer: accepted or not, and to which addresses."""
    assert describe(PLAIN, "www-data") == (
        True, "local; relayed to ops@example.com, web@example.com (addresses.aliases)")
    assert describe(PLAIN, "user@example.org") == (True, "relayed as it is")
    accepted, verdict = describe(PLAIN, "nobody")
    assert not accepted and verdict.startswith("refused: 550 5.1.1")


# --- the relay's names --------------------------------------------------------------


@pytest.mark.parametrize("hosts, fqdn", [
    ("127.0.0.1 localhost\n127.0.1.1 vm.example.com vm\n", "vm.example.com"),
    ("127.0.1.1\tVM.Example.com  vm # the installer's line\n", "vm.example.com"),
    ("127.0.0.1 localhost vm\n", None),
    ("10.0.0.5 vm vm.example.com\n", "vm.example.com"),
    ("# 127.0.1.1 vm.example.com vm\n", None),
    ("127.0.1.1 vmware.example.com vmware\n", None),
    ("", None),
])
def test_fqdn_from_etc_hosts(hosts: str, fqdn: str | None) -> None:
    """The FQDN as `hostname -f` finds it in /etc/hosts, without DNS."""
    assert fqdn_from_hosts(hosts, "vm") == fqdn


@pytest.mark.parametrize("configured, system, hostname", [
    (None, SystemName("vm", "vm.example.com"), "vm.example.com"),
    (None, SystemName("vm", None), "vm"),
    ("mail.example.com", SystemName("vm", "vm.example.com"), "mail.example.com"),
])
def test_hostname_default_and_local_names(configured: str | None, system: SystemName,
                                          hostname: str) -> None:
    """addresses.hostname, else the FQDN, else the short name; all of them are local."""
    text = f"addresses: {{hostname: {configured}}}" if configured else "{}"
    rules = rules_for(parse_config(text, {}).addresses, system)
    assert rules.hostname == hostname
    assert {"localhost", hostname, system.short} <= rules.local_domains
    assert rules.is_local(f"root@{system.fqdn or system.short}")


@pytest.mark.parametrize("aliases, found", [
    ({"root": ("ops@example.com",), "www-data": ("root",), "*": ("root",)}, None),
    ({"root": ("ops@example.com",), "admin": ("boss",)},
     ("admin", 'no entry for boss, and no "*"')),
    ({"root": ("ops@example.com",), "*": ("nobody",)}, ("*", "alias loop: nobody -> nobody")),
    ({"root": ("root@vm.example.com",)}, ("root", "alias loop: root -> root")),
    ({"root": ("root@elsewhere.example",)}, None),
])
def test_alias_table_check(aliases: dict[str, tuple[str, ...]],
                           found: tuple[str, str] | None) -> None:
    """The config's check: the first entry that loops or leads nowhere, and why."""
    assert alias_problem(aliases, {"localhost", "vm.example.com"}) == found
