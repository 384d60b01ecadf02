"""The address rules in a real relay: what the upstream receives, the refusals clients
hear, and what the queue keeps (relay.addresses wired into the listener)."""

from __future__ import annotations

import json
import re
import smtplib
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import RelayProcess, relay_config, wait_for
from upstream import Transaction, Upstream

HOSTNAME = "vm.example.com"
BODY = (b"\r\nGr\xc3\xb6\xc3\x9fe: 12 MB\r\n.. a line that starts with a dot\r\n"
        b"From the start of a line\r\n")


def addresses(**values: Any) -> dict[str, Any]:
    return {"hostname": HOSTNAME, "aliases": {"root": "ops@example.com"}, **values}


def delivered(upstream: Upstream, count: int = 1) -> list[Transaction]:
    return wait_for(lambda: upstream.transactions if len(upstream.transactions) >= count
                    else None, what=f"{count} upstream transaction(s)")


def own_headers_removed(data: bytes) -> bytes:
    """The message as the client sent it, after the relay's Received: and Message-ID:."""
    assert data.startswith(b"Received: ")
    rest = data.split(b"\r\n", 1)[1]
    while rest[:1] == b"\t":  # the Received: field's folded lines
        rest = rest.split(b"\r\n", 1)[1]
    first, after = rest.split(b"\r\n", 1)
    if first.startswith(b"Message-ID: <") and first.endswith(b"@vm.example.com>"):
        rest = after
    return rest


def smtp_send(relay: RelayProcess, sender: str, recipients: list[str], message: bytes) -> str:
    with relay.client() as smtp:
        smtp.ehlo()
        code, reply = smtp.mail(sender)
        assert code == 250, reply
        for recipient in recipients:
            code, reply = smtp.rcpt(recipient)
            assert code == 250, reply
        code, reply = smtp.data(message)
    assert code == 250, reply
    match = re.search(rb"queued as ([0-9A-F]+)", reply)
    assert match, reply
    return match.group(1).decode()


@pytest.mark.parametrize("from_field, expected", [
    (b'From: "Doe, John" <root@vm>\r\n',
     (b'From: "Doe, John" <noreply@mg.example.com>\r\n'
      b'Reply-To: "Doe, John" <root@vm.example.com>\r\n')),
    (b"From: =?utf-8?b?QmFja3VwIErDtnJn?=\r\n <backup@localhost>\r\n",
     (b"From: =?utf-8?b?QmFja3VwIErDtnJn?= <noreply@mg.example.com>\r\n"
      b"Reply-To: =?utf-8?b?QmFja3VwIErDtnJn?= <backup@vm.example.com>\r\n")),
    (b"From: Admins: root, Web <www-data@vm>;, app@mg.example.com\r\n",
     (b"From: noreply@mg.example.com, app@mg.example.com\r\n"
      b"Reply-To: root@vm.example.com, Web <www-data@vm.example.com>\r\n")),
])
def test_envelope_and_from_rewritten_and_the_rest_byte_for_byte(
        make_relay, upstream: Upstream, ca_file: Path, tmp_path: Path,
        from_field: bytes, expected: bytes) -> None:
    """A local sender outside sender_domains: envelope and From: become default_sender
    (display names, encoded words, groups, several addresses), Reply-To: gets the
    originals, and every other byte arrives as it was sent."""
    relay = make_relay(relay_config(tmp_path, upstream, ca_file, addresses=addresses(
        sender_domains=["mg.example.com"], default_sender="noreply@mg.example.com")))
    header = b"Subject: backup report\r\n" + from_field + b"To: root\r\nX-Mailer: cron\r\n"
    smtp_send(relay, "root@vm", ["root"], header + BODY)
    [transaction] = delivered(upstream)
    assert (transaction.sender, transaction.recipients) == ("noreply@mg.example.com",
                                                           ("ops@example.com",))
    assert own_headers_removed(transaction.data) == (
        b"Subject: backup report\r\n" + expected + b"To: root\r\nX-Mailer: cron\r\n" + BODY)


