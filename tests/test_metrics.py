"""/metrics: the figures a real `relay serve` exports after known traffic through the
test upstream, and the Recorder API the listener calls, on fresh registries."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import MakeRelay, RelayProcess, relay_config, wait_for
from metrics_text import Samples, number, promtool, promtool_lint, samples, value
from upstream import Upstream

from relay.entry import Entry, Queue, Recipient, Status
from relay.metrics import Metrics, Recorder, Refusal
from relay.outcome import AttemptResult, Reply, Stage
from relay.spool import Spool

BODY = b"Subject: metrics\r\nMessage-ID: <m@example.com>\r\n\r\nHello.\r\n"


def metrics_config(tmp_path: Path, upstream: Upstream, ca_file: Path,
                   **delivery: object) -> dict[str, Any]:
    """The test config with metrics on (an ephemeral port) and, by default, retries an hour
    away, so every figure stays put once the traffic has settled."""
    return relay_config(tmp_path, upstream, ca_file, metrics={"port": 0},
                        delivery={"retry_min": "1h", "retry_max": "1h", **delivery})


def scrape(relay: RelayProcess) -> Samples:
    status, text = relay.get("/metrics")
    assert status == 200, text
    return samples(text)


def test_figures_after_sent_deferred_and_failed_traffic(
        make_relay: MakeRelay, upstream: Upstream, ca_file: Path, tmp_path: Path) -> None:
    """Two recipients sent, one refused (550), one deferred (451): every delivery-side and
    queue figure is exact, and the process metrics are there."""
    relay = make_relay(metrics_config(tmp_path, upstream, ca_file))
    sent_at = time.time()
    relay.send("app@example.com", ["one@example.com", "two@example.com"], BODY)
    failed_id = relay.send("app@example.com", ["reject@example.com"], BODY)
    deferred_id = relay.send("app@example.com", ["tempfail@example.com"], BODY)
    name = f"127.0.0.1:{upstream.port}"
    found = wait_for(lambda: (s := scrape(relay)) and value(
        s, "relay_deliveries_total", upstream=name, outcome="deferred") == 1
        and value(s, "relay_deliveries_total", upstream=name, outcome="sent") == 2
        and value(s, "relay_deliveries_total", upstream=name, outcome="failed") == 1 and s,
        what="three messages settled")
    assert relay.files("failed") == [failed_id] and relay.files("deferred") == [deferred_id]
    assert value(found, "relay_deliveries_total", upstream=name, outcome="expired") == 0
    assert value(found, "relay_delivery_delay_seconds_count") == 2
    assert 0 < number(found, "relay_delivery_delay_seconds_sum") < 2 * (time.time() - sent_at)
    assert value(found, "relay_upstream_up", upstream=name) == 1
    assert value(found, "relay_upstream_paused", upstream=name) == 0
    assert value(found, "relay_upstream_errors_total", upstream=name, stage="rcpt") == 2
    assert value(found, "relay_upstream_errors_total", upstream=name, stage="session") is None
    for state, count in (("queued", 0), ("active", 0), ("deferred", 1), ("held", 0),
                         ("failed", 1)):
        assert value(found, "relay_queue_messages", state=state) == count, state
    age = value(found, "relay_queue_oldest_age_seconds")
    assert age is not None and 0 < age <= time.time() - sent_at
    disk = os.statvfs(relay.spool)
    free = value(found, "relay_spool_free_bytes")
    assert free is not None and abs(free - disk.f_bavail * disk.f_frsize) < 64 * 1024 * 1024
    assert value(found, "relay_bounces_total", outcome="queued") == 0
    assert number(found, "process_resident_memory_bytes") > 0
    assert number(found, "process_start_time_seconds") <= time.time()


def test_listener_figures_after_accepted_and_refused_traffic(
        make_relay: MakeRelay, upstream: Upstream, ca_file: Path, tmp_path: Path) -> None:
    """Two messages accepted and one refused for its address: received, accept_seconds and
    refused{reason="address"} count them."""
    relay = make_relay(metrics_config(tmp_path, upstream, ca_file))
    relay.send("app@example.com", ["one@example.com"], BODY)
    relay.send("app@example.com", ["two@example.com"], BODY)
    with relay.client() as smtp:
        smtp.ehlo()
        code, _ = smtp.mail("a..b@example.com")
    assert code == 553
    found = scrape(relay)
    assert value(found, "relay_messages_received_total") == 2
    assert value(found, "relay_accept_seconds_count") == 2
    assert value(found, "relay_messages_refused_total", reason="address") == 1


def test_expired_recipient_counts_as_expired(make_relay: MakeRelay, upstream: Upstream,
        ca_file: Path, tmp_path: Path) -> None:
    """delivery.max_attempts 1 and a 451: the recipient is expired, not failed."""
    relay = make_relay(metrics_config(tmp_path, upstream, ca_file, max_attempts=1))
    relay.send("app@example.com", ["tempfail@example.com"], BODY)
    name = f"127.0.0.1:{upstream.port}"
    found = wait_for(lambda: (s := scrape(relay)) and value(
        s, "relay_deliveries_total", upstream=name, outcome="expired") == 1 and s,
        what="the expiry")
    assert value(found, "relay_deliveries_total", upstream=name, outcome="failed") == 0
    assert value(found, "relay_deliveries_total", upstream=name, outcome="deferred") == 0
    assert value(found, "relay_queue_messages", state="failed") == 1
    assert value(found, "relay_queue_oldest_age_seconds") == 0


def test_unreachable_upstream_is_down(make_relay: MakeRelay, upstream: Upstream,
        ca_file: Path, tmp_path: Path) -> None:
    """A refused connection: relay_upstream_up 0, a session error, the message deferred."""
    upstream.stop()
    relay = make_relay(metrics_config(tmp_path, upstream, ca_file))
    relay.send("app@example.com", ["user@example.com"], BODY)
    name = f"127.0.0.1:{upstream.port}"
    found = wait_for(lambda: (s := scrape(relay)) and value(
        s, "relay_upstream_up", upstream=name) == 0 and s, what="the upstream down")
    assert value(found, "relay_upstream_errors_total", upstream=name, stage="connect") == 1
    assert value(found, "relay_deliveries_total", upstream=name, outcome="deferred") == 1


def test_rejected_credentials_pause_the_upstream(make_relay: MakeRelay, upstream: Upstream,
                                                 ca_file: Path, tmp_path: Path) -> None:
    """535 to AUTH: relay_upstream_paused 1 and an auth error; the upstream answered, so up."""
    upstream.auth_reply = "535 5.7.8 Authentication credentials invalid"
    relay = make_relay(metrics_config(tmp_path, upstream, ca_file))
    relay.send("app@example.com", ["user@example.com"], BODY)
    name = f"127.0.0.1:{upstream.port}"
    found = wait_for(lambda: (s := scrape(relay)) and value(
        s, "relay_upstream_paused", upstream=name) == 1 and s, what="the pause")
    assert value(found, "relay_upstream_errors_total", upstream=name, stage="auth") == 1
    assert value(found, "relay_upstream_up", upstream=name) == 1


@pytest.mark.skipif(promtool() is None, reason="promtool (Debian package prometheus) missing")
def test_exposition_passes_promtool_check_metrics(make_relay: MakeRelay, upstream: Upstream,
                                                  ca_file: Path, tmp_path: Path) -> None:
    """The served text follows Prometheus's format and naming rules (promtool's linter)."""
    relay = make_relay(metrics_config(tmp_path, upstream, ca_file))
    relay.send("app@example.com", ["user@example.com"], BODY)
    status, text = relay.get("/metrics")
    assert status == 200
    result = promtool_lint(text)
    assert result.returncode == 0, result.stdout + result.stderr


# --- the Recorder API, in process -------------------------------------------------------

def fresh(spool: Spool, now: float = 1000.0) -> Metrics:
    return Metrics(spool, clock=lambda: now)


def exported(metrics: Metrics) -> Samples:
    body, content_type = metrics.exposition()
    assert content_type.startswith("text/plain")
    return samples(body.decode())


def test_accepted_counts_the_message_and_its_seconds(spool: Spool) -> None:
    """accepted(0.003): one message received, in the 5 ms bucket and not the 2 ms one."""
    metrics = fresh(spool)
    metrics.accepted(0.003)
    found = exported(metrics)
    assert value(found, "relay_messages_received_total") == 1
    assert value(found, "relay_accept_seconds_bucket", le="0.002") == 0
    assert value(found, "relay_accept_seconds_bucket", le="0.005") == 1
    assert value(found, "relay_accept_seconds_sum") == pytest.approx(0.003)


def test_refused_counts_by_reason(spool: Spool) -> None:
    """Every Refusal is served from the start; refused(SIZE) twice counts 2 there only."""
    metrics = fresh(spool)
    metrics.refused(Refusal.SIZE)
    metrics.refused(Refusal.SIZE)
    found = exported(metrics)
    for reason in Refusal:
        expected = 2 if reason is Refusal.SIZE else 0
        assert value(found, "relay_messages_refused_total", reason=reason.value) == expected


def test_each_registry_is_its_own(spool: Spool) -> None:
    """Two Metrics never share a count: tests and a reload can make fresh ones."""
    first, second = fresh(spool), fresh(spool)
    first.accepted(0.001)
    assert value(exported(second), "relay_messages_received_total") == 0


def test_a_new_upstream_drops_the_old_ones_gauges(spool: Spool) -> None:
    """After a reload to another upstream, the old one's up and paused are no longer served
    (an old provider must not stay down in an alert); its counters stay."""
    metrics = fresh(spool)
    metrics.upstreams(["old.example:587"])
    entry = Entry(id="0000000000001DEADBEEF", queue=Queue.ACTIVE, sender="a@example.com",
                  recipients=(Recipient("b@example.com"),), arrived=999.0, size=1)
    result = AttemptResult(relay="old.example:587", error=Reply(None, "connection refused"))
    metrics.answered("old.example:587", result)
    metrics.attempted("old.example:587", entry, entry, 1000.0)
    assert value(exported(metrics), "relay_upstream_up", upstream="old.example:587") == 0
    metrics.upstreams(["new.example:587"])
    found = exported(metrics)
    assert value(found, "relay_upstream_up", upstream="old.example:587") is None
    assert value(found, "relay_upstream_paused", upstream="old.example:587") is None
    assert value(found, "relay_upstream_paused", upstream="new.example:587") == 0
    assert value(found, "relay_deliveries_total", upstream="old.example:587",
                 outcome="deferred") == 1


def test_queue_gauges_come_from_the_spool_at_scrape_time(spool: Spool) -> None:
    """Entries stored and moved without any metrics call are counted when scraped, and the
    oldest waiting one's age is taken from its queue ID."""
    spool.store("0000000000100DEADBEEF", "a@example.com", ["b@example.com"], [b"x\r\n"],
                0.0001, False)
    spool.store("0000000000200DEADBEEF", "a@example.com", ["b@example.com"], [b"x\r\n"],
                0.0002, False)
    spool.move("0000000000100DEADBEEF", (Queue.INCOMING,), Queue.HOLD)
    found = exported(fresh(spool, now=10.0))
    assert value(found, "relay_queue_messages", state="queued") == 1
    assert value(found, "relay_queue_messages", state="held") == 1
    assert value(found, "relay_queue_oldest_age_seconds") == pytest.approx(10.0 - 0.000512)


