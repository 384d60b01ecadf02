"""The ways in to scheduled delivery through the listener: ESMTP FUTURERELEASE (RFC 4865),
the X-Relay-Send-At header, and `relay sendmail --send-at/--send-in`; their refusals."""

from __future__ import annotations

import json
import smtplib
import time
from pathlib import Path

import pytest
from conftest import RelayProcess, holds_for, relay_config, wait_for
from upstream import Upstream

from relay.schedule import rfc3339

BODY = b"Subject: later\r\n\r\nSee you soon.\r\n"


@pytest.fixture
def holding_relay(make_relay, tmp_path: Path) -> RelayProcess:
    """A relay without upstream: whatever it accepts stays in its spool for inspection."""
    return make_relay(relay_config(tmp_path, None, None))


def entry(relay: RelayProcess, entry_id: str) -> dict[str, object]:
    shown = relay.cli("queue", "show", entry_id, "--json")
    assert shown.returncode == 0, shown.stderr
    return json.loads(shown.stdout)


def send(relay: RelayProcess, options: list[str], body: bytes = BODY) -> tuple[int, bytes]:
    """One message with MAIL parameters `options`: the reply to MAIL, else to DATA."""
    with relay.client() as smtp:
        smtp.ehlo()
        code, reply = smtp.mail("app@example.com", options)
        if code != 250:
            return code, reply
        smtp.rcpt("user@example.com")
        return smtp.data(body)


def queued_id(reply: bytes) -> str:
    return reply.rsplit(b" ", 1)[1].decode()


