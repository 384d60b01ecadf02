"""End to end: a real relay process delivering to a real STARTTLS + AUTH upstream."""

from __future__ import annotations

import json
import smtplib
from pathlib import Path

import pytest
from conftest import RelayProcess, relay_config, wait_for
from upstream import Upstream, secret_forms

from relay.tuning import INLINE_READ_BYTES

BODY = (b"From: app@example.com\r\nTo: user@example.com\r\nSubject: hello\r\n"
        b"Message-ID: <m1@example.com>\r\n\r\nHello there.\r\n")


def strip_received(data: bytes) -> tuple[bytes, bytes]:
    """Split our prepended Received: header (with its folded lines) from the rest."""
    assert data.startswith(b"Received: ")
    lines = data.split(b"\r\n")
    end = 1
    while lines[end].startswith((b"\t", b" ")):
        end += 1
    return b"\r\n".join(lines[:end]) + b"\r\n", b"\r\n".join(lines[end:])


def state_of(relay: RelayProcess, entry_id: str) -> dict:
    return json.loads((relay.spool / "state" / entry_id).read_text())


@pytest.mark.plan(45)
def test_message_is_relayed_byte_for_byte_over_starttls_with_auth(relay: RelayProcess,
                                                                   upstream: Upstream) -> None:
    """The upstream gets the exact bytes sent, after one prepended Received: header."""
    entry_id = relay.send("app@example.com", ["user@example.com"], BODY)
    [got] = wait_for(lambda: upstream.delivered_to("user@example.com"), what="delivery")
    received, rest = strip_received(got.data)
    assert rest == BODY
    assert entry_id.encode() in received
    assert got.sender == "app@example.com"
    assert got.tls and got.authenticated
    # The relay logs after the upstream's reply and the spool update: wait for the line.
    wait_for(lambda: f"{entry_id}: status=removed" in relay.log(), what="the removal")
    assert not relay.files("active") and not relay.files("incoming")
    assert f"{entry_id}: to=<user@example.com>, relay=127.0.0.1:{upstream.port}" in relay.log()
    assert "status=sent (250 2.0.0 Ok: queued upstream)" in relay.log()


@pytest.mark.plan(16, 17, 20)
def test_8bit_body_utf8_addresses_and_leading_dots_survive(relay: RelayProcess,
                                                           upstream: Upstream) -> None:
    """8-bit content, SMTPUTF8 addresses and lines starting with a dot arrive unchanged."""
    body = ("Subject: caf\u00e9\r\nMessage-ID: <8bit@example.com>\r\n\r\n"
            ".\r\n..two dots\r\n.leading dot\r\nna\u00efve \u2603\r\n").encode()
    with relay.client() as smtp:
        smtp.ehlo()
        smtp.mail("exp\u00e9diteur@example.com", options=["SMTPUTF8", "BODY=8BITMIME"])
        code, _ = smtp.rcpt("j\u00fcrgen@b\u00fccher.example")
        assert code == 250
        code, reply = smtp.data(body)
    assert code == 250, reply
    [got] = wait_for(lambda: upstream.delivered_to("j\u00fcrgen@b\u00fccher.example"),
                     what="delivery")
    assert strip_received(got.data)[1] == body
    assert got.sender == "exp\u00e9diteur@example.com"
    assert "SMTPUTF8" in got.mail_options and "BODY=8BITMIME" in got.mail_options


