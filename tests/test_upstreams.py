"""Several upstreams through a running relay: failover and back, a route per sender domain
with its own credentials, rates, a provider's rate limiting, and Mailgun's HTTP API
against a local HTTPS stand-in; what `relay queue` and the log say of them."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import RelayProcess, holds_for, relay_config, wait_for
from mailgun import DOMAIN, MailgunStandIn
from metrics_text import samples, value
from upstream import Upstream

BODY = b"Subject: several\r\nMessage-ID: <several@example.com>\r\n\r\nhello\r\n"
OTHER_PASSWORD = "An0ther-Domain-Secret"
OTHER_ENV = "RELAY_TEST_OTHER_PASSWORD"


def smtp_entry(config: dict[str, Any], upstream: Upstream, name: str,
               **keys: Any) -> dict[str, Any]:
    """An `upstreams:` entry like relay_config's single upstream, for `upstream`."""
    return {**config["upstream"], "port": upstream.port, "name": name, **keys}


def config_with(tmp_path: Path, ca_file: Path, upstreams: list[Upstream],
                extra: list[dict[str, Any]] | None = None, **overrides: Any) -> dict[str, Any]:
    config = relay_config(tmp_path, upstreams[0], ca_file, **overrides)
    config["upstreams"] = [smtp_entry(config, u, f"up{n}") for n, u in enumerate(upstreams)]
    config["upstreams"] += extra or []
    del config["upstream"]
    return config


def attempts(relay: RelayProcess, entry_id: str) -> list[dict[str, Any]]:
    shown = relay.cli("queue", "show", entry_id, "--json")
    return json.loads(shown.stdout)["attempt_history"] if shown.returncode == 0 else []


def test_a_down_upstream_fails_over_to_the_next_and_is_used_again_once_back(
        tmp_path: Path, make_relay: Any, make_upstream: Any, ca_file: Path) -> None:
    """The first upstream stopped: the second delivers at once, `relay queue` shows the
    first down; the first back, its probe succeeds and it takes the mail again."""
    first, second = make_upstream(), make_upstream()
    first.stop()
    relay = make_relay(config_with(tmp_path, ca_file, [first, second]))
    relay.send("app@example.com", ["one@example.com"], BODY)
    [got] = wait_for(lambda: second.delivered_to("one@example.com"), what="failover")
    assert got.authenticated and got.tls
    listing = relay.cli("queue").stdout
    assert "-- upstream up0: down for " in listing and "-- upstream up1: up" in listing
    checked = relay.cli("check")
    assert checked.returncode == 69  # up0 is still unreachable
    assert "relay     sees    down for " in checked.stdout
    assert "relay     sees    up" in checked.stdout
    assert f"relay=up0[127.0.0.1]:{first.port}" in relay.log()
    first.start()
    for n in range(40):  # each message a chance for the probe, once up0's backoff is over
        relay.send("app@example.com", [f"back{n}@example.com"], BODY)
        if wait_for(lambda n=n: first.messages() or len(second.messages()) > n + 1,
                    what="a delivery") and first.messages():
            break
    assert first.messages(), "the first upstream was never used again"
    assert "-- upstream up0: up" in relay.cli("queue").stdout


@pytest.mark.parametrize(("fault", "reply"), [
    ("auth_reply", "535 5.7.8 Error: authentication failed"),
    ("starttls_reply", "454 4.7.0 TLS not available due to local problem"),
])
def test_rejected_credentials_or_a_failed_tls_fail_over_to_the_next_upstream(
        tmp_path: Path, make_relay: Any, make_upstream: Any, ca_file: Path, fault: str,
        reply: str) -> None:
    """The first upstream answers but will not take mail (AUTH refused, or no TLS where
    TLS is configured): the second delivers at once, and the first got no transaction."""
    first, second = make_upstream(), make_upstream()
    setattr(first, fault, reply)
    relay = make_relay(config_with(tmp_path, ca_file, [first, second]))
    relay.send("app@example.com", ["one@example.com"], BODY)
    [got] = wait_for(lambda: second.delivered_to("one@example.com"), what="failover")
    assert got.authenticated and got.tls
    assert first.messages() == [] and first.mail_commands == 0
    wait_for(lambda: "status=failover" in relay.log(), what="the failover logged")
    assert reply in relay.log()