def test_null_sender_is_never_rewritten(make_relay, upstream: Upstream, ca_file: Path,
                                        tmp_path: Path) -> None:
    """<> stays <> even where every other sender is replaced."""
    relay = make_relay(relay_config(tmp_path, upstream, ca_file, addresses=addresses(
        sender_domains=["mg.example.com"], default_sender="noreply@mg.example.com")))
    smtp_send(relay, "", ["user@example.org"], b"Subject: bounce\r\n" + BODY)
    assert delivered(upstream)[0].sender == ""


def test_sender_outside_domains_is_refused_at_mail(make_relay, tmp_path: Path) -> None:
    """Without default_sender: 553 5.7.1 at MAIL, naming the domain and the keys."""
    relay = make_relay(relay_config(tmp_path, None, None,
                                    addresses=addresses(sender_domains=["mg.example.com"])))
    with relay.client() as smtp:
        smtp.ehlo()
        code, reply = smtp.mail("app@shop.example")
        assert code == 553
        assert reply.startswith(b"5.7.1 Error: sender domain shop.example is not in "
                                b"addresses.sender_domains, and addresses.default_sender")
        assert smtp.mail("app@mg.example.com")[0] == 250


def test_unknown_local_recipient_is_refused_at_rcpt(make_relay, tmp_path: Path) -> None:
    """A local name without an alias: 550 5.1.1 naming addresses.aliases; the other
    recipients of the transaction go on."""
    relay = make_relay(relay_config(tmp_path, None, None, addresses=addresses()))
    with relay.client() as smtp:
        smtp.ehlo()
        smtp.mail("app@example.org")
        code, reply = smtp.rcpt("nobody@localhost")
        assert code == 550
        assert reply.startswith(b"5.1.1 <nobody@localhost>: no such local recipient: "
                                b"addresses.aliases has no entry for nobody")
        assert smtp.rcpt("user@example.org")[0] == 250


@pytest.mark.parametrize("postmaster", ["<Postmaster>", "<POSTMASTER>", "<postmaster@vm>"])
def test_postmaster_is_always_accepted(make_relay, upstream: Upstream, ca_file: Path,
                                       tmp_path: Path, postmaster: str) -> None:
    """RFC 5321 4.1.1.3: <Postmaster> in any case; it goes to root's alias here."""
    relay = make_relay(relay_config(tmp_path, upstream, ca_file, addresses=addresses()))
    with relay.client() as smtp:
        smtp.ehlo()
        smtp.mail("app@example.org")
        assert smtp.docmd(f"RCPT TO:{postmaster}")[0] == 250
        assert smtp.data(b"Subject: hello postmaster\r\n" + BODY)[0] == 250
    assert delivered(upstream)[0].recipients == ("ops@example.com",)


def test_alias_list_reaches_every_address_once(make_relay, upstream: Upstream,
                                               ca_file: Path, tmp_path: Path) -> None:
    """An alias to a list, one of them another alias: each final address once."""
    relay = make_relay(relay_config(tmp_path, upstream, ca_file, addresses=addresses(
        aliases={"root": ["a@example.com", "admin", "b@example.com"],
                 "admin": ["c@example.com", "a@example.com"]})))
    smtp_send(relay, "app@example.org", ["root", "ADMIN"], b"Subject: list\r\n" + BODY)
    assert delivered(upstream)[0].recipients == ("a@example.com", "c@example.com",
                                                 "b@example.com")


def test_alias_loop_stops_the_relay_before_it_listens(tmp_path: Path) -> None:
    """A loop in the aliases: exit 78 naming the alias, never a lookup that spins."""
    config = relay_config(tmp_path, None, None, addresses=addresses(
        aliases={"root": "admin", "admin": ["ops@example.com", "root"]}))
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    result = subprocess.run([sys.executable, "-m", "relay", "serve", "--config", str(path)],
                            check=False, capture_output=True, text=True, timeout=30)
    assert result.returncode == 78
    assert "addresses.aliases.root: alias loop: root -> admin -> root" in result.stderr
    assert "listening" not in result.stderr