def test_small_and_large_messages_are_relayed_whole(relay: RelayProcess,
                                                     upstream: Upstream) -> None:
    """Contents up to INLINE_READ_BYTES go out from memory on their first attempt (or are
    read on the event loop), larger ones are read in a thread: both reach the upstream
    byte for byte."""
    head = b"Subject: sizes\r\nMessage-ID: <%d@example.com>\r\n\r\n"
    line = b"y" * 998 + b"\r\n"
    bodies = {"small@example.com": head % 1 + line * 4,
              "large@example.com": head % 2 + line * (INLINE_READ_BYTES // len(line) + 50)}
    for recipient, body in bodies.items():
        relay.send("app@example.com", [recipient], body)
    for recipient, body in bodies.items():
        [got] = wait_for(lambda r=recipient: upstream.delivered_to(r), what=recipient)
        assert strip_received(got.data)[1] == body


@pytest.mark.plan(15, 66)
def test_null_sender_is_relayed_as_null_sender(relay: RelayProcess, upstream: Upstream) -> None:
    """MAIL FROM:<> (bounces, auto-replies) is accepted and relayed as <>."""
    relay.send("<>", ["user@example.com"], BODY)
    [got] = wait_for(lambda: upstream.delivered_to("user@example.com"), what="delivery")
    assert got.sender == ""


@pytest.mark.plan(59)
def test_rejected_recipient_fails_alone_and_the_other_is_delivered_once(
        relay: RelayProcess, upstream: Upstream) -> None:
    """550 to one RCPT fails that recipient; the other is delivered exactly once."""
    entry_id = relay.send("app@example.com", ["reject@example.com", "ok@example.com"], BODY)
    wait_for(lambda: relay.files("failed"), what="the entry to fail")
    assert relay.files("failed") == [entry_id]
    assert len(upstream.delivered_to("ok@example.com")) == 1
    assert upstream.delivered_to("reject@example.com") == []
    state = state_of(relay, entry_id)
    assert [r["status"] for r in state["recipients"]] == ["failed", "sent"]
    assert state["recipients"][0]["reply"] == "550 5.1.1 No such user"
    assert len(state["attempts"]) == 1


@pytest.mark.plan(59)
def test_temporary_recipient_is_retried_without_resending_to_the_accepted_one(
        relay: RelayProcess, upstream: Upstream) -> None:
    """A 451 recipient stays pending; retries never send again to the accepted one."""
    entry_id = relay.send("app@example.com", ["tempfail@example.com", "ok@example.com"], BODY)
    wait_for(lambda: len(state_of_if_any(relay, entry_id).get("attempts", [])) >= 3,
             what="three attempts")
    assert len(upstream.delivered_to("ok@example.com")) == 1
    assert relay.files("failed") == []


def state_of_if_any(relay: RelayProcess, entry_id: str) -> dict:
    try:
        return state_of(relay, entry_id)
    except (FileNotFoundError, ValueError):
        return {}


@pytest.mark.plan(68)
def test_two_451_replies_then_delivered(relay: RelayProcess, upstream: Upstream) -> None:
    """DATA answered 451 twice is retried with backoff and then delivered once."""
    upstream.data_replies = ["451 4.3.0 Try again later", "451 4.3.0 Try again later"]
    entry_id = relay.send("app@example.com", ["user@example.com"], BODY)
    [got] = wait_for(lambda: upstream.delivered_to("user@example.com"), what="delivery")
    assert strip_received(got.data)[1] == BODY
    wait_for(lambda: relay.log().count(f"{entry_id}: to=<user@example.com>") == 3,
             what="three attempts logged")
    assert "status=deferred (451 4.3.0 Try again later)" in relay.log()
    wait_for(lambda: not (relay.spool / "state" / entry_id).exists(), what="state removal")


@pytest.mark.plan(46, 89)
def test_upstream_down_at_submit_then_back(tmp_path: Path, make_relay, make_upstream,
                                           ca_file: Path) -> None:
    """With the upstream down the clients still get 250 at once; once it is back the
    backlog drains, each message delivered exactly once."""
    upstream = make_upstream()
    upstream.stop()
    relay = make_relay(relay_config(tmp_path, upstream, ca_file))
    ids = [relay.send("app@example.com", [f"user{n}@example.com"], BODY) for n in range(20)]
    wait_for(lambda: state_of_if_any(relay, ids[0]).get("last_error"), what="a deferral")
    assert "connection failed" in state_of(relay, ids[0])["last_error"]
    upstream.start()
    wait_for(lambda: len(upstream.messages()) == 20, what="the backlog delivered")
    assert all(strip_received(t.data)[1] == BODY for t in upstream.messages())
    assert sorted(r for t in upstream.messages() for r in t.recipients) == \
        sorted(f"user{n}@example.com" for n in range(20))


@pytest.mark.plan(56)
def test_rejected_credentials_defer_and_never_fail(tmp_path: Path, make_relay, make_upstream,
                                                   ca_file: Path) -> None:
    """AUTH rejected is our side's problem: the entry is deferred, not failed."""
    upstream = make_upstream()
    upstream.password = "not-what-the-relay-has"
    relay = make_relay(relay_config(tmp_path, upstream, ca_file))
    entry_id = relay.send("app@example.com", ["user@example.com"], BODY)
    wait_for(lambda: len(state_of_if_any(relay, entry_id).get("attempts", [])) >= 2,
             what="two attempts")
    assert relay.files("failed") == []
    assert state_of(relay, entry_id)["last_error"].startswith("535")
    assert upstream.messages() == [] and upstream.mail_commands == 0


@pytest.mark.plan(52, 74)
def test_upstream_without_starttls_gets_no_auth_and_no_mail(tmp_path: Path, make_relay,
                                                            make_upstream, ca_file: Path) -> None:
    """tls: starttls never falls back to clear text: no AUTH, no MAIL, entry deferred."""
    upstream = make_upstream(offer_starttls=False)
    relay = make_relay(relay_config(tmp_path, upstream, ca_file))
    entry_id = relay.send("app@example.com", ["user@example.com"], BODY)
    wait_for(lambda: state_of_if_any(relay, entry_id).get("last_error"), what="a deferral")
    assert "STARTTLS" in state_of(relay, entry_id)["last_error"]
    assert upstream.auth_attempts == 0 and upstream.mail_commands == 0
    assert relay.files("failed") == []


@pytest.mark.plan(54)
def test_untrusted_certificate_gets_no_auth(tmp_path: Path, make_relay, upstream: Upstream) -> None:
    """A certificate from a CA the relay does not trust ends the session before AUTH."""
    config = relay_config(tmp_path, upstream, None)
    del config["upstream"]["ca_file"]
    relay = make_relay(config)
    entry_id = relay.send("app@example.com", ["user@example.com"], BODY)
    wait_for(lambda: state_of_if_any(relay, entry_id).get("last_error"), what="a deferral")
    assert "certificate" in state_of(relay, entry_id)["last_error"].lower()
    assert upstream.auth_attempts == 0 and upstream.mail_commands == 0


@pytest.mark.plan(71)
def test_entry_expires_after_max_age(tmp_path: Path, make_relay, upstream: Upstream,
                                     ca_file: Path) -> None:
    """Still undelivered after max_age: failed, with the last upstream reply kept."""
    upstream.data_replies = ["451 4.3.0 Still busy"] * 100
    relay = make_relay(relay_config(tmp_path, upstream, ca_file,
                                    delivery={"max_age": "1s", "retry_min": "100ms",
                                              "retry_max": "300ms"}))
    entry_id = relay.send("app@example.com", ["user@example.com"], BODY)
    wait_for(lambda: relay.files("failed"), what="expiry")
    state = state_of(relay, entry_id)
    assert state["recipients"][0]["status"] == "failed"
    assert "expired after" in state["last_error"] and "451 4.3.0 Still busy" in state["last_error"]
    wait_for(lambda: f"{entry_id}: status=failed" in relay.log(), what="the failure logged")


@pytest.mark.plan(71)
def test_max_attempts_fails_the_entry(tmp_path: Path, make_relay, upstream: Upstream,
                                      ca_file: Path) -> None:
    """delivery.max_attempts caps the attempts, then the entry is failed."""
    upstream.data_replies = ["451 4.3.0 Still busy"] * 100
    relay = make_relay(relay_config(tmp_path, upstream, ca_file,
                                    delivery={"max_attempts": 2, "retry_min": "50ms"}))
    entry_id = relay.send("app@example.com", ["user@example.com"], BODY)
    wait_for(lambda: relay.files("failed"), what="failure")
    assert len(state_of(relay, entry_id)["attempts"]) == 2


def test_no_upstream_keeps_mail_until_one_is_configured(tmp_path: Path, make_relay,
                                                        upstream: Upstream, ca_file: Path) -> None:
    """Built-in defaults hold mail as deferred ('no upstream configured'); it flows later."""
    relay = make_relay(relay_config(tmp_path, None, None))
    entry_id = relay.send("app@example.com", ["user@example.com"], BODY)
    wait_for(lambda: relay.files("deferred") == [entry_id], what="deferral")
    assert state_of(relay, entry_id)["last_error"] == "no upstream configured"
    assert state_of(relay, entry_id)["attempts"] == []
    assert relay.stop() == 0
    make_relay(relay_config(tmp_path, upstream, ca_file))
    wait_for(lambda: upstream.delivered_to("user@example.com"), what="delivery")


@pytest.mark.plan(70)
def test_sessions_are_reused_one_login_per_worker(relay: RelayProcess,
                                                  upstream: Upstream) -> None:
    """Twenty messages travel over at most `connections` sessions, each logged in once."""
    for n in range(20):
        relay.send("app@example.com", [f"user{n}@example.com"], BODY)
    wait_for(lambda: len(upstream.messages()) == 20, what="twenty deliveries")
    workers = relay.config["upstream"]["connections"]
    assert upstream.connections <= workers and upstream.auth_attempts <= workers


def test_a_session_fresh_from_a_delivery_sends_the_next_mail_without_rset(
        make_relay, tmp_path: Path, upstream: Upstream, ca_file: Path) -> None:
    """Back-to-back messages on one worker share one session and no RSET: the final dot's
    250 already left the upstream in its initial state (RFC 5321 4.1.1.4)."""
    relay = make_relay(relay_config(tmp_path, upstream, ca_file,
                                    upstream={"connections": 1}))
    for n in range(5):
        relay.send("app@example.com", [f"user{n}@example.com"], BODY)
        wait_for(lambda n=n: upstream.delivered_to(f"user{n}@example.com"), what="delivery")
    assert upstream.connections == 1 and upstream.rset_commands == 0


def test_a_pipelining_upstream_gets_mail_rcpt_and_data_in_one_write(
        relay: RelayProcess, upstream: Upstream) -> None:
    """RFC 2920: with PIPELINING offered, the envelope and DATA go out together (one round
    trip), the message after the 354 (a second one)."""
    relay.send("app@example.com", ["one@example.com", "two@example.com"], BODY)
    wait_for(lambda: upstream.delivered_to("two@example.com"), what="the delivery")
    assert upstream.command_reads == [(b"MAIL FROM:<app@example.com>\r\n"
                                       b"RCPT TO:<one@example.com>\r\n"
                                       b"RCPT TO:<two@example.com>\r\nDATA\r\n")]


def test_an_upstream_without_pipelining_hears_one_command_at_a_time(
        make_relay, make_upstream, tmp_path: Path, ca_file: Path) -> None:
    """Without PIPELINING, each command waits for the reply to the one before."""
    upstream = make_upstream(pipelining=False)
    relay = make_relay(relay_config(tmp_path, upstream, ca_file))
    relay.send("app@example.com", ["one@example.com", "two@example.com"], BODY)
    [got] = wait_for(lambda: upstream.delivered_to("two@example.com"), what="the delivery")
    assert got.recipients == ("one@example.com", "two@example.com")
    assert upstream.command_reads == [b"MAIL FROM:<app@example.com>\r\n"]


@pytest.mark.plan(60)
def test_data_accepted_after_every_rcpt_refused_gets_an_empty_message(
        relay: RelayProcess, upstream: Upstream) -> None:
    """A pipelined DATA that the server takes although it refused every recipient gets
    only the final dot (RFC 2920 3.1): the content is never sent, the entry fails."""
    upstream.data_without_recipients = True
    entry_id = relay.send("app@example.com", ["reject@example.com"], BODY)
    wait_for(lambda: entry_id in relay.files("failed"), what="the failure")
    assert upstream.data_seen == [b""]
    assert upstream.messages() == []


@pytest.mark.parametrize("tls", ["none", "starttls"])
def test_an_upstream_without_auth_is_greeted_before_mail(
        make_relay, make_upstream, tmp_path: Path, ca_file: Path, tls: str) -> None:
    """No AUTH configured (an open relay on the provider's side, or a local smarthost),
    in clear or after STARTTLS: EHLO goes before the first MAIL, and the mail is sent."""
    upstream = make_upstream(require_auth=False, offer_starttls=tls == "starttls")
    config = relay_config(tmp_path, upstream, ca_file, upstream={"tls": tls})
    del config["upstream"]["username"], config["upstream"]["password_env"]
    relay = make_relay(config)
    relay.send("app@example.com", ["user@example.com"], BODY)
    [got] = wait_for(lambda: upstream.delivered_to("user@example.com"), what="the delivery")
    assert got.tls is (tls == "starttls") and not got.authenticated


def test_a_session_lost_before_mail_costs_no_attempt(make_relay, tmp_path: Path,
                                                    upstream: Upstream, ca_file: Path) -> None:
    """Reused without RSET, the session turns out dead at MAIL: nothing of the message was
    sent, so it goes out at once on a new session, as its first attempt."""
    relay = make_relay(relay_config(tmp_path, upstream, ca_file,
                                    upstream={"connections": 1}))
    relay.send("app@example.com", ["first@example.com"], BODY)
    wait_for(lambda: upstream.delivered_to("first@example.com"), what="the first message")
    upstream.abort_next_mail = True
    second = relay.send("app@example.com", ["second@example.com"], BODY)
    wait_for(lambda: upstream.delivered_to("second@example.com"), what="the second message")
    assert upstream.connections == 2
    wait_for(lambda: f"{second}: to=<second@example.com>" in relay.log(), what="its log line")
    [line] = [line for line in relay.lines if f"{second}: to=" in line]
    assert "attempt=1, status=sent" in line


@pytest.mark.plan(78)
def test_sigterm_exits_zero_and_keeps_undelivered_mail(tmp_path: Path, make_relay,
                                                       upstream: Upstream, ca_file: Path) -> None:
    """SIGTERM drains and exits 0; what could not be delivered stays in the spool."""
    upstream.stop()
    relay = make_relay(relay_config(tmp_path, upstream, ca_file))
    entry_id = relay.send("app@example.com", ["user@example.com"], BODY)
    assert relay.stop() == 0
    assert entry_id in relay.files("deferred") + relay.files("incoming")
    try:
        relay.client()
        raise AssertionError("the listener still accepts connections")
    except (ConnectionRefusedError, smtplib.SMTPConnectError):
        pass


def test_implicit_tls_upstream_on_its_own_port(tmp_path: Path, make_relay, make_upstream,
                                               ca_file: Path) -> None:
    """tls: implicit (port 465 style) delivers over TLS from the first byte, with AUTH."""
    upstream = make_upstream(implicit_tls=True)
    config = relay_config(tmp_path, upstream, ca_file)
    config["upstream"]["tls"] = "implicit"
    relay = make_relay(config)
    relay.send("app@example.com", ["user@example.com"], BODY)
    [got] = wait_for(lambda: upstream.delivered_to("user@example.com"), what="delivery")
    assert got.tls and got.authenticated


@pytest.mark.plan(92, 93)
def test_password_never_appears_in_logs_queue_output_or_spool(relay: RelayProcess,
                                                              upstream: Upstream) -> None:
    """At log level debug, after AUTH and a deferral: neither the password nor its AUTH
    encodings are in the log, in `relay queue show`, or in any spool file."""
    delivered = relay.send("app@example.com", ["user@example.com"], BODY)
    kept = relay.send("app@example.com", ["tempfail@example.com"], BODY)
    wait_for(lambda: f"{delivered}: status=removed" in relay.log(), what="delivery logged")
    wait_for(lambda: kept in relay.files("deferred"), what="the deferral")
    assert upstream.auth_attempts >= 1
    assert relay.config["log"]["level"] == "debug"
    shown = relay.cli("queue", "show", kept).stdout + relay.cli("queue", "--json").stdout
    spooled = b"".join(p.read_bytes() for p in relay.spool.rglob("*") if p.is_file())
    for secret in secret_forms():
        assert secret.decode() not in relay.log()
        assert secret.decode() not in shown
        assert secret not in spooled


def test_json_log_format_has_the_same_fields(tmp_path: Path, make_relay, upstream: Upstream,
                                             ca_file: Path) -> None:
    """log.format json: one JSON object per line with queue_id, to, relay, status, reply."""
    relay = make_relay(relay_config(tmp_path, upstream, ca_file, log={"format": "json"}))
    entry_id = relay.send("app@example.com", ["user@example.com"], BODY)

    def sent_event() -> dict | None:
        for line in relay.lines:
            event = json.loads(line)
            if event.get("queue_id") == entry_id and event.get("status") == "sent":
                return event
        return None
    event = wait_for(sent_event, what="the sent event")
    assert event["to"] == "user@example.com"
    assert event["relay"] == f"127.0.0.1:{upstream.port}"
    assert event["reply"].startswith("250 ")
    assert event["attempt"] == 1


@pytest.mark.plan(58)
def test_mail_from_refused_temporarily_defers_and_permanently_fails(
        tmp_path: Path, make_relay, upstream: Upstream, ca_file: Path) -> None:
    """Plan #58: 451 to MAIL FROM defers; 553 to MAIL FROM fails every recipient."""
    upstream.mail_reply = "451 4.3.0 Sender check unavailable"
    relay = make_relay(relay_config(tmp_path, upstream, ca_file,
                                    delivery={"retry_min": "1h", "retry_max": "2h"}))
    deferred = relay.send("app@example.com", ["user@example.com"], BODY)
    # The state record is written before the entry moves: wait for both.
    wait_for(lambda: relay.files("deferred") == [deferred]
             and state_of_if_any(relay, deferred).get("last_error"), what="deferral")
    upstream.mail_reply = "553 5.1.8 Sender domain rejected"
    failed = relay.send("app@example.com", ["a@example.com", "b@example.com"], BODY)
    wait_for(lambda: relay.files("failed") == [failed], what="failure")
    assert {r["reply"] for r in state_of(relay, failed)["recipients"]} == {
        "553 5.1.8 Sender domain rejected"}


@pytest.mark.plan(19)
def test_bare_line_feeds_reach_the_upstream_as_crlf(relay: RelayProcess,
                                                    upstream: Upstream) -> None:
    """Plan #19: a body with bare LF and bare CR is relayed with CRLF line endings only."""
    relay.send("app@example.com", ["user@example.com"],
               b"Subject: bare\r\nMessage-ID: <bare@example.com>\r\n\r\none\ntwo\rthree\r\n")
    [got] = wait_for(lambda: upstream.delivered_to("user@example.com"), what="delivery")
    body = strip_received(got.data)[1]
    assert body == b"Subject: bare\r\nMessage-ID: <bare@example.com>\r\n\r\none\r\ntwo\r\nthree\r\n"


@pytest.mark.plan(94)
def test_message_content_never_reaches_the_log(relay: RelayProcess, upstream: Upstream) -> None:
    """Plan #94: even at log level debug, no line of a message body is logged."""
    token = "body-token-5f1c0a"
    entry_id = relay.send("app@example.com", ["user@example.com"],
                          f"Subject: private\r\n\r\n{token}\r\n".encode())
    wait_for(lambda: f"{entry_id}: status=removed" in relay.log(), what="delivery")
    assert relay.config["log"]["level"] == "debug"
    assert token not in relay.log()
