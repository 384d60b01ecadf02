"""Bounce notices through a real `relay serve` and the test upstream: who gets them, that
they go from <> through the relay's own queue, never for <> or a notice, never twice, and
the rate limit; and the pure rules beside them."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage, Message
from pathlib import Path
from typing import Any

import pytest
from conftest import MakeRelay, RelayProcess, relay_config, wait_for
from metrics_text import samples, value
from upstream import Transaction, Upstream

from relay.bounces import RateLimit, notice_recipient
from relay.config import BouncesConfig
from relay.entry import Entry, Queue, Recipient

BODY = b"Subject: invoice 42\r\nMessage-ID: <b@example.com>\r\n\r\nHello.\r\n"


def bounce_config(tmp_path: Path, upstream: Upstream, ca_file: Path,
                  **bounces: Any) -> dict[str, Any]:
    return relay_config(tmp_path, upstream, ca_file, metrics={"port": 0},
                        bounces={"notify": "sender", **bounces},
                        delivery={"retry_min": "1h", "retry_max": "1h"})


def settled(relay: RelayProcess, entry_id: str) -> None:
    """Wait for the entry's failure to be logged: its notice, if any, is stored by then."""
    wait_for(lambda: f"{entry_id}: status=failed" in relay.log(), what=f"{entry_id} to fail")


def notices(upstream: Upstream) -> list[Transaction]:
    return [t for t in upstream.messages() if t.sender == ""]