def test_recorder_records_nothing_and_costs_no_registry() -> None:
    """Metrics off: every call is accepted and does nothing."""
    recorder = Recorder()
    recorder.accepted(0.1)
    recorder.refused(Refusal.DISK)
    recorder.paused("up:25", True)
    assert not hasattr(recorder, "registry")


def test_recipient_refused_at_rcpt_and_sent_one_count_apart(spool: Spool) -> None:
    """One attempt, one recipient sent and one refused 550: sent 1, failed 1, one rcpt
    error, one delay observed from arrival."""
    metrics = fresh(spool)
    before = Entry(id="0000000000001DEADBEEF", queue=Queue.ACTIVE, sender="a@example.com",
                   recipients=(Recipient("ok@example.com"), Recipient("no@example.com")),
                   arrived=990.0, size=1)
    after = Entry(id=before.id, queue=Queue.FAILED, sender=before.sender, arrived=990.0,
                  size=1, recipients=(Recipient("ok@example.com", Status.SENT, "250 ok"),
                                      Recipient("no@example.com", Status.FAILED, "550 no")))
    result = AttemptResult(relay="up:25", recipients={"ok@example.com": Reply(250, "ok"),
                                                      "no@example.com": Reply(550, "no")},
                           stage=Stage.SESSION)
    metrics.answered("up:25", result)
    metrics.attempted("up:25", before, after, 1000.0)
    found = exported(metrics)
    assert value(found, "relay_deliveries_total", upstream="up:25", outcome="sent") == 1
    assert value(found, "relay_deliveries_total", upstream="up:25", outcome="failed") == 1
    assert value(found, "relay_upstream_errors_total", upstream="up:25", stage="rcpt") == 1
    assert value(found, "relay_delivery_delay_seconds_sum") == pytest.approx(10.0)
    assert value(found, "relay_upstream_up", upstream="up:25") == 1