def test_ehlo_advertises_futurerelease_with_the_limit(holding_relay: RelayProcess) -> None:
    """RFC 4865 4.1: the longest hold in seconds and the latest release time."""
    with holding_relay.client() as smtp:
        smtp.ehlo()
        interval, latest = smtp.esmtp_features["futurerelease"].split()
    assert interval == str(30 * 86400)
    assert abs(time.mktime(time.strptime(latest, "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
               - (time.time() + 30 * 86400)) < 5


@pytest.mark.parametrize("parameter", ["HOLDFOR=3600", "holdfor=3600", "HOLDUNTIL={}"])
def test_a_held_message_waits_in_the_scheduled_state(holding_relay: RelayProcess,
                                                    parameter: str) -> None:
    """HOLDFOR or HOLDUNTIL an hour ahead: queued as scheduled, its send time recorded."""
    parameter = parameter.format(rfc3339(time.time() + 3600))
    code, reply = send(holding_relay, [parameter])
    assert code == 250, reply
    shown = entry(holding_relay, queued_id(reply))
    assert shown["state"] == "scheduled"
    send_at = time.mktime(time.strptime(str(shown["send_at"]), "%Y-%m-%dT%H:%M:%SZ")) \
        - time.timezone
    assert abs(send_at - (time.time() + 3600)) < 60


@pytest.mark.parametrize(("parameters", "fragment"), [
    (["HOLDFOR=99999999"], b"beyond the limit"),
    (["HOLDFOR=soon"], b"number of seconds"),
    (["HOLDUNTIL=tomorrow"], b"RFC 3339"),
    (["HOLDFOR=60", "HOLDUNTIL=2030-01-01T00:00:00Z"], b"cannot both"),
])
def test_a_hold_that_cannot_be_honoured_gets_501(holding_relay: RelayProcess,
                                                 parameters: list[str], fragment: bytes) -> None:
    """RFC 4865's 501 5.5.4, naming what is wrong; nothing is queued."""
    code, reply = send(holding_relay, parameters)
    assert (code, reply[:5]) == (501, b"5.5.4") and fragment in reply
    assert holding_relay.queued() == [] and holding_relay.files("scheduled") == []


def test_a_hold_until_a_time_past_is_sent_now(relay: RelayProcess, upstream: Upstream) -> None:
    """HOLDUNTIL an hour ago: not scheduled, relayed at once."""
    code, _ = send(relay, [f"HOLDUNTIL={rfc3339(time.time() - 3600)}"])
    assert code == 250
    wait_for(lambda: upstream.delivered_to("user@example.com"), what="the delivery")


def test_the_send_at_header_schedules_and_is_removed(relay: RelayProcess,
                                                     upstream: Upstream) -> None:
    """X-Relay-Send-At two seconds ahead: nothing reaches the upstream before then, the
    message does after, and without the header."""
    send_at = time.time() + 2
    when = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime(send_at + 1))
    body = f"X-Relay-Send-At: {when}\r\nSubject: later\r\n\r\nSee you soon.\r\n".encode()
    code, _ = send(relay, [], body)
    assert code == 250
    holds_for(lambda: not upstream.delivered_to("user@example.com"), send_at - time.time(),
              what="nothing before the send time")
    [delivered] = wait_for(lambda: upstream.delivered_to("user@example.com"), what="delivery")
    assert b"X-Relay-Send-At" not in delivered.data and b"Subject: later" in delivered.data


@pytest.mark.parametrize("way", ["HOLDFOR", "HOLDUNTIL", "sendmail --send-at",
                                 "sendmail --send-in"])
def test_each_way_in_holds_until_its_time_then_sends(relay: RelayProcess, upstream: Upstream,
                                                     way: str) -> None:
    """Two or three seconds ahead, by each way in: nothing reaches the upstream before the
    time, and the message does after it."""
    send_at = float(int(time.time()) + 3)  # a whole second: RFC 3339 times are written so
    if way.startswith("sendmail"):
        option = ["--send-at", rfc3339(send_at)] if way.endswith("at") else ["--send-in", "3s"]
        result = relay.cli("sendmail", *option, "user@example.com", stdin=BODY)
        assert result.returncode == 0, result.stderr
    else:
        parameter = ("HOLDFOR=3" if way == "HOLDFOR" else f"HOLDUNTIL={rfc3339(send_at)}")
        code, reply = send(relay, [parameter])
        assert code == 250, reply
    holds_for(lambda: not upstream.delivered_to("user@example.com"),
              send_at - time.time() - 0.5, what="nothing before the send time")
    wait_for(lambda: upstream.delivered_to("user@example.com"), what="the delivery")


def test_an_unreadable_send_at_header_gets_554_naming_it(holding_relay: RelayProcess) -> None:
    code, reply = send(holding_relay, [], b"X-Relay-Send-At: next tuesday\r\n\r\nx\r\n")
    assert (code, reply[:5]) == (554, b"5.6.0") and b"X-Relay-Send-At" in reply
    assert holding_relay.queued() == [] and holding_relay.files("scheduled") == []


def test_sendmail_send_in_holds_the_message(holding_relay: RelayProcess) -> None:
    """`relay sendmail --send-in 2h`: the listener holds it, as HOLDUNTIL asks."""
    result = holding_relay.cli("sendmail", "--send-in", "2h", "-v", "user@example.com",
                               stdin=BODY)
    assert result.returncode == 0, result.stderr
    shown = entry(holding_relay, result.stdout.split()[-1])
    assert shown["state"] == "scheduled"


def test_a_sender_no_upstream_carries_is_refused_at_mail(make_relay, tmp_path: Path,
                                                         upstream: Upstream,
                                                         ca_file: Path) -> None:
    """With every upstream limited to sender domains, another domain gets 553 5.7.1 naming
    it; a sender of a listed domain is accepted."""
    config = relay_config(tmp_path, upstream, ca_file)
    config["upstream"]["sender_domains"] = ["mg.example.com"]
    relay_process = make_relay(config)
    with relay_process.client() as smtp:
        smtp.ehlo()
        code, reply = smtp.mail("app@other.example")
        assert (code, reply[:5]) == (553, b"5.7.1") and b"other.example" in reply
        assert smtp.mail("app@mg.example.com")[0] == 250


def test_holdfor_needs_ehlo(holding_relay: RelayProcess) -> None:
    """ESMTP parameters after HELO are a syntax error, as aiosmtpd answers them."""
    with smtplib.SMTP("127.0.0.1", holding_relay.port, timeout=10) as smtp:
        smtp.helo()
        code, _ = smtp.docmd("MAIL FROM:<app@example.com> HOLDFOR=60")
    assert code == 501