def parsed(transaction: Transaction) -> EmailMessage:
    message = email.message_from_bytes(transaction.data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def status_blocks(message: EmailMessage) -> list[Message]:
    """The message/delivery-status part's blocks: per message, then per recipient."""
    payload = list(message.iter_parts())[1].get_payload()
    assert isinstance(payload, list)
    return [block for block in payload if isinstance(block, Message)]


def bounce_lines(relay: RelayProcess) -> list[str]:
    return [line for line in relay.lines if "event=bounce" in line]


def test_failed_recipient_notifies_the_sender_from_the_null_sender(
        make_relay: MakeRelay, upstream: Upstream, ca_file: Path, tmp_path: Path) -> None:
    """550 to the only recipient: one notice, MAIL FROM:<> to the original sender, through
    the upstream, reporting that recipient; the state record names the notice."""
    relay = make_relay(bounce_config(tmp_path, upstream, ca_file))
    entry_id = relay.send("app@example.com", ["reject@example.com"], BODY)
    [notice] = wait_for(lambda: notices(upstream), what="the notice")
    assert notice.recipients == ("app@example.com",)
    message = parsed(notice)
    assert message.get_content_type() == "multipart/report"
    blocks = status_blocks(message)
    assert blocks[0]["X-Relay-Queue-ID"] == entry_id
    assert blocks[1]["Final-Recipient"] == "rfc822; reject@example.com"
    assert (blocks[1]["Action"], blocks[1]["Status"]) == ("failed", "5.1.1")
    assert blocks[1]["Diagnostic-Code"] == "smtp; 550 5.1.1 No such user"
    headers = list(message.iter_parts())[2].get_content()
    assert "Subject: invoice 42" in headers and "Hello." not in headers
    notice_id = relay.state(entry_id)["notice"]
    assert message["Message-ID"].startswith(f"<{notice_id}@")
    assert (f"{entry_id}: event=bounce, to=<app@example.com>, notice={notice_id}, "
            f"status=queued") in relay.log()
    wait_for(lambda: f"{notice_id}: status=removed" in relay.log(), what="the notice sent")
    found = samples(relay.get("/metrics")[1])
    assert value(found, "relay_bounces_total", outcome="queued") == 1


def test_one_notice_covers_every_failed_recipient(
        make_relay: MakeRelay, upstream: Upstream, ca_file: Path, tmp_path: Path) -> None:
    """Two refused and one sent: one notice with two recipient blocks."""
    relay = make_relay(bounce_config(tmp_path, upstream, ca_file))
    relay.send("app@example.com", ["reject1@example.com", "ok@example.com",
                                   "reject2@example.com"], BODY)
    [notice] = wait_for(lambda: notices(upstream), what="the notice")
    blocks = status_blocks(parsed(notice))
    assert [b["Final-Recipient"] for b in blocks[1:]] == [
        "rfc822; reject1@example.com", "rfc822; reject2@example.com"]


def test_expired_message_notice_says_4_4_7(make_relay: MakeRelay, upstream: Upstream,
        ca_file: Path, tmp_path: Path) -> None:
    """Out of attempts (max_attempts 1, a 451): the notice's Status is 4.4.7."""
    config = bounce_config(tmp_path, upstream, ca_file)
    config["delivery"]["max_attempts"] = 1
    relay = make_relay(config)
    relay.send("app@example.com", ["tempfail@example.com"], BODY)
    [notice] = wait_for(lambda: notices(upstream), what="the notice")
    blocks = status_blocks(parsed(notice))
    assert blocks[1]["Status"] == "4.4.7"
    assert blocks[1]["Diagnostic-Code"] == "smtp; 451 4.2.0 Mailbox busy, try later"


@pytest.mark.plan(15, 86)
def test_no_notice_for_a_null_sender(make_relay: MakeRelay, upstream: Upstream,
        ca_file: Path, tmp_path: Path) -> None:
    """A message from <> that fails makes no notice: nothing queued, nothing logged."""
    relay = make_relay(bounce_config(tmp_path, upstream, ca_file))
    entry_id = relay.send("<>", ["reject@example.com"], BODY)
    settled(relay, entry_id)
    assert bounce_lines(relay) == []
    assert relay.queued() == [] and relay.files("failed") == [entry_id]
    assert relay.state(entry_id)["notice"] is None


def test_notify_an_address_sends_every_notice_there(
        make_relay: MakeRelay, upstream: Upstream, ca_file: Path, tmp_path: Path) -> None:
    """notify: ops@example.com and a from: the notice goes there, from that address."""
    relay = make_relay(bounce_config(tmp_path, upstream, ca_file, notify="ops@example.com",
                                     **{"from": "relay@example.com"}))
    relay.send("app@example.com", ["reject@example.com"], BODY)
    [notice] = wait_for(lambda: notices(upstream), what="the notice")
    assert notice.recipients == ("ops@example.com",)
    message = parsed(notice)
    assert message["To"] == "ops@example.com"
    assert message["From"].addresses[0].addr_spec == "relay@example.com"


@pytest.mark.plan(86)
def test_notices_over_the_hourly_limit_are_counted_and_logged(
        make_relay: MakeRelay, upstream: Upstream, ca_file: Path, tmp_path: Path) -> None:
    """max_per_hour 2 and three failures to notify one address: two notices, one
    suppressed, counted as rate_limited."""
    relay = make_relay(bounce_config(tmp_path, upstream, ca_file, max_per_hour=2))
    ids = [relay.send("app@example.com", ["reject@example.com"], BODY) for _ in range(3)]
    for entry_id in ids:
        settled(relay, entry_id)
    assert len([line for line in bounce_lines(relay) if "status=queued" in line]) == 2
    [suppressed] = [line for line in bounce_lines(relay) if "status=suppressed" in line]
    assert "bounces.max_per_hour (2)" in suppressed
    found = samples(relay.get("/metrics")[1])
    assert value(found, "relay_bounces_total", outcome="rate_limited") == 1
    assert value(found, "relay_bounces_total", outcome="queued") == 2
    wait_for(lambda: len(notices(upstream)) == 2, what="two notices delivered")


@pytest.mark.plan(86)
def test_a_notice_that_fails_makes_no_notice(make_relay: MakeRelay, upstream: Upstream,
        ca_file: Path, tmp_path: Path) -> None:
    """The notice to reject-ops@ is refused in turn: it fails from <>, and that is the end."""
    relay = make_relay(bounce_config(tmp_path, upstream, ca_file,
                                     notify="reject-ops@example.com"))
    entry_id = relay.send("app@example.com", ["reject@example.com"], BODY)
    settled(relay, entry_id)
    notice_id = relay.state(entry_id)["notice"]
    settled(relay, notice_id)
    assert len(bounce_lines(relay)) == 1
    assert sorted(relay.files("failed")) == sorted([entry_id, notice_id])
    assert relay.queued() == []


@pytest.mark.plan(86)
def test_requeued_message_failing_again_gets_no_second_notice(
        make_relay: MakeRelay, upstream: Upstream, ca_file: Path, tmp_path: Path) -> None:
    """Never more than once per message: after `relay queue requeue` and a second
    failure, the state still names the first notice and no other is queued."""
    relay = make_relay(bounce_config(tmp_path, upstream, ca_file))
    entry_id = relay.send("app@example.com", ["reject@example.com"], BODY)
    settled(relay, entry_id)
    first = relay.state(entry_id)["notice"]
    assert relay.cli("queue", "requeue", entry_id).returncode == 0
    wait_for(lambda: relay.log().count(f"{entry_id}: status=failed") == 2,
             what="the second failure")
    assert relay.state(entry_id)["notice"] == first
    assert len(bounce_lines(relay)) == 1


# --- the pure rules ---------------------------------------------------------------------

def test_rate_limit_allows_the_limit_per_key_within_the_window() -> None:
    """Two per hour: the third is refused, another address is not, and an hour later the
    first address may have one again."""
    limit = RateLimit(2, window=3600.0)
    assert limit.allow("a@example.com", 0.0) and limit.allow("a@example.com", 10.0)
    assert not limit.allow("a@example.com", 20.0)
    assert limit.allow("b@example.com", 20.0)
    assert limit.allow("a@example.com", 3600.5)
    assert not limit.allow("a@example.com", 3601.0)


def test_notice_recipient_follows_notify_and_skips_the_null_sender() -> None:
    entry = Entry(id="0000000000001DEADBEEF", queue=Queue.FAILED, sender="app@example.com",
                  recipients=(Recipient("r@example.com"),), arrived=0.0, size=1)
    null = Entry(id=entry.id, queue=Queue.FAILED, sender="", recipients=entry.recipients,
                 arrived=0.0, size=1)
    assert notice_recipient(BouncesConfig(), entry) is None
    assert notice_recipient(BouncesConfig(notify="sender"), entry) == "app@example.com"
    assert notice_recipient(BouncesConfig(notify="ops@example.com"), entry) == "ops@example.com"
    assert notice_recipient(BouncesConfig(notify="ops@example.com"), null) is None