def test_a_failed_over_upstream_shows_in_the_metrics_the_queue_and_the_history(
        tmp_path: Path, make_relay: Any, make_upstream: Any, ca_file: Path) -> None:
    """The first upstream stopped, the second takes the messages: /metrics says the first
    is down with a connect error (so the upstream-down alert can fire) and the second up,
    `relay queue show` names each upstream an attempt went to, and the history the one
    that delivered."""
    first, second = make_upstream(), make_upstream()
    first.stop()
    relay = make_relay(config_with(tmp_path, ca_file, [first, second], metrics={"port": 0},
                                   delivery={"retry_min": "1h", "retry_max": "2h"}))
    deferred = relay.send("app@example.com", ["tempfail@example.com"], BODY)
    tried = wait_for(lambda: len(shown := attempts(relay, deferred)) == 2 and shown,
                     what="the failover and the deferral")
    assert [a["relay"] for a in tried] == [f"up0[127.0.0.1]:{first.port}",
                                           f"up1[127.0.0.1]:{second.port}"]
    sent = relay.send("app@example.com", ["one@example.com"], BODY)
    found = wait_for(lambda: (s := samples(relay.get("/metrics")[1])) and value(
        s, "relay_deliveries_total", upstream="up1", outcome="sent") == 1 and s,
        what="the delivery counted")
    assert value(found, "relay_upstream_up", upstream="up0") == 0
    assert value(found, "relay_upstream_errors_total", upstream="up0", stage="connect") == 1
    assert value(found, "relay_upstream_up", upstream="up1") == 1
    assert value(found, "relay_deliveries_total", upstream="up1", outcome="deferred") == 1
    history = wait_for(lambda: json.loads(relay.cli("history", "--json").stdout or "[]"),
                       what="the history record")
    assert [(r["id"], r["relay"]) for r in history] == [
        (sent, f"up1[127.0.0.1]:{second.port}")]


def test_each_sender_domain_goes_to_its_own_upstream_with_its_own_login(
        tmp_path: Path, make_relay: Any, make_upstream: Any, ca_file: Path) -> None:
    """Two upstreams, each for one sending domain and with its own password: a message
    goes to the one of its sender's domain, logged in with that one's credentials."""
    first, second = make_upstream(), make_upstream()
    second.password = OTHER_PASSWORD
    config = relay_config(tmp_path, first, ca_file)
    config["upstreams"] = [
        smtp_entry(config, first, "one", sender_domains=["one.example"]),
        smtp_entry(config, second, "two", sender_domains=["two.example"],
                   password_env=OTHER_ENV)]
    del config["upstream"]
    relay = make_relay(config, env={OTHER_ENV: OTHER_PASSWORD})
    relay.send("app@one.example", ["a@example.com"], BODY)
    relay.send("app@two.example", ["b@example.com"], BODY)
    wait_for(lambda: first.delivered_to("a@example.com") and second.delivered_to("b@example.com"),
             what="both delivered")
    assert not first.delivered_to("b@example.com") and not second.delivered_to("a@example.com")
    assert first.auth_attempts >= 1 and second.auth_attempts >= 1


def test_a_rate_spaces_the_messages_out(tmp_path: Path, make_relay: Any, upstream: Upstream,
                                        ca_file: Path) -> None:
    """`rate: 5/s`: eight messages reach the upstream a fifth of a second apart, none in
    a burst (the bench times a hundred)."""
    config = config_with(tmp_path, ca_file, [upstream])
    config["upstreams"][0]["rate"] = "5/s"
    relay = make_relay(config)
    for n in range(8):
        relay.send("app@example.com", [f"r{n}@example.com"], BODY)
    wait_for(lambda: len(upstream.messages()) == 8, what="all eight")
    times = sorted(t.at for t in upstream.messages())
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) > 0.15, gaps


def test_a_rate_of_messages_per_hour_puts_the_rest_back_waiting_for_their_turn(
        tmp_path: Path, make_relay: Any, upstream: Upstream, ca_file: Path) -> None:
    """`rate: 2/h`: the first goes, the others wait in the queue with no attempt counted,
    and `relay queue` says they wait for the rate."""
    config = config_with(tmp_path, ca_file, [upstream])
    config["upstreams"][0]["rate"] = "2/h"
    relay = make_relay(config)
    ids = [relay.send("app@example.com", [f"r{n}@example.com"], BODY) for n in range(3)]
    wait_for(lambda: len(relay.files("deferred")) == 2, what="two put back")
    assert len(upstream.messages()) == 1
    listing = json.loads(relay.cli("queue", "--json").stdout)
    for item in listing:
        assert item["attempts"] == 0 and item["last_error"] == "waiting for rate (up0)"
    assert sorted(item["id"] for item in listing) == sorted(
        i for i in ids if not upstream.delivered_to(f"r{ids.index(i)}@example.com"))


def test_a_providers_rate_limiting_puts_the_message_back_without_an_attempt(
        tmp_path: Path, make_relay: Any, upstream: Upstream, ca_file: Path) -> None:
    """451 4.7.0 to MAIL: back in the queue, no attempt counted, tried again after
    retry_min, and delivered."""
    upstream.mail_reply = "451 4.7.0 Rate limit exceeded, slow down"
    relay = make_relay(config_with(tmp_path, ca_file, [upstream],
                                   delivery={"retry_min": "1s", "retry_max": "2s"}))
    entry_id = relay.send("app@example.com", ["user@example.com"], BODY)
    wait_for(lambda: "4.7.0 Rate limit" in (relay.state(entry_id).get("last_error") or ""),
             what="the requeue")
    assert relay.state(entry_id)["attempts"] == []
    upstream.mail_reply = ""
    wait_for(lambda: upstream.delivered_to("user@example.com"), what="delivery after the pause")