def test_redirect_to_replaces_every_recipient(make_relay, upstream: Upstream,
                                              ca_file: Path, tmp_path: Path) -> None:
    """Staging: one recipient upstream, the original ones in X-Original-To:."""
    relay = make_relay(relay_config(tmp_path, upstream, ca_file, addresses=addresses(
        redirect_to="staging@example.com")))
    message = b"From: app@example.org\r\nSubject: welcome\r\n" + BODY
    smtp_send(relay, "app@example.org", ["customer@example.net", "root"], message)
    [transaction] = delivered(upstream)
    assert transaction.recipients == ("staging@example.com",)
    assert own_headers_removed(transaction.data) == (
        b"X-Original-To: customer@example.net, root\r\n" + message)


def test_queue_show_lists_original_and_rewritten_addresses(make_relay,
                                                           tmp_path: Path) -> None:
    """The queue entry records both envelopes; show and --json list them."""
    relay = make_relay(relay_config(tmp_path, None, None, addresses=addresses(
        sender_domains=["mg.example.com"], default_sender="noreply@mg.example.com")))
    entry_id = smtp_send(relay, "root", ["root", "user@example.org"],
                         b"Subject: s\r\n" + BODY)
    wait_for(lambda: entry_id in relay.files("deferred"), what="the entry")
    shown = relay.cli("queue", "show", entry_id)
    assert shown.returncode == 0, shown.stderr
    assert "Sender:       <noreply@mg.example.com> (rewritten from <root>)" in shown.stdout
    assert "Recipients:   (rewritten from root, user@example.org)" in shown.stdout
    assert re.search(r"\n  ops@example.com\s+pending", shown.stdout)
    data = json.loads(relay.cli("queue", "show", entry_id, "--json").stdout)
    assert (data["sender"], data["original_sender"]) == ("noreply@mg.example.com", "root")
    assert [r["address"] for r in data["recipients"]] == ["ops@example.com",
                                                          "user@example.org"]
    assert data["original_recipients"] == ["root", "user@example.org"]


def test_queued_mail_keeps_the_rules_it_was_received_under(
        make_relay, upstream: Upstream, ca_file: Path, tmp_path: Path) -> None:
    """A reload with other aliases changes new mail only: a queued message goes where
    the rules sent it when it arrived."""
    relay = make_relay(relay_config(tmp_path, None, None, addresses=addresses()))
    queued = smtp_send(relay, "app@example.org", ["root"], b"Subject: before\r\n" + BODY)
    wait_for(lambda: queued in relay.files("deferred"), what="the entry")
    relay.reload(relay_config(tmp_path, upstream, ca_file, addresses=addresses(
        aliases={"root": "new-ops@example.com"})))
    smtp_send(relay, "app@example.org", ["root"], b"Subject: after\r\n" + BODY)
    relay.cli("queue", "flush")
    transactions = delivered(upstream, 2)
    recipients = {t.data.split(b"Subject: ")[1].split(b"\r\n")[0]: t.recipients
                  for t in transactions}
    assert recipients == {b"before": ("ops@example.com",), b"after": ("new-ops@example.com",)}


def test_refused_sender_leaves_nothing_queued(make_relay, tmp_path: Path) -> None:
    """A refusal at MAIL stores nothing: the client keeps the message and knows why."""
    relay = make_relay(relay_config(tmp_path, None, None,
                                    addresses=addresses(sender_domains=["mg.example.com"])))
    with pytest.raises(smtplib.SMTPSenderRefused), relay.client() as smtp:
        smtp.sendmail("root", ["user@example.org"], b"Subject: s\r\n" + BODY)
    assert relay.queued() == []
