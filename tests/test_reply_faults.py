"""Upstream replies that are not what the relay expects (issue 19, findings 1, 2 and 6):
bytes that are not UTF-8, replies out of step with the commands, and refused credentials
on a new session opened halfway through an attempt. Each is kept, matched or classified
so that no recipient is sent twice and none is failed for another's reply."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from conftest import RelayProcess, relay_config, wait_for
from upstream import PASSWORD, USERNAME, Upstream

from relay.config import UpstreamConfig
from relay.outcome import AttemptResult, Stage
from relay.policy import credentials_rejected
from relay.smtp_client import UpstreamSession, make_tls_context

BODY = b"Subject: replies\r\nMessage-ID: <replies@example.com>\r\n\r\nbody\r\n"


def attempts(relay: RelayProcess, entry_id: str) -> int:
    return len(relay.state(entry_id).get("attempts", []))


@pytest.mark.plan(107)
def test_a_latin1_reply_is_recorded_escaped_and_the_accepted_recipient_gets_one_copy(
        relay: RelayProcess, upstream: Upstream) -> None:
    """450 with a Latin-1 byte to one recipient, 250 to the other: each attempt is recorded
    (the byte kept as \\xee), the busy recipient is retried, the other is sent once."""
    upstream.rcpt_replies["busy@example.com"] = b"450 4.2.1 bo\xeete pleine"
    entry_id = relay.send("app@example.com", ["busy@example.com", "ok@example.com"], BODY)
    wait_for(lambda: attempts(relay, entry_id) >= 3, what="three recorded attempts")
    assert len(upstream.delivered_to("ok@example.com")) == 1
    busy, ok = relay.state(entry_id)["recipients"]
    assert busy == {"status": "pending", "reply": "450 4.2.1 bo\\xeete pleine"}
    assert ok["status"] == "sent"
    shown = relay.cli("queue", "show", entry_id)
    assert "450 4.2.1 bo\\xeete pleine" in shown.stdout


@pytest.mark.plan(107)
def test_a_latin1_refusal_fails_its_recipient_with_the_reply_kept(
        relay: RelayProcess, upstream: Upstream) -> None:
    """550 with Latin-1 text: the entry fails at once, its reply kept and printable."""
    upstream.rcpt_replies["gone@example.com"] = b"550 5.1.1 Empf\xe4nger unbekannt"
    entry_id = relay.send("app@example.com", ["gone@example.com"], BODY)
    wait_for(lambda: entry_id in relay.files("failed"), what="the failure")
    [gone] = relay.state(entry_id)["recipients"]
    assert gone == {"status": "failed", "reply": "550 5.1.1 Empf\\xe4nger unbekannt"}


@pytest.mark.plan(108)
def test_an_extra_reply_to_mail_defers_the_whole_transaction(
        tmp_path: Path, make_relay, upstream: Upstream, ca_file: Path) -> None:
    """One 250 too many after MAIL shifts every later reply: the relay notices, marks no
    recipient sent or failed, and defers; on the retry each gets its own reply."""
    upstream.extra_replies = 1
    relay = make_relay(relay_config(tmp_path, upstream, ca_file,
                                    upstream={"connections": 1}))
    entry_id = relay.send("app@example.com", ["ok@example.com", "reject@example.com"], BODY)
    wait_for(lambda: attempts(relay, entry_id) >= 1, what="the first attempt")
    first = relay.state(entry_id)
    assert "out of step" in first["attempts"][0]["reply"]
    assert [r["status"] for r in first["recipients"]] == ["pending", "pending"]
    wait_for(lambda: entry_id in relay.files("failed"), what="the retry's outcome")
    assert [r["status"] for r in relay.state(entry_id)["recipients"]] == ["sent", "failed"]
    assert len(upstream.delivered_to("ok@example.com")) == 1


@pytest.mark.plan(108)
def test_an_extra_reply_to_mail_without_pipelining_defers_too(
        tmp_path: Path, make_relay, make_upstream, ca_file: Path) -> None:
    """The same, one command at a time: the reply left over is seen before the next
    command goes out, and nothing is marked."""
    upstream = make_upstream(pipelining=False)
    upstream.extra_replies = 1
    relay = make_relay(relay_config(tmp_path, upstream, ca_file,
                                    upstream={"connections": 1}))
    entry_id = relay.send("app@example.com", ["ok@example.com", "reject@example.com"], BODY)
    wait_for(lambda: attempts(relay, entry_id) >= 1, what="the first attempt")
    first = relay.state(entry_id)
    assert "out of step" in first["attempts"][0]["reply"]
    assert [r["status"] for r in first["recipients"]] == ["pending", "pending"]
    wait_for(lambda: entry_id in relay.files("failed"), what="the retry's outcome")
    assert len(upstream.delivered_to("ok@example.com")) == 1


@pytest.mark.plan(112)
def test_refused_credentials_on_a_reconnect_are_classified_as_auth(
        upstream: Upstream, ca_file: Path) -> None:
    """A reused session found dead at MAIL is replaced at once; if the new one is refused
    at AUTH (535), the attempt says so (stage AUTH), so that delivery pauses as it does
    for a first login."""
    config = UpstreamConfig(host="127.0.0.1", port=upstream.port, ca_file=ca_file,
                            username=USERNAME, password=PASSWORD, timeout=5)

    async def scenario() -> AttemptResult:
        session = UpstreamSession(config, make_tls_context(config))
        try:
            first = await session.deliver("app@example.com", ["first@example.com"], BODY,
                                          False)
            assert first.error is None
            upstream.password = "rotated-at-the-provider"
            upstream.abort_next_mail = True
            return await session.deliver("app@example.com", ["second@example.com"], BODY,
                                         False)
        finally:
            await session.close()
    result = asyncio.run(scenario())
    assert upstream.connections == 2  # the second message went to a new session
    assert result.error is not None and result.error.code == 535
    assert result.stage is Stage.AUTH and credentials_rejected(result)