# --- Mailgun's HTTP API -------------------------------------------------------------------

@pytest.fixture
def api_relay(tmp_path: Path, make_relay: Any, mailgun: MailgunStandIn,
              ca_file: Path) -> RelayProcess:
    # Refused credentials pause the upstream for retry_max: long enough that a test
    # watching for no request within 2 s cannot see the pause end.
    config = relay_config(tmp_path, None, None, delivery={"retry_min": "1s", "retry_max": "10s"})
    config["upstreams"] = [mailgun.upstream_entry(ca_file)]
    return make_relay(config)


def test_the_api_transport_posts_the_message_as_it_is_to_each_recipient(
        api_relay: RelayProcess, mailgun: MailgunStandIn) -> None:
    """messages.mime: a `to` field per recipient, the message stored by the relay byte
    for byte as the file; Mailgun's id kept in the reply."""
    entry_id = api_relay.send("app@example.com", ["a@example.com", "b@example.com"], BODY)
    [received] = wait_for(lambda: mailgun.received, what="the POST")
    assert received.domain == DOMAIN and received.to == ("a@example.com", "b@example.com")
    stored = received.message
    assert stored.endswith(BODY) and stored.startswith(b"Received: from ")
    wait_for(lambda: entry_id not in api_relay.queued(), what="removed once sent")
    assert "Queued. Thank you. <20261205120000.1@" in api_relay.log()


def test_an_api_key_refused_pauses_the_api_upstream(api_relay: RelayProcess,
                                                    mailgun: MailgunStandIn) -> None:
    """401: deferred, never failed, and no further request until a reload."""
    mailgun.script((401, "Forbidden"))
    api_relay.send("app@example.com", ["a@example.com"], BODY)
    wait_for(lambda: "status=paused" in api_relay.log(), what="the pause")
    requests = len(mailgun.requests)
    api_relay.send("app@example.com", ["b@example.com"], BODY)
    holds_for(lambda: len(mailgun.requests) == requests, 2.0, what="no further request")
    assert api_relay.files("failed") == []
    api_relay.reload(api_relay.config)
    wait_for(lambda: len(mailgun.received) == 2, what="both sent after the reload")


@pytest.mark.parametrize(("status", "counted"), [(429, False), (500, True)])
def test_api_rate_limiting_and_server_errors_are_retried(api_relay: RelayProcess,
                                                         mailgun: MailgunStandIn, status: int,
                                                         counted: bool) -> None:
    """429 puts the message back without an attempt; 500 is an attempt deferred; both
    are sent on the next try."""
    mailgun.script((status, {"message": "not now"}))
    entry_id = api_relay.send("app@example.com", ["a@example.com"], BODY)
    wait_for(lambda: api_relay.state(entry_id).get("last_error"), what="the deferral")
    assert (len(api_relay.state(entry_id)["attempts"]) == 1) is counted
    wait_for(lambda: mailgun.received, what="sent on the next try")


@pytest.mark.parametrize("status", [401, 503])
def test_an_api_that_refuses_the_key_or_fails_fails_over_to_the_next_upstream(
        tmp_path: Path, make_relay: Any, mailgun: MailgunStandIn, upstream: Upstream,
        ca_file: Path, status: int) -> None:
    """The API first in the route answers 401 (key refused) or 503: the SMTP upstream
    after it delivers the message at once, and the API got one request."""
    config = relay_config(tmp_path, upstream, ca_file)
    config["upstreams"] = [mailgun.upstream_entry(ca_file),
                           smtp_entry(config, upstream, "smtp-after")]
    del config["upstream"]
    relay = make_relay(config)
    mailgun.script((status, {"message": "no"}))
    relay.send("app@example.com", ["a@example.com"], BODY)
    wait_for(lambda: upstream.delivered_to("a@example.com"), what="failover to SMTP")
    assert len(mailgun.requests) == 1 and mailgun.received == []
    wait_for(lambda: "status=failover" in relay.log(), what="the failover logged")


def test_a_slow_api_times_out_and_is_retried(tmp_path: Path, make_relay: Any,
                                             mailgun: MailgunStandIn, ca_file: Path) -> None:
    """No answer within the upstream's timeout: deferred (it may have arrived: the retry
    is correct but may duplicate), then sent."""
    config = relay_config(tmp_path, None, None, delivery={"retry_min": "1s", "retry_max": "2s"})
    config["upstreams"] = [mailgun.upstream_entry(ca_file, timeout="1s")]
    relay = make_relay(config)
    mailgun.delay = 3.0
    entry_id = relay.send("app@example.com", ["a@example.com"], BODY)
    wait_for(lambda: "timed out" in (relay.state(entry_id).get("last_error") or ""),
             what="the timeout")
    mailgun.delay = 0.0
    wait_for(lambda: entry_id not in relay.queued(), what="sent on a later try")
