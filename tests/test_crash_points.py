"""SIGKILL at each named step of ingest and delivery, then restart (docs/RELIABILITY-PLAN.md
#35, #83).

Expected, per the plan: killed before the rename, the client never heard 250 and nothing
is queued; killed after the rename but before 250, the message is queued and delivered
(the client, which saw a reset, may send it again: at most one duplicate); killed around
the upstream's reply, the message reaches the upstream once or twice, never zero times.
"""

from __future__ import annotations

import signal
import smtplib
from pathlib import Path

import pytest
from conftest import relay_config, wait_for
from upstream import Upstream

BODY = b"Subject: crash\r\nMessage-ID: <crash@example.com>\r\n\r\nbody\r\n"


def submit(port: int) -> bool:
    """True if the relay answered 250; False if it died during the transaction."""
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            smtp.sendmail("app@example.com", ["user@example.com"], BODY)
        return True
    except (smtplib.SMTPServerDisconnected, ConnectionError):
        return False


@pytest.mark.plan(35)
@pytest.mark.parametrize("point, queued_after", [
    ("before-spool-write", False),
    ("after-fsync-before-rename", False),
    ("after-rename-before-250", True),
])
def test_kill_during_ingest(tmp_path: Path, make_relay, upstream: Upstream, ca_file: Path,
                            point: str, queued_after: bool) -> None:
    """No 250 is ever heard; the message exists after restart exactly when it was published."""
    config = relay_config(tmp_path, upstream, ca_file)
    doomed = make_relay(config, env={"RELAY_CRASH_AT": point})
    assert submit(doomed.port) is False
    assert doomed.process is not None and doomed.process.wait(timeout=10) == -signal.SIGKILL
    restarted = make_relay(config)
    assert restarted.debris() == []
    if queued_after:
        [got] = wait_for(lambda: upstream.delivered_to("user@example.com"), what="delivery")
        assert b"Message-ID: <crash@example.com>" in got.data
    else:
        assert restarted.files("incoming") + restarted.files("deferred") == []
        assert upstream.messages() == []


@pytest.mark.plan(83)
def test_kill_after_upstream_reply_before_state_update_resends_once(
        tmp_path: Path, make_relay, upstream: Upstream, ca_file: Path) -> None:
    """The upstream took the message but the spool never heard: after restart it is sent
    again. That one duplicate is the contract's only allowed one."""
    config = relay_config(tmp_path, upstream, ca_file)
    doomed = make_relay(config, env={"RELAY_CRASH_AT": "after-upstream-reply-before-state"})
    assert submit(doomed.port) is True
    assert doomed.process is not None and doomed.process.wait(timeout=10) == -signal.SIGKILL
    assert len(upstream.messages()) == 1
    make_relay(config)
    wait_for(lambda: len(upstream.messages()) == 2, what="the resend after restart")


@pytest.mark.plan(40, 83)
def test_kill_after_final_dot_before_the_reply(tmp_path: Path, make_relay, upstream: Upstream,
                                               ca_file: Path) -> None:
    """Killed while the upstream holds the final dot (it replies later, to a dead socket):
    after restart the message arrives again, so the upstream has it once or twice."""
    upstream.data_delay = 1.0
    config = relay_config(tmp_path, upstream, ca_file)
    doomed = make_relay(config)
    assert submit(doomed.port) is True
    assert upstream.data_started.wait(timeout=15)
    doomed.kill()
    upstream.data_delay = 0.0
    restarted = make_relay(config)
    wait_for(lambda: upstream.delivered_to("user@example.com"), what="delivery after restart")
    wait_for(lambda: not (restarted.files("incoming") + restarted.files("deferred")
                          + restarted.files("active")), what="the queue to empty")
    # The resend, plus the dead session's copy if the upstream kept it (aiosmtpd drops a
    # transaction whose client vanished; a real provider may not).
    assert 1 <= len(upstream.delivered_to("user@example.com")) <= 2


@pytest.mark.plan(40, 44)
def test_recipient_sent_before_a_kill_is_not_sent_again(tmp_path: Path, make_relay,
                                                        upstream: Upstream, ca_file: Path) -> None:
    """One recipient delivered, one deferred; SIGKILL; restart: only the deferred one is
    sent, and the entry is never stuck as busy."""
    upstream.rcpt_replies["later@example.com"] = "451 4.2.0 Mailbox busy, try later"
    config = relay_config(tmp_path, upstream, ca_file, delivery={"retry_min": "1s"})
    relay = make_relay(config)
    entry_id = relay.send("app@example.com", ["now@example.com", "later@example.com"], BODY)
    wait_for(lambda: entry_id in relay.files("deferred"), what="the partial delivery")
    relay.kill()
    del upstream.rcpt_replies["later@example.com"]
    restarted = make_relay(config)
    wait_for(lambda: upstream.delivered_to("later@example.com"), what="the pending recipient")
    wait_for(lambda: f"{entry_id}: status=removed" in restarted.log(), what="the removal")
    assert len(upstream.delivered_to("now@example.com")) == 1
    assert [t.recipients for t in upstream.messages()] == [("now@example.com",),
                                                           ("later@example.com",)]
